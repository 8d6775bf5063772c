"""Role ft_engine's rendered lockstepd configuration (vars/main.yml ft_engine_config), without a host:
datastore_id is given only when ft_engine_datastore_id is set (the installed engine does not know
the setting yet; `ftctl daemon --check` would refuse it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROLE = REPO / "collections" / "ansible_collections" / "ft" / "lockstep" / "roles" / "ft_engine"


def config(tmp_path: Path, *extra: str) -> dict:
    inv = tmp_path / "hosts.yml"
    host = {"ansible_connection": "local", "ft_logging_address": "10.0.2.11"}
    inv.write_text(yaml.safe_dump({"all": {"children": {"ft_hosts": {"hosts": {"kvm1": host}}}}}))
    role_vars = ["-e", f"@{ROLE / 'defaults' / 'main.yml'}", "-e", f"@{ROLE / 'vars' / 'main.yml'}"]
    debug = ["-m", "ansible.builtin.debug", "-a", "var=ft_engine_config"]
    argv = [BIN / "ansible", "kvm1", "-i", str(inv), "-o", *debug, *role_vars, *extra]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.split(" => ", 1)[1])["ft_engine_config"]


@pytest.mark.parametrize("given", ["", "0b6a3c52-8a7e-4a55-9a64-0e1f6c1d2a11"])
def test_datastore_id_is_rendered_only_when_given(tmp_path, given):
    rendered = config(tmp_path, "-e", f"ft_engine_datastore_id={given}")
    assert rendered["datastore"] == "/var/lib/ft/datastore" and rendered["host"] == "kvm1"
    assert rendered.get("datastore_id") == (given or None)


def test_the_role_names_a_missing_engine_package_before_it_changes_anything(tmp_path):
    inv = tmp_path / "hosts.yml"
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inv.write_text(yaml.safe_dump({"all": {"children": {"ft_hosts": {"hosts": {"kvm1": host}}}}}))
    play = [{"name": "Engine", "hosts": "ft_hosts", "gather_facts": False,
             "roles": [{"role": "ft.lockstep.ft_engine", "ft_engine_prefix": str(tmp_path / "opt"),
                        "ft_engine_package": str(tmp_path / "no-such.whl")}]}]  # fmt: skip
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    r = subprocess.run([BIN / "ansible-playbook", "-i", str(inv), str(tmp_path / "play.yml")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0
    assert f"no engine package {tmp_path}/no-such.whl on the controller (ft_engine_package)" in r.stdout, (
        r.stdout
    )
    assert not (tmp_path / "opt").exists()
