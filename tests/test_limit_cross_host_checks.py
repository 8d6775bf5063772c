"""The cross-host checks survive --limit (adding a host): the hosts of the run are compared with the
FT hosts outside it, without the lab (two hosts with local connections on this machine). Also: the
role ft_storage refuses an iSCSI-only datastore for the engine with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def inventory(tmp_path: Path, old: dict, new: dict) -> Path:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    hosts = {"old1": local | old, "new2": local | new}
    group = {
        "hosts": hosts,
        "vars": {"ft_storage_type": "dir", "ft_storage_pool": "", "ft_host_require_kvm": False},
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump({"all": {"children": {"ft_hosts": group}}}, sort_keys=False))  # old1 first
    return path


def play(tmp_path: Path, tasks: list) -> Path:
    path = tmp_path / "play.yml"
    path.write_text(
        yaml.safe_dump([{"name": "Roles", "hosts": "ft_hosts", "gather_facts": False, "tasks": tasks}])
    )
    return path


def run(playbook: Path, inv: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
    }
    return subprocess.run([BIN / "ansible-playbook", "-i", str(inv), str(playbook), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def datastore(tmp_path: Path, name: str, ident: str | None) -> str:
    path = tmp_path / name
    path.mkdir()
    if ident:
        (path / ".ft-lockstep-datastore").write_text(ident + "\n")
    return str(path)


STORAGE = [{"name": "The datastore", "ansible.builtin.include_role": {"name": "ft.lockstep.ft_storage"}}]


def test_a_host_added_with_limit_is_compared_with_the_datastore_of_the_hosts_outside_the_limit(tmp_path):
    inv = inventory(tmp_path, {"ft_storage_path": datastore(tmp_path, "a", "id-of-a")},
                    {"ft_storage_path": datastore(tmp_path, "b", "id-of-b")})  # fmt: skip
    r = run(play(tmp_path, STORAGE), inv, "--limit", "new2")
    assert r.returncode != 0, r.stdout[-3000:]
    assert "not id-of-a: every FT host must see the same datastore" in r.stdout, r.stdout[-3000:]


def test_a_host_added_with_limit_that_sees_the_same_datastore_passes_and_gets_its_id(tmp_path):
    shared = datastore(tmp_path, "a", "id-of-a")
    inv = inventory(tmp_path, {"ft_storage_path": shared}, {"ft_storage_path": shared})
    tasks = [*STORAGE, {"name": "Id", "ansible.builtin.debug": {"msg": "id={{ ft_storage_datastore_id }}"}}]
    r = run(play(tmp_path, tasks), inv, "--limit", "new2")
    assert r.returncode == 0, r.stdout[-3000:]
    assert '"msg": "id=id-of-a"' in r.stdout


def test_without_limit_the_first_host_sets_the_datastore_up_and_the_others_are_compared(tmp_path):
    inv = inventory(tmp_path, {"ft_storage_path": datastore(tmp_path, "a", None)},
                    {"ft_storage_path": datastore(tmp_path, "b", "id-of-b")})  # fmt: skip
    r = run(play(tmp_path, STORAGE), inv)
    ident = (tmp_path / "a" / ".ft-lockstep-datastore").read_text().strip()  # made by old1, the first
    assert r.returncode != 0, r.stdout[-3000:]
    assert f"not {ident}: every FT host must see the same datastore" in r.stdout, r.stdout[-3000:]


def test_the_engine_datastore_on_iscsi_only_is_refused_with_the_reason(tmp_path):
    inv = inventory(tmp_path, {"ft_storage_path": datastore(tmp_path, "a", None)}, {})
    r = run(play(tmp_path, STORAGE), inv, "-e", "ft_storage_type=iscsi")
    assert r.returncode != 0, r.stdout[-3000:]
    assert "ft_storage_type iscsi is refused: lockstepd keeps its pair records" in r.stdout
    assert "iSCSI LUNs may carry VM disks" in r.stdout
    assert not (tmp_path / "a" / ".ft-lockstep-datastore").exists()


def fake_qemu(tmp_path: Path, name: str, version: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
    path.chmod(0o755)
    return str(path)


def test_a_host_added_with_limit_is_compared_with_the_hypervisor_build_outside_the_limit(tmp_path):
    inv = inventory(tmp_path, {"ft_host_qemu": fake_qemu(tmp_path, "qemu-a", "7.2.0")},
                    {"ft_host_qemu": fake_qemu(tmp_path, "qemu-b", "8.0.0")})  # fmt: skip
    checks = [
        {
            "name": "Checks",
            "ansible.builtin.include_role": {"name": "ft.lockstep.ft_host", "tasks_from": "check.yml"},
        }
    ]
    r = run(play(tmp_path, checks), inv, "--limit", "new2")
    assert r.returncode != 0, r.stdout[-3000:]
    assert "hosts run different hypervisor builds" in r.stdout and "7.2.0" in r.stdout and "8.0.0" in r.stdout
