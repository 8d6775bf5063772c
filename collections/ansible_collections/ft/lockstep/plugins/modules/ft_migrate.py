#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


DOCUMENTATION = r"""
---
module: ft_migrate
short_description: Move the primary or the secondary of a running FT pair to another FT host
version_added: "0.1.0"
description:
  - C(secondary) ("Migrate Secondary") stops the secondary and makes it anew on O(host); the VM runs
    unprotected for the copy (seconds).
  - C(primary) moves the secondary to O(host) first, then fails over to it in a controlled way (a
    pause like a failover's); the engine then makes a new secondary on a third host when it can.
  - Nothing changes when the side already runs on O(host). The pair must be C(running); the
    secondary never goes to the primary's host. lockstepd's placement may still refuse O(host),
    with the reason.
author:
  - ft developers (@ft-lockstep)
extends_documentation_fragment:
  - ft.lockstep.engine
options:
  name:
    description: The VM; its pair must be C(running).
    type: str
    required: true
  role:
    description: Which side to move.
    type: str
    required: true
    choices: [primary, secondary]
  host:
    description: The FT host to move it to (a name of the engine's C(hosts)).
    type: str
    required: true
  timeout:
    description: Seconds to wait for lockstepd to finish the move.
    type: int
    default: 600
attributes:
  check_mode:
    description: Reports whether the side would move; refuses what lockstepd refuses for the pair's state.
    support: full
  diff_mode:
    description: Returns where the primary and the secondary run before and after.
    support: full
  idempotent:
    description: When run twice with the same arguments, the second run reports no change.
    support: full
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: linux
seealso:
  - module: ft.lockstep.ft_vm
"""

EXAMPLES = r"""
- name: Move db1's secondary to kvm3
  ft.lockstep.ft_migrate:
    name: db1
    role: secondary
    host: kvm3

- name: Move db1's primary to kvm2 (its secondary goes there first)
  ft.lockstep.ft_migrate:
    name: db1
    role: primary
    host: kvm2
"""

RETURN = r"""
vm:
  description: The pair after the move (in check mode, as it is), as RV(ft.lockstep.ft_vm#module:vm).
  returned: when the engine knows the VM
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ft.lockstep.plugins.module_utils.engine import Engine, EngineError


def where(view):
    return {"primary": view.get("primary"), "secondary_host": view.get("secondary_host")}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            role=dict(type="str", required=True, choices=["primary", "secondary"]),
            host=dict(type="str", required=True),
            timeout=dict(type="int", default=600),
            socket=dict(type="path", default="/run/lockstepd.sock"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    name, role, target = p["name"], p["role"], p["host"]
    engine = Engine(p["socket"], timeout=p["timeout"] + 60)
    try:
        view = engine.vm(name)
        if view is None:
            module.fail_json(msg=f"no FT VM named {name}")
        key = "primary" if role == "primary" else "secondary_host"
        if view["state"] == "running" and view.get(key) == target:
            module.exit_json(changed=False, vm=view, diff={"before": where(view), "after": where(view)})
        problems = []
        if view["state"] != "running" or not view.get("secondary_host"):
            problems.append(f"migrate needs a running pair; {name} is {view['state']} ({view['reason']})")
        if role == "secondary" and target == view.get("primary"):
            problems.append(f"{target} runs the primary (primary and secondary never share a host)")
        if problems:
            module.fail_json(
                msg="{} refused: {}".format(name, "; ".join(problems)), reasons=problems, vm=view
            )
        after = dict(where(view), **{key: target})
        if role == "primary" and view.get("secondary_host") == target:
            after["secondary_host"] = None  # a new secondary is made on a third host
        if module.check_mode:
            module.exit_json(changed=True, vm=view, diff={"before": where(view), "after": after})
        answer = engine.request("POST", f"/vms/{name}/migrate", {"role": role, "host": target})
        moved = answer.get("vm") or engine.vm(name)
        diff = {"before": where(view), "after": where(moved)}
        module.exit_json(changed=bool(answer.get("changed", True)), vm=moved, diff=diff)
    except EngineError as e:
        module.fail_json(msg=e.message, status=e.status)


if __name__ == "__main__":
    main()
