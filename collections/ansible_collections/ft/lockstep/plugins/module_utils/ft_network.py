# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The FT networks of a host (migration, FT logging): what is there, what is wanted, what is wrong
with the request, the steps from one to the other, and the files that make it survive a reboot.

Pure functions over plain data, so the unit tests run them without a kernel; the module reads the
links through pyroute2 and carries out the steps."""

import ipaddress
import os

ROLES = ("migration", "ft_logging")
DEFAULT_INTERFACE = {"migration": "ft-mig", "ft_logging": "ft-log"}
BOND_MODES = (
    "balance-rr",
    "active-backup",
    "balance-xor",
    "broadcast",
    "802.3ad",
    "balance-tlb",
    "balance-alb",
)
STACKS = ("systemd-networkd", "NetworkManager")
MARK = "# Managed by ft.lockstep.ft_network (role: {role}). Changes here are overwritten.\n"


def marker(role):
    """The interface alias that tags a link as carrying an FT network (survives in the kernel)."""
    return "ft.lockstep:" + role


class Link:
    """A network interface as the kernel reports it."""

    def __init__(
        self,
        name,
        kind="",
        master=None,
        mtu=1500,
        alias="",
        up=False,
        speed=None,
        bond_mode=None,
        addresses=(),
    ):
        self.name, self.kind, self.master, self.mtu, self.alias = name, kind, master, mtu, alias
        self.up, self.speed, self.bond_mode, self.addresses = up, speed, bond_mode, list(addresses)

    def summary(self):
        out = {
            "kind": self.kind or "nic",
            "mtu": self.mtu,
            "up": self.up,
            "addresses": sorted(self.addresses),
        }
        if self.master:
            out["master"] = self.master
        if self.bond_mode:
            out["bond_mode"] = self.bond_mode
        return out


class Want:
    """One FT network as the task asks for it."""

    def __init__(
        self,
        role,
        members,
        address=None,
        interface=None,
        bond_mode="active-backup",
        miimon=100,
        mtu=None,
        state="present",
    ):
        self.role, self.members, self.address, self.state = role, list(members or []), address, state
        self.bond_mode, self.miimon, self.mtu = bond_mode, miimon, mtu
        self.bonded = len(self.members) > 1
        if self.bonded:
            self.interface = interface or DEFAULT_INTERFACE[role]
        else:
            self.interface = self.members[0] if self.members else interface


def role_interface(role, links):
    """The interface that carries this role now (tagged with the role's alias), or None."""
    for link in links.values():
        if link.alias == marker(role):
            return link
    return None


NIC_KINDS = ("", "veth")  # a veth stands in for a NIC in containers and the lab


def adopt_persisted(links, role, text):
    """Tag, in memory, the interface that a role's persisted main file names when no link carries the
    role's alias: after a reboot the stack recreates the network but not the kernel alias."""
    if role_interface(role, links) is not None or not text:
        return
    for line in text.splitlines():
        key, _sep, value = line.partition("=")
        if key.strip() in ("Name", "interface-name") and value.strip() in links:
            links[value.strip()].alias = marker(role)
            return


def main_file(role, stack):
    directory, prefix = owned_paths(role, stack)
    return "{}/{}.{}".format(directory, prefix, "network" if stack == "systemd-networkd" else "nmconnection")


def nic_names(links):
    return sorted(n for n, link in links.items() if link.kind in NIC_KINDS and n != "lo")


def problems(want, links, vm_interfaces=(), min_speed=1000, warn_speed=10000):
    """(errors, warnings) about the request on this host; any error means nothing is changed."""
    errors, warnings = [], []
    if want.state == "absent":
        return errors, warnings
    if not want.members:
        errors.append(
            f"members is empty: name at least one NIC for the {want.role} network (a bond with no members "
            "carries nothing)"
        )
    if len(set(want.members)) != len(want.members):
        errors.append("members lists a NIC twice: {}".format(", ".join(want.members)))
    if not want.address:
        errors.append(f"address is required (ADDRESS/PREFIX, e.g. 10.0.2.11/24) for the {want.role} network")
    else:
        try:
            ipaddress.ip_interface(want.address)
            if "/" not in want.address:
                raise ValueError("no prefix length")
        except ValueError as e:
            errors.append(f"address {want.address!r} is not ADDRESS/PREFIX: {e}")
    other = next(r for r in ROLES if r != want.role)
    other_link = role_interface(other, links)
    other_nics = set()
    if other_link is not None:
        other_nics = {other_link.name} | {n for n, link in links.items() if link.master == other_link.name}
    vm = set(vm_interfaces)
    for nic in want.members:
        link = links.get(nic)
        if link is None:
            errors.append(
                "NIC {} does not exist on this host (NICs here: {}); fix members".format(
                    nic, ", ".join(nic_names(links)) or "none"
                )
            )
            continue
        if link.kind not in NIC_KINDS:
            errors.append(f"{nic} is a {link.kind}, not a NIC: members must be physical NICs")
            continue
        if nic in other_nics:
            errors.append(
                f"NIC {nic} already carries the {other} network ({other_link.name}): "
                "the migration and FT-logging networks need separate NICs"
            )
        elif nic in vm or (link.master and link.master in vm):
            errors.append(
                "NIC {} carries the VM network (vm_interfaces: {}): FT traffic needs its own NICs".format(
                    nic, ", ".join(sorted(vm))
                )
            )
        elif link.master and link.master != want.interface:
            master = links.get(link.master)
            what = master.kind if master is not None and master.kind else "device"
            errors.append(
                f"NIC {nic} is already enslaved to {what} {link.master}: "
                "release it first or choose another NIC"
            )
        if link.speed is None:
            warnings.append(
                f"NIC {nic} does not report its link speed: cannot check it is at least {min_speed} Mb/s"
            )
        elif link.speed < min_speed:
            errors.append(
                f"NIC {nic} links at {link.speed} Mb/s; "
                f"the {want.role} network needs at least {min_speed} Mb/s"
            )
        elif link.speed < warn_speed:
            warnings.append(
                f"NIC {nic} links at {link.speed} Mb/s; "
                f"{warn_speed} Mb/s or more is recommended for {want.role}"
            )
    if want.bonded and want.interface in links and links[want.interface].kind not in ("bond",):
        errors.append(
            "interface {} exists and is not a bond ({}): choose another interface name".format(
                want.interface, links[want.interface].kind or "a NIC"
            )
        )
    if want.address and not errors:
        for name, link in links.items():
            if name != want.interface and want.address in link.addresses:
                errors.append(f"address {want.address} is already on {name}")
    return errors, warnings


def plan(want, links):
    """The steps from the links as they are to what is wanted, each (action, args, description).

    Actions: delete, create_bond, nomaster, enslave, set_mtu, set_alias, del_addr, add_addr, up."""
    steps = []

    def step(action, description, **args):
        steps.append((action, args, description))

    current = role_interface(want.role, links)
    target = links.get(want.interface) if want.interface else None
    if want.state == "absent":
        if current is not None:
            _teardown(current, links, step)
        return steps
    if current is not None and current.name != want.interface:
        _teardown(current, links, step)
        if target is current:
            target = None
    if want.bonded:
        if target is not None and target.kind == "bond" and target.bond_mode != want.bond_mode:
            step(
                "delete",
                f"recreate bond {target.name}: mode {target.bond_mode} -> {want.bond_mode}",
                name=target.name,
            )
            target = None
        if target is None:
            step(
                "create_bond",
                f"create bond {want.interface} (mode {want.bond_mode}, miimon {want.miimon} ms)",
                name=want.interface,
                mode=want.bond_mode,
                miimon=want.miimon,
            )
        for name, link in sorted(links.items()):
            if target is not None and link.master == target.name and name not in want.members:
                step("nomaster", f"release {name} from bond {target.name}", name=name)
        for nic in want.members:
            if target is None or links[nic].master != want.interface:
                step("enslave", f"add {nic} to bond {want.interface}", name=nic, master=want.interface)
    iface_mtu = target.mtu if target is not None else None
    if want.mtu is not None and iface_mtu != want.mtu:
        step("set_mtu", f"MTU of {want.interface} -> {want.mtu}", name=want.interface, mtu=want.mtu)
    if target is None or target.alias != marker(want.role):
        step(
            "set_alias",
            f"tag {want.interface} as the {want.role} network",
            name=want.interface,
            alias=marker(want.role),
        )
    present = target.addresses if target is not None else []
    for address in present:
        if address != want.address and not _link_local(address):
            step(
                "del_addr",
                f"remove address {address} from {want.interface}",
                name=want.interface,
                address=address,
            )
    if want.address not in present:
        step(
            "add_addr",
            f"add address {want.address} to {want.interface}",
            name=want.interface,
            address=want.address,
        )
    down = [
        n
        for n in [want.interface] + (want.members if want.bonded else [])
        if n not in links or not links[n].up
    ]
    if target is None or any(s[0] in ("enslave", "create_bond") for s in steps):
        down = [want.interface] + (want.members if want.bonded else [])
    for name in down:
        step("up", f"bring {name} up", name=name)
    return steps


def _teardown(link, links, step):
    if link.kind == "bond":
        step(
            "delete",
            "delete bond {} (releases {})".format(
                link.name,
                ", ".join(sorted(n for n, x in links.items() if x.master == link.name)) or "no NICs",
            ),
            name=link.name,
        )
        return
    for address in link.addresses:
        if not _link_local(address):
            step("del_addr", f"remove address {address} from {link.name}", name=link.name, address=address)
    step("set_alias", f"untag {link.name}", name=link.name, alias="")


def _link_local(address):
    return ipaddress.ip_interface(address).ip.is_link_local


# --- persistence -------------------------------------------------------------------------------------


def detect_stack(proc="/proc", etc="/etc"):
    """(stack, evidence): the network stack that runs here, or (None, what was found instead)."""
    running = set()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            with open(os.path.join(proc, pid, "comm")) as f:
                running.add(f.read().strip())
        except OSError:
            continue
    if "NetworkManager" in running:
        return "NetworkManager", "NetworkManager runs"
    if "systemd-network" in running:  # comm is cut at 15 characters
        return "systemd-networkd", "systemd-networkd runs"
    found = []
    interfaces = os.path.join(etc, "network", "interfaces")
    if os.path.exists(interfaces):
        found.append(f"ifupdown ({interfaces})")
    if os.path.isdir(os.path.join(etc, "netplan")):
        found.append("netplan without a running renderer")
    return None, ", ".join(found) or "no network manager running"


def render(want, stack):
    """{path: content} of the files that recreate this network at boot under the given stack."""
    if want.state == "absent" or not want.members:
        return {}
    if stack == "systemd-networkd":
        return _render_networkd(want)
    if stack == "NetworkManager":
        return _render_nm(want)
    return {}


def owned_paths(role, stack):
    """Where the files of a role live (to find old ones when members change)."""
    if stack == "systemd-networkd":
        return "/etc/systemd/network", "40-ft-{}".format(role.replace("_", "-"))
    return "/etc/NetworkManager/system-connections", "ft-{}".format(role.replace("_", "-"))


def _render_networkd(want):
    directory, prefix = owned_paths(want.role, "systemd-networkd")
    head = MARK.format(role=want.role)
    link = f"[Link]\nMTUBytes={want.mtu}\n" if want.mtu else ""
    files = {}
    if want.bonded:
        files[f"{directory}/{prefix}.netdev"] = (
            head
            + f"[NetDev]\nName={want.interface}\nKind=bond\n"
            + (f"MTUBytes={want.mtu}\n" if want.mtu else "")
            + f"\n[Bond]\nMode={want.bond_mode}\nMIIMonitorSec={want.miimon}ms\n"
        )
        for nic in want.members:
            files[f"{directory}/{prefix}-{nic}.network"] = (
                head
                + "[Match]\nName={}\n\n{}[Network]\nBond={}\n".format(
                    nic, link + "\n" if link else "", want.interface
                )
            )
    files[f"{directory}/{prefix}.network"] = (
        head
        + "[Match]\nName={}\n\n{}[Network]\nAddress={}\nLinkLocalAddressing={}\n".format(
            want.interface,
            link + "\n" if link else "",
            want.address,
            # IPv6 neighbour discovery needs the link-local address; IPv4 needs none
            "ipv6" if ipaddress.ip_interface(want.address).version == 6 else "no",
        )
    )
    return files


def _render_nm(want):
    directory, prefix = owned_paths(want.role, "NetworkManager")
    head = MARK.format(role=want.role)
    # the address goes in its own family's section; the other family is disabled
    if ipaddress.ip_interface(want.address).version == 6:
        ip = f"[ipv4]\nmethod=disabled\n\n[ipv6]\nmethod=manual\naddress1={want.address}\n"
    else:
        ip = f"[ipv4]\nmethod=manual\naddress1={want.address}\n\n[ipv6]\nmethod=disabled\n"
    mtu = f"mtu={want.mtu}\n" if want.mtu else ""
    files = {}
    if want.bonded:
        files[f"{directory}/{prefix}.nmconnection"] = (
            head
            + f"[connection]\nid={prefix}\ntype=bond\ninterface-name={want.interface}\n\n"
            + f"[bond]\nmode={want.bond_mode}\nmiimon={want.miimon}\n\n[ethernet]\n{mtu}\n{ip}"
        )
        for nic in want.members:
            files[f"{directory}/{prefix}-{nic}.nmconnection"] = (
                head
                + f"[connection]\nid={prefix}-{nic}\ntype=ethernet\ninterface-name={nic}\n"
                + f"master={want.interface}\nslave-type=bond\n\n[ethernet]\n{mtu}"
            )
    else:
        files[f"{directory}/{prefix}.nmconnection"] = (
            head
            + f"[connection]\nid={prefix}\ntype=ethernet\ninterface-name={want.interface}\n\n"
            + f"[ethernet]\n{mtu}\n{ip}"
        )
    return files
