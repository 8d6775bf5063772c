"""The capability probe against real QEMU binaries."""

import dataclasses

import pytest

from lockstep.probe import Capabilities, ProbeError, compare, probe


@pytest.fixture(scope="module")
def system_qemu() -> Capabilities:
    return probe(["qemu-system-x86_64"])


def test_debian_qemu_has_everything_colo_needs(system_qemu):
    assert system_qemu.x_colo
    assert system_qemu.missing() == []
    assert system_qemu.package.startswith("Debian")
    assert compare({"h1": system_qemu, "h2": system_qemu}) == []


def test_a_qemu_without_colo_is_refused_with_each_reason(system_qemu):
    lacking = dataclasses.replace(system_qemu, x_colo=False, drivers=frozenset({"nbd"}))
    assert compare({"h1": system_qemu, "h2": lacking}) == [
        "h2: migration capability x-colo is missing",
        "h2: block driver quorum is missing",
        "h2: block driver replication is missing",
    ]


def test_hosts_with_different_builds_are_refused(system_qemu):
    other = dataclasses.replace(system_qemu, version="10.0.13", package="Debian 1:10.0.13+ds-0+deb13u1")
    (reason,) = compare({"h1": system_qemu, "h2": other})
    assert reason.startswith("hosts run different QEMU builds: h1 7.2")
    assert "h2 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)" in reason


@pytest.mark.parametrize(
    "qemu, message",
    [
        (["/nonexistent/qemu"], "cannot run /nonexistent/qemu: No such file or directory"),
        (["/bin/false"], "/bin/false did not answer QMP"),
        (["qemu-system-x86_64", "-no-such-option"], "invalid option"),
    ],
)
def test_something_that_is_not_a_working_qemu_gets_a_clear_error(qemu, message):
    with pytest.raises(ProbeError, match=message):
        probe(qemu, timeout=5)


def test_the_default_mode_is_lockstep_on_kvm_and_checkpoint_under_tcg_where_the_build_can(system_qemu):
    lab_build = dataclasses.replace(system_qemu, package=system_qemu.package + " +ft-545da61003a0")
    assert not system_qemu.passive_secondary and lab_build.passive_secondary
    assert lab_build.default_mode("kvm") == "lockstep"
    assert lab_build.default_mode("tcg") == "checkpoint"
    assert system_qemu.default_mode("tcg") == "lockstep"  # stock 7.2 would run a -S secondary
