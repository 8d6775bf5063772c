"""An FT pair of the lab guest on lab hosts, built from the engine's data-plane driver: what the
data-plane tests and bench/failover run. The failures are injected and the failover sequences
driven from here; deciding on its own is the engine daemon's job."""

from __future__ import annotations

import asyncio
import subprocess

from lockstep import accel, colo

from . import guest as lab_guest
from . import lab
from . import topology as t
from .lab import REPO
from .proc import LabError, in_node

MiB = 1 << 20


def lab_qemu() -> str:
    """The lab's QEMU: Debian's 7.2 with the patches of lab/qemu (built once, cached)."""
    proc = subprocess.run([str(REPO / "lab" / "qemu" / "build")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"lab/qemu/build failed: {proc.stderr.strip()}")
    return proc.stdout.split()[-1]


def lab_host(index: int, qemu: str) -> colo.Host:
    h = t.host(index)
    state = lab.load_state()
    if state is None:
        raise lab.NotUp("the lab is not up")
    return colo.Host(
        name=h.hostname, ft_ip=h.ip("ft_logging"), run_dir=h.dir, qemu=(qemu,),
        prefix=tuple(in_node(state["holders"][h.name], [])),
        bridge=t.VM_BRIDGE, accel=accel.choose("auto").accel,  # TCG on the lab machines
    )  # fmt: skip


def cut_links(index: int, up: bool = False) -> None:
    """Take a host off the FT-logging and VM networks (its root-side veth ends), or back on."""
    for link in (f"ftl-h{index}-ft", f"ftl-h{index}-vm"):
        subprocess.run(["ip", "link", "set", link, "up" if up else "down"], check=True)


class Pair:
    """Primary on lab-h1, secondary on lab-h2, the guest at 10.77.3.100."""

    def __init__(self, qemu: str, mode: colo.Mode, checkpoint_ms: int = 100) -> None:
        image = lab_guest.build_image()
        self.ip = t.guest_ip(0)
        self.guest = colo.Guest(
            name="ftpair", mac=t.guest_mac(0), kernel=f"{image}/vmlinuz", initrd=f"{image}/initrd.img",
            cmdline=f"console=ttyS0 ft.ip={self.ip}/24",
        )  # fmt: skip
        self.mode, self.checkpoint_ms = mode, checkpoint_ms
        self.ports = colo.Ports()
        self.primary = colo.Vm(self.guest, lab_host(1, qemu), "primary")
        self.secondary = colo.Vm(self.guest, lab_host(2, qemu), "secondary")

    async def start(self) -> lab_guest.StreamFollower:
        """Boot the primary, connect the client, then enter replication under its traffic."""
        g, p, s = self.guest, self.primary.host, self.secondary.host
        await self.secondary.start(colo.secondary_argv(g, s, p, self.ports, self.mode), tap_up=False)
        await self.primary.start(colo.primary_argv(g, p, self.ports), tap_up=True)
        client = lab_guest.StreamFollower(self.ip)
        await asyncio.to_thread(client.wait_for_bytes, 1, 120)
        await colo.enter_colo(self.primary, self.secondary, self.ports, self.checkpoint_ms, self.mode)
        await asyncio.to_thread(client.wait_for_bytes, client.bytes + MiB, 60)  # flowing while replicated
        return client

    async def close(self) -> None:
        await self.primary.close()
        await self.secondary.close()
