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
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from qemu.qmp import QMPClient

from . import images, probe, vmspec
from .qmp import connect
from .vmspec import VmSpec


class Mode(StrEnum):
    LOCKSTEP = "lockstep"
    CHECKPOINT = "checkpoint"


class DataPlaneError(Exception):
    pass


def Guest(
    name: str,
    mac: str = "",
    memory_mib: int = 256,
    vcpus: int = 1,
    kernel: str | None = None,
    initrd: str | None = None,
    cmdline: str = "",
    disk_mib: int | None = None,
    nics: int = 1,
) -> VmSpec:
    """The lab's test guest in the earlier flat shape (one MAC, kernel boot, a scratch disk of
    disk_mib) as a VmSpec; `nics` NICs (the watcher knows only the name and the NIC count)."""
    spec = vmspec.from_record(
        {
            "name": name,
            "mac": mac,
            "memory_mib": memory_mib,
            "vcpus": vcpus,
            "kernel": kernel,
            "initrd": initrd,
            "cmdline": cmdline,
            "disk_mib": disk_mib,
        }
    )
    return replace(spec, nics=spec.nics + tuple(vmspec.Nic(mac="") for _ in range(nics - 1)))  # fmt: skip


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

    def nic(self, index: int) -> NicPorts:
        """The ports of one NIC's filters: NIC 0 keeps the pair's first ones, NIC i > 0 takes
        four from base+11 on (a block is PORTS_STEP = 20 wide: vmspec.MAX_NICS = 3)."""
        if index == 0:
            return NicPorts(self.mirror, self.compare, self.local_in, self.local_out)
        first = self.base + 11 + 4 * (index - 1)
        return NicPorts(first + 1, first + 2, first, first + 3)


@dataclass(frozen=True)
class NicPorts:
    mirror: int
    compare: int
    local_in: int
    local_out: int


async def abort_connections(host: Host, peer_ip: str, ports: Ports) -> None:
    """Abort this pair's TCP connections to a peer that is gone (the kernel's socket destroy,
    `ss -K`, scoped to the pair's ports so other pairs with that peer are untouched). QEMU
    connects and drains in its main loop under its big lock: a connect to a dead host waits for
    the SYN retries (minutes), a drain for in-flight NBD writes until TCP gives up (longer), and
    the guest stalls with it. Aborted, each fails at once. yank cannot do this: it does not reach
    a connect in progress, and it needs node names QEMU picks."""
    nics = [ports.nic(i) for i in range(vmspec.MAX_NICS)]
    filt = " or ".join([f"dport = :{ports.nbd}", f"dport = :{ports.migrate}",
                        *(f"sport = :{n.mirror} or sport = :{n.compare}" for n in nics)])  # fmt: skip
    filt = f"( {filt} )"
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


def tap_name(guest: VmSpec | str, role: str, nic: int = 0) -> str:
    """The tap of one NIC of one side of a VM: unique per VM, side and NIC within Linux's 15
    characters (a cut name would collide: webserver-01 and webserver-02), still readable:
    ftp-webs1a2b3c4 (NIC 0), ftp1web1a2b3c4 (NIC 1)."""
    name = guest if isinstance(guest, str) else guest.name
    digest = hashlib.sha256(name.encode()).hexdigest()[:7]
    return f"ft{role[0]}-{name[:4]}{digest}" if nic == 0 else f"ft{role[0]}{nic}{name[:3]}{digest}"


def tap_names(name: str, role: str) -> list[str]:
    """Every tap a side of this VM may have (to clean up without its description)."""
    return [tap_name(name, role, i) for i in range(vmspec.MAX_NICS)]


# --- the COLO wiring, derived from the spec: names per disk and per NIC ------------------------
# Disk 0 and NIC 0 keep the names a one-disk, one-NIC pair has always had (colo-disk0, hn0,
# mirror0, ...): a running pair of an earlier release is undone and taken over by the same steps.


@dataclass(frozen=True)
class DiskWiring:
    index: int
    disk: vmspec.Disk

    @property
    def quorum(self) -> str:  # the node the guest's device sees
        return f"colo-disk{self.index}"

    @property
    def parent(self) -> str:  # the secondary's copy, exported over NBD under this name
        return f"parent{self.index}"

    @property
    def childs(self) -> str:  # the secondary's replication node (active and hidden overlays)
        return f"childs{self.index}"

    @property
    def replication(self) -> str:  # the primary's replication node, writing to the secondary
        return f"replication{self.index}"

    @property
    def job(self) -> str:  # the drive-mirror that copies the disk to a new secondary
        return "resync" if self.index == 0 else f"resync{self.index}"


@dataclass(frozen=True)
class NicWiring:
    index: int
    nic: vmspec.Nic
    ports: NicPorts

    def id(self, base: str) -> str:  # hn0, mirror0, ... for NIC 0; hn1, mirror0-n1, ... after
        if base == "hn":
            return f"hn{self.index}"
        return base if self.index == 0 else f"{base}-n{self.index}"


def disks(spec: VmSpec) -> list[DiskWiring]:
    return [DiskWiring(i, d) for i, d in enumerate(spec.disks)]


def nics(spec: VmSpec, ports: Ports) -> list[NicWiring]:
    return [NicWiring(i, n, ports.nic(i)) for i, n in enumerate(spec.nics)]


def disk_path(guest: VmSpec, host: Host, layer: str = "disk", index: int = 0) -> Path:
    """A disk the engine makes in a host's run directory: a scratch disk (and the secondary's copy
    of it), and the active and hidden overlays of block replication (QEMU's
    docs/block-replication.txt). A disk image of the spec is never made: the primary opens it
    where it is, and a secondary's copy of it is on the datastore (copy_source)."""
    n = "" if index == 0 else str(index)
    return host.run_dir / f"{guest.name}.{layer}{n}.{'raw' if layer == 'disk' else 'qcow2'}"


def copy_source(guest: VmSpec, host: Host, w: DiskWiring, generation: int) -> tuple[str, str]:
    """(path, format) of the secondary's copy of a disk: an image's beside it on the datastore,
    in its format, so that it can become the image when this side goes live (images.py); a
    scratch disk's in the run directory."""
    if w.disk.create:
        return str(disk_path(guest, host, index=w.index)), "raw"
    return str(images.copy_path(w.disk.path, guest.name, host.name, generation)), w.disk.format


def image_copies(guest: VmSpec, host: str, generation: int) -> dict[str, str]:
    """A secondary's copies of the VM's disk images on the datastore, each to its image (scratch
    disks have none there)."""
    return {
        str(images.copy_path(w.disk.path, guest.name, host, generation)): w.disk.path
        for w in disks(guest)
        if not w.disk.create
    }


def primary_source(guest: VmSpec, host: Host, w: DiskWiring) -> tuple[str, str]:
    """(path, format) of the disk the primary runs on."""
    if w.disk.create:
        return str(disk_path(guest, host, index=w.index)), "raw"
    return w.disk.path, w.disk.format


def disk_commands(
    guest: VmSpec, host: Host, role: str, sizes: dict[int, int], generation: int = 0
) -> list[list[str]]:
    """The qemu-img commands that make a side's engine-made disks before its QEMU starts: the
    primary's scratch disks (empty at every start); the secondary's copy of every disk and its
    overlays, of the disk's size in bytes (sizes[i], read from the image) - a drive-mirror fills
    the copy. A disk image is never created or emptied: a VM started again keeps its contents."""
    out = []
    for w in disks(guest):
        size = f"{w.disk.size_mib}M" if w.disk.create else str(sizes.get(w.index))
        made = []  # (path, format)
        if role == "secondary":
            made.append(copy_source(guest, host, w, generation))
            made += [(str(disk_path(guest, host, layer, w.index)), "qcow2") for layer in ("active", "hidden")]
        elif w.disk.create:
            made.append((str(disk_path(guest, host, index=w.index)), "raw"))
        out += [["qemu-img", "create", "-q", "-f", fmt, path, size] for path, fmt in made]
    return out


def disk_argv(guest: VmSpec, host: Host, role: str, generation: int = 0) -> list[str]:
    """Each disk behind a quorum node colo-disk<i>: on the primary its one child is the disk
    (replication to the secondary is added when replication starts); on the secondary its copy
    is written by the primary over NBD while the secondary VM sees it through replication's
    overlays, which the failover commits."""
    argv: list[str] = []
    ws = disks(guest)
    if any(w.disk.bus == "virtio-scsi" for w in ws):
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    for w in ws:
        quorum = f"driver=quorum,read-pattern=fifo,vote-threshold=1,id={w.quorum},if=none"
        if role == "primary":
            path, fmt = primary_source(guest, host, w)
            drives = [f"{quorum},children.0.file.filename={path},children.0.driver={fmt}"]
        else:
            disk, fmt = copy_source(guest, host, w, generation)
            active, hidden = (disk_path(guest, host, layer, w.index) for layer in ("active", "hidden"))
            drives = [
                f"if=none,id={w.parent},file.filename={disk},driver={fmt}",
                f"if=none,id={w.childs},driver=replication,mode=secondary,top-id={w.quorum},file.driver=qcow2,"
                f"file.file.filename={active},file.backing.driver=qcow2,"
                f"file.backing.file.filename={hidden},file.backing.backing={w.parent}",
                f"{quorum},children.0={w.childs}",
            ]
        boot = ",bootindex=1" if w.index == 0 and guest.kernel is None else ""
        device = (f"virtio-blk-pci,drive={w.quorum}" if w.disk.bus == "virtio-blk"
                  else f"scsi-hd,bus=scsi0.0,drive={w.quorum}")  # fmt: skip
        argv += [arg for d in drives for arg in ("-drive", d)] + ["-device", device + boot]
    return argv


def _common_argv(guest: VmSpec, host: Host, role: str, generation: int = 0) -> list[str]:
    smp = (
        str(guest.vcpus)
        if guest.sockets is None
        else f"{guest.vcpus},sockets={guest.sockets},cores={guest.cores}"
    )
    argv = [
        *host.prefix,
        *host.qemu,
        "-name",
        f"{guest.name} ({role})",
        *(["-machine", guest.machine] if guest.machine else []),
        "-accel",
        host.accel,
        "-cpu",
        guest.cpu_model or ("qemu64" if host.accel == "tcg" else "host"),
        "-m",
        str(guest.memory_mib),
        "-smp",
        smp,
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-no-shutdown",  # a guest powering off leaves QEMU up: the engine stops the pair, no failover
        *(["-serial", f"file:{host.run_dir / f'{guest.name}.{role}.console'}"] if guest.serial else []),
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
    ]
    for i, nic in enumerate(guest.nics):
        argv += [
            "-netdev",
            f"tap,id=hn{i},ifname={tap_name(guest, role, i)},script=no,downscript=no,vhost=off",
            "-device",
            f"{nic.model},netdev=hn{i},mac={nic.mac},romfile=",
        ]
    if guest.kernel:
        argv += ["-kernel", guest.kernel, "-initrd", guest.initrd or "", "-append", guest.cmdline]
    return argv + disk_argv(guest, host, role, generation)


def primary_chardevs(guest: VmSpec, host: Host, ports: Ports) -> list[tuple[str, str, int, bool]]:
    """(id, address, port, server) of the sockets the primary's COLO filters use, per NIC."""
    ip = host.ft_ip
    return [
        c
        for w in nics(guest, ports)
        for c in (
            (w.id("mirror0"), ip, w.ports.mirror, True),
            (w.id("compare1"), ip, w.ports.compare, True),
            (w.id("compare0"), "127.0.0.1", w.ports.local_in, True),
            (w.id("compare0-0"), "127.0.0.1", w.ports.local_in, False),
            (w.id("compare_out"), "127.0.0.1", w.ports.local_out, True),
            (w.id("compare_out0"), "127.0.0.1", w.ports.local_out, False),
        )
    ]


def primary_argv(guest: VmSpec, host: Host, ports: Ports) -> list[str]:
    """The primary boots like any VM; its COLO filters are added just before replication starts
    (colo-compare holds all output until then)."""
    argv = _common_argv(guest, host, "primary")
    for label, ip, port, server in primary_chardevs(guest, host, ports):
        argv += [
            "-chardev",
            f"socket,id={label},host={ip},port={port}" + (",server=on,wait=off" if server else ""),
        ]
    return argv


def secondary_argv(
    guest: VmSpec, host: Host, primary: Host, ports: Ports, mode: Mode, generation: int = 0
) -> list[str]:
    p = primary.ft_ip
    argv = _common_argv(guest, host, "secondary", generation)
    if mode is Mode.LOCKSTEP:
        for w in nics(guest, ports):
            hn = w.id("hn")
            argv += [
                "-chardev", f"socket,id={w.id('red0')},host={p},port={w.ports.mirror},reconnect=1",
                "-chardev", f"socket,id={w.id('red1')},host={p},port={w.ports.compare},reconnect=1",
                "-object", f"filter-redirector,id={w.id('f1')},netdev={hn},queue=tx,indev={w.id('red0')},"
                           "vnet_hdr_support=on",
                "-object", f"filter-redirector,id={w.id('f2')},netdev={hn},queue=rx,outdev={w.id('red1')},"
                           "vnet_hdr_support=on",
                "-object", f"filter-rewriter,id={w.id('rew0')},netdev={hn},queue=all,vnet_hdr_support=on",
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
    generation: int = 0  # a secondary's: names its copies of the disk images (copy_source)
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
        for i, nic in enumerate(self.guest.nics):
            tap = tap_name(self.guest, self.role, i)
            # the name is this VM's, side's and NIC's alone: a tap left by its own dead QEMU may go
            with contextlib.suppress(DataPlaneError):
                await self.host.run("ip", "link", "del", tap)
            await self.host.run("ip", "tuntap", "add", tap, "mode", "tap")
            await self.host.run("ip", "link", "set", tap, "master", nic.bridge or self.host.bridge)
            if tap_up:
                await self.host.run("ip", "link", "set", tap, "up")
        sizes = {}
        if self.role == "secondary":  # its copies are as large as the primary's disks
            for w in disks(self.guest):
                if not w.disk.create:
                    info = await asyncio.to_thread(vmspec.image_info, w.disk.path, self.host.prefix)
                    if "virtual-size" not in info:
                        raise DataPlaneError(f"{self.host.name}: cannot read the size of {w.disk.path}")
                    sizes[w.index] = info["virtual-size"]
        for cmd in disk_commands(self.guest, self.host, self.role, sizes, self.generation):
            await self.host.run(*cmd)
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
def nic_filters(w: NicWiring, mode: Mode) -> list[dict]:
    """The objects one NIC of the primary gets for replication, in creation order (a passive twin
    runs nothing, so nothing is mirrored to it); colo-compare runs in iothread1 (NIC 0 makes it)."""
    hn = w.id("hn")
    out = [
        {"qom-type": "filter-mirror", "id": w.id("m0"), "netdev": hn, "queue": "tx",
         "outdev": w.id("mirror0"), "vnet_hdr_support": True},
        {"qom-type": "filter-redirector", "id": w.id("redire0"), "netdev": hn, "queue": "rx",
         "indev": w.id("compare_out"), "vnet_hdr_support": True},
        {"qom-type": "filter-redirector", "id": w.id("redire1"), "netdev": hn, "queue": "rx",
         "outdev": w.id("compare0"), "vnet_hdr_support": True},
        *([{"qom-type": "iothread", "id": "iothread1"}] if w.index == 0 else []),
        {"qom-type": "colo-compare", "id": w.id("comp0"), "primary_in": w.id("compare0-0"),
         "secondary_in": w.id("compare1"), "outdev": w.id("compare_out0"), "iothread": "iothread1",
         "vnet_hdr_support": True},
    ]  # fmt: skip
    return out if mode is Mode.LOCKSTEP else out[1:]


def primary_filters(guest: VmSpec, mode: Mode) -> list[dict]:
    return [f for w in nics(guest, Ports()) for f in nic_filters(w, mode)]


COLO_FILTERS = primary_filters(Guest("x"), Mode.LOCKSTEP)  # one NIC's
# every COLO object a primary may have, in the order they are deleted (colo-compare before the
# iothread it runs in): what the undo looks for in a QEMU whose description it does not have
UNDO_ORDER = [f["id"] for f in reversed(primary_filters(Guest("x", nics=vmspec.MAX_NICS), Mode.LOCKSTEP))]


def _is_resync(device: str) -> bool:
    return re.fullmatch(r"resync\d*", device) is not None


async def enter_colo(primary: Vm, secondary: Vm, ports: Ports, checkpoint_ms: int, mode: Mode) -> None:
    """Copy the running primary to the waiting secondary and keep them in replication; returns
    once the primary reports migration status 'colo'."""
    await prepare_secondary(secondary, ports)
    await start_replication(primary, secondary.host.ft_ip, ports, checkpoint_ms, mode)


async def prepare_secondary(secondary: Vm, ports: Ports) -> None:
    """The waiting secondary's side of entering replication (on its own host)."""
    await secondary.execute("migrate-set-capabilities", COLO_CAPABILITY)
    if ws := disks(secondary.guest):  # the primary's writes go to the secondary's disks too, over NBD
        nbd = {"type": "inet", "data": {"host": secondary.host.ft_ip, "port": str(ports.nbd)}}
        await secondary.execute("nbd-server-start", {"addr": nbd})
        for w in ws:
            await secondary.execute("nbd-server-add", {"device": w.parent, "writable": True})


async def start_replication(
    primary: Vm, secondary_ip: str, ports: Ports, checkpoint_ms: int, mode: Mode, stall: float = 15.0
) -> None:
    """The primary's side: copy and replicate the disks, add the filters, start checkpointing.
    A copy that makes no progress for `stall` seconds (the secondary's host died, its link went)
    fails; the caller then undoes it all with primary_continue_alone(peer_lost=True)."""
    if ws := disks(primary.guest):
        await resync_disks(primary, secondary_ip, ports, stall)
        await reachable(primary.host, secondary_ip, ports.nbd)
        for w in ws:
            await hmp(primary, f"drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,"
                               f"file.host={secondary_ip},file.port={ports.nbd},file.export={w.parent},"
                               f"node-name={w.replication}")  # fmt: skip
            await primary.execute("x-blockdev-change", {"parent": w.quorum, "node": w.replication})
    await add_primary_chardevs(primary, ports, mode)
    objects = {o["name"] for o in await primary.execute("qom-list", {"path": "/objects"})}
    for w in nics(primary.guest, ports):
        for f in nic_filters(w, mode):
            if f["id"] in objects:  # left by an earlier attempt that was not undone
                continue
            if w.id("rew0") in objects and f["qom-type"].startswith("filter-"):  # a former lockstep
                f = f | {
                    "insert": "before",
                    "position": f"id={w.id('rew0')}",
                }  # secondary: its rewriter stays last
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
    """Whether the guest's virtio-net drivers have set every NIC up (DRIVER_OK). A guest whose NIC
    driver started after replication had begun heard nothing after a failover in the lab (the
    stream and new connections dead, ARP unanswered); one whose driver was up first fails over
    cleanly. So replication starts only once the drivers are up (ADR 0004)."""
    for device in await vm.execute("x-query-virtio"):
        if device["name"] == "virtio-net":
            status = await vm.execute("x-query-virtio-status", {"path": device["path"]})
            if not any(s.startswith("VIRTIO_CONFIG_S_DRIVER_OK") for s in status["status"]["statuses"]):
                return False
    return True


async def resync_disks(primary: Vm, secondary_ip: str, ports: Ports, stall: float) -> None:
    """Make the secondary's disks copies of the primary's before replication starts (QEMU's
    COLO-FT.txt, "resume replication"): mirror each over NBD until every copy has caught up,
    then stop the VM and end the mirrors; replication then carries every later write, and
    entering COLO resumes the VM (a failure from here on is undone by primary_continue_alone,
    which resumes it). The copies count only if every job ended without an error and copied
    all it had to: the jobs are kept after they end (auto-dismiss off) to be read, then dismissed."""
    ws = disks(primary.guest)
    await reachable(primary.host, secondary_ip, ports.nbd)
    for w in ws:
        target = f"nbd://{secondary_ip}:{ports.nbd}/{w.parent}"
        mirror = {"device": w.quorum, "job-id": w.job, "target": target, "mode": "existing",
                  "format": "raw", "sync": "full", "auto-dismiss": False}  # fmt: skip
        await primary.execute("drive-mirror", mirror)
    progress = Progress("the disk copy", stall)
    while True:
        jobs = {j["device"]: j for j in await primary.execute("query-block-jobs")}
        if missing := [w.job for w in ws if w.job not in jobs or jobs[w.job].get("status") == "concluded"]:
            why = [f"{n}: {jobs[n]['error']}" for n in missing if jobs.get(n, {}).get("error")]
            raise DataPlaneError(f"the disk copy {', '.join(missing)} ended before it caught up"
                                 + (f" ({'; '.join(why)})" if why else ""))  # fmt: skip
        if all(jobs[w.job].get("ready") for w in ws):
            break
        progress.check(tuple(jobs[w.job].get("offset") for w in ws))
        await asyncio.sleep(0.1)
    await primary.execute("stop")
    for w in ws:
        await primary.execute("block-job-cancel", {"device": w.job})  # a ready mirror: completes
    while True:
        jobs = {j["device"]: j for j in await primary.execute("query-block-jobs") if _is_resync(j["device"])}
        if all(j.get("status") == "concluded" for j in jobs.values()):
            break
        progress.check(None)
        await asyncio.sleep(0.05)
    for w in ws:
        await primary.execute("block-job-dismiss", {"id": w.job})
    if failed := copy_failures([jobs.get(w.job) for w in ws], [w.job for w in ws]):
        raise DataPlaneError("the disk copy failed: " + "; ".join(failed))


def copy_failures(jobs: list[dict | None], names: list[str]) -> list[str]:
    """Why ended mirror jobs (query-block-jobs entries, status concluded) do not make copies."""
    why = []
    for name, job in zip(names, jobs, strict=True):
        if job is None:
            why.append(f"{name} vanished before it could be read")
        elif job.get("error"):
            why.append(f"{name}: {job['error']}")
        elif job.get("offset") != job.get("len"):
            why.append(f"{name} copied {job.get('offset')} of {job.get('len')} bytes")
    return why


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
    mirrors = {w.id("mirror0") for w in nics(vm.guest, ports)}
    for label, host, port, server in primary_chardevs(vm.guest, vm.host, ports):
        if label not in have and (mode is Mode.LOCKSTEP or label not in mirrors):
            await vm.execute("chardev-add", {"id": label, "backend": _socket(host, port, server)})


async def secondary_takeover(secondary: Vm, mode: Mode) -> None:
    """The primary is lost: the secondary leaves replication, joins the VM network and runs on.
    The caller must have won the split-brain token first (arbiter.claim). Of the VM's
    description it needs only the NIC count (the watcher's --nics)."""
    if await secondary.execute("query-block-exports"):  # its disks were written over NBD until now
        await secondary.execute("nbd-server-stop")
    await secondary.execute("x-colo-lost-heartbeat")
    ws = nics(secondary.guest, Ports())
    if mode is Mode.LOCKSTEP:
        for w in ws:
            for obj in ("f2", "f1"):
                await secondary.execute("object-del", {"id": w.id(obj)})
            for dev in ("red1", "red0"):
                await secondary.execute("chardev-remove", {"id": w.id(dev)})
    # A packet the guest sent into the removed redirector path can be left waiting for a
    # completion that never comes, and virtio-net sends nothing more until it does. Taking the
    # link down purges the netdev's queue, which completes every pending send.
    for w in ws:
        for up in (False, True):
            await secondary.execute("set_link", {"name": w.id("hn"), "up": up})
    if not (await secondary.execute("query-status"))["running"]:
        await secondary.execute("cont")
    for w in ws:
        await secondary.host.run("ip", "link", "set", tap_name(secondary.guest, "secondary", w.index), "up")
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
    for job in await primary.execute("query-block-jobs"):
        if _is_resync(job["device"]) and job.get("status") == "concluded":  # ended, kept to be read
            await primary.execute("block-job-dismiss", {"id": job["device"]})
        elif _is_resync(job["device"]):
            await primary.execute("block-job-cancel", {"device": job["device"], "force": True})
    migration = (await primary.execute("query-migrate")).get("status")
    if migration in ("setup", "active", "pre-switchover", "device"):
        await primary.execute("migrate_cancel")
    nodes = await primary.execute("query-named-block-nodes", {"flat": True})
    for name in sorted({n.get("node-name") or "" for n in nodes}):
        if m := re.fullmatch(r"replication(\d+)", name):  # stop writing to the lost secondary's disk
            await primary.execute("x-blockdev-change", {"parent": f"colo-disk{m[1]}", "child": "children.1"})
            await hmp(primary, f"drive_del {name}")
    objects = {o["name"] for o in await primary.execute("qom-list", {"path": "/objects"})}
    for obj in UNDO_ORDER:
        if obj in objects:
            await primary.execute("object-del", {"id": obj})
    if (await primary.execute("query-colo-status"))["mode"] == "primary":
        await primary.execute("x-colo-lost-heartbeat")
    while resync := [j for j in await primary.execute("query-block-jobs") if _is_resync(j["device"])]:
        for job in resync:
            if job.get("status") == "concluded":  # a cancelled copy waits to be dismissed
                await primary.execute("block-job-dismiss", {"id": job["device"]})
        await asyncio.sleep(0.05)
    if (await primary.execute("query-status"))["status"] in ("paused", "postmigrate"):
        await primary.execute("cont")


async def overlays_pending(vm: Vm) -> list[str]:
    """The block replication overlays (active, hidden) a failed-over secondary still has: until the
    failover's commit of them into its copies ends (an internal job of QEMU's replication driver,
    not in query-block-jobs), the VM's newest writes are in the overlays in this host's run
    directory, not in the copies (found by bench/database-local)."""
    prefix = str(vm.host.run_dir / vm.guest.name)
    nodes = await vm.execute("query-named-block-nodes", {"flat": True})
    return sorted(
        {n["file"] for n in nodes if n.get("file", "").startswith((f"{prefix}.active", f"{prefix}.hidden"))}
    )


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
