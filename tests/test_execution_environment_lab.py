"""The execution environment used for real: execution-environment.yml built with podman on a Debian
base made here (lab/ee/build; no registry is reachable), then status.yml and drill.yml run against
the lab from inside the image the way AWX runs a job: ansible-runner with the project at
/runner/project, the inventory at /runner/inventory, the machine credential's key in
/runner/env/ssh_key (ansible-runner hands it to an ssh-agent), the network of the root namespace
(the lab's hosts answer ssh on ftl-mgmt there). The collection that runs is the EE's copy, not the
repository's collections/ (which the repository's ansible.cfg points at)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ftlab import engine
from ftlab import lab as ftlab_lab
from ftlab import topology as t
from ftlab.ansible import playbook
from lockstep import api

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
EE_COLLECTIONS = "/usr/share/ansible/collections"  # where ansible-builder installs ee/requirements.yml
PODMAN_ENV = os.environ | {"CONTAINERS_CONF": str(REPO / "lab" / "ee" / "containers.conf")}


@pytest.fixture(scope="module")
def ee_image() -> str:
    """The EE image (built once per machine; lab/ee/build skips it when its inputs did not change)."""
    proc = subprocess.run([REPO / "lab" / "ee" / "build"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip()


def runner_dir(tmp_path: Path) -> Path:
    """An ansible-runner private data directory as AWX lays it out: inventory (the lab's, without
    the key path: the key comes as the machine credential), env/ssh_key, env/envvars."""
    runner = tmp_path / "runner"
    (runner / "project").mkdir(parents=True)
    shutil.copytree(REPO / "inventories" / "lab" / "group_vars", runner / "inventory" / "group_vars")
    inventory = yaml.safe_load(ftlab_lab.INVENTORY.read_text())
    del inventory["all"]["vars"]["ansible_ssh_private_key_file"]
    (runner / "inventory" / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (runner / "env").mkdir()
    shutil.copyfile(t.SSH_KEY, runner / "env" / "ssh_key")
    # The project's ansible.cfg says collections_path = ./collections: the EE's copy must come first.
    (runner / "env" / "envvars").write_text(
        yaml.safe_dump({"ANSIBLE_COLLECTIONS_PATH": EE_COLLECTIONS, "ANSIBLE_NOCOLOR": "1"})
    )
    subprocess.run(["chown", "-R", "1000:0", runner], check=True)  # the image's user (USER 1000)
    (runner / "env" / "ssh_key").chmod(0o600)
    return runner


def in_ee(image: str, runner: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    mounts = ["-v", f"{runner}:/runner", "-v", f"{REPO}:/runner/project:ro"]
    cmd = ["podman", "run", "--rm", "--network", "host", *mounts, "-w", "/runner/project", image, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=PODMAN_ENV)


def ee_playbook(
    image: str, runner: Path, path: str, extravars: dict, *flags: str
) -> subprocess.CompletedProcess:
    (runner / "env" / "extravars").write_text(yaml.safe_dump(extravars))
    return in_ee(image, runner, "ansible-runner", "run", "/runner", "-p", path, *flags)


def test_status_and_drill_run_from_the_ee_with_the_ees_collection(ee_image, lab, tmp_path):
    runner = runner_dir(tmp_path)
    code, out, _recap = playbook("playbooks/site.yml")
    assert code == 0, out[-4000:]
    status, view = api.local(engine.installed_socket(1), "POST", "/vms", engine.guest_body("ee1", 1))
    assert status == 200, view
    code, out, _recap = playbook("playbooks/protect.yml", "-e", "ft_vm_name=ee1", "-e", "ft_vm_state=enabled")
    assert code == 0 and "ee1: running" in out, out[-3000:]

    run = ee_playbook(ee_image, runner, "playbooks/status.yml", {}, "-vvv")  # -vvv: each module's file
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "ee1: running" in run.stdout and "primary lab-h1" in run.stdout, run.stdout[-3000:]
    ee_module = f"{EE_COLLECTIONS}/ansible_collections/ft/lockstep/plugins/modules/ft_cluster_info.py"
    assert f"Using module file {ee_module}" in run.stdout, run.stdout[-3000:]
    assert "/runner/project/collections" not in run.stdout  # nothing ran from the repository's copy

    run = ee_playbook(ee_image, runner, "playbooks/drill.yml",
                      {"ft_drill_vm": "ee1", "ft_drill_action": "test_restart_secondary"})  # fmt: skip
    assert run.returncode == 0 and "protected again" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
