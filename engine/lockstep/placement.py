"""Where a new secondary goes: pure, so every rule is unit-tested.

Never the primary's host (anti-affinity); free memory at least twice the guest's RAM (the
secondary and its checkpoint buffer); per-host caps on FT VMs and their vCPUs, primaries and
secondaries counted; the FT-logging bandwidth budget; every bridge the VM's NICs are on. The
preferred host wins when it fits; otherwise the fitting host with the fewest FT VMs, then the
most free memory."""

from __future__ import annotations

from dataclasses import dataclass

from . import vmspec
from .config import Caps
from .records import Record


@dataclass(frozen=True)
class HostInfo:
    name: str
    free_mib: int  # MemAvailable; -1 when the host did not answer
    build: str | None = None  # its QEMU build (the probe's): both sides of a pair run the same
    bridges: frozenset[str] | None = None  # its bridges (None: not known, not checked)
    default_bridge: str | None = None  # the bridge of a NIC that names none


def load(records: dict[str, Record], host: str) -> tuple[int, int, int]:
    """(FT VMs, their vCPUs, FT-logging Mb/s estimate) on a host, from the pair records."""
    vms = vcpus = mbps = 0
    for r in records.values():
        if r.state.value in ("not_configured", "lost"):
            continue
        if host in r.hosts():
            vms += 1
            vcpus += int(r.guest.get("vcpus", 1))
            mbps += bandwidth_estimate(r.guest)
    return vms, vcpus, mbps


def bandwidth_estimate(guest: dict) -> int:
    """A pair's FT-logging need, Mb/s: a tenth of its RAM per second (checkpoints of a busy guest)."""
    return max(1, int(guest.get("memory_mib", 256)) * 8 // 10)


def refusals(
    host: HostInfo,
    guest: dict,
    records: dict[str, Record],
    caps: Caps,
    primary: str,
    name: str,
    build: str | None = None,
) -> list[str]:
    """Why a host cannot take this pair's secondary (build: the primary's QEMU build); empty when
    it can."""
    why = []
    if host.name == primary:
        why.append(f"{host.name} runs the primary")
    if host.free_mib < 0:
        why.append(f"{host.name} did not answer")
        return why
    if build is not None and host.build != build:
        why.append(f"{host.name} runs QEMU {host.build}, the primary {build}: both sides need the same build")
    if host.bridges is not None:  # the secondary's tap joins the same bridge at failover
        spec = vmspec.from_record(guest)
        why += [
            f"{host.name}: {w}" for w in vmspec.missing_bridges(spec, set(host.bridges), host.default_bridge)
        ]
    need = 2 * int(guest.get("memory_mib", 256))
    if host.free_mib < need:
        why.append(f"{host.name} has {host.free_mib} MiB free, the secondary needs {need}")
    others = {k: r for k, r in records.items() if k != name}
    vms, vcpus, mbps = load(others, host.name)
    if caps.max_vms and vms + 1 > caps.max_vms:
        why.append(f"{host.name} already runs {vms} FT VMs (cap {caps.max_vms})")
    if caps.max_vcpus and vcpus + int(guest.get("vcpus", 1)) > caps.max_vcpus:
        why.append(f"{host.name} already runs {vcpus} FT vCPUs (cap {caps.max_vcpus})")
    if caps.ft_bandwidth_mbps and mbps + bandwidth_estimate(guest) > caps.ft_bandwidth_mbps:
        why.append(f"{host.name}'s FT-logging budget of {caps.ft_bandwidth_mbps} Mb/s is used up ({mbps})")
    return why


def choose(
    hosts: list[HostInfo], record: Record, records: dict[str, Record], caps: Caps
) -> tuple[str | None, list[str]]:
    """(host, []) or (None, every host's reasons); the primary's own entry in hosts gives its build."""
    fits, reasons = [], []
    build = next((h.build for h in hosts if h.name == record.primary.host), None)
    for h in hosts:
        why = refusals(h, record.guest, records, caps, record.primary.host, record.name, build)
        (reasons.extend(why) if why else fits.append(h))
    if not fits:
        return None, reasons
    preferred = [h for h in fits if h.name == record.preferred_secondary]
    best = preferred or sorted(fits, key=lambda h: (load(records, h.name)[0], -h.free_mib, h.name))
    return best[0].name, []


def admit(primary: str, guest: dict, records: dict[str, Record], caps: Caps, name: str) -> list[str]:
    """Whether the primary's host can take one more FT VM (enable counts the primary too)."""
    return refusals(HostInfo(primary, 1 << 30), {**guest, "memory_mib": 0}, records, caps, "", name)
