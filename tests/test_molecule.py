"""The Molecule scenarios, as an operator runs them (`molecule test -s NAME` from the repository),
on one lab brought up here for all of them (each scenario's prepare brings up only what is not up,
and its cleanup takes down only what its prepare brought up):

- ft_network, ft_storage, ft_engine: each role alone on the lab's Debian guest, booted once for the
  three (ft_engine: lockstepd under systemd, restarted by a change and only by one);
- default: site.yml and protect.yml on the three lab hosts.

Each converges, converges again (nothing may change) and verifies with testinfra."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from ftlab import collection

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
LABCTL = REPO / "lab" / "labctl"
STATE = Path("/var/lib/ftlab/state.json")
pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab():
    assert not STATE.exists(), "a lab is up: the scenarios run on one made here"
    collection.build_engine_wheel()  # role ft_engine, run from the repository, installs engine/ as it is
    try:
        subprocess.run([LABCTL, "up"], check=True, capture_output=True, timeout=600)
        yield
    finally:  # a failed step skips molecule's own cleanup
        if STATE.exists():
            subprocess.run([LABCTL, "down"], capture_output=True, timeout=300)


def molecule_test(scenario: str, play: str) -> str:
    """Runs the scenario; its converge play `play` must run twice (converge, idempotence) and
    its verifier pass every test it collects."""
    start = time.monotonic()
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "NO_COLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    run = subprocess.run([BIN / "molecule", "test", "--scenario-name", scenario], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    out = run.stdout + run.stderr
    print(out[-30000:])  # shown by pytest when the test fails
    print(f"molecule test -s {scenario}: {time.monotonic() - start:.0f} s")
    assert run.returncode == 0, f"molecule test -s {scenario}:\n{out[-6000:]}"
    assert "Idempotence test failed" not in out
    assert out.count(f"PLAY [{play}]") == 2  # converge, then idempotence: the same run again
    summary = re.findall(r"^=+ (.*) in [0-9.]+s", out, re.MULTILINE)
    assert "Verifier completed successfully." in out and summary and "passed" in summary[-1], summary
    assert not re.search(r"failed|error|skipped", summary[-1]), summary[-1]
    return out


def test_each_role_alone_on_the_debian_guest(lab):
    subprocess.run([LABCTL, "debian", "start"], check=True, capture_output=True, timeout=600)
    try:
        molecule_test("ft_network", "Both FT networks as bonds of two NICs on the Debian guest")
        molecule_test("ft_storage", "The NFS datastore (the lab's nfs-ganesha) on the Debian guest")
        out = molecule_test("ft_engine", "The engine (lockstepd) on the Debian guest, under systemd")
        assert "PLAY [A change restarts lockstepd, and only a change]" in out
    finally:
        subprocess.run([LABCTL, "debian", "stop"], capture_output=True, timeout=60)


def test_the_default_scenario_on_the_lab_hosts(lab):
    molecule_test("default", "FT hosts")
