"""ft_cluster_info and ft_drill driven against a FAKE lockstepd (a stub Unix-socket server)."""

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.ft.lockstep.plugins.modules import (
    ft_cluster_info,
    ft_drill,
    ft_host_info,
    ft_migrate,
)
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


# --- ft_migrate ---------------------------------------------------------------------------------


def migrate(engine, capsys, check=False, **args) -> dict:
    args = {"socket": engine.path, "name": "db1"} | args
    if check:
        args |= {"_ansible_check_mode": True, "_ansible_diff": True}
    return run(ft_migrate.main, args, capsys)


def test_ft_migrate_moves_the_secondary_check_mode_first_then_no_change(engine, capsys):
    engine.vms["db1"] = pair("db1", "running", primary="h1", secondary_host="h2")
    checked = migrate(engine, capsys, check=True, role="secondary", host="h3")
    assert checked["changed"] and engine.mutations() == [], checked
    assert checked["diff"] == {"before": {"primary": "h1", "secondary_host": "h2"},
                               "after": {"primary": "h1", "secondary_host": "h3"}}  # fmt: skip
    first = migrate(engine, capsys, role="secondary", host="h3")
    second = migrate(engine, capsys, role="secondary", host="h3")
    assert first["changed"] and first["vm"]["secondary_host"] == "h3", first
    assert not second["changed"], second
    assert engine.mutations() == [("POST", "/vms/db1/migrate", {"role": "secondary", "host": "h3"})]


def test_ft_migrate_moves_the_primary(engine, capsys):
    engine.vms["db1"] = pair("db1", "running", primary="h1", secondary_host="h2")
    result = migrate(engine, capsys, role="primary", host="h3")
    assert result["changed"] and result["vm"]["primary"] == "h3", result


@pytest.mark.parametrize("check", [True, False])
def test_ft_migrate_refuses_every_reason_at_once_in_check_and_real_mode(engine, capsys, check):
    result = migrate(engine, capsys, check=check, role="secondary", host="h1")  # db1: need_secondary on h1
    assert result["failed"] and not result.get("changed"), result
    assert result["reasons"] == [
        "migrate needs a running pair; db1 is need_secondary (user_action)",
        "h1 runs the primary (primary and secondary never share a host)",
    ]
    assert engine.mutations() == []


def test_ft_migrate_of_an_unknown_vm_fails_clearly(engine, capsys):
    result = migrate(engine, capsys, name="ghost", role="secondary", host="h2")
    assert result["failed"] and result["msg"] == "no FT VM named ghost"


# --- ft_host_info ---------------------------------------------------------------------------------

PROBE = {"version": "7.2.19", "package": "Debian 1:7.2+dfsg-7", "accel": "tcg", "accel_reason": "no KVM",
         "missing": ["migration capability x-colo is missing"], "mode": "checkpoint"}  # fmt: skip
PROBE_JSON = json.dumps(PROBE)


def fake_ftctl(tmp_path, probe_rc=0, probe_out=PROBE_JSON, probe_err=""):
    """A FAKE ftctl: answers --version and probe --json as the engine's CLI does."""
    path = tmp_path / "ftctl"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "ftctl 0.1.0"; exit 0; fi\n'
        f'echo "$@" > {tmp_path}/argv\n'
        f"echo '{probe_out}'\necho '{probe_err}' >&2\nexit {probe_rc}\n"
    )
    path.chmod(0o755)
    return str(path)


def test_ft_host_info_returns_the_probe_of_ftctl(tmp_path, capsys):
    ftctl = fake_ftctl(tmp_path)
    result = run(
        ft_host_info.main, {"ftctl": ftctl, "qemu": "qemu-system-x86_64 -nodefaults", "accel": "tcg"}, capsys
    )
    assert not result.get("failed") and not result["changed"], result
    assert result["ready"] is False and result["missing"] == PROBE["missing"]
    assert (result["qemu_version"], result["mode"], result["engine_version"]) == (
        "7.2.19",
        "checkpoint",
        "0.1.0",
    )
    argv = ["probe", "--json", "--qemu", "qemu-system-x86_64", "-nodefaults", "--accel", "tcg"]
    assert (tmp_path / "argv").read_text().split() == argv


def test_ft_host_info_fails_clearly_when_ftctl_is_missing_or_fails(tmp_path, capsys):
    result = run(ft_host_info.main, {"ftctl": "ftctl-not-installed"}, capsys)
    assert (
        result["failed"] and "lockstepd's ftctl-not-installed is not installed on this host" in result["msg"]
    )
    ftctl = fake_ftctl(
        tmp_path, probe_rc=1, probe_out="", probe_err="ftctl: error: no QEMU at qemu-system-x86_64"
    )
    result = run(ft_host_info.main, {"ftctl": ftctl}, capsys)
    assert result["failed"] and result["msg"].endswith(
        "probe failed (rc 1): ftctl: error: no QEMU at qemu-system-x86_64"
    )
