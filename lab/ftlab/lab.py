"""lab up / down / status: namespace hosts with sshd and libvirtd, the networks between them,
and a storage node serving the shared datastore over NFS (nfs-ganesha) and iSCSI (tgt).

Everything made is recorded in STATE_FILE as it is made, so that down removes exactly that
(and a failed up is rolled back the same way)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path

import yaml

from . import topology as t
from .proc import (
    LabError,
    alive,
    in_node,
    netns_inode,
    pids_in_netns,
    run,
    spawn,
    succeeds,
    terminate,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
INVENTORY = REPO / "inventories" / "lab" / "hosts.yml"
REQUIRED = [
    "ip",
    "unshare",
    "nsenter",
    "ssh-keygen",
    "/usr/sbin/sshd",
    "libvirtd",
    "virsh",
    "qemu-system-x86_64",
    "rpcbind",
    "ganesha.nfsd",
    "tgtd",
    "tgtadm",
    "nfs-ls",
    "iscsi-ls",
]
LIBVIRT_DIRS = ["etc/libvirt", "var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt"]
# what the ft_engine role installs: each lab host has its own, like a real server
ENGINE_DIRS = ["etc/lockstep", "opt/lockstep", "var/lib/lockstep"]
# libvirtd probes each QEMU binary at its first connection, about 8 s a host and one host after
# the other: its capability cache is kept between lab ups (libvirtd itself probes again when a
# binary, libvirtd or the kernel changed: the cache records their times and versions).
CAPS_CACHE = t.CACHE_DIR / "libvirt-qemu-capabilities"
CAPS_DIR = "qemu/capabilities"

# PID 1 of a node's mount + UTS namespaces (inside its network namespace): it sets the node
# up, then holds the namespaces until down kills it. A private /run keeps daemons' sockets
# and pid files apart; bind mounts give each host its own libvirt configuration and state.
HOLDER = """set -e
hostname "$1"; shift
mount -t tmpfs -o mode=0755 ftlab-run /run
mkdir -p /run/sshd /run/lock /run/libvirt /run/rpcbind
while [ $# -gt 1 ]; do mkdir -p "$2"; mount --bind "$1" "$2"; shift 2; done
ip link set lo up
exec sleep infinity
"""


class NotUp(LabError):
    exit_code = 3


class AlreadyUp(LabError):
    exit_code = 3


class MissingPrerequisite(LabError):
    exit_code = 4


def say(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


# --- the record of what exists --------------------------------------------------------------


def load_state() -> dict | None:
    try:
        return json.loads(t.STATE_FILE.read_text())
    except FileNotFoundError:
        return None


def save_state(state: dict) -> None:
    tmp = t.STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(t.STATE_FILE)


def leftover_netns() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith("ftl-"))
    except FileNotFoundError:
        return []


# --- building blocks ------------------------------------------------------------------------


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise MissingPrerequisite("the lab needs root (namespaces, bridges, daemons): run it as root")
    missing = [c for c in REQUIRED if shutil.which(c) is None]
    if missing:
        raise MissingPrerequisite(f"missing commands {', '.join(missing)}: run lab/install first")


def add_link(state: dict, name: str, *args: str) -> None:
    state["links"].append(name)
    save_state(state)
    run(["ip", "link", "add", name, *args])


def make_node(state: dict, node: t.Node, binds: list[tuple[Path, str]]) -> int:
    """Create the node's namespaces and start its holder; return the holder's PID."""
    node.dir.mkdir(parents=True, exist_ok=True)
    state["netns"].append(node.netns)
    save_state(state)
    run(["ip", "netns", "add", node.netns])
    args = [a for src, dst in binds for a in (str(src), dst)]
    pid = spawn(
        [
            "ip",
            "netns",
            "exec",
            node.netns,
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            HOLDER,
            "holder",
            node.hostname,
            *args,
        ],
        node.dir / "holder.log",
    )
    state["holders"][node.name] = pid
    save_state(state)

    def ready() -> bool:
        if not alive(pid):
            log = (node.dir / "holder.log").read_text().strip()
            raise LabError(f"setting up node {node.hostname} failed: {log}")
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"

    wait_for(f"node {node.hostname}", ready, 10)
    return pid


def plug(state: dict, node: t.Node, network: str, inner: str, address: str | None) -> None:
    """A veth from the network's root bridge into the node, named inner there."""
    outer = f"ftl-{node.name}-{network[:2]}"
    add_link(state, outer, "type", "veth", "peer", "name", inner, "netns", node.netns)
    run(["ip", "link", "set", outer, "master", t.BRIDGES[network], "up"])
    if address:
        run(["ip", "-n", node.netns, "addr", "add", f"{address}/24", "dev", inner])
    run(["ip", "-n", node.netns, "link", "set", inner, "up"])


def start(state: dict, node: t.Node, service: str, cmd: list[str]) -> int:
    pid = spawn(in_node(state["holders"][node.name], cmd), node.dir / f"{service}.log")
    state["services"].setdefault(node.name, {})[service] = pid
    save_state(state)
    return pid


def tcp_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def service_ready(state: dict, node: t.Node, service: str, check) -> bool:
    pid = state["services"][node.name][service]
    if not alive(pid):
        log = (node.dir / f"{service}.log").read_text().strip().splitlines()[-5:]
        raise LabError(f"{service} on {node.hostname} exited: " + " | ".join(log))
    return check()


# --- the storage node -----------------------------------------------------------------------

GANESHA_CONF = """NFS_CORE_PARAM {{ Protocols = 3, 4; Bind_addr = {ip}; }}
NFSV4 {{ Graceless = true; }}
EXPORT {{
  Export_Id = 1; Path = {path}; Pseudo = /datastore;
  Access_Type = RW; Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; SecType = sys;
  FSAL {{ Name = VFS; }}
}}
"""


def start_storage(state: dict) -> None:
    node = t.STORAGE
    say("storage node: rpcbind, nfs-ganesha, tgtd")
    make_node(state, node, [])
    plug(state, node, "mgmt", "mgmt0", t.STORAGE_IP)
    t.DATASTORE.mkdir(parents=True, exist_ok=True)
    identity = t.DATASTORE / ".ft-lockstep-datastore"  # as ft_storage makes it on a real site
    if not identity.exists():
        identity.write_text(f"{uuid.uuid4()}\n")
    (node.dir / "ganesha.conf").write_text(GANESHA_CONF.format(ip=t.STORAGE_IP, path=t.DATASTORE))
    lun = node.dir / "lun0.img"
    with open(lun, "wb") as f:
        f.truncate(256 << 20)
    start(state, node, "rpcbind", ["rpcbind", "-w", "-f"])
    # ganesha registers with rpcbind as it starts: start it once rpcbind listens (a CI run once
    # saw ganesha exit at start, with rpcbind started a moment before)
    wait_for(
        "rpcbind", lambda: service_ready(state, node, "rpcbind", lambda: tcp_open(t.STORAGE_IP, 111)), 15
    )
    ganesha_conf, ganesha_log = node.dir / "ganesha.conf", node.dir / "ganesha.log"
    start(state, node, "ganesha", ["ganesha.nfsd", "-F", "-f", str(ganesha_conf), "-L", str(ganesha_log),
                                   "-p", "/run/ganesha.pid", "-N", "NIV_EVENT"])  # fmt: skip
    start(state, node, "tgtd", ["tgtd", "-f", "--iscsi", f"portal={t.STORAGE_IP}:3260"])
    holder = state["holders"][node.name]
    tgtadm = in_node(holder, ["tgtadm", "--lld", "iscsi"])

    def tgt_ready() -> bool:
        return run([*tgtadm, "--op", "show", "--mode", "sys"], check=False) != ""

    wait_for("tgtd", lambda: service_ready(state, node, "tgtd", tgt_ready), 15)
    run([*tgtadm, "--op", "new", "--mode", "target", "--tid", "1", "-T", t.ISCSI_IQN])
    run([*tgtadm, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(lun)])
    run([*tgtadm, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"])

    wait_for(
        "nfs-ganesha",
        lambda: service_ready(state, node, "ganesha", lambda: succeeds(["nfs-ls", t.NFS_EXPORT])),
        60,
        0.5,
    )


# --- hosts ----------------------------------------------------------------------------------

SSHD_CONFIG = """ListenAddress {ip}
HostKey {dir}/ssh_host_ed25519_key
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
AuthorizedKeysFile {authorized}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""

LIBVIRTD_CONF = """
# ftlab: this host's own identity and a TCP listener on the management network (lab only:
# no authentication, reachable only from this machine's namespaces).
host_uuid = "{uuid}"
listen_tls = 0
listen_tcp = 1
listen_addr = "{ip}"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """
# ftlab: a namespace host shares the machine with others (see shared/LAB-FACTS.md)
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
security_driver = "none"
stdio_handler = "file"
migration_address = "{mig}"
migration_host = "{mig}"
"""


def prepare_host_dirs(h: t.Host) -> list[tuple[Path, str]]:
    binds = []
    for d in LIBVIRT_DIRS + ENGINE_DIRS:
        src = h.dir / d.replace("/", "-")
        if d in LIBVIRT_DIRS and Path("/" + d).is_dir():
            shutil.copytree("/" + d, src, symlinks=True, dirs_exist_ok=True)
        src.mkdir(parents=True, exist_ok=True)
        binds.append((src, "/" + d))
    if CAPS_CACHE.is_dir():
        shutil.copytree(CAPS_CACHE, h.dir / "var-cache-libvirt" / CAPS_DIR, dirs_exist_ok=True)
    etc = h.dir / "etc-libvirt"
    for f in (etc / "qemu" / "networks" / "autostart").glob("*"):
        f.unlink()  # no default NAT network: guests use the lab's VM network bridge
    with open(etc / "libvirtd.conf", "a") as f:
        f.write(LIBVIRTD_CONF.format(uuid=h.host_uuid, ip=h.ip("mgmt")))
    with open(etc / "qemu.conf", "a") as f:
        f.write(QEMU_CONF.format(mig=h.ip("migration")))
    (h.dir / "var-log-libvirt" / "qemu").mkdir(parents=True, exist_ok=True)
    keyfile = h.dir / "ssh_host_ed25519_key"
    if not keyfile.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keyfile)])
    authorized = t.SSH_KEY.parent / "authorized_keys"
    (h.dir / "sshd_config").write_text(SSHD_CONFIG.format(ip=h.ip("mgmt"), dir=h.dir, authorized=authorized))
    return binds


def start_host(state: dict, h: t.Host) -> None:
    say(f"host {h.hostname}: namespaces, links, sshd, libvirtd")
    make_node(state, h, prepare_host_dirs(h))
    plug(state, h, "mgmt", "mgmt0", h.ip("mgmt"))
    plug(state, h, "migration", "mig0", h.ip("migration"))
    plug(state, h, "ft_logging", "ftlog0", h.ip("ft_logging"))
    plug(state, h, "vm", "vmnet0", None)
    run(["ip", "-n", h.netns, "link", "add", t.VM_BRIDGE, "type", "bridge"])
    run(["ip", "-n", h.netns, "link", "set", "vmnet0", "master", t.VM_BRIDGE])
    run(["ip", "-n", h.netns, "link", "set", t.VM_BRIDGE, "up"])
    start(state, h, "sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(h.dir / "sshd_config")])
    start(state, h, "libvirtd", ["libvirtd", "--listen", "--pid-file", "/run/libvirtd.pid"])


def keep_capabilities(h: t.Host) -> None:
    """The capability cache libvirtd on this host wrote (or found valid), for the next lab up."""
    found = h.dir / "var-cache-libvirt" / CAPS_DIR
    if any(found.glob("*.xml")):
        shutil.rmtree(CAPS_CACHE, ignore_errors=True)
        shutil.copytree(found, CAPS_CACHE)


def libvirt_answers(h: t.Host) -> bool:
    return succeeds(["virsh", "-c", h.libvirt_uri, "version"])


def make_ssh_key() -> None:
    if not t.SSH_KEY.exists():
        t.SSH_KEY.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ftlab", "-f", str(t.SSH_KEY)])
    authorized = t.SSH_KEY.parent / "authorized_keys"
    authorized.write_text(Path(f"{t.SSH_KEY}.pub").read_text())


GUEST_IMAGES = t.DATASTORE / "images"  # the lab guest's kernel and initrd, on the shared datastore


def lab_qemu_path() -> str:
    from .colopair import lab_qemu  # built by lab/install (cached)

    return lab_qemu()


def copy_guest_image() -> None:
    """The lab guest boots from files on the shared datastore, as an FT VM's must be: its
    secondary may start on any host."""
    from .guest import build_image

    image = build_image()
    GUEST_IMAGES.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img"):
        shutil.copyfile(image / name, GUEST_IMAGES / name)


def write_inventory(hosts: list[t.Host]) -> None:
    inventory = {
        "all": {
            "children": {
                "ft_hosts": {
                    "hosts": {
                        h.hostname: {
                            "ansible_host": h.ip("mgmt"),
                            "ft_migration_address": h.ip("migration"),
                            "ft_logging_address": h.ip("ft_logging"),
                            "ft_libvirt_uri": h.libvirt_uri,
                        }
                        for h in hosts
                    }
                }
            },
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(t.SSH_KEY),
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ft_storage_path": str(t.DATASTORE),
                "ft_storage_nfs_server": t.STORAGE_IP,
                "ft_storage_iscsi_target": t.ISCSI_IQN,
                "ft_host_require_kvm": False,  # the lab runs its guests under TCG (shared/LAB-FACTS.md)
                "ft_lab_qemu": lab_qemu_path(),
                "ft_lab_guest_image": str(GUEST_IMAGES),
            },
        }
    }
    INVENTORY.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `lab/labctl up`; removed by `lab/labctl down`. Do not edit.\n"
    INVENTORY.write_text(header + yaml.safe_dump(inventory, sort_keys=False))


# --- the commands ---------------------------------------------------------------------------


def up(n_hosts: int) -> None:
    check_prerequisites()
    if load_state() is not None or leftover_netns():
        raise AlreadyUp("the lab is already up (or was left half-made): run `lab/labctl down` first")
    t.STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = {"hosts": n_hosts, "netns": [], "links": [], "holders": {}, "services": {}}
    save_state(state)
    try:
        say(f"bridges {', '.join(t.BRIDGES.values())}")
        for bridge in t.BRIDGES.values():
            add_link(state, bridge, "type", "bridge")
            run(["ip", "link", "set", bridge, "up"])
        run(["ip", "addr", "add", f"{t.CONTROLLER_IP}/24", "dev", t.BRIDGES["mgmt"]])
        make_ssh_key()
        start_storage(state)
        hosts = [t.host(i) for i in range(1, n_hosts + 1)]
        for h in hosts:
            start_host(state, h)
        say("client node on the VM network")
        make_node(state, t.CLIENT, [])
        plug(state, t.CLIENT, "vm", "eth0", t.CLIENT_IP)
        for h in hosts:
            say(f"waiting for sshd and libvirtd on {h.hostname} (libvirtd probes QEMU at first start)")
            wait_for(
                f"sshd on {h.hostname}",
                lambda h=h: service_ready(state, h, "sshd", lambda: tcp_open(h.ip("mgmt"), 22)),
                20,
            )
            wait_for(
                f"libvirtd on {h.hostname}",
                lambda h=h: service_ready(state, h, "libvirtd", lambda: libvirt_answers(h)),
                120,
                0.5,
            )
        keep_capabilities(hosts[0])
        copy_guest_image()
        write_inventory(hosts)
    except BaseException:
        say("up failed: removing what it made")
        down(quiet=True)
        raise
    say(f"up: {n_hosts} hosts; inventory {INVENTORY.relative_to(REPO)}")


def down(quiet: bool = False) -> None:
    if os.geteuid() != 0:
        raise MissingPrerequisite("the lab needs root: run it as root")
    state = load_state()
    if state is None:
        if leftover_netns():
            raise LabError(
                f"namespaces {', '.join(leftover_netns())} exist but no lab record "
                f"({t.STATE_FILE}): they were not made by this lab state; remove by hand"
            )
        raise NotUp("the lab is not up: nothing to take down")
    storage = state["holders"].get(t.STORAGE.name)
    if storage and alive(storage):  # tgtd ignores SIGTERM: stop it the way its own unit does
        tgtadm = in_node(storage, ["tgtadm", "--lld", "iscsi"])
        for step in (
            ["--op", "update", "--mode", "sys", "--name", "State", "-v", "offline"],
            ["--op", "delete", "--mode", "target", "--tid", "1", "--force"],
            ["--op", "delete", "--mode", "system"],
        ):
            run([*tgtadm, *step], check=False)
    # Every process of a node lives in its network namespace: holders, daemons, QEMU, ssh sessions.
    pids = [p for ns in state["netns"] if (ino := netns_inode(ns)) for p in pids_in_netns(ino)]
    pids += [p for p in state["holders"].values() if alive(p)]
    pids += [p for p in state.get("pids", []) if alive(p)]  # outside the nodes: the Debian guest
    if not quiet:
        say(f"down: stopping {len(pids)} processes")
    terminate(sorted(set(pids)))
    for link in reversed(state["links"]):
        run(["ip", "link", "del", link], check=False)  # veths may have gone with their netns
    for ns in state["netns"]:
        if netns_inode(ns):
            run(["ip", "netns", "del", ns])
    INVENTORY.unlink(missing_ok=True)
    INVENTORY.with_name("debian.yml").unlink(missing_ok=True)  # the Debian guest's (labctl debian)
    shutil.rmtree(t.STATE_DIR / "nodes", ignore_errors=True)
    shutil.rmtree(t.DATASTORE, ignore_errors=True)
    t.STATE_FILE.unlink()
    if not quiet:
        say("down: removed every namespace, link and process the lab made")


def status(as_json: bool) -> dict:
    state = load_state()
    if state is None:
        raise NotUp("the lab is not up")
    nodes = []
    for name, holder in state["holders"].items():
        services = {
            s: ("running" if alive(p) else "dead") for s, p in state["services"].get(name, {}).items()
        }
        nodes.append({"node": name, "netns": f"ftl-{name}", "alive": alive(holder), "services": services})
    report = {"hosts": state["hosts"], "nodes": nodes}
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(f"{'NODE':10} {'NAMESPACE':14} {'STATE':8} SERVICES")
        for n in nodes:
            svc = " ".join(f"{s}={v}" for s, v in n["services"].items()) or "-"
            print(f"{n['node']:10} {n['netns']:14} {'up' if n['alive'] else 'DOWN':8} {svc}")
    return report
