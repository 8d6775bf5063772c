"""README's first command's main job: `labctl demo` brings the lab up, runs site.yml (lockstepd on
every host), protect.yml (the demo guest protected right after it starts) and drill.yml (Test
Failover) while the client checks every byte, and reports. Run as the operator runs it, twice (the
second time on the lab already up: site.yml changes nothing), then the lab is taken down."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LABCTL = REPO / "lab" / "labctl"
pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]


def test_the_demo_protects_a_guest_fails_it_over_and_reports_a_byte_exact_stream():
    assert not Path("/var/lib/ftlab/state.json").exists(), "a lab is up: the demo makes its own"
    try:
        demo = subprocess.run([LABCTL, "demo"], capture_output=True, text=True, timeout=600)
        out = demo.stdout + demo.stderr
        assert demo.returncode == 0, out
        assert "before:  running, primary lab-h1, secondary lab-h" in out
        assert "after:   running, primary lab-h" in out and "no command given" in out
        assert "none lost, duplicated or reordered" in out
        steps = ("collection: ft-lockstep-", "ft.lockstep.ft_engine : The engine's API answers", "site: done",
                 "protect: done", "drill: done", "demo done in")  # fmt: skip
        for step in steps:
            assert step in out, out
        again = subprocess.run([LABCTL, "demo"], capture_output=True, text=True, timeout=600)
        out = again.stdout + again.stderr
        assert again.returncode == 0 and "the lab is already up: using it" in out, out
        assert "(lab-h1 changed=0, lab-h2 changed=0, lab-h3 changed=0)" in out, out
        assert "none lost, duplicated or reordered" in out
    finally:
        subprocess.run([LABCTL, "down"], capture_output=True, timeout=300)
