# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a host offers for hardware virtualization, read from the kernel: the CPU's flags, the
firmware's switch for VT-x / AMD-V (model-specific registers through /dev/cpu/*/msr), and
whether /dev/kvm really creates a VM. Pure functions take what was read, so they are tested
without the hardware."""

import errno
import fcntl
import os
import struct

IA32_FEATURE_CONTROL = 0x3A  # Intel: bit 0 lock, bit 2 VMX outside SMX
MSR_VM_CR = 0xC0010114  # AMD: bit 4 SVMDIS
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12


def parse_cpuinfo(text):
    """(vendor, flags) of the first CPU in /proc/cpuinfo."""
    vendor, flags = None, set()
    for line in text.splitlines():
        key, _sep, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return vendor, flags


def vt_extension(vendor, flags):
    """The CPU's virtualization extension as the kernel shows it: vmx, svm or None."""
    if "vmx" in flags:
        return "vmx"
    if "svm" in flags:
        return "svm"
    return None


def firmware_state(vendor, msr_value):
    """(enabled, reason) from the MSR that holds the firmware's switch; enabled is None when
    the value could not be read (msr_value None)."""
    if msr_value is None:
        return None, "the MSR could not be read"
    if vendor == "GenuineIntel":
        locked, vmx = msr_value & 0x1, msr_value & 0x4
        if locked and not vmx:
            return False, "VT-x is disabled in the firmware (IA32_FEATURE_CONTROL locked without VMX)"
        if locked:
            return True, "VT-x enabled and locked by the firmware"
        return True, "IA32_FEATURE_CONTROL not locked: the kernel enables VT-x itself"
    if vendor == "AuthenticAMD":
        if msr_value & 0x10:
            return False, "AMD-V is disabled in the firmware (VM_CR.SVMDIS set)"
        return True, "AMD-V enabled (VM_CR.SVMDIS clear)"
    return None, f"unknown CPU vendor {vendor}"


def read_msr(register, cpu=0, root="/dev/cpu"):
    """(value, reason): value None with the reason when it cannot be read."""
    path = os.path.join(root, str(cpu), "msr")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None, f"{path} does not exist (load the msr module: modprobe msr)"
        return None, f"cannot open {path}: {e.strerror}"
    try:
        data = os.pread(fd, 8, register)
    except OSError as e:
        return None, f"cannot read MSR {register:#x}: {e.strerror} (a virtual CPU may not expose it)"
    finally:
        os.close(fd)
    if len(data) != 8:
        return None, f"short read of MSR {register:#x}"
    return struct.unpack("<Q", data)[0], None


def msr_register(vendor):
    return {"GenuineIntel": IA32_FEATURE_CONTROL, "AuthenticAMD": MSR_VM_CR}.get(vendor)


def kvm_state(path="/dev/kvm"):
    """(usable, reason): /dev/kvm opened, its API version checked and a VM created."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open {path}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return False, f"{path} answers API version {version}, not {KVM_API_VERSION}"
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
        return True, f"{path} creates VMs"
    except OSError as e:
        return False, f"{path} cannot create a VM: {e.strerror}"
    finally:
        os.close(fd)


def kvm_kind(vt_ext, kvm_usable):
    """hardware KVM, paravirtual KVM (a /dev/kvm that works on a CPU without VT-x/AMD-V, such as
    PVM: stock guests do not boot on it), or None when /dev/kvm is not usable."""
    if not kvm_usable:
        return None
    return "hardware" if vt_ext else "paravirtual"


def problems(facts, require_kvm=True):
    """One reason per requirement of an FT host that these facts do not meet (none about VT-x and
    KVM when require_kvm is false: a lab that runs its guests under TCG)."""
    found = []
    if not require_kvm:
        return found
    if not facts["vt_extension"]:
        if facts["hypervisor"]:
            found.append(
                "the CPU shows no VT-x/AMD-V: this host is itself a virtual machine whose "
                "hypervisor does not pass nested virtualization through"
            )
        else:
            found.append("the CPU shows no VT-x/AMD-V flag (vmx/svm): enable virtualization in the firmware")
    if facts["firmware_enabled"] is False:
        found.append(facts["firmware_reason"])
    if not facts["kvm_usable"]:
        found.append(f"KVM is not usable: {facts['kvm_reason']}")
    elif facts["kvm_kind"] == "paravirtual":
        found.append("/dev/kvm is paravirtual KVM (no VT-x/AMD-V under it): stock guests do not boot on it")
    return found
