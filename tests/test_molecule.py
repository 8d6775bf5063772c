"""The Molecule default scenario, as an operator runs it (`molecule test` from the repository):
prepare brings the lab and its Debian guest up, converge runs site.yml and protect.yml on the lab
hosts and the network and storage roles on the guest, idempotence runs it again (nothing may
change), verify checks the hosts with testinfra, cleanup takes the lab down."""

import os
import subprocess
from pathlib import Path

import pytest

from ftlab import collection

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]


def test_the_molecule_default_scenario_converges_is_idempotent_and_verifies():
    assert not Path("/var/lib/ftlab/state.json").exists(), "a lab is up: the scenario makes its own"
    collection.build_engine_wheel()  # role ft_engine, run from the repository, installs engine/ as it is
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "NO_COLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    try:
        run = subprocess.run([BIN / "molecule", "test"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=1800)  # fmt: skip
        out = run.stdout + run.stderr
        print(out[-30000:])  # shown by pytest when the test fails
        assert run.returncode == 0, out[-6000:]
        assert out.count("PLAY [FT hosts]") == 2  # converge, then idempotence: the same run again
        assert "Idempotence test failed" not in out
        assert "Verifier completed successfully." in out and "8 passed" in out
    finally:  # a failed step skips molecule's own cleanup
        if Path("/var/lib/ftlab/state.json").exists():
            subprocess.run([REPO / "lab" / "labctl", "down"], capture_output=True, timeout=300)
