"""ft.lockstep.vt_host_info on the lab hosts, over SSH like any managed host: every host answers
with what this machine's kernel shows (nested, paravirtual KVM: shared/LAB-FACTS.md), one reason
per unmet requirement, and nothing changed - in check mode too."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv" / "bin"

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def run_module(*extra: str) -> dict[str, dict]:
    proc = subprocess.run(
        [VENV / "ansible", "ft_hosts", "-m", "ft.lockstep.vt_host_info", "-o", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {}
    for line in proc.stdout.splitlines():
        host, _, rest = line.partition(" | SUCCESS => ")
        if rest:
            results[host] = json.loads(rest)
    return results


def test_every_lab_host_reports_its_virtualization_and_why_it_falls_short(lab):
    results = run_module()
    assert sorted(results) == ["lab-h1", "lab-h2", "lab-h3"]
    for facts in results.values():
        assert facts["changed"] is False
        assert facts["vendor"] in ("GenuineIntel", "AuthenticAMD")
        assert facts["vt_extension"] is None and facts["hypervisor"] is True  # these machines: nested PVM
        assert facts["kvm_kind"] in ("paravirtual", None)
        assert any("this host is itself a virtual machine" in p for p in facts["problems"])
        assert facts["versions"]["qemu"] and facts["versions"]["libvirt"]
        if facts["firmware_enabled"] is None:
            assert facts["firmware_reason"]  # says why the MSR could not be read
    assert len({json.dumps(f["versions"], sort_keys=True) for f in results.values()}) == 1


def test_check_mode_reports_the_same(lab):
    assert run_module() == run_module("--check")


def playbook(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VENV / "ansible-playbook", "playbooks/check_hosts.yml", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_host_check_passes_where_tcg_is_accepted_and_names_each_reason_where_kvm_is_required(lab):
    ok = playbook()  # the lab's inventory: ft_host_require_kvm false
    assert ok.returncode == 0, ok.stdout + ok.stderr
    strict = playbook("-e", "ft_host_require_kvm=true")
    assert strict.returncode != 0
    for host in ("lab-h1", "lab-h2", "lab-h3"):
        assert f"{host}: the CPU shows no VT-x/AMD-V: this host is itself a virtual machine" in strict.stdout


def test_the_host_check_fails_when_one_host_runs_another_qemu_build(lab, tmp_path):
    other = tmp_path / "other.yml"  # a second inventory source: lab-h3 uses Debian's QEMU, not the lab's
    other.write_text(json.dumps({"ft_hosts": {"hosts": {"lab-h3": {"ft_host_qemu": "qemu-system-x86_64"}}}}))
    mixed = playbook("-i", "inventories/lab", "-i", str(other))
    assert mixed.returncode != 0
    assert "hosts run different hypervisor builds" in mixed.stdout and "+ft-" in mixed.stdout
