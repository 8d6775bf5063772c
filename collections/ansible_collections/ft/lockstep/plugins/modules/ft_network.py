#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


DOCUMENTATION = r"""
---
module: ft_network
short_description: A dedicated migration or FT-logging network on a host (bond or single NIC)
version_added: "0.1.0"
description:
  - Configures the network of one FT role on the running kernel through netlink (pyroute2) and
    persists it for the host's network stack (systemd-networkd or NetworkManager, detected).
  - Two or more O(members) make a bond named O(interface); one member is used as it is.
  - The interface is tagged with the alias C(ft.lockstep:ROLE), which is how the module finds the
    network again and how it keeps the two roles on separate NICs.
  - Checks before changing anything, and fails listing every problem, changing nothing - members
    exist and are NICs, are not used by the other role, by the VM network or by another bond, link at
    O(min_speed_mbps) or faster (a warning below 10 Gb/s), and the network stack is supported.
  - If a step fails half-way, the steps already made are undone.
author:
  - ft developers (@ft-lockstep)
requirements:
  - pyroute2 on the managed host (Debian C(python3-pyroute2))
options:
  role:
    description: Which FT network this is.
    type: str
    required: true
    choices: [migration, ft_logging]
  members:
    description: The NICs that carry the network. Required with O(state=present).
    type: list
    elements: str
    default: []
  interface:
    description:
      - Name of the bond when there are two or more members. Ignored for one member (the NIC itself
        carries the network).
      - Defaults to C(ft-mig) for migration and C(ft-log) for FT logging.
    type: str
  bond_mode:
    description: Bonding mode.
    type: str
    default: active-backup
    choices: [balance-rr, active-backup, balance-xor, broadcast, 802.3ad, balance-tlb, balance-alb]
  miimon:
    description: Link monitoring interval of the bond, in milliseconds.
    type: int
    default: 100
  mtu:
    description: MTU of the interface (and so of the bond's members); left alone when not set.
    type: int
  address:
    description: The host's address on this network, C(ADDRESS/PREFIX). Required with O(state=present).
    type: str
  vm_interfaces:
    description:
      - Interfaces (NICs or bridges) that carry the VM network. A member that is one of them, or
        enslaved to one of them, is refused.
    type: list
    elements: str
    default: []
  min_speed_mbps:
    description: Slowest link speed accepted for a member, in Mb/s.
    type: int
    default: 1000
  persist:
    description:
      - Where the configuration is persisted. C(auto) picks the running network stack and fails when
        none is supported; C(none) configures the running kernel only.
    type: str
    default: auto
    choices: [auto, systemd-networkd, NetworkManager, none]
  state:
    description: C(present) configures the network, C(absent) removes it (the bond is deleted; a single
      NIC loses the address and the tag) and its persisted files.
    type: str
    default: present
    choices: [present, absent]
attributes:
  check_mode:
    description: Computes every step and file and changes nothing.
    support: full
  diff_mode:
    description: Shows the interface before and after and each persisted file.
    support: full
  idempotent:
    description: When run twice with the same arguments, the second run reports no change.
    support: full
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: linux
notes:
  - Files written for systemd-networkd (C(/etc/systemd/network/40-ft-ROLE*)) or NetworkManager
    (C(/etc/NetworkManager/system-connections/ft-ROLE*)) take effect at the next boot or reload; the
    running kernel is configured at once.
"""

EXAMPLES = r"""
- name: FT-logging network on two bonded 10 Gb/s NICs
  ft.lockstep.ft_network:
    role: ft_logging
    members: [ens4f0, ens5f0]
    bond_mode: active-backup
    mtu: 9000
    address: 10.0.2.11/24
    vm_interfaces: [br-vm]

- name: Migration network on a single NIC, running kernel only
  ft.lockstep.ft_network:
    role: migration
    members: [ens6]
    address: 10.0.1.11/24
    persist: none

- name: Remove the FT-logging network
  ft.lockstep.ft_network:
    role: ft_logging
    state: absent
"""

RETURN = r"""
interface:
  description: The interface that carries the network (the bond, or the single NIC).
  returned: always
  type: str
  sample: ft-log
steps:
  description: What was changed on the running kernel (or would be, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["create bond ft-log (mode active-backup, miimon 100 ms)", "add ens4f0 to bond ft-log"]
files:
  description: Persisted files written or removed (or that would be).
  returned: always
  type: list
  elements: str
stack:
  description: The network stack the configuration is persisted for, or C(none).
  returned: always
  type: str
  sample: systemd-networkd
"""

import errno
import os
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.ft.lockstep.plugins.module_utils import ft_network as net
from ansible_collections.ft.lockstep.plugins.module_utils.files import read_text

PYROUTE2_ERROR = None
try:
    from pyroute2 import IPRoute
    from pyroute2.ethtool import Ethtool
except ImportError:
    IPRoute = None
    PYROUTE2_ERROR = traceback.format_exc()


def sysfs(name, item):
    try:
        with open(f"/sys/class/net/{name}/{item}") as f:
            return f.read().strip()
    except OSError:
        return None


def link_speed(ethtool, name):
    """Mb/s through ethtool (sysfs shows no speed while a NIC is down, as bond members start), or None."""
    try:
        speed = ethtool.get_link_mode(name).speed
    except Exception:  # a device without ethtool link settings
        return None
    return speed if speed and speed > 0 else None


def read_links(ipr, ethtool):
    names, links = {}, {}
    messages = list(ipr.get_links())
    for msg in messages:
        names[msg["index"]] = msg.get_attr("IFLA_IFNAME")
    for msg in messages:
        name = names[msg["index"]]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
        mode = sysfs(name, "bonding/mode") if kind == "bond" else None
        links[name] = net.Link(
            name,
            kind=kind,
            master=names.get(msg.get_attr("IFLA_MASTER")),
            mtu=msg.get_attr("IFLA_MTU"),
            alias=(msg.get_attr("IFLA_IFALIAS") or "").rstrip("\0"),
            up=bool(msg["flags"] & 1),
            speed=link_speed(ethtool, name) if kind in net.NIC_KINDS else None,
            bond_mode=mode.split()[0] if mode else None,
        )
    for msg in ipr.get_addr():
        name = names.get(msg["index"])
        if name in links:
            links[name].addresses.append("{}/{}".format(msg.get_attr("IFA_ADDRESS"), msg["prefixlen"]))
    return links


class Kernel:
    """Carries out plan steps through netlink and remembers how to undo each."""

    def __init__(self, ipr, links):
        self.ipr, self.links, self.undo = ipr, links, []

    def index(self, name):
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise RuntimeError(f"interface {name} has gone")
        return found[0]

    def apply(self, action, args):
        name = args["name"]
        before = self.links.get(name)
        if action == "create_bond":
            mode = net.BOND_MODES.index(args["mode"])
            self.ipr.link("add", ifname=name, kind="bond", bond_mode=mode, bond_miimon=args["miimon"])
            self.undo.append(lambda: self.ipr.link("del", index=self.index(name)))
            return
        i = self.index(name)
        if action == "delete":
            self.ipr.link("del", index=i)
        elif action == "nomaster":
            self.ipr.link("set", index=i, master=0)
        elif action == "enslave":
            self.ipr.link("set", index=i, state="down")
            self.ipr.link("set", index=i, master=self.index(args["master"]))
            self.undo.append(lambda: self.ipr.link("set", index=self.index(name), master=0))
        elif action == "set_mtu":
            self.ipr.link("set", index=i, mtu=args["mtu"])
            if before is not None:
                self.undo.append(lambda: self.ipr.link("set", index=self.index(name), mtu=before.mtu))
        elif action == "set_alias":
            self.ipr.link("set", index=i, ifalias=args["alias"])
            old = before.alias if before is not None else ""
            self.undo.append(lambda: self.ipr.link("set", index=self.index(name), ifalias=old))
        elif action in ("add_addr", "del_addr"):
            ip, prefix = args["address"].split("/")
            verb, inverse = ("add", "del") if action == "add_addr" else ("del", "add")
            try:
                self.ipr.addr(verb, index=i, address=ip, prefixlen=int(prefix))
            except Exception as e:  # NetlinkError: the network stack may have just done the same
                if getattr(e, "code", None) not in (errno.EEXIST, errno.EADDRNOTAVAIL):
                    raise
                return
            self.undo.append(
                lambda: self.ipr.addr(inverse, index=self.index(name), address=ip, prefixlen=int(prefix))
            )
        elif action == "up":
            self.ipr.link("set", index=i, state="up")

    def roll_back(self):
        for undo in reversed(self.undo):
            try:  # noqa: SIM105 - contextlib would be one more import for one place
                undo()
            except Exception:  # best effort: report the original failure, not this one
                pass


def file_changes(role, stacks, wanted):
    """{path: (old content or None, new content or None)} for every file of the role under the given
    stacks that differs from what is wanted (absent from wanted: to be removed)."""
    changes = {}
    existing = []
    for stack in stacks:
        directory, prefix = net.owned_paths(role, stack)
        if os.path.isdir(directory):
            existing += [
                os.path.join(directory, n)
                for n in os.listdir(directory)
                if n.startswith(prefix + ".") or n.startswith(prefix + "-")
            ]
    for path in sorted(set(existing) | set(wanted)):
        old, new = read_text(path), wanted.get(path)
        if old != new:
            changes[path] = (old, new)
    return changes


def write_files(module, stack, changes):
    for path, (_old, new) in changes.items():
        if new is None:
            os.unlink(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".ft-tmp"
        with open(tmp, "w") as f:
            f.write(new)
        os.chmod(tmp, 0o600 if stack == "NetworkManager" else 0o644)
        os.rename(tmp, path)
    if stack == "NetworkManager" and changes and module.get_bin_path("nmcli"):
        module.run_command(["nmcli", "connection", "reload"], check_rc=True)


def describe(link, links):
    if link is None:
        return "(none)\n"
    lines = [f"interface: {link.name}"]
    for key, value in sorted(link.summary().items()):
        lines.append(f"{key}: {value}")
    members = sorted(n for n, x in links.items() if x.master == link.name)
    if members:
        lines.append("members: {}".format(", ".join(members)))
    return "\n".join(lines) + "\n"


def describe_wanted(want):
    if want.state == "absent":
        return "(none)\n"
    lines = [f"interface: {want.interface}", "kind: %s" % ("bond" if want.bonded else "nic")]
    if want.bonded:
        lines += [f"bond_mode: {want.bond_mode}", "members: {}".format(", ".join(want.members))]
    if want.mtu:
        lines.append(f"mtu: {want.mtu}")
    lines.append(f"addresses: ['{want.address}']")
    return "\n".join(lines) + "\n"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            role=dict(type="str", required=True, choices=list(net.ROLES)),
            members=dict(type="list", elements="str", default=[]),
            interface=dict(type="str"),
            bond_mode=dict(type="str", default="active-backup", choices=list(net.BOND_MODES)),
            miimon=dict(type="int", default=100),
            mtu=dict(type="int"),
            address=dict(type="str"),
            vm_interfaces=dict(type="list", elements="str", default=[]),
            min_speed_mbps=dict(type="int", default=1000),
            persist=dict(
                type="str", default="auto", choices=["auto", "systemd-networkd", "NetworkManager", "none"]
            ),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        supports_check_mode=True,
    )
    if IPRoute is None:
        module.fail_json(msg=missing_required_lib("pyroute2"), exception=PYROUTE2_ERROR)
    p = module.params
    want = net.Want(
        p["role"],
        p["members"],
        p["address"],
        p["interface"],
        p["bond_mode"],
        p["miimon"],
        p["mtu"],
        p["state"],
    )

    errors = []
    stack = None
    if p["persist"] != "none":
        running, evidence = net.detect_stack()
        if p["persist"] == "auto":
            stack = running
            if stack is None:
                errors.append(
                    f"no supported network stack runs on this host (found: {evidence}): "
                    "run systemd-networkd or NetworkManager, "
                    "or set persist: none to configure the running kernel only"
                )
        elif running != p["persist"]:
            errors.append(
                "persist is {} but it does not run on this host (found: {})".format(p["persist"], evidence)
            )
        else:
            stack = running

    with IPRoute() as ipr:
        ethtool = Ethtool()
        try:
            links = read_links(ipr, ethtool)
        finally:
            ethtool.close()
        for role in net.ROLES:
            for persisted_stack in net.STACKS:
                net.adopt_persisted(links, role, read_text(net.main_file(role, persisted_stack)))
        found, warnings = net.problems(want, links, p["vm_interfaces"], p["min_speed_mbps"])
        errors += found
        for w in warnings:
            module.warn(w)
        if errors:
            module.fail_json(msg="; ".join(errors), problems=errors, changed=False)

        steps = net.plan(want, links)
        if want.state == "absent":
            current = net.role_interface(want.role, links)
            interface = current.name if current is not None else None
            changes = file_changes(want.role, net.STACKS, {})
        else:
            interface = want.interface
            changes = file_changes(want.role, [stack] if stack else [], net.render(want, stack))
        diff = [
            dict(
                before_header=f"{want.role} network (running kernel)",
                after_header=f"{want.role} network (running kernel)",
                before=describe(net.role_interface(want.role, links), links),
                after=describe_wanted(want),
            )
        ]
        for path, (old, new) in changes.items():
            diff.append(dict(before_header=path, after_header=path, before=old or "", after=new or ""))
        result = dict(
            changed=bool(steps or changes),
            interface=interface,
            steps=[s[2] for s in steps],
            files=sorted(changes),
            stack=stack or "none",
            diff=diff,
        )
        if module.check_mode or not result["changed"]:
            module.exit_json(**result)

        kernel = Kernel(ipr, links)
        for action, args, description in steps:
            try:
                kernel.apply(action, args)
            except Exception as e:
                kernel.roll_back()
                module.fail_json(
                    msg=f"step '{description}' failed: {e}; the steps before it were undone",
                    steps_undone=[s[2] for s in steps[: steps.index((action, args, description))]],
                    exception=traceback.format_exc(),
                    changed=False,
                )
    try:
        write_files(module, stack, changes)
    except (OSError, RuntimeError) as e:
        module.fail_json(msg=f"the running kernel is configured but persisting failed: {e}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
