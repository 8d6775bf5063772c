"""ft_cluster_info and ft_drill driven against a FAKE lockstepd (a stub Unix-socket server)."""

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.ft.lockstep.plugins.modules import ft_cluster_info, ft_drill
from ansible_collections.ft.lockstep.tests.unit.plugins.fake_lockstepd import FakeLockstepd, pair


@pytest.fixture
def engine(tmp_path):
    with FakeLockstepd(tmp_path / "fake.sock", [pair("db1", "need_secondary")]) as fake:
        yield fake


def run(main, args, capsys) -> dict:
    with patch_module_args(args), pytest.raises(SystemExit):
        main()
    return json.loads(capsys.readouterr().out)


def test_ft_cluster_info_returns_the_status_under_one_key_and_keeps_the_documented_keys(engine, capsys):
    engine.status_extra = {"msg": "a key a newer daemon might add", "changed": True}
    result = run(ft_cluster_info.main, {"socket": engine.path}, capsys)
    assert not result.get("failed") and result["changed"] is False, result
    assert result["cluster"]["msg"] == "a key a newer daemon might add"
    assert "msg" not in result  # the daemon's other keys never reach the top level
    assert result["pairs"] == result["cluster"]["pairs"] and result["pairs"][0]["name"] == "db1"
    red = {"vm": "db1", "level": "red", "state": "need_secondary", "reason": "user_action"}
    assert result["alarms"] == [red]


def test_ft_drill_on_a_pair_that_is_not_running_is_refused_and_kills_nothing(engine, capsys):
    for check in (True, False):
        args = {"socket": engine.path, "name": "db1", "action": "test_failover", "_ansible_check_mode": check}
        result = run(ft_drill.main, args, capsys)
        assert result["failed"], result
        assert "test_failover needs a running pair; db1 is need_secondary" in result["msg"]
    assert engine.mutations() == []


def test_ft_drill_waits_for_the_pair_to_run_again_in_a_new_generation(engine, capsys):
    engine.vms["db1"] = pair("db1", "running", primary="h1", secondary_host="h2")
    result = run(ft_drill.main, {"socket": engine.path, "name": "db1", "action": "test_failover"}, capsys)
    assert result["changed"] and result["after"]["generation"] == 2 and result["after"]["primary"] == "h2"
    assert result["after"]["state"] == "running" and result["reprotect_s"] >= 0
