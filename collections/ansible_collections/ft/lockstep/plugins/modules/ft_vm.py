#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


DOCUMENTATION = r"""
---
module: ft_vm
short_description: Turn Fault Tolerance on, suspend it or turn it off for a VM
version_added: "0.1.0"
description:
  - C(enabled) ("Turn On FT") starts a secondary on another host, copies the VM there and keeps the
    two in lockstep; it returns once the pair is C(running) (see O(wait)). Before that the VM is
    checked and refused with every reason at once - devices the secondary cannot replay (USB
    controllers and devices, sound cards, the host's CD-ROM or floppy drive, hostdev passthrough,
    C(device='lun') disks), snapshots, disks or boot files not on the shared datastore. Thin
    (sparse) disk images are made thick (every block allocated) first, noted in RV(notes).
  - C(disabled) ("Suspend FT") stops the secondary; the pair's set-up is kept and C(enabled) turns
    it on again.
  - C(absent) ("Turn Off FT") removes the secondary and the FT set-up; the VM keeps running.
  - The VM keeps running through every change. The module talks to lockstepd on the managed host,
    whichever FT host that is.
  - A VM lockstepd does not run yet is started under it from O(definition) (C(enabled),
    C(disabled)); a libvirt domain of the same name on the managed host is checked as above.
    Without O(definition) such a VM is refused (C(enabled), C(disabled)), in check mode as well.
author:
  - ft developers (@ft-lockstep)
extends_documentation_fragment:
  - ft.lockstep.engine
options:
  name:
    description: The VM.
    type: str
    required: true
  state:
    description: What FT should be for the VM.
    type: str
    choices: [enabled, disabled, absent]
    default: enabled
  checkpoint_ms:
    description:
      - Longest time between two checkpoints (checkpoint mode) or forced checkpoints (lockstep
        mode), in milliseconds. Applied to a running pair at once. Defaults to the engine's.
    type: int
  secondary_host:
    description: The FT host preferred for the secondary (placement may still refuse it, with the reason).
    type: str
  wait:
    description:
      - Wait until the pair is C(running) (C(enabled)), also when it was already turned on and is
        still C(starting) or C(need_secondary); fail with its state and reason if not within O(wait_timeout).
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait.
    type: int
    default: 600
  definition:
    description:
      - The VM to start under lockstepd on the managed host when the engine does not run it yet
        (ignored when it does), in the engine's VM schema (spec_version 1). Disk images and boot
        files must be on the shared datastore. Either O(definition.nics) and O(definition.disks),
        or the earlier shape O(definition.mac) and O(definition.disk_mib).
      - The engine checks it before anything starts and refuses it with every reason at once
        (an image off the datastore or missing, an unknown bridge, a MAC twice or used by another
        VM, a machine type or firmware its QEMU cannot run).
    type: dict
    suboptions:
      memory_mib:
        description: Memory.
        type: int
        default: 256
      vcpus:
        description: Virtual CPUs.
        type: int
        default: 1
      sockets:
        description: CPU sockets (with O(definition.cores); sockets x cores = vcpus).
        type: int
      cores:
        description: Cores per socket.
        type: int
      machine:
        description:
          - QEMU machine type (C(pc) or a versioned one such as C(pc-i440fx-7.2)); default C(pc).
          - C(q35) is refused (QEMU 7.2's COLO secondary aborts loading a q35 checkpoint).
        type: str
      firmware:
        description: C(seabios). C(ovmf) is refused (its NVRAM is not replicated across a failover).
        type: str
      cpu_model:
        description: QEMU CPU model, the same on both sides; default C(qemu64) under TCG, C(host) under KVM.
        type: str
      serial:
        description: Keep the serial console in a file beside the VM's sockets.
        type: bool
      disks:
        description: The VM's disks, the first is the boot disk when no O(definition.kernel) is given.
        type: list
        elements: dict
        suboptions:
          path:
            description:
              - The disk image on the shared datastore; it must exist and is never created.
              - This path always holds the VM's disk. A secondary keeps its copy beside it, as
                C(.<image>.<vm>.ft-<host>-g<generation>), and that copy is renamed over the image when
                the secondary takes over; so the directory must be writable by lockstepd on every host.
            type: path
          format:
            description: Image format.
            type: str
            choices: [raw, qcow2]
          bus:
            description: Bus of the disk.
            type: str
            choices: [virtio-blk, virtio-scsi]
          create:
            description: >-
              A scratch disk (no O(definition.disks[].path)),
              made empty at every start on each host.
            type: bool
          size_mib:
            description: Size of a scratch disk.
            type: int
      nics:
        description: The VM's NICs (at most 3).
        type: list
        elements: dict
        suboptions:
          mac:
            description: MAC address.
            type: str
            required: true
          bridge:
            description: Bridge of the VM network; default the engine's C(bridge).
            type: str
          model:
            description: NIC model.
            type: str
            choices: [virtio-net-pci]
      mac:
        description: MAC address of its one NIC on the VM network (the earlier shape; or O(definition.nics)).
        type: str
      kernel:
        description: Kernel to boot.
        type: path
      initrd:
        description: Initial ramdisk.
        type: path
      cmdline:
        description: Kernel command line.
        type: str
        default: ""
      disk_mib:
        description: Size of a scratch virtio disk (the earlier shape; or O(definition.disks)).
        type: int
  libvirt_uri:
    description: libvirt on the managed host, where a domain of the same name is checked.
    type: str
    default: qemu:///system
attributes:
  check_mode:
    description: Can run in check mode and report what would change.
    support: full
  diff_mode:
    description: Returns before and after when run with --diff.
    support: full
  idempotent:
    description: When run twice with the same arguments, the second run reports no change.
    support: full
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: linux
"""

EXAMPLES = r"""
- name: Turn On FT for db1 and wait for the pair to run
  ft.lockstep.ft_vm:
    name: db1
    state: enabled
    checkpoint_ms: 100
    secondary_host: kvm3

- name: Suspend FT (secondary stopped, set-up kept)
  ft.lockstep.ft_vm:
    name: db1
    state: disabled

- name: Turn Off FT (the VM keeps running)
  ft.lockstep.ft_vm:
    name: db1
    state: absent
"""

RETURN = r"""
vm:
  description: The pair as lockstepd reports it after the change (in check mode, as it was).
  returned: when the engine knows the VM
  type: dict
  contains:
    state:
      description: FT state (not_configured, starting, running, need_secondary, disabled).
      type: str
      sample: running
    reason:
      description: Why it is in that state.
      type: str
      sample: entered_lockstep
    primary:
      description: Host of the primary.
      type: str
    secondary_host:
      description: Host of the secondary, if any.
      type: str
    stats:
      description: Statistics (on the primary's host's answer).
      type: dict
    name:
      description: The VM.
      type: str
    generation:
      description: The pair's generation; it grows with every failover or new secondary.
      type: int
      sample: 3
    mode:
      description: C(lockstep) (KVM) or C(checkpoint) (TCG, or a QEMU without lockstep).
      type: str
    checkpoint_ms:
      description: Longest time between two checkpoints, in milliseconds.
      type: int
      sample: 100
    alarm:
      description: C(green), C(yellow) (suspended, or slow lockstep) or C(red) (no secondary).
      type: str
    preferred_secondary:
      description: The host preferred for the secondary (O(secondary_host)), if any.
      type: str
    guest:
      description: The VM's definition as lockstepd runs it (spec_version, name, nics, disks, ...).
      type: dict
    datastore:
      description: The shared datastore lockstepd keeps the pair's records on.
      type: str
    disks:
      description: The primary's disk images (known on the primary's host).
      type: list
      elements: str
reasons:
  description: Every reason the VM was refused.
  returned: failed with reasons
  type: list
  elements: str
notes:
  description: What was done besides the state change (thin disks made thick, the VM started).
  returned: always
  type: list
  elements: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ft.lockstep.plugins.module_utils import vm_checks
from ansible_collections.ft.lockstep.plugins.module_utils.engine import Engine, EngineError

LIBVIRT_ERROR = None
try:
    import libvirt
except ImportError:
    LIBVIRT_ERROR = traceback.format_exc()

ON = ("running", "starting", "need_secondary")
OFF = ("disabled", "not_configured")


def libvirt_domain(module):
    """(domain XML, snapshot count) of the libvirt domain of that name, or None."""
    if LIBVIRT_ERROR:
        module.warn(
            "libvirt-python is missing: no libvirt domain named {} checked".format(module.params["name"])
        )
        return None
    libvirt.registerErrorHandler(lambda *_: None, None)
    try:
        conn = libvirt.openReadOnly(module.params["libvirt_uri"])
    except libvirt.libvirtError as e:
        module.warn("libvirt at {}: {} (no domain checked)".format(module.params["libvirt_uri"], e))
        return None
    try:
        dom = conn.lookupByName(module.params["name"])
        return dom.XMLDesc(0), dom.snapshotNum(0)
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def summary(view):
    if view is None:
        return {"state": "not_running_under_lockstepd"}
    return {k: view.get(k) for k in ("state", "primary", "secondary_host", "checkpoint_ms")}


def without_none(value):
    """The definition as the engine's API takes it: options not given are left out."""
    if isinstance(value, dict):
        return dict((k, without_none(v)) for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def refusals(module, engine, view):
    """Every reason the VM cannot be protected, and the thin disks to make thick."""
    p = module.params
    datastore = (view or {}).get("datastore") or engine.request("GET", "/status").get("datastore")
    problems = []
    domain = libvirt_domain(module)
    if domain is not None:
        problems += vm_checks.domain_problems(domain[0], datastore, snapshots=domain[1])
        if view is None:
            problems.append(
                "{} is a libvirt domain: lockstepd protects the VMs it runs itself; start it "
                "under lockstepd (definition) - it cannot take over a libvirt-run QEMU".format(p["name"])
            )
    guest = (view or {}).get("guest") or p["definition"] or {}
    problems += vm_checks.boot_file_problems(guest, datastore)
    if view is None and domain is None and not p["definition"]:
        problems.append("lockstepd runs no VM named {}: give its definition to start it".format(p["name"]))
    thin = [d for d in (view or {}).get("disks", []) if vm_checks.is_thin(d)]
    return problems, thin


def await_running(module, engine, view, notes):
    """With O(wait), the pair's view once running; fails with its state and reason at the deadline."""
    p = module.params
    if not p["wait"]:
        return view
    view, ok = engine.await_vm(p["name"], lambda v: v["state"] == "running", p["wait_timeout"])
    if not ok:
        state = "gone" if view is None else "{} ({})".format(view["state"], view["reason"])
        module.fail_json(
            msg="{} did not reach running within {} s: {}".format(p["name"], p["wait_timeout"], state),
            vm=view,
            notes=notes,
        )
    return view


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="enabled", choices=["enabled", "disabled", "absent"]),
            checkpoint_ms=dict(type="int"),
            secondary_host=dict(type="str"),
            wait=dict(type="bool", default=True),
            wait_timeout=dict(type="int", default=600),
            definition=dict(
                type="dict",
                options=dict(
                    memory_mib=dict(type="int", default=256),
                    vcpus=dict(type="int", default=1),
                    sockets=dict(type="int"),
                    cores=dict(type="int"),
                    machine=dict(type="str"),
                    firmware=dict(type="str"),
                    cpu_model=dict(type="str"),
                    serial=dict(type="bool"),
                    disks=dict(
                        type="list",
                        elements="dict",
                        options=dict(
                            path=dict(type="path"),
                            format=dict(type="str", choices=["raw", "qcow2"]),
                            bus=dict(type="str", choices=["virtio-blk", "virtio-scsi"]),
                            create=dict(type="bool"),
                            size_mib=dict(type="int"),
                        ),
                    ),
                    nics=dict(
                        type="list",
                        elements="dict",
                        options=dict(
                            mac=dict(type="str", required=True),
                            bridge=dict(type="str"),
                            model=dict(type="str", choices=["virtio-net-pci"]),
                        ),
                    ),
                    mac=dict(type="str"),
                    kernel=dict(type="path"),
                    initrd=dict(type="path"),
                    cmdline=dict(type="str", default=""),
                    disk_mib=dict(type="int"),
                ),
                required_one_of=[("mac", "nics")],
                mutually_exclusive=[("mac", "nics"), ("disk_mib", "disks")],
            ),
            libvirt_uri=dict(type="str", default="qemu:///system"),
            socket=dict(type="path", default="/run/lockstepd.sock"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    name, state = p["name"], p["state"]
    engine = Engine(p["socket"], timeout=p["wait_timeout"] + 60)
    notes = []
    try:
        view = engine.vm(name)
        before = summary(view)
        if state == "absent" and view is None:
            module.exit_json(changed=False, notes=notes)
        want_on = state == "enabled"
        on = view is not None and view["state"] in ON
        interval_change = (
            want_on and on and p["checkpoint_ms"] is not None and p["checkpoint_ms"] != view["checkpoint_ms"]
        )
        if (want_on and not on) or view is None:  # a VM to protect, or to start from its definition
            problems, thin = refusals(module, engine, view)
            if problems:
                module.fail_json(
                    msg="{} refused: {}".format(name, "; ".join(problems)),
                    reasons=problems,
                    vm=view,
                    notes=notes,
                )
            for disk in thin if want_on else []:
                if not module.check_mode:
                    vm_checks.thicken(disk)
                notes.append(f"thin disk {disk} made thick (every block allocated)")
        if view is None:
            changed = True  # started under lockstepd (state absent has returned above)
        elif state == "enabled":
            changed = not on or interval_change
        elif state == "disabled":
            changed = view["state"] not in OFF
        else:
            changed = view["state"] != "not_configured"
        after = dict(before)
        if changed:
            after["state"] = {"enabled": "running", "disabled": "disabled", "absent": "not_configured"}[state]
            if interval_change or (want_on and p["checkpoint_ms"] is not None):
                after["checkpoint_ms"] = p["checkpoint_ms"]
        diff = {"before": before, "after": after}
        if not changed and not module.check_mode and want_on and view["state"] != "running":
            view = await_running(module, engine, view, notes)  # starting or need_secondary: wait
        if module.check_mode or not changed:
            module.exit_json(changed=changed, vm=view, notes=notes, diff=diff)
        if view is None:
            body = without_none(p["definition"])
            view = engine.request("POST", "/vms", dict(body, name=name))["vm"]
            notes.append("{} started under lockstepd on {}".format(name, view["primary"]))
        if state == "enabled":
            body = {"checkpoint_ms": p["checkpoint_ms"], "secondary_host": p["secondary_host"]}
            view = engine.request(
                "POST", f"/vms/{name}/enable", dict((k, v) for k, v in body.items() if v is not None)
            )["vm"]
            if view["state"] != "running":
                view = await_running(module, engine, view, notes)
        elif state == "disabled" and view["state"] not in OFF:
            view = engine.request("POST", f"/vms/{name}/disable")["vm"]
        elif state == "absent":
            view = engine.request("POST", f"/vms/{name}/absent")["vm"]
        diff["after"] = summary(view)
        module.exit_json(changed=True, vm=view, notes=notes, diff=diff)
    except EngineError as e:
        module.fail_json(msg=e.message, status=e.status, notes=notes)


if __name__ == "__main__":
    main()
