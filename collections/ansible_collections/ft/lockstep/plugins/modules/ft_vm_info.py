#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


DOCUMENTATION = r"""
---
module: ft_vm_info
short_description: FT state, reason and statistics of one VM or of every FT VM
version_added: "0.1.0"
description:
  - Asks lockstepd on the managed host; it forwards to the daemon of the pair's primary, so the
    statistics come from where they are measured.
author:
  - ft developers (@ft-lockstep)
extends_documentation_fragment:
  - ft.lockstep.engine
options:
  name:
    description: The VM; every FT VM when not given.
    type: str
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
- name: Where does db1 run, and how is its lockstep?
  ft.lockstep.ft_vm_info:
    name: db1
  register: db1

- name: Every FT VM
  ft.lockstep.ft_vm_info:
  register: ft
"""

RETURN = r"""
vms:
  description: One entry per VM (none when O(name) is not an FT VM).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The VM.
      type: str
    state:
      description: FT state (not_configured, starting, running, need_secondary, disabled).
      type: str
    reason:
      description: Why it is in that state (entered_lockstep, lost_connection, no_compatible_host, ...).
      type: str
    primary:
      description: Host of the primary.
      type: str
    secondary_host:
      description: Host of the secondary.
      type: str
    alarm:
      description: green, yellow or red.
      type: str
    stats:
      description:
        - checkpoints, pause_ms_p50, pause_ms_p99, lockstep_interval_s, log_bandwidth_mbps,
          secondary_cpu_percent, secondary_rss_mib.
      type: dict
    generation:
      description: The pair's generation; it grows with every failover or new secondary.
      type: int
    mode:
      description: C(lockstep) (KVM) or C(checkpoint) (TCG, or a QEMU without lockstep).
      type: str
    checkpoint_ms:
      description: Longest time between two checkpoints, in milliseconds.
      type: int
    preferred_secondary:
      description: The host preferred for the secondary, if any.
      type: str
    guest:
      description: The VM's definition as lockstepd runs it (name, mac, memory_mib, vcpus, kernel, ...).
      type: dict
    datastore:
      description: The shared datastore lockstepd keeps the pair's records on.
      type: str
    disks:
      description: The primary's disk images (known on the primary's host).
      type: list
      elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ft.lockstep.plugins.module_utils.engine import Engine, EngineError


def main():
    module = AnsibleModule(
        argument_spec=dict(name=dict(type="str"), socket=dict(type="path", default="/run/lockstepd.sock")),
        supports_check_mode=True,
    )
    engine = Engine(module.params["socket"], timeout=30)
    try:
        if module.params["name"]:
            view = engine.vm(module.params["name"])
            vms = [view] if view else []
        else:
            vms = [engine.vm(p["name"]) or p for p in engine.request("GET", "/status")["pairs"]]
    except EngineError as e:
        module.fail_json(msg=e.message, status=e.status)
    module.exit_json(changed=False, vms=vms)


if __name__ == "__main__":
    main()
