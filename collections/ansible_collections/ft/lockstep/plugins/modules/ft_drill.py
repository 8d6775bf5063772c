#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


DOCUMENTATION = r"""
---
module: ft_drill
short_description: Test Failover or Test Restart Secondary on a running FT pair
version_added: "0.1.0"
description:
  - C(test_failover) kills the primary's QEMU; the secondary goes live and the engine makes a new
    secondary on its own, as after a real loss.
  - C(test_restart_secondary) kills the secondary's QEMU; the engine makes a new one.
  - With O(wait), returns once the pair runs again in a new generation, with the time it took.
author:
  - ft developers (@ft-lockstep)
extends_documentation_fragment:
  - ft.lockstep.engine
options:
  name:
    description: The VM; its pair must be C(running).
    type: str
    required: true
  action:
    description: Which drill.
    type: str
    required: true
    choices: [test_failover, test_restart_secondary]
  wait:
    description: Wait for the pair to be C(running) again (re-protected).
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait.
    type: int
    default: 600
attributes:
  check_mode:
    description: Can run in check mode and report what would change.
    support: full
    details: In check mode only the pair's state is checked; nothing is killed.
  diff_mode:
    description: Returns no diff; RV(before) and RV(after) show the pair around the drill.
    support: none
  idempotent:
    description: When run twice with the same arguments, the second run reports no change.
    support: none
    details: Every run kills a QEMU (the primary's or the secondary's) and reports a change.
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: linux
"""

EXAMPLES = r"""
- name: Test Failover on db1 and wait for it to be protected again
  ft.lockstep.ft_drill:
    name: db1
    action: test_failover
  register: drill

- name: Show how long re-protection took
  ansible.builtin.debug:
    msg: "{{ drill.before.primary }} -> {{ drill.after.primary }} in {{ drill.reprotect_s }} s"
"""

RETURN = r"""
before:
  description: The pair before the drill.
  returned: always
  type: dict
after:
  description: The pair once running again (O(wait)) or right after the drill.
  returned: when not check mode
  type: dict
reprotect_s:
  description: Seconds from the drill to the pair running again in a new generation.
  returned: when O(wait)
  type: float
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ft.lockstep.plugins.module_utils.engine import Engine, EngineError

PATH = {"test_failover": "test-failover", "test_restart_secondary": "test-restart-secondary"}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            action=dict(type="str", required=True, choices=sorted(PATH)),
            wait=dict(type="bool", default=True),
            wait_timeout=dict(type="int", default=600),
            socket=dict(type="path", default="/run/lockstepd.sock"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    engine = Engine(p["socket"], timeout=60)
    try:
        before = engine.vm(p["name"])
        if before is None:
            module.fail_json(msg=f"no FT VM named {p['name']}")
        if before["state"] != "running":
            module.fail_json(
                msg=f"{p['action']} needs a running pair; "
                f"{p['name']} is {before['state']} ({before['reason']})",
                before=before,
            )
        if module.check_mode:
            module.exit_json(changed=True, before=before)
        began = time.monotonic()
        engine.request("POST", f"/vms/{p['name']}/{PATH[p['action']]}")
        result = dict(changed=True, before=before)
        if p["wait"]:
            after, ok = engine.await_vm(
                p["name"],
                lambda v: v["state"] == "running" and v["generation"] > before["generation"],
                p["wait_timeout"],
                poll=0.2,
            )
            result.update(after=after, reprotect_s=round(time.monotonic() - began, 2))
            if not ok:
                module.fail_json(
                    msg=f"{p['name']} was not protected again within {p['wait_timeout']} s", **result
                )
        else:
            result["after"] = engine.vm(p["name"])
        module.exit_json(**result)
    except EngineError as e:
        module.fail_json(msg=e.message, status=e.status)


if __name__ == "__main__":
    main()
