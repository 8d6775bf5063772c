"""labctl's life cycle: up/down leave nothing behind; bad input gets a clear message and exit code."""

from __future__ import annotations

import os
import subprocess

import pytest

from ftlab.testing import labctl

pytestmark = pytest.mark.lab


def snapshot() -> dict:
    """What up could leave behind: namespaces, links, mounts, processes outside the root netns."""
    root_net = os.readlink("/proc/self/ns/net")
    procs = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                net = os.readlink(f"/proc/{entry}/ns/net")
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if net != root_net or "/var/lib/ftlab" in cmd or "ftl-" in cmd:
                procs.add((int(entry), cmd))
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()),
        "mounts": sorted(line.split(" ", 4)[4] for line in open("/proc/self/mountinfo")),
        "processes": procs,
    }


def test_down_when_nothing_is_up_says_so():
    r = labctl("down")
    assert r.returncode == 3
    assert "not up" in r.stderr and "Traceback" not in r.stderr


def test_status_when_nothing_is_up_says_so():
    r = labctl("status")
    assert r.returncode == 3
    assert "not up" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["up", "--hosts", "0"], "--hosts: must be between 1 and 20, got 0"),
        (["up", "--hosts", "three"], "--hosts: not a number"),
        (["up", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(args, message):
    r = labctl(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists("/var/lib/ftlab/state.json"), "a refused command must change nothing"


def test_up_and_down_twice_leave_nothing_behind():
    before = snapshot()
    for _ in range(2):
        up = labctl("up", "--hosts", "2")
        assert up.returncode == 0, up.stdout + up.stderr
        during = snapshot()
        assert {"ftl-h1", "ftl-h2", "ftl-storage", "ftl-client"} <= set(during["netns"])
        assert {"ftl-mgmt", "ftl-vmnet", "ftl-h1-mg", "ftl-h2-ft"} <= set(during["links"])
        assert len(during["processes"]) > len(before["processes"])
        again = labctl("up")
        assert again.returncode == 3 and "already up" in again.stderr
        down = labctl("down")
        assert down.returncode == 0, down.stdout + down.stderr
        after = snapshot()
        assert after["processes"] - before["processes"] == set()
        assert {k: v for k, v in after.items() if k != "processes"} == {
            k: v for k, v in before.items() if k != "processes"
        }
