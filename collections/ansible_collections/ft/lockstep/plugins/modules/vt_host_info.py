#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: vt_host_info
short_description: What a host offers for fault-tolerant KVM VMs
version_added: "0.1.0"
description:
  - Reads the CPU vendor and its VT-x / AMD-V flag, whether the firmware enabled the extension
    (Intel C(IA32_FEATURE_CONTROL), AMD C(VM_CR) read through C(/dev/cpu/*/msr)), whether the host
    is itself a virtual machine, whether C(/dev/kvm) really creates a VM, and the QEMU, libvirt and
    lockstep engine versions.
  - Says why when something cannot be read (no C(msr) module, a virtual CPU that hides the MSR).
  - C(problems) lists one reason per requirement of an FT host that is not met; the module never
    fails on them, so a play can gather every host first and assert afterwards.
  - Changes nothing on the host.
author:
  - ft developers (@ft-lockstep)
options:
  qemu:
    description: The QEMU binary whose version is reported.
    type: str
    default: qemu-system-x86_64
  require_kvm:
    description:
      - Whether hardware KVM is a requirement. Set it to C(false) only where guests are meant to
        run under TCG (a test lab); the facts are reported either way.
    type: bool
    default: true
attributes:
  check_mode:
    description: Can run in check mode.
    support: full
    details: This action does not modify state.
  diff_mode:
    description: Returns what changed (or would change in check mode) when run with --diff.
    support: N/A
    details: This action does not modify state.
  idempotent:
    description: When run twice with the same arguments, the second run reports no change.
    support: full
    details: This action does not modify state.
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: linux
"""

EXAMPLES = r"""
- name: Read what every host offers
  ft.lockstep.vt_host_info:
  register: vt

- name: Every requirement met, or one reason each
  ansible.builtin.assert:
    that: vt.problems | length == 0
    fail_msg: "{{ inventory_hostname }}: {{ vt.problems | join('; ') }}"
"""

RETURN = r"""
vendor:
  description: CPU vendor string from /proc/cpuinfo.
  returned: always
  type: str
  sample: GenuineIntel
vt_extension:
  description: C(vmx), C(svm), or null when the CPU shows neither.
  returned: always
  type: str
  sample: vmx
hypervisor:
  description: Whether this host runs under a hypervisor (the CPU's C(hypervisor) flag).
  returned: always
  type: bool
firmware_enabled:
  description: Whether the firmware enabled the extension; null when it could not be read.
  returned: always
  type: bool
firmware_reason:
  description: How C(firmware_enabled) was decided, or why it could not be.
  returned: always
  type: str
  sample: /dev/cpu/0/msr does not exist (load the msr module, modprobe msr)
kvm_usable:
  description: Whether /dev/kvm answered the expected API version and created a VM.
  returned: always
  type: bool
kvm_reason:
  description: Why C(kvm_usable) is what it is.
  returned: always
  type: str
kvm_kind:
  description:
    - C(hardware), or C(paravirtual) when /dev/kvm works on a CPU without VT-x/AMD-V (for example
      PVM, on which stock guests do not boot); null when KVM is not usable.
  returned: always
  type: str
  sample: hardware
versions:
  description:
    - Versions of QEMU, libvirt and the lockstep engine (null when not installed). QEMU's is the
      whole build as C(--version) says it, so that two builds of one release differ.
  returned: always
  type: dict
  sample: {qemu: "7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)", libvirt: "9.0.0", engine: "0.1.0"}
problems:
  description: One reason per FT host requirement this host does not meet; empty when it meets them all.
  returned: always
  type: list
  elements: str
"""

import re

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ft.lockstep.plugins.module_utils import vt


def version_of(module, argv, pattern):
    path = module.get_bin_path(argv[0])
    if not path:
        return None
    rc, out, err = module.run_command([path] + argv[1:])
    match = re.search(pattern, out + err)
    return match.group(1) if rc == 0 and match else None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            qemu=dict(type="str", default="qemu-system-x86_64"),
            require_kvm=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    with open("/proc/cpuinfo") as f:
        vendor, flags = vt.parse_cpuinfo(f.read())
    register = vt.msr_register(vendor)
    if register is None:
        msr, msr_reason = None, f"unknown CPU vendor {vendor}"
    else:
        msr, msr_reason = vt.read_msr(register)
    enabled, firmware_reason = vt.firmware_state(vendor, msr)
    kvm_usable, kvm_reason = vt.kvm_state()
    facts = dict(
        vendor=vendor,
        vt_extension=vt.vt_extension(vendor, flags),
        hypervisor="hypervisor" in flags,
        firmware_enabled=enabled,
        firmware_reason=msr_reason if msr is None else firmware_reason,
        kvm_usable=kvm_usable,
        kvm_reason=kvm_reason,
        versions=dict(
            qemu=version_of(module, [module.params["qemu"], "--version"], r"version (\S+(?: \([^)]*\))?)"),
            libvirt=version_of(module, ["libvirtd", "--version"], r"(\d+\.\d+\.\d+)"),
            engine=version_of(module, ["ftctl", "--version"], r"ftctl (\S+)"),
        ),
    )
    facts["kvm_kind"] = vt.kvm_kind(facts["vt_extension"], kvm_usable)
    facts["problems"] = vt.problems(facts, module.params["require_kvm"])
    module.exit_json(changed=False, **facts)


if __name__ == "__main__":
    main()
