"""The QEMU COLO data plane: start a primary and a secondary of one guest on two hosts, enter
replication, and fail over in either direction. QMP through qemu.qmp (see qmp.py).

Two modes share this code (docs/adr/0002-data-plane.md):
- lockstep: COLO proper. The secondary runs the same input as the primary (mirrored packets);
  colo-compare releases the primary's output when the secondary's matches, and checkpoints
  when they differ or every checkpoint interval. For KVM hosts.
- checkpoint: the secondary is started with -S and stays passive: it loads every checkpoint but
  does not run until failover (a QEMU with lab/qemu/colo-passive-secondary.patch). colo-compare
  then holds each packet of the primary until the checkpoint that produced it has reached the
  secondary - Remus's output commit, at a cost of up to one checkpoint interval of latency.
  Experimental.

Both modes survive losing either side with the client's TCP connection intact (tests in
engine/tests/test_dataplane.py). Who fails over when is decided by watch.py.

Network: the primary's NIC is a tap on the VM network bridge. The secondary's tap is on the
same bridge but kept down until failover, so the twin never answers on the VM network while the
primary lives. Mirror, compare and checkpoint traffic use the hosts' FT-logging addresses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from qemu.qmp import QMPClient

from . import probe
from .qmp import connect


class Mode(StrEnum):
    LOCKSTEP = "lockstep"
    CHECKPOINT = "checkpoint"


class DataPlaneError(Exception):
    pass


@dataclass(frozen=True)
class Guest:
    """What both sides run. The lab boots a kernel directly; disk_mib gives the guest a
    replicated virtio disk (each host keeps its own copy, created empty on both sides)."""

    name: str
    mac: str
    memory_mib: int = 256
    vcpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    disk_mib: int | None = None


@dataclass(frozen=True)
class Host:
    """One host's end of a pair: how to run things there and its addresses."""

    name: str
    ft_ip: str  # address on the FT-logging network
    run_dir: Path  # QMP socket, console and log of the VMs this host runs
    qemu: tuple[str, ...] = ("qemu-system-x86_64",)
    prefix: tuple[str, ...] = ()  # e.g. nsenter into a lab host; empty on a real host
    bridge: str = "vmbr0"  # the VM network
    accel: str = "tcg"
    diagnostic_monitor: bool = False  # a third QMP monitor, <name>.<role>.diag.qmp, for tools and tests

    async def run(self, *cmd: str) -> None:
        """A short command (ip, qemu-img) on this host, off the event loop."""
        proc = await asyncio.create_subprocess_exec(
            *self.prefix, *cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise DataPlaneError(f"{self.name}: {' '.join(cmd)}: {err.decode(errors='replace').strip()}")


@dataclass(frozen=True)
class Ports:
    """TCP ports of one pair (several pairs on a host need distinct bases)."""

    base: int = 9000

    @property
    def mirror(self) -> int:  # primary -> secondary: the primary's incoming packets
        return self.base + 3

    @property
    def compare(self) -> int:  # secondary -> primary: the secondary's outgoing packets
        return self.base + 4

    @property
    def migrate(self) -> int:  # primary -> secondary: the initial copy, then checkpoints
        return self.base + 8

    @property
    def local_in(self) -> int:  # on the primary: its outgoing packets into colo-compare
        return self.base + 1

    @property
    def local_out(self) -> int:  # on the primary: colo-compare's released packets back
        return self.base + 5

    @property
    def nbd(self) -> int:  # on the secondary: its disk, written by the primary's replication
        return self.base + 9

    @property
    def heartbeat(self) -> int:  # UDP, each side's watcher (watch.py)
        return self.base + 10

    @classmethod
    def of_heartbeat(cls, port: int) -> Ports:
        return cls(port - 10)


async def abort_connections(host: Host, peer_ip: str, ports: Ports) -> None:
    """Abort this pair's TCP connections to a peer that is gone (the kernel's socket destroy,
    `ss -K`, scoped to the pair's ports so other pairs with that peer are untouched). QEMU
    connects and drains in its main loop under its big lock: a connect to a dead host waits for
    the SYN retries (minutes), a drain for in-flight NBD writes until TCP gives up (longer), and
    the guest stalls with it. Aborted, each fails at once. yank cannot do this: it does not reach
    a connect in progress, and it needs node names QEMU picks."""
    filt = (f"( dport = :{ports.nbd} or dport = :{ports.migrate} or sport = :{ports.mirror} "
            f"or sport = :{ports.compare} )")  # fmt: skip
    with contextlib.suppress(DataPlaneError):
        await host.run("ss", "-K", "-t", "dst", peer_ip, filt)


async def check_hosts(*hosts: Host) -> None:
    """The capability probe on each host of a pair, before anything is started on either: both
    QEMUs must have what COLO needs and be the same build."""
    try:
        caps = {h.name: await asyncio.to_thread(probe.probe, [*h.prefix, *h.qemu]) for h in hosts}
    except probe.ProbeError as e:
        raise DataPlaneError(f"refused: capability probe failed: {e}") from None
    if reasons := probe.compare(caps):
        raise DataPlaneError("refused: " + "; ".join(reasons))


def tap_name(guest: Guest, role: str) -> str:
    """The tap of one side of a VM: unique per VM and side within Linux's 15 characters (a cut
    name would collide: webserver-01 and webserver-02), still readable: ftp-webs1a2b3c4."""
    digest = hashlib.sha256(guest.name.encode()).hexdigest()[:7]
    return f"ft{role[0]}-{guest.name[:4]}{digest}"


def disk_path(guest: Guest, host: Host, layer: str = "disk") -> Path:
    """The guest's disk on a host; the secondary also has the active and hidden overlays of
    block replication (QEMU's docs/block-replication.txt)."""
    return host.run_dir / f"{guest.name}.{layer}.{'raw' if layer == 'disk' else 'qcow2'}"


def disk_argv(guest: Guest, host: Host, role: str) -> list[str]:
    """The disk behind a quorum node colo-disk0: on the primary its one child is the local disk
    (replication to the secondary is added when replication starts); on the secondary the
    local disk is written by the primary over NBD while the secondary VM sees it through
    replication's overlays, which the failover commits."""
    if not guest.disk_mib:
        return []
    disk = disk_path(guest, host)
    quorum = "driver=quorum,read-pattern=fifo,vote-threshold=1,id=colo-disk0,if=none"
    if role == "primary":
        drives = [f"{quorum},children.0.file.filename={disk},children.0.driver=raw"]
    else:
        active, hidden = disk_path(guest, host, "active"), disk_path(guest, host, "hidden")
        drives = [
            f"if=none,id=parent0,file.filename={disk},driver=raw",
            f"if=none,id=childs0,driver=replication,mode=secondary,top-id=colo-disk0,file.driver=qcow2,"
            f"file.file.filename={active},file.backing.driver=qcow2,"
            f"file.backing.file.filename={hidden},file.backing.backing=parent0",
            f"{quorum},children.0=childs0",
        ]
    return [arg for d in drives for arg in ("-drive", d)] + ["-device", "virtio-blk-pci,drive=colo-disk0"]


def _common_argv(guest: Guest, host: Host, role: str, tap: str) -> list[str]:
    argv = [
        *host.prefix,
        *host.qemu,
        "-name",
        f"{guest.name} ({role})",
        "-accel",
        host.accel,
        "-cpu",
        "qemu64" if host.accel == "tcg" else "host",
        "-m",
        str(guest.memory_mib),
        "-smp",
        str(guest.vcpus),
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-no-shutdown",  # a guest powering off leaves QEMU up: the engine stops the pair, no failover
        "-serial",
        f"file:{host.run_dir / f'{guest.name}.{role}.console'}",
        "-qmp",
        f"unix:{host.run_dir / f'{guest.name}.{role}.qmp'},server=on,wait=off",
        "-qmp",  # a second monitor for the engine's watcher (watch.py)
        f"unix:{host.run_dir / f'{guest.name}.{role}.engine.qmp'},server=on,wait=off",
        # QEMU serves one client per monitor: tools beside the engine need one of their own
        *(
            ["-qmp", f"unix:{host.run_dir / f'{guest.name}.{role}.diag.qmp'},server=on,wait=off"]
            if host.diagnostic_monitor
            else []
        ),
        "-netdev",
        f"tap,id=hn0,ifname={tap},script=no,downscript=no,vhost=off",
        "-device",
        f"virtio-net-pci,netdev=hn0,mac={guest.mac},romfile=",
    ]
    if guest.kernel:
        argv += ["-kernel", guest.kernel, "-initrd", guest.initrd or "", "-append", guest.cmdline]
    return argv + disk_argv(guest, host, role)


def primary_argv(guest: Guest, host: Host, ports: Ports) -> list[str]:
    """The primary boots like any VM; its COLO filters are added just before replication starts
    (colo-compare holds all output until then)."""
    ip = host.ft_ip
    return _common_argv(guest, host, "primary", tap_name(guest, "primary")) + [
        "-chardev", f"socket,id=mirror0,host={ip},port={ports.mirror},server=on,wait=off",
        "-chardev", f"socket,id=compare1,host={ip},port={ports.compare},server=on,wait=off",
        "-chardev", f"socket,id=compare0,host=127.0.0.1,port={ports.local_in},server=on,wait=off",
        "-chardev", f"socket,id=compare0-0,host=127.0.0.1,port={ports.local_in}",
        "-chardev", f"socket,id=compare_out,host=127.0.0.1,port={ports.local_out},server=on,wait=off",
        "-chardev", f"socket,id=compare_out0,host=127.0.0.1,port={ports.local_out}",
    ]  # fmt: skip


def secondary_argv(guest: Guest, host: Host, primary: Host, ports: Ports, mode: Mode) -> list[str]:
    p = primary.ft_ip
    argv = _common_argv(guest, host, "secondary", tap_name(guest, "secondary"))
    if mode is Mode.LOCKSTEP:
        argv += [
            "-chardev", f"socket,id=red0,host={p},port={ports.mirror},reconnect=1",
            "-chardev", f"socket,id=red1,host={p},port={ports.compare},reconnect=1",
            "-object", "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0,vnet_hdr_support=on",
            "-object", "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1,vnet_hdr_support=on",
            "-object", "filter-rewriter,id=rew0,netdev=hn0,queue=all,vnet_hdr_support=on",
        ]  # fmt: skip
    else:
        argv += ["-S"]  # passive: loads checkpoints, runs only after failover
    return argv + ["-incoming", f"tcp:{host.ft_ip}:{ports.migrate}"]


@dataclass
class Vm:
    """One running QEMU of a pair and its QMP connection."""

    guest: Guest
    host: Host
    role: str
    proc: subprocess.Popen | None = None
    qmp: QMPClient | None = None
    log: Path | None = field(default=None)

    @property
    def qmp_path(self) -> Path:
        return self.host.run_dir / f"{self.guest.name}.{self.role}.qmp"

    @property
    def engine_qmp_path(self) -> Path:
        return self.host.run_dir / f"{self.guest.name}.{self.role}.engine.qmp"

    async def start(self, argv: list[str], tap_up: bool) -> None:
        tap = tap_name(self.guest, self.role)
        # the name is this VM's and side's alone: a tap left by its own dead QEMU may go
        with contextlib.suppress(DataPlaneError):
            await self.host.run("ip", "link", "del", tap)
        await self.host.run("ip", "tuntap", "add", tap, "mode", "tap")
        await self.host.run("ip", "link", "set", tap, "master", self.host.bridge)
        if tap_up:
            await self.host.run("ip", "link", "set", tap, "up")
        if self.guest.disk_mib:  # a fresh, empty disk on both sides: identical at the start
            size = f"{self.guest.disk_mib}M"
            layers = ("disk", "active", "hidden") if self.role == "secondary" else ("disk",)
            for layer in layers:
                path = disk_path(self.guest, self.host, layer)
                await self.host.run("qemu-img", "create", "-q", "-f", path.suffix[1:], str(path), size)
        self.qmp_path.unlink(missing_ok=True)
        self.log = self.host.run_dir / f"{self.guest.name}.{self.role}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            self.qmp = await connect(
                str(self.qmp_path), 20, name=f"{self.guest.name}.{self.role}", proc=self.proc
            )
        except Exception:
            raise DataPlaneError(
                f"{self.role} QEMU on {self.host.name} did not start: {self.log.read_text().strip()[-500:]}"
            ) from None

    async def execute(self, cmd: str, args: dict | None = None, timeout: float = 10.0):
        assert self.qmp is not None
        return await asyncio.wait_for(self.qmp.execute(cmd, args), timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def close(self) -> None:
        if self.qmp:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
        self.kill()


# The tap runs with vnet_hdr (virtio-net offloads), so every packet in the filters carries a
# virtio-net header: each filter and colo-compare must be told (vnet_hdr_support), or
# colo-compare cannot parse a packet, calls it unsupported and releases it at once - no
# output commit at all, and a failover loses the client's connection.
COLO_FILTERS = [
    {"qom-type": "filter-mirror", "id": "m0", "netdev": "hn0", "queue": "tx", "outdev": "mirror0",
     "vnet_hdr_support": True},
    {"qom-type": "filter-redirector", "id": "redire0", "netdev": "hn0", "queue": "rx",
     "indev": "compare_out", "vnet_hdr_support": True},
    {"qom-type": "filter-redirector", "id": "redire1", "netdev": "hn0", "queue": "rx",
     "outdev": "compare0", "vnet_hdr_support": True},
    {"qom-type": "iothread", "id": "iothread1"},
    {"qom-type": "colo-compare", "id": "comp0", "primary_in": "compare0-0", "secondary_in": "compare1",
     "outdev": "compare_out0", "iothread": "iothread1", "vnet_hdr_support": True},
]  # fmt: skip


def colo_filters(mode: Mode) -> list[dict]:
    """The objects the primary gets for replication, in creation order (a passive twin runs
    nothing, so nothing is mirrored to it)."""
    return COLO_FILTERS if mode is Mode.LOCKSTEP else COLO_FILTERS[1:]


async def enter_colo(primary: Vm, secondary: Vm, ports: Ports, checkpoint_ms: int, mode: Mode) -> None:
    """Copy the running primary to the waiting secondary and keep them in replication; returns
    once the primary reports migration status 'colo'."""
    await prepare_secondary(secondary, ports)
    await start_replication(primary, secondary.host.ft_ip, ports, checkpoint_ms, mode)


async def prepare_secondary(secondary: Vm, ports: Ports) -> None:
    """The waiting secondary's side of entering replication (on its own host)."""
    await secondary.execute("migrate-set-capabilities", COLO_CAPABILITY)
    if secondary.guest.disk_mib:  # the primary's writes go to the secondary's disk too, over NBD
        nbd = {"type": "inet", "data": {"host": secondary.host.ft_ip, "port": str(ports.nbd)}}
        await secondary.execute("nbd-server-start", {"addr": nbd})
        await secondary.execute("nbd-server-add", {"device": "parent0", "writable": True})


async def start_replication(
    primary: Vm, secondary_ip: str, ports: Ports, checkpoint_ms: int, mode: Mode, stall: float = 15.0
) -> None:
    """The primary's side: copy and replicate the disk, add the filters, start checkpointing.
    A copy that makes no progress for `stall` seconds (the secondary's host died, its link went)
    fails; the caller then undoes it all with primary_continue_alone(peer_lost=True)."""
    if primary.guest.disk_mib:
        await resync_disk(primary, secondary_ip, ports, stall)
        await reachable(primary.host, secondary_ip, ports.nbd)
        await hmp(primary, f"drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,"
                           f"file.host={secondary_ip},file.port={ports.nbd},file.export=parent0,"
                           f"node-name=replication0")  # fmt: skip
        await primary.execute("x-blockdev-change", {"parent": "colo-disk0", "node": "replication0"})
    await add_primary_chardevs(primary, ports, mode)
    objects = {o["name"] for o in await primary.execute("qom-list", {"path": "/objects"})}
    for f in colo_filters(mode):
        if f["id"] in objects:  # left by an earlier attempt that was not undone
            continue
        if "rew0" in objects and f["qom-type"].startswith("filter-"):  # a former lockstep secondary:
            f = f | {"insert": "before", "position": "id=rew0"}  # its rewriter stays last
        await primary.execute("object-add", f)
    await primary.execute("migrate-set-capabilities", COLO_CAPABILITY)
    await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": checkpoint_ms})
    await primary.execute("migrate", {"uri": f"tcp:{secondary_ip}:{ports.migrate}"})
    progress = Progress("the memory copy", stall)
    while (info := await primary.execute("query-migrate")).get("status") != "colo":
        if info.get("status") in ("failed", "cancelled", "completed"):
            raise DataPlaneError(f"replication did not start: migration {info.get('status')}")
        progress.check(info.get("ram", {}).get("transferred"))
        await asyncio.sleep(0.2)


PROBE = "import socket, sys; a = sys.argv; socket.create_connection((a[1], int(a[2])), float(a[3])).close()"


async def reachable(host: Host, ip: str, port: int, timeout: float = 1.0) -> None:
    """Fail at once unless the peer's port answers from this host (its network namespace). QEMU
    opens an NBD connection in its main loop, holding its big lock: to a host that just died the
    connect blocks for the kernel's SYN retries (about two minutes), and the guest with it. This
    leaves that window at the milliseconds between this probe and QEMU's own connect."""
    try:
        await asyncio.wait_for(
            host.run(sys.executable, "-c", PROBE, ip, str(port), str(timeout)), timeout + 5
        )
    except (DataPlaneError, TimeoutError):
        raise DataPlaneError(f"{ip}:{port} does not answer from {host.name}: the secondary is gone") from None


class Progress:
    """A long copy fails when it stops moving, not after a fixed time: a big disk on a slow link
    takes as long as it takes, a dead peer is noticed within `stall` seconds."""

    def __init__(self, what: str, stall: float) -> None:
        self.what, self.stall = what, stall
        self.value: object = None
        self.moved = asyncio.get_running_loop().time()

    def check(self, value: object) -> None:
        now = asyncio.get_running_loop().time()
        if value != self.value:
            self.value, self.moved = value, now
        elif now - self.moved > self.stall:
            raise DataPlaneError(f"{self.what} made no progress for {self.stall:.0f} s (at {value})")


async def nic_driver_ready(vm: Vm) -> bool:
    """Whether the guest's virtio-net driver has set its NIC up (DRIVER_OK). A guest whose NIC
    driver started after replication had begun heard nothing after a failover in the lab (the
    stream and new connections dead, ARP unanswered); one whose driver was up first fails over
    cleanly. So replication starts only once the driver is up (ADR 0004)."""
    for device in await vm.execute("x-query-virtio"):
        if device["name"] == "virtio-net":
            status = await vm.execute("x-query-virtio-status", {"path": device["path"]})
            return any(s.startswith("VIRTIO_CONFIG_S_DRIVER_OK") for s in status["status"]["statuses"])
    return True


async def resync_disk(primary: Vm, secondary_ip: str, ports: Ports, stall: float) -> None:
    """Make the secondary's disk a copy of the primary's before replication starts (QEMU's
    COLO-FT.txt, "resume replication"): mirror it over NBD until the copy has caught up, then
    stop the VM and end the mirror; replication then carries every later write, and entering
    COLO resumes the VM (a failure from here on is undone by primary_continue_alone, which
    resumes it). The copy counts only if the job ended without an error."""
    target = f"nbd://{secondary_ip}:{ports.nbd}/parent0"
    await reachable(primary.host, secondary_ip, ports.nbd)
    await primary.execute("drive-mirror", {"device": "colo-disk0", "job-id": "resync", "target": target,
                                           "mode": "existing", "format": "raw", "sync": "full"})  # fmt: skip
    progress = Progress("the disk copy", stall)
    while True:
        (job,) = [j for j in await primary.execute("query-block-jobs") if j["device"] == "resync"] or [None]
        if job is None:
            raise DataPlaneError("the disk copy ended before it caught up")
        if job.get("ready"):
            break
        progress.check(job.get("offset"))
        await asyncio.sleep(0.1)
    await primary.execute("stop")
    await primary.execute("block-job-cancel", {"device": "resync"})  # a ready mirror: completes
    while any(j["device"] == "resync" for j in await primary.execute("query-block-jobs")):
        progress.check(None)
        await asyncio.sleep(0.05)


COLO_CAPABILITY = {"capabilities": [{"capability": "x-colo", "state": True}]}


def _socket(host: str, port: int, server: bool) -> dict:
    addr = {"type": "inet", "data": {"host": host, "port": str(port)}}
    data = {"addr": addr, "server": server} | ({"wait": False} if server else {})
    return {"type": "socket", "data": data}


async def add_primary_chardevs(vm: Vm, ports: Ports, mode: Mode) -> None:
    """The sockets the COLO filters of a primary use. A VM started as primary has them from its
    command line; a former secondary about to protect itself again (re-protection after a
    failover) gets them here, as QEMU's docs/COLO-FT.txt describes."""
    have = {c["label"] for c in await vm.execute("query-chardev")}
    ip = vm.host.ft_ip
    wanted = [
        ("mirror0", ip, ports.mirror, True),
        ("compare1", ip, ports.compare, True),
        ("compare0", "127.0.0.1", ports.local_in, True),
        ("compare0-0", "127.0.0.1", ports.local_in, False),
        ("compare_out", "127.0.0.1", ports.local_out, True),
        ("compare_out0", "127.0.0.1", ports.local_out, False),
    ]
    for label, host, port, server in wanted:
        if label not in have and (mode is Mode.LOCKSTEP or label != "mirror0"):
            await vm.execute("chardev-add", {"id": label, "backend": _socket(host, port, server)})


async def secondary_takeover(secondary: Vm, mode: Mode) -> None:
    """The primary is lost: the secondary leaves replication, joins the VM network and runs on.
    The caller must have won the split-brain token first (arbiter.claim)."""
    if await secondary.execute("query-block-exports"):  # its disk was written over NBD until now
        await secondary.execute("nbd-server-stop")
    await secondary.execute("x-colo-lost-heartbeat")
    if mode is Mode.LOCKSTEP:
        for obj in ("f2", "f1"):
            await secondary.execute("object-del", {"id": obj})
        for dev in ("red1", "red0"):
            await secondary.execute("chardev-remove", {"id": dev})
    # A packet the guest sent into the removed redirector path can be left waiting for a
    # completion that never comes, and virtio-net sends nothing more until it does. Taking the
    # link down purges the netdev's queue, which completes every pending send.
    for up in (False, True):
        await secondary.execute("set_link", {"name": "hn0", "up": up})
    if not (await secondary.execute("query-status"))["running"]:
        await secondary.execute("cont")
    await secondary.host.run("ip", "link", "set", tap_name(secondary.guest, "secondary"), "up")
    await announce(secondary)


async def primary_continue_alone(primary: Vm, mode: Mode, peer_lost: bool = False) -> None:
    """The primary runs on unprotected: whatever replication had set up, or a failed attempt
    had left half made, is undone, from what the running QEMU has (so the next attempt starts
    clean), and a VM the disk copy had stopped runs again. With the peer lost, its connections
    are yanked first: a copy to a dead host would otherwise hang on its sockets."""
    if peer_lost:
        instances = await primary.execute("query-yank")
        hung = [i for i in instances if i["type"] in ("migration", "block-node")]
        if hung:
            await primary.execute("yank", {"instances": hung})
    if any(j["device"] == "resync" for j in await primary.execute("query-block-jobs")):
        await primary.execute("block-job-cancel", {"device": "resync", "force": True})
    migration = (await primary.execute("query-migrate")).get("status")
    if migration in ("setup", "active", "pre-switchover", "device"):
        await primary.execute("migrate_cancel")
    if await has_block_node(primary, "replication0"):  # stop writing to the lost secondary's disk
        await primary.execute("x-blockdev-change", {"parent": "colo-disk0", "child": "children.1"})
        await hmp(primary, "drive_del replication0")
    objects = {o["name"] for o in await primary.execute("qom-list", {"path": "/objects"})}
    for f in reversed(COLO_FILTERS):  # colo-compare before the iothread it runs in
        if f["id"] in objects:
            await primary.execute("object-del", {"id": f["id"]})
    if (await primary.execute("query-colo-status"))["mode"] == "primary":
        await primary.execute("x-colo-lost-heartbeat")
    while any(j["device"] == "resync" for j in await primary.execute("query-block-jobs")):
        await asyncio.sleep(0.05)
    if (await primary.execute("query-status"))["status"] in ("paused", "postmigrate"):
        await primary.execute("cont")


async def has_block_node(vm: Vm, name: str) -> bool:
    """Whether the VM's block graph has this node. The failover steps follow what the running
    QEMU has (its nodes, its NBD exports), so whoever drives them - the driver, a watcher -
    needs no copy of the guest's configuration."""
    nodes = await vm.execute("query-named-block-nodes", {"flat": True})
    return any(n.get("node-name") == name for n in nodes)


async def hmp(vm: Vm, command: str) -> None:
    """An HMP command (drive_add/drive_del of a replication node have no QMP form in 7.2)."""
    out = await vm.execute("human-monitor-command", {"command-line": command})
    if out.strip():
        raise DataPlaneError(f"{vm.role}: {command}: {out.strip()}")


async def announce(vm: Vm) -> None:
    """Gratuitous ARP/RARP from the VM's NIC so the network learns its new port at once."""
    await vm.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})
