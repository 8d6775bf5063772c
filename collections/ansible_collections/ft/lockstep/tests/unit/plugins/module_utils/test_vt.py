"""module_utils.vt: deciding from what the kernel shows (real files for the MSR device)."""

import struct

import pytest

from ansible_collections.ft.lockstep.plugins.module_utils import vt

INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme vmx ept\n\nprocessor\t: 1\n"
NESTED = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 hypervisor\n"


def test_cpuinfo_gives_the_vendor_and_the_extension():
    vendor, flags = vt.parse_cpuinfo(INTEL)
    assert (vendor, vt.vt_extension(vendor, flags)) == ("GenuineIntel", "vmx")
    vendor, flags = vt.parse_cpuinfo(NESTED)
    assert vt.vt_extension(vendor, flags) is None and "hypervisor" in flags


@pytest.mark.parametrize(
    "vendor, value, enabled, words",
    [
        ("GenuineIntel", 0x5, True, "enabled and locked"),
        ("GenuineIntel", 0x1, False, "disabled in the firmware"),
        ("GenuineIntel", 0x0, True, "not locked"),
        ("AuthenticAMD", 0x10, False, "SVMDIS set"),
        ("AuthenticAMD", 0x0, True, "SVMDIS clear"),
        ("GenuineIntel", None, None, "could not be read"),
    ],
)
def test_firmware_switch_from_the_msr(vendor, value, enabled, words):
    got, reason = vt.firmware_state(vendor, value)
    assert got is enabled and words in reason


def test_msr_is_read_little_endian_at_the_register_offset(tmp_path):
    (tmp_path / "0").mkdir()
    data = bytearray(0x48)
    data[0x3A : 0x3A + 8] = struct.pack("<Q", 0x5)
    (tmp_path / "0" / "msr").write_bytes(bytes(data))
    assert vt.read_msr(0x3A, root=str(tmp_path)) == (0x5, None)


def test_a_missing_msr_device_says_how_to_get_it(tmp_path):
    value, reason = vt.read_msr(0x3A, root=str(tmp_path))
    assert value is None and "modprobe msr" in reason


def test_kvm_that_is_not_a_device_is_not_usable(tmp_path):
    usable, reason = vt.kvm_state(str(tmp_path / "kvm"))
    assert not usable and "cannot open" in reason


def test_one_problem_per_unmet_requirement():
    facts = {"vt_extension": None, "hypervisor": True, "firmware_enabled": None, "firmware_reason": "",
             "kvm_usable": False, "kvm_reason": "/dev/kvm cannot create a VM", "kvm_kind": None}  # fmt: skip
    found = vt.problems(facts)
    assert len(found) == 2
    assert "virtual machine" in found[0] and "cannot create a VM" in found[1]
    ok = dict(facts, vt_extension="vmx", hypervisor=False, firmware_enabled=True, kvm_usable=True)
    ok["kvm_kind"] = "hardware"
    assert vt.problems(ok) == []
    pvm = dict(ok, vt_extension=None, hypervisor=True, kvm_kind=vt.kvm_kind(None, True))
    assert pvm["kvm_kind"] == "paravirtual" and "paravirtual KVM" in vt.problems(pvm)[-1]
