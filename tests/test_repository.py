"""Repository-wide checks: the collection builds, the Python code is lint-clean."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from ftlab import collection

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv" / "bin"
COLLECTION = REPO / "collections" / "ansible_collections" / "ft" / "lockstep"


def test_the_collection_builds_into_a_tarball_with_its_roles_playbooks_and_the_engine(tmp_path):
    tarball = collection.build(tmp_path)  # lab/build-collection: the engine's wheel, ansible-galaxy build
    assert tarball == tmp_path / "ft-lockstep-0.1.0.tar.gz"
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    assert {"MANIFEST.json", "FILES.json", "meta/runtime.yml", "README.md"} <= set(names)
    assert "plugins/modules/ft_vm.py" in names and "plugins/doc_fragments/engine.py" in names
    assert "plugins/inventory/ft_vms.py" in names
    assert {"LICENSE", "changelogs/changelog.yaml", "changelogs/config.yaml"} <= set(names)
    for role in ("ft_host", "ft_network", "ft_storage", "ft_engine"):
        assert {f"roles/{role}/tasks/main.yml", f"roles/{role}/meta/argument_specs.yml"} <= set(names), role
    playbooks = {"site", "protect", "drill", "status", "check_hosts"}
    assert {f"playbooks/{p}.yml" for p in playbooks} | {"playbooks/tasks/answering_hosts.yml"} <= set(names)
    wheels = [n for n in names if n.startswith("roles/ft_engine/files/") and n.endswith(".whl")]
    assert wheels == ["roles/ft_engine/files/ft_lockstep_engine-0.1.0-py3-none-any.whl"], wheels
    with tarfile.open(tarball) as tar, zipfile.ZipFile(tar.extractfile(wheels[0])) as wheel:
        inside = set(wheel.namelist())
    assert {"lockstep/daemon.py", "lockstep/cli.py"} <= inside and not any("__pycache__" in n for n in inside)
    assert not any("/tests/output/" in n or n.endswith(".tar.gz") for n in names)
    with tarfile.open(tarball) as tar:
        manifest = json.load(tar.extractfile("MANIFEST.json"))["collection_info"]
    assert manifest["repository"] == "https://github.com/ft-lockstep/ft" and manifest["issues"]
    assert {"infrastructure", "linux"} <= set(manifest["tags"])


def test_the_engine_wheel_is_the_same_bytes_for_the_same_source():
    first = collection.build_engine_wheel()
    data, mtime = first.read_bytes(), first.stat().st_mtime_ns
    again = collection.build_engine_wheel()  # what keeps a rebuilt collection from reinstalling the engine
    assert again == first and again.read_bytes() == data and again.stat().st_mtime_ns == mtime


def test_the_license_is_the_gpl_3_text_at_the_root_and_in_the_collection():
    for path in (REPO / "LICENSE", COLLECTION / "LICENSE"):
        text = path.read_text()
        assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE") and "Version 3, 29 June 2007" in text
    assert yaml.safe_load((COLLECTION / "galaxy.yml").read_text())["license"] == ["GPL-3.0-or-later"]


def test_runtime_metadata_requires_the_tested_core_and_groups_the_engine_modules():
    runtime = yaml.safe_load((COLLECTION / "meta" / "runtime.yml").read_text())
    # the lowest version claimed is the one CI installs and tests
    (tested,) = re.findall(r"^ansible-core==(\S+)$", (REPO / "lab" / "constraints.txt").read_text(), re.M)
    assert runtime["requires_ansible"] == f">={tested}"
    assert {"ft_cluster_info", "ft_drill", "ft_vm", "ft_vm_info"} <= set(runtime["action_groups"]["engine"])


def test_every_module_documents_idempotent_and_platform():
    for path in sorted((COLLECTION / "plugins" / "modules").glob("*.py")):
        doc = yaml.safe_load(path.read_text().split('DOCUMENTATION = r"""', 1)[1].split('"""', 1)[0])
        assert {"check_mode", "diff_mode", "idempotent", "platform"} <= set(doc["attributes"]), path.name


def test_the_execution_environment_bakes_in_the_tarball_the_collection_builds_into():
    version = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())["version"]
    ee = yaml.safe_load((REPO / "execution-environment.yml").read_text())
    assert ee["version"] == 3 and ee["dependencies"]["galaxy"] == "ee/requirements.yml"
    tarball = f"ft-lockstep-{version}.tar.gz"
    assert [f["src"] for f in ee["additional_build_files"]] == [f"ee/{tarball}"]
    requirements = yaml.safe_load((REPO / "ee" / "requirements.yml").read_text())
    assert requirements["collections"] == [{"name": f"/build/collections/{tarball}", "type": "file"}]


def test_the_example_inventory_is_a_three_host_site_with_bonds_and_nfs():
    r = subprocess.run([VENV / "ansible-inventory", "-i", "inventories/example", "--list"],
                       cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    inventory = json.loads(r.stdout)
    assert inventory["ft_hosts"]["hosts"] == ["kvm1", "kvm2", "kvm3"]
    kvm1 = inventory["_meta"]["hostvars"]["kvm1"]
    assert kvm1["ft_storage_type"] == "nfs" and all(len(n["members"]) == 2 for n in kvm1["ft_network_list"])


def test_python_code_is_formatted_and_lint_clean():
    lint = subprocess.run([VENV / "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    fmt = subprocess.run([VENV / "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout


def test_ansible_content_passes_ansible_lint_production_profile():
    lint = subprocess.run(
        [VENV / "ansible-lint", "--offline", "--profile", "production",
         "playbooks/", "inventories/", "molecule/", "collections/", "docs/awx/"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize(
    "module, option",
    [
        ("vt_host_info", "require_kvm"),
        ("ft_network", "vm_interfaces"),
        ("ft_storage", "same_datastore_as"),
        ("ft_vm", "checkpoint_ms"),
        ("ft_vm_info", "socket"),
        ("ft_cluster_info", "socket"),
        ("ft_drill", "action"),
        ("ft_migrate", "role"),
        ("ft_host_info", "ftctl"),
    ],
)
def test_the_collection_ships_its_modules_with_their_documentation(module, option):
    doc = [VENV / "ansible-doc", f"ft.lockstep.{module}"]
    r = subprocess.run(doc, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert option in r.stdout and "RETURN VALUES" in r.stdout


def test_the_collection_passes_ansible_test_sanity():
    sanity = subprocess.run(
        [VENV / "ansible-test", "sanity", "--python", "3.11"],
        cwd=COLLECTION, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert sanity.returncode == 0, sanity.stdout[-3000:] + sanity.stderr[-3000:]
