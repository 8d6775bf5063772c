"""The operator playbooks (status, drill, protect) while the first FT host is down, without the lab:
the first inventory host is 127.0.0.1 on a closed port (unreachable), the second runs locally, and
the engine calls go to a FAKE lockstepd (a stub on a Unix socket, tests/unit/plugins/fake_lockstepd.py
in the collection). Before the fix the first run_once task died with the first host and the play
ended for every host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ansible_collections.ft.lockstep.tests.unit.plugins.fake_lockstepd import FakeLockstepd, pair

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def engine(tmp_path):
    with FakeLockstepd(tmp_path / "fake-lockstepd.sock", [pair("db1", "disabled")]) as fake:
        yield fake


def inventory(tmp_path: Path, socket: str, **group_vars) -> Path:
    hosts = {
        "dead1": {"ansible_host": "127.0.0.1", "ansible_port": 1, "ansible_connection": "ssh",
                  "ansible_ssh_common_args": "-o ConnectTimeout=2 -o StrictHostKeyChecking=no"},
        "live2": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
    }  # fmt: skip
    path = tmp_path / "hosts.yml"
    group = {"hosts": hosts, "vars": {"ft_engine_socket": socket, **group_vars}}
    doc = {"all": {"children": {"ft_hosts": group}}}
    path.write_text(yaml.safe_dump(doc))
    return path


def run(playbook: str, inv: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "ansible-playbook", "-i", str(inv), f"ft.lockstep.{playbook}", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_protect_yml_runs_on_the_host_that_answers_when_the_first_is_down(tmp_path, engine):
    inv = inventory(tmp_path, engine.path, ft_vms=[{"name": "db1", "host": "dead1"}])
    r = run("protect", inv)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert ("POST", "/vms/db1/enable", {}) in engine.calls, engine.calls
    assert engine.vms["db1"]["state"] == "running"
    assert "do not answer, left out of this run: dead1" in r.stdout
    assert "db1: running" in r.stdout


def test_status_yml_reports_the_cluster_when_the_first_host_is_down(tmp_path, engine):
    r = run("status", inventory(tmp_path, engine.path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "db1: disabled" in r.stdout and "do not answer, left out of this run: dead1" in r.stdout
    assert engine.mutations() == []


def test_drill_yml_runs_the_drill_when_the_first_host_is_down(tmp_path, engine):
    engine.vms["db1"] = pair("db1", "running", primary="h1", secondary_host="h2")
    r = run("drill", inventory(tmp_path, engine.path), "-e", "ft_drill_vm=db1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert engine.mutations() == [("POST", "/vms/db1/test-failover", {})]
    assert engine.vms["db1"]["generation"] == 2 and engine.vms["db1"]["primary"] == "h2"
    assert "before: primary h1, secondary h2" in r.stdout


def test_no_ft_host_answering_fails_the_play_with_the_hosts_named(tmp_path, engine):
    inv = inventory(tmp_path, engine.path)
    doc = yaml.safe_load(inv.read_text())
    doc["all"]["children"]["ft_hosts"]["hosts"]["live2"] = {"ansible_host": "127.0.0.1", "ansible_port": 1,
        "ansible_connection": "ssh", "ansible_ssh_common_args": "-o ConnectTimeout=2"}  # fmt: skip
    inv.write_text(yaml.safe_dump(doc))
    r = run("status", inv)
    assert r.returncode != 0 and "no FT host answers: dead1, live2" in r.stdout, r.stdout[-3000:]


def test_module_defaults_for_the_engine_group_give_the_socket_to_every_engine_module(tmp_path, engine):
    tasks = [{"name": "Cluster", "ft.lockstep.ft_cluster_info": {}},
             {"name": "VMs", "ft.lockstep.ft_vm_info": {}},
             {"name": "Suspend", "ft.lockstep.ft_vm": {"name": "db1", "state": "disabled"}}]  # fmt: skip
    defaults = {"group/ft.lockstep.engine": {"socket": engine.path}}
    play = [{"name": "Engine modules", "hosts": "live2", "gather_facts": False, "module_defaults": defaults,
             "tasks": tasks}]  # fmt: skip
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    inv = inventory(tmp_path, "/nonexistent.sock")  # no socket given in the tasks: the group's default wins
    r = subprocess.run([BIN / "ansible-playbook", "-i", str(inv), str(tmp_path / "play.yml")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:]
    assert [c[1] for c in engine.calls] == ["/status", "/status", "/vms/db1", "/vms/db1"]
