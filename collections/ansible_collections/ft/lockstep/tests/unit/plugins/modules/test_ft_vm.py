"""ft_vm driven end to end against a FAKE lockstepd (a stub Unix-socket server, fake_lockstepd.py):
the same answer in check mode and real mode, and waiting for a pair that is not running yet."""

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.ft.lockstep.plugins.modules import ft_vm
from ansible_collections.ft.lockstep.tests.unit.plugins.fake_lockstepd import FakeLockstepd, pair


@pytest.fixture
def engine(tmp_path, monkeypatch):
    monkeypatch.setattr(ft_vm, "LIBVIRT_ERROR", "libvirt left out of the unit tests")
    with FakeLockstepd(tmp_path / "fake.sock") as fake:
        yield fake


def run(engine, capsys, check=False, **args) -> dict:
    args = {"socket": engine.path, **args}
    if check:
        args |= {"_ansible_check_mode": True, "_ansible_diff": True}
    with patch_module_args(args), pytest.raises(SystemExit):
        ft_vm.main()
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("state", ["disabled", "enabled"])
def test_an_unknown_vm_without_definition_fails_clearly_in_check_and_real_mode(engine, capsys, state):
    results = [run(engine, capsys, check=check, name="ghost", state=state) for check in (True, False)]
    reason = "lockstepd runs no VM named ghost: give its definition to start it"
    for result in results:
        assert result["failed"] and not result.get("changed"), result
        assert result["msg"] == f"ghost refused: {reason}" and result["reasons"] == [reason]
    assert engine.mutations() == []


def test_absent_for_an_unknown_vm_is_no_change(engine, capsys):
    for check in (True, False):
        result = run(engine, capsys, check=check, name="ghost", state="absent")
        assert not result.get("failed") and not result["changed"], result


def test_disabled_for_an_unknown_vm_with_definition_starts_it_suspended(engine, capsys):
    definition = {"mac": "52:54:00:00:00:07"}
    checked = run(engine, capsys, check=True, name="new1", state="disabled", definition=definition)
    assert checked["changed"] and engine.mutations() == [], checked
    result = run(engine, capsys, name="new1", state="disabled", definition=definition)
    assert result["changed"] and not result.get("failed"), result
    assert [c[:2] for c in engine.mutations()] == [("POST", "/vms")]


@pytest.mark.parametrize("state", ["need_secondary", "starting"])
def test_enabled_on_a_pair_that_is_not_running_yet_waits_for_it(engine, capsys, state):
    engine.vms["db1"] = pair("db1", state)
    engine.pending["db1"] = 2  # running at the third GET after this one
    result = run(engine, capsys, name="db1", state="enabled")
    assert not result.get("failed") and not result["changed"], result
    assert result["vm"]["state"] == "running", result
    assert engine.mutations() == []


def test_enabled_on_a_pair_that_does_not_get_running_fails_at_the_deadline(engine, capsys):
    engine.vms["db1"] = pair("db1", "need_secondary", reason="no_compatible_host")
    result = run(engine, capsys, name="db1", state="enabled", wait_timeout=1)
    assert result["failed"], result
    assert result["msg"] == "db1 did not reach running within 1 s: need_secondary (no_compatible_host)"


def test_enabled_without_wait_returns_at_once(engine, capsys):
    engine.vms["db1"] = pair("db1", "need_secondary")
    engine.pending["db1"] = 100
    result = run(engine, capsys, name="db1", state="enabled", wait=False)
    assert not result.get("failed") and result["vm"]["state"] == "need_secondary", result


def test_turn_on_suspend_and_off_check_mode_first_then_real_then_no_change(engine, capsys):
    engine.vms["db1"] = pair("db1", "not_configured")
    for state, expected in (("enabled", "running"), ("disabled", "disabled"), ("absent", "not_configured")):
        before = engine.vms["db1"]["state"]
        checked = run(engine, capsys, check=True, name="db1", state=state)
        assert checked["changed"] and engine.vms["db1"]["state"] == before, checked
        assert checked["diff"]["after"]["state"] == expected
        first, second = (run(engine, capsys, name="db1", state=state) for _repeat in range(2))
        assert first["changed"] and not second["changed"], (first, second)
        assert first["vm"]["state"] == expected == engine.vms["db1"]["state"]
