"""Accelerator choice against this machine's real /proc/cpuinfo and /dev/kvm, and against
cpuinfo texts of other machines."""

import pytest

from lockstep.accel import AccelError, choose, kvm_unusable_reason

INTEL = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae mce vmx ept\n"
NO_VT = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae mce\n"


def test_this_machine_gets_what_it_can_really_run():
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    choice = choose("auto")
    if kvm_unusable_reason(cpuinfo) is None:
        assert choice.accel == "kvm"
    else:  # the lab machines (shared/LAB-FACTS.md): /dev/kvm without vmx/svm
        assert choice.accel == "tcg" and choice.reason.startswith("KVM unusable: ")


def test_without_vmx_or_svm_kvm_is_refused_even_if_dev_kvm_exists(tmp_path):
    assert "neither vmx nor svm" in kvm_unusable_reason(NO_VT, "/dev/kvm")
    with pytest.raises(AccelError, match="accelerator kvm was asked for, but the CPU shows neither vmx"):
        choose("kvm", cpuinfo=NO_VT)
    assert choose("auto", cpuinfo=NO_VT).accel == "tcg"


def test_vt_flags_but_no_usable_dev_kvm(tmp_path):
    missing = tmp_path / "kvm"
    assert kvm_unusable_reason(INTEL, str(missing)) == f"cannot open {missing}: No such file or directory"
    not_kvm = tmp_path / "plain-file"
    not_kvm.write_text("")
    assert kvm_unusable_reason(INTEL, str(not_kvm)) == (
        f"{not_kvm} is not a KVM device: Inappropriate ioctl for device"
    )


def test_override_and_bad_setting():
    assert choose("tcg").accel == "tcg"
    with pytest.raises(AccelError, match="must be auto, kvm or tcg, not 'hvf'"):
        choose("hvf")
