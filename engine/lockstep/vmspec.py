"""What a protected VM is: one versioned schema for the API, ftctl, ft_vm's `definition` and the
pair records (docs/adr/0006-vm-model.md). It keeps to what a libvirt domain's XML holds - disks
with source/target bus/format, interfaces with bridge/mac/model, vcpus with a topology, memory,
machine, firmware, CPU model, serial console, kernel boot or disk boot - so a running libvirt
domain can later be read into it.

parse() checks a description on its own and returns every problem at once; check_host() checks
it against the host that is to run it (the datastore, its images, its bridges, the QEMU build,
the other pairs' MACs and images). Neither starts anything."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

SPEC_VERSION = 1
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")  # it names files, sockets and taps
MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
BRIDGE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # a Linux interface name
FORMATS = ("raw", "qcow2")
BUSES = ("virtio-blk", "virtio-scsi")
NIC_MODELS = ("virtio-net-pci",)  # the engine waits for the virtio-net driver (colo.nic_driver_ready)
MACHINES = re.compile(r"^(pc|q35|pc-i440fx-[0-9.]+|pc-q35-[0-9.]+)$")
FIRMWARES = ("seabios",)
MAX_DISKS = 8
MAX_NICS = 3  # each NIC needs 4 ports of the pair's block of 20 (colo.Ports)
# QEMU 7.2's COLO secondary aborts loading the first checkpoint of a q35 VM
# (memory_region_add_subregion_common: Assertion `!subregion->container' failed), in both modes:
# the VM then runs unprotected with its network held. Found running the wiring locally (ADR 0006).
Q35_REFUSED = ("machine q35 is refused: QEMU 7.2's COLO secondary aborts loading a q35 checkpoint "
               "(a memory_region_add_subregion assertion); use pc")  # fmt: skip
LEGACY_FIELDS = ("name", "memory_mib", "vcpus", "mac", "kernel", "initrd", "cmdline", "disk_mib")


class SpecError(ValueError):
    """A description that cannot run, with every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Disk:
    """A disk image on the shared datastore, opened as it is (never created or emptied), or a
    scratch disk (`create`): made empty at every start on each host - the lab's test guest."""

    path: str | None = None  # libvirt <source file=...>
    format: str = "raw"  # <driver type=...>
    bus: str = "virtio-blk"  # <target bus=...>: virtio or scsi (on a virtio-scsi controller)
    create: bool = False
    size_mib: int | None = None  # a scratch disk's size


@dataclass(frozen=True)
class Nic:
    """A NIC on a named bridge of the VM network (libvirt <interface type='bridge'>)."""

    mac: str
    bridge: str | None = None  # None: the host's VM network bridge (lockstepd's `bridge`)
    model: str = "virtio-net-pci"


@dataclass(frozen=True)
class VmSpec:
    name: str
    nics: tuple[Nic, ...] = ()
    disks: tuple[Disk, ...] = ()
    memory_mib: int = 256
    vcpus: int = 1
    sockets: int | None = None  # <cpu><topology sockets cores>; None: QEMU's default topology
    cores: int | None = None
    machine: str | None = None  # None: QEMU's default machine (pc)
    firmware: str = "seabios"
    cpu_model: str | None = None  # None: qemu64 under TCG, host under KVM
    serial: bool = True  # the serial console, into a file beside the VM's sockets
    kernel: str | None = None  # direct kernel boot; without it the VM boots from its first disk
    initrd: str | None = None
    cmdline: str = ""
    spec_version: int = SPEC_VERSION

    @property
    def mac(self) -> str:  # the first NIC's: what the lab's harness and the views call the VM's MAC
        return self.nics[0].mac if self.nics else ""


def to_dict(spec: VmSpec) -> dict:
    return asdict(spec) | {"nics": [asdict(n) for n in spec.nics], "disks": [asdict(d) for d in spec.disks]}


def legacy(d: dict) -> dict:
    """Today's shape before spec_version (records and API bodies of earlier releases, the lab's
    guest body): one MAC, kernel boot, an optional scratch disk of disk_mib."""
    out = {k: v for k, v in d.items() if k not in ("mac", "disk_mib")}
    if "mac" in d:
        out["nics"] = [{"mac": d["mac"]}]
    if d.get("disk_mib") is not None:
        out["disks"] = [{"create": True, "size_mib": d["disk_mib"]}]
    return out | {"spec_version": SPEC_VERSION}


def from_record(guest: dict) -> VmSpec:
    """The spec a pair record holds, of any version (not validated again: it ran already)."""
    d = guest if guest.get("spec_version") else legacy(guest)
    return VmSpec(**{k: v for k, v in d.items() if k not in ("nics", "disks")},
                  nics=tuple(Nic(**n) for n in d.get("nics", ())),
                  disks=tuple(Disk(**x) for x in d.get("disks", ())))  # fmt: skip


def _unknown(where: str, d: dict, cls) -> list[str]:
    unknown = set(d) - {f.name for f in fields(cls)}
    return [f"{where}: unknown fields: {', '.join(sorted(unknown))}"] if unknown else []


def _int(problems: list[str], where: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        problems.append(f"{where} must be a whole number from {low} to {high}")


def _entry(where: str, raw, cls, problems: list[str]):
    """One disk or NIC from its dict: the known fields, and a problem for each unknown one."""
    if not isinstance(raw, dict):
        problems.append(f"{where} must be an object")
        return None
    problems += _unknown(where, raw, cls)
    return cls(**{k: v for k, v in raw.items() if k in {f.name for f in fields(cls)}})


def _disk(i: int, d, problems: list[str]) -> Disk | None:
    where = f"disks[{i}]"
    disk = _entry(where, d, Disk, problems)
    if disk is None:
        return None
    if disk.format not in FORMATS:
        problems.append(f"{where}.format must be one of {', '.join(FORMATS)}")
    if disk.bus not in BUSES:
        problems.append(f"{where}.bus must be one of {', '.join(BUSES)}")
    if disk.create:
        if disk.path is not None:
            problems.append(f"{where}: a scratch disk (create) has no path: an image is never created")
        if disk.format != "raw":
            problems.append(f"{where}: a scratch disk is raw")
        _int(problems, f"{where}.size_mib", disk.size_mib, 1, 1 << 24)
    else:
        if not isinstance(disk.path, str) or not disk.path.startswith("/"):
            problems.append(f"{where}.path must be the absolute path of an image on the datastore")
        if disk.size_mib is not None:
            problems.append(f"{where}.size_mib is for a scratch disk only (an image has its own size)")
    return disk


def _nic(i: int, n, problems: list[str]) -> Nic | None:
    where = f"nics[{i}]"
    nic = _entry(where, n, Nic, problems)
    if nic is None:
        return None
    if not isinstance(nic.mac, str) or not MAC.match(nic.mac):
        problems.append(f"{where}.mac must be a MAC address like 52:54:00:12:34:56")
    if nic.bridge is not None and (not isinstance(nic.bridge, str) or not BRIDGE.match(nic.bridge)):
        problems.append(f"{where}.bridge must be an interface name")
    if nic.model not in NIC_MODELS:
        problems.append(f"{where}.model must be one of {', '.join(NIC_MODELS)}")
    return nic


def parse(body: dict) -> VmSpec:
    """A VM description (this version's shape, or the earlier flat one) as a VmSpec; SpecError
    with every problem found."""
    if not isinstance(body, dict):
        raise SpecError(["a VM description must be an object"])
    problems: list[str] = []
    if "spec_version" not in body or body["spec_version"] is None:
        if unknown := set(body) - set(LEGACY_FIELDS) - {f.name for f in fields(VmSpec)}:
            raise SpecError([f"unknown fields: {', '.join(sorted(unknown))}"])
        if any(k in body for k in ("mac", "disk_mib")):
            if "nics" in body or "disks" in body:
                problems.append("give either mac/disk_mib (the earlier shape) or nics/disks, not both")
            elif body.get("disk_mib") is not None:
                _int(problems, "disk_mib", body["disk_mib"], 1, 1 << 24)
            body = legacy({k: v for k, v in body.items() if k != "spec_version"})
        else:
            body = body | {"spec_version": SPEC_VERSION}
    elif body["spec_version"] != SPEC_VERSION:
        raise SpecError([f"spec_version {body['spec_version']!r} is not known (this engine: {SPEC_VERSION})"])
    problems += _unknown("the VM", body, VmSpec)
    name = body.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append("name must be 1-31 lower-case letters, digits or dashes")
    nics_in, disks_in = body.get("nics", []), body.get("disks", [])
    if not isinstance(nics_in, list) or not 1 <= len(nics_in) <= MAX_NICS:
        problems.append(f"nics must be a list of 1 to {MAX_NICS} NICs")
        nics_in = nics_in if isinstance(nics_in, list) else []
    if not isinstance(disks_in, list) or len(disks_in) > MAX_DISKS:
        problems.append(f"disks must be a list of at most {MAX_DISKS} disks")
        disks_in = disks_in if isinstance(disks_in, list) else []
    nics = [n for i, d in enumerate(nics_in) if (n := _nic(i, d, problems))]
    disks = [x for i, d in enumerate(disks_in) if (x := _disk(i, d, problems))]
    macs = [n.mac for n in nics]
    if dups := sorted({m for m in macs if isinstance(m, str) and macs.count(m) > 1}):
        problems.append(f"MAC {', '.join(dups)} is given to more than one NIC")
    paths = [x.path for x in disks if x.path]
    if dups := sorted({p for p in paths if paths.count(p) > 1}):
        problems.append(f"image {', '.join(dups)} is given to more than one disk")
    rest = {k: v for k, v in body.items() if k in {f.name for f in fields(VmSpec)} - {"nics", "disks"}}
    spec = VmSpec(**rest, nics=tuple(nics), disks=tuple(disks))
    _int(problems, "memory_mib", spec.memory_mib, 64, 1 << 20)
    _int(problems, "vcpus", spec.vcpus, 1, 64)
    if (spec.sockets is None) != (spec.cores is None):
        problems.append("give sockets and cores together")
    elif spec.sockets is not None:
        _int(problems, "sockets", spec.sockets, 1, 64)
        _int(problems, "cores", spec.cores, 1, 64)
        if (
            isinstance(spec.sockets, int)
            and isinstance(spec.cores, int)
            and spec.sockets * spec.cores != spec.vcpus
        ):
            problems.append(
                f"sockets x cores ({spec.sockets} x {spec.cores}) must equal vcpus ({spec.vcpus})"
            )
    if spec.machine is not None and (not isinstance(spec.machine, str) or not MACHINES.match(spec.machine)):
        problems.append("machine must be pc, q35 or a versioned pc-i440fx-X.Y / pc-q35-X.Y")
    elif isinstance(spec.machine, str) and "q35" in spec.machine:
        problems.append(Q35_REFUSED)
    if spec.firmware == "ovmf":
        problems.append(
            "firmware ovmf is refused: its NVRAM (VARS) is writable guest state that the engine "
            "does not replicate yet, so a failover would lose or fork it; use seabios"
        )
    elif spec.firmware not in FIRMWARES:
        problems.append(f"firmware must be one of {', '.join(FIRMWARES)}")
    if spec.cpu_model is not None and (
        not isinstance(spec.cpu_model, str) or not re.match(r"^[A-Za-z0-9_.-]+$", spec.cpu_model)
    ):
        problems.append("cpu_model must be a QEMU CPU model name (e.g. qemu64, Skylake-Server)")
    if not isinstance(spec.serial, bool):
        problems.append("serial must be true or false")
    for key in ("kernel", "initrd"):
        value = getattr(spec, key)
        if value is not None and (not isinstance(value, str) or not value.startswith("/")):
            problems.append(f"{key} must be an absolute path")
    if not isinstance(spec.cmdline, str):
        problems.append("cmdline must be a string")
    if spec.kernel is None and not any(not x.create for x in disks[:1]):
        problems.append("boot from disk needs an image as the first disk (or give a kernel)")
    if spec.initrd is not None and spec.kernel is None:
        problems.append("an initrd needs a kernel")
    if problems:
        raise SpecError(problems)
    return spec


@dataclass
class HostFacts:
    """What check_host needs to know about the host that is to run the VM."""

    datastore: Path
    bridges: set[str]
    default_bridge: str
    machines: set[str] = field(default_factory=set)  # empty: not probed, not checked
    images: dict[str, str] = field(default_factory=dict)  # path -> the format found (qemu-img info)


def check_host(spec: VmSpec, facts: HostFacts, others: dict[str, VmSpec]) -> list[str]:
    """Every reason this host cannot run the VM now (empty: it can). `others`: the specs of the
    other pairs on this datastore, whose MACs and images are theirs."""
    problems = []
    datastore = Path(facts.datastore).resolve()
    for i, disk in enumerate(spec.disks):
        if disk.create:
            continue
        path = Path(disk.path).resolve()
        if not path.is_relative_to(datastore) or path == datastore:
            problems.append(f"disks[{i}]: {disk.path} is not on the shared datastore {facts.datastore}")
        elif not path.is_file():
            problems.append(f"disks[{i}]: image {disk.path} does not exist (an image is never created)")
        elif (found := facts.images.get(disk.path)) and found != disk.format:
            problems.append(f"disks[{i}]: {disk.path} is a {found} image, not {disk.format}")
    problems += missing_bridges(spec, facts.bridges, facts.default_bridge)
    for other in others.values():
        if other.name == spec.name:
            continue
        if shared := sorted({n.mac for n in spec.nics} & {n.mac for n in other.nics}):
            problems.append(f"MAC {', '.join(shared)} is used by VM {other.name}")
        mine = {str(Path(d.path).resolve()) for d in spec.disks if d.path}
        if shared := sorted(mine & {str(Path(d.path).resolve()) for d in other.disks if d.path}):
            problems.append(f"image {', '.join(shared)} is used by VM {other.name}")
    if spec.machine is not None and facts.machines and spec.machine not in facts.machines:
        known = ", ".join(sorted(m for m in facts.machines if MACHINES.match(m)))
        problems.append(f"machine {spec.machine} is not one this QEMU build runs (it has {known})")
    return problems


def host_facts(spec: VmSpec, datastore: Path, default_bridge: str, machines: set[str],
               prefix: tuple[str, ...] = ()) -> HostFacts:  # fmt: skip
    """Read what check_host needs from this host: its bridges (`ip link`) and the format of each
    image that exists (`qemu-img info -U`: the image may be open in a running QEMU)."""
    images = {}
    for disk in spec.disks:
        if disk.path and Path(disk.path).is_file():
            images[disk.path] = image_format(disk.path, prefix)
    return HostFacts(Path(datastore), host_bridges(prefix), default_bridge, machines, images)


def host_bridges(prefix: tuple[str, ...] = ()) -> set[str]:
    out = subprocess.run(
        [*prefix, "ip", "-j", "link", "show", "type", "bridge"], capture_output=True, text=True
    )
    return {link["ifname"] for link in json.loads(out.stdout or "[]")} if out.returncode == 0 else set()


def missing_bridges(spec: VmSpec, bridges: set[str], default_bridge: str) -> list[str]:
    """Why a host lacks what the VM's NICs are on (the primary's host and a secondary's alike)."""
    return [
        f"nics[{i}]: bridge {nic.bridge or default_bridge} does not exist on this host"
        for i, nic in enumerate(spec.nics)
        if (nic.bridge or default_bridge) not in bridges
    ]


def image_info(path: str, prefix: tuple[str, ...] = ()) -> dict:
    out = subprocess.run([*prefix, "qemu-img", "info", "-U", "--output=json", path],
                         capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout) if out.returncode == 0 else {}


def image_format(path: str, prefix: tuple[str, ...] = ()) -> str:
    return image_info(path, prefix).get("format", "")
