"""ft.lockstep.vt_host_info on the lab hosts, over SSH like any managed host: every host answers
with what this machine's kernel shows (nested, paravirtual KVM: shared/LAB-FACTS.md), one reason
per unmet requirement, and nothing changed - in check mode too."""

import json

import pytest

from ftlab import ansible

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def run_module(*extra: str) -> dict[str, dict]:
    results = ansible.module("ft_hosts", "vt_host_info", {}, *extra)
    assert not any(r["failed"] for r in results.values()), results
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


def playbook(*extra: str) -> tuple[int, str]:
    code, out, _recap = ansible.playbook("ft.lockstep.check_hosts", *extra)
    return code, out


def test_the_host_check_passes_where_tcg_is_accepted_and_names_each_reason_where_kvm_is_required(lab):
    code, out = playbook()  # the lab's inventory: ft_host_require_kvm false
    assert code == 0, out
    code, strict = playbook("-e", "ft_host_require_kvm=true")
    assert code != 0
    for host in ("lab-h1", "lab-h2", "lab-h3"):
        assert f"{host}: the CPU shows no VT-x/AMD-V: this host is itself a virtual machine" in strict


def test_the_host_check_fails_when_one_host_runs_another_qemu_build(lab, tmp_path):
    other = tmp_path / "other.yml"  # a second inventory source: lab-h3 uses Debian's QEMU, not the lab's
    other.write_text(json.dumps({"ft_hosts": {"hosts": {"lab-h3": {"ft_host_qemu": "qemu-system-x86_64"}}}}))
    code, mixed = playbook("-i", "inventories/lab", "-i", str(other))
    assert code != 0
    assert "hosts run different hypervisor builds" in mixed and "+ft-" in mixed
