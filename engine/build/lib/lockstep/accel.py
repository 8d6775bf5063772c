"""Which accelerator QEMU should use on this host: KVM where it really works, TCG otherwise.

/dev/kvm existing is not enough (shared/LAB-FACTS.md: here it is nested PVM, without vmx/svm
flags, and stock guests never boot on it). KVM is chosen only when the CPU shows vmx or svm and
/dev/kvm answers the API version and creates a VM. The setting overrides: "kvm" where KVM is
unusable is an error with the reason, never a silent fall back."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12


class AccelError(Exception):
    pass


@dataclass(frozen=True)
class Choice:
    accel: str  # "kvm" or "tcg"
    reason: str


def kvm_unusable_reason(cpuinfo: str, kvm_path: str = "/dev/kvm") -> str | None:
    """Why KVM cannot run guests here, or None when it can."""
    flags = {
        f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":")[1].split()
    }
    if not flags & {"vmx", "svm"}:
        return "the CPU shows neither vmx nor svm (virtualization off in firmware, or not passed to this VM)"
    try:
        fd = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {kvm_path}: {e.strerror}"
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as e:
            return f"{kvm_path} is not a KVM device: {e.strerror}"
        if version != KVM_API_VERSION:
            return f"{kvm_path} speaks KVM API {version}, not {KVM_API_VERSION}"
        try:
            os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        except OSError as e:
            return f"{kvm_path} cannot create a VM: {e.strerror}"
    finally:
        os.close(fd)
    return None


def choose(setting: str = "auto", cpuinfo: str | None = None, kvm_path: str = "/dev/kvm") -> Choice:
    """The accelerator for setting "auto", "kvm" or "tcg"."""
    if setting not in ("auto", "kvm", "tcg"):
        raise AccelError(f"accelerator must be auto, kvm or tcg, not {setting!r}")
    if setting == "tcg":
        return Choice("tcg", "set to tcg")
    if cpuinfo is None:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    why_not = kvm_unusable_reason(cpuinfo, kvm_path)
    if why_not is None:
        return Choice("kvm", "KVM works on this host")
    if setting == "kvm":
        raise AccelError(f"accelerator kvm was asked for, but {why_not}")
    return Choice("tcg", f"KVM unusable: {why_not}")
