"""The collection installs on its own: its tarball (roles, playbooks and the engine's wheel inside)
installed with ansible-galaxy into an empty directory, and `ansible-playbook ft.lockstep.site` run
from a directory holding only that, an inventory (the lab's, copied) and an ansible.cfg of its own,
deploys lockstepd on every lab host."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab import collection, engine
from ftlab import lab as ftlab
from ftlab import topology as t
from ftlab.ansible import playbook
from lockstep import api

pytestmark = [pytest.mark.lab, pytest.mark.slow]
BIN = Path(sys.executable).parent


def test_site_from_the_installed_tarball_deploys_lockstepd_on_every_host(lab, tmp_path):
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    shutil.copy(ftlab.INVENTORY, inventory / "hosts.yml")
    shutil.copy(ftlab.INVENTORY.parent / "group_vars" / "ft_hosts.yml", inventory / "group_vars")
    work = collection.installed(tmp_path / "controller", inventory)

    listed = subprocess.run([BIN / "ansible-galaxy", "collection", "list", "ft.lockstep"], cwd=work,
                            capture_output=True, text=True)  # fmt: skip
    assert listed.returncode == 0 and f"# {work}/collections/ansible_collections" in listed.stdout, listed
    assert listed.stdout.count("ft.lockstep") == 1, listed.stdout  # no other copy (the repository's) is seen

    code, out, recap = playbook("ft.lockstep.site", cwd=work)
    assert code == 0, out[-4000:]
    assert set(recap) == {"lab-h1", "lab-h2", "lab-h3"} and all(r["failed"] == 0 for r in recap.values())

    (wheel,) = (work / "collections/ansible_collections/ft/lockstep/roles/ft_engine/files").glob("*.whl")
    shipped = hashlib.sha256(wheel.read_bytes()).hexdigest()
    for i in (1, 2, 3):
        status, answer = api.local(engine.installed_socket(i), "GET", "/status")
        assert status == 200 and answer["host"] == f"lab-h{i}", answer
        installed = (t.host(i).dir / "opt-lockstep" / "installed-package.sha256").read_text().strip()
        assert installed == shipped  # the engine the collection carries

    code, out, again = playbook("ft.lockstep.site", "--check", cwd=work)
    assert code == 0, out[-4000:]
    assert {h: r["changed"] for h, r in again.items()} == {"lab-h1": 0, "lab-h2": 0, "lab-h3": 0}, out[-4000:]
