#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


DOCUMENTATION = r"""
---
module: ft_cluster_info
short_description: The FT cluster as one host's lockstepd sees it - hosts, pairs, caps, alarms
version_added: "0.1.0"
description:
  - Pair records live on the shared datastore, so every host lists every pair; RV(local_vms) and
    RV(caps) are the managed host's own.
author:
  - ft developers (@ft-lockstep)
extends_documentation_fragment:
  - ft.lockstep.engine
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
- name: Any FT alarm?
  ft.lockstep.ft_cluster_info:
  register: cluster
  run_once: true

- name: Fail the job on a red alarm
  ansible.builtin.assert:
    that: cluster.cluster.alarms | selectattr('level', 'equalto', 'red') | list | length == 0
  run_once: true
"""

RETURN = r"""
cluster:
  description:
    - The cluster as the managed host's lockstepd reports it (its C(GET /status)), under one key.
    - The same keys are also returned at the top level (RV(host), RV(pairs), ...) for playbooks
      written before RV(cluster); new playbooks should use RV(cluster). Keys the daemon adds later
      appear only in RV(cluster).
  returned: always
  type: dict
  contains:
    host:
      description: The managed host's name in the FT cluster.
      type: str
    hosts:
      description: Every FT host and its FT-logging address.
      type: dict
    mode:
      description: lockstep (KVM) or checkpoint (TCG, or a QEMU without lockstep).
      type: str
    caps:
      description: This host's limits (max_vms, max_vcpus, ft_bandwidth_mbps; 0 is none).
      type: dict
    datastore:
      description: The shared datastore.
      type: str
    pairs:
      description: Every FT pair (as RV(ft.lockstep.ft_vm_info#module:vms)).
      type: list
      elements: dict
    local_vms:
      description: VMs whose primary or secondary runs on this host.
      type: list
      elements: str
    alarms:
      description: Pairs not green, with level (yellow or red), state and reason.
      type: list
      elements: dict
host:
  description: The managed host's name in the FT cluster.
  returned: always
  type: str
hosts:
  description: Every FT host and its FT-logging address.
  returned: always
  type: dict
mode:
  description: lockstep (KVM) or checkpoint (TCG, or a QEMU without lockstep).
  returned: always
  type: str
caps:
  description: This host's limits (max_vms, max_vcpus, ft_bandwidth_mbps; 0 is none).
  returned: always
  type: dict
datastore:
  description: The shared datastore.
  returned: always
  type: str
pairs:
  description: Every FT pair (as RV(ft.lockstep.ft_vm_info#module:vms)).
  returned: always
  type: list
  elements: dict
local_vms:
  description: VMs whose primary or secondary runs on this host (a secondary as C(NAME (secondary))).
  returned: always
  type: list
  elements: str
alarms:
  description: Pairs not green, with level (yellow or red), state and reason.
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ft.lockstep.plugins.module_utils.engine import Engine, EngineError

LEGACY = ("host", "hosts", "mode", "caps", "datastore", "pairs", "local_vms", "alarms")


def main():
    module = AnsibleModule(
        argument_spec=dict(socket=dict(type="path", default="/run/lockstepd.sock")),
        supports_check_mode=True,
    )
    try:
        status = Engine(module.params["socket"], timeout=30).request("GET", "/status")
    except EngineError as e:
        module.fail_json(msg=e.message, status=e.status)
    # under one key; the documented keys also at the top level (backward compatible), never the
    # daemon's other keys, which could collide with changed, failed, msg or warnings
    legacy = {k: status[k] for k in LEGACY if k in status}
    module.exit_json(changed=False, cluster=status, **legacy)


if __name__ == "__main__":
    main()
