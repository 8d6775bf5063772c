"""pytest plugin: the lab for tests that need real hosts (root). Loaded by the root conftest.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LABCTL = REPO / "lab" / "labctl"


def labctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(LABCTL), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lab():
    """A 3-host lab for the tests of one module; always taken down afterwards (FTLAB_KEEP=1, for
    debugging: a lab that is up is used and left up, logs and all)."""
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root")
    keep = os.environ.get("FTLAB_KEEP") == "1"
    up = labctl("up", "--hosts", "3")
    assert up.returncode == 0 or (keep and up.returncode == 3), up.stdout + up.stderr
    try:
        yield
    finally:
        if not keep:
            down = labctl("down")
            assert down.returncode == 0, down.stdout + down.stderr
