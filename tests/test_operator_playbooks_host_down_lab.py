"""On the lab: lab-h1's sshd stopped (Ansible cannot reach the first FT host; its lockstepd still
runs), status.yml, protect.yml and drill.yml still run on the hosts that answer and report.
The fast version without the lab is tests/test_operator_playbooks_host_down.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ftlab import engine
from ftlab import lab as ftlab_lab
from ftlab import topology as t
from ftlab.ansible import playbook
from lockstep import api

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]


def stop_sshd(host: t.Host) -> None:
    """Every sshd of the host: the listener and the sessions that Ansible's ControlPersist keeps open
    (its lockstepd and libvirtd go on)."""
    os.kill(ftlab_lab.load_state()["services"][host.name]["sshd"], signal.SIGKILL)
    pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sshd":
                os.kill(int(pid), signal.SIGKILL)


def test_status_protect_and_drill_run_with_the_first_lab_host_unreachable(lab):
    code, out, _recap = playbook("ft.lockstep.site")
    assert code == 0, out[-4000:]
    status, view = api.local(engine.installed_socket(2), "POST", "/vms", engine.guest_body("down1", 2))
    assert status == 200, view
    stop_sshd(t.host(1))

    survey = ("-e", "ft_vm_name=down1", "-e", "ft_vm_state=enabled")
    code, out, recap = playbook("ft.lockstep.protect", *survey)
    assert code == 0, out[-4000:]
    assert "left out of this run: lab-h1" in out and "down1: running" in out, out[-3000:]
    assert recap["lab-h1"]["unreachable"] == 0 and recap["lab-h2"]["failed"] == 0, recap

    code, out, _recap = playbook("ft.lockstep.status")
    assert code == 0 and "down1: running" in out and "left out of this run: lab-h1" in out, out[-3000:]

    code, out, _recap = playbook("ft.lockstep.drill", "-e", "ft_drill_vm=down1", "-e",
                                 "ft_drill_action=test_restart_secondary")  # fmt: skip
    assert code == 0 and "protected again" in out, out[-3000:]
