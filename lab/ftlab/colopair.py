"""An FT pair of the lab guest on lab hosts, built from the engine's data-plane driver: what the
data-plane tests and bench/failover run. The failures are injected and the failover sequences
driven from here; deciding on its own is the engine daemon's job."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lockstep import accel, arbiter, colo

from . import guest as lab_guest
from . import lab
from . import topology as t
from .lab import REPO
from .proc import LabError, in_node, wait_for

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


def set_links(links: list[str], up: bool) -> None:
    for link in links:
        subprocess.run(["ip", "link", "set", link, "up" if up else "down"], check=True)


def tail(path: Path) -> str:
    return path.read_text()[-800:]


class Pair:
    """Primary on lab-h1, secondary on lab-h2, the guest at 10.77.3.100."""

    def __init__(
        self, qemu: str, mode: colo.Mode, checkpoint_ms: int = 100, disk_mib: int | None = None
    ) -> None:
        image = lab_guest.build_image()
        self.ip = t.guest_ip(0)
        self.guest = colo.Guest(
            name="ftpair", mac=t.guest_mac(0), kernel=f"{image}/vmlinuz", initrd=f"{image}/initrd.img",
            cmdline=f"console=ttyS0 ft.ip={self.ip}/24", disk_mib=disk_mib,
        )  # fmt: skip
        self.mode, self.checkpoint_ms = mode, checkpoint_ms
        self.ports = colo.Ports()
        self.primary = colo.Vm(self.guest, lab_host(1, qemu), "primary")
        self.secondary = colo.Vm(self.guest, lab_host(2, qemu), "secondary")
        self.watchers: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.id: str | None = None
        self.cut: list[str] = []  # links taken down, put back up by close()

    async def __aenter__(self) -> Pair:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def cut_off(self, vm: colo.Vm, which: tuple[str, ...] = ("ft", "vm")) -> None:
        """Take a side's host off the FT-logging and VM networks (its root-side veth ends)."""
        index = 1 if vm is self.primary else 2
        links = [f"ftl-h{index}-{name}" for name in which]
        self.cut += links
        set_links(links, up=False)

    async def boot(self) -> None:
        """Probe both hosts, start the secondary waiting and boot the primary, unprotected."""
        g, p, s = self.guest, self.primary.host, self.secondary.host
        await colo.check_hosts(p, s)
        await self.secondary.start(colo.secondary_argv(g, s, p, self.ports, self.mode), tap_up=False)
        await self.primary.start(colo.primary_argv(g, p, self.ports), tap_up=True)

    async def protect(self) -> None:
        await colo.enter_colo(self.primary, self.secondary, self.ports, self.checkpoint_ms, self.mode)

    async def start(self) -> lab_guest.StreamFollower:
        """Boot the primary, connect the client, then enter replication under its traffic."""
        await self.boot()
        client = lab_guest.StreamFollower(self.ip)
        await asyncio.to_thread(client.wait_for_bytes, 1, 120)
        await self.protect()
        await asyncio.to_thread(client.wait_for_bytes, client.bytes + MiB, 60)  # flowing while replicated
        return client

    def watch(self, timeout: float = 0.5) -> None:
        """Start each side's watcher (ftctl watch) inside its lab host, as lockstepd would run
        it: from now on the pair detects failures and fails over on its own."""
        self.id = f"{self.guest.name}-{time.time_ns()}"  # a fresh token for each run
        ftctl = str(Path(sys.executable).with_name("ftctl"))
        for vm, other in ((self.primary, self.secondary), (self.secondary, self.primary)):
            assert vm.proc is not None
            log = vm.host.run_dir / f"{self.guest.name}.{vm.role}.watch.log"
            argv = [
                *vm.host.prefix, ftctl, "watch", "--pair", self.id, "--generation", "1", "--role", vm.role,
                "--me", vm.host.name, "--listen", f"{vm.host.ft_ip}:{self.ports.heartbeat}",
                "--peer", f"{other.host.ft_ip}:{self.ports.heartbeat}", "--datastore", str(t.DATASTORE),
                "--mode", self.mode, "--qmp", str(vm.engine_qmp_path), "--qemu-pid", str(vm.proc.pid),
                "--guest", self.guest.name, "--timeout", str(timeout),
            ]  # fmt: skip
            with open(log, "w") as out:
                self.watchers[vm.role] = (subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT), log)
        for role, (proc, log) in self.watchers.items():  # failures injected before this go unseen

            def started(proc=proc, log=log) -> bool:
                return '"peer-seen"' in log.read_text() or proc.poll() is not None

            wait_for(f"the {role}'s watcher", started, 20)
            if proc.poll() is not None:
                raise LabError(f"the {role}'s watcher did not start: {tail(log)}")

    def events(self, role: str) -> list[dict]:
        """What a side's watcher logged (JSON lines with "event" and "at")."""
        lines = self.watchers[role][1].read_text().splitlines()
        return [e for e in map(json.loads, (x for x in lines if x.startswith("{"))) if "event" in e]

    def watching(self) -> set[str]:
        """The sides whose watcher is still watching (has decided nothing)."""
        return {role for role, (proc, _) in self.watchers.items() if proc.poll() is None}

    def verdict(self, role: str, timeout: float = 60) -> dict:
        """Wait for a side's watcher to decide; its verdict (watch.Verdict as a dict)."""
        proc, log = self.watchers[role]
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"the {role}'s watcher decided nothing in {timeout} s: {tail(log)}") from None
        lines = log.read_text().strip().splitlines()
        try:
            return json.loads(lines[-1])["verdict"]
        except (IndexError, ValueError, KeyError):
            raise LabError(f"the {role}'s watcher ended without a verdict: {tail(log)}") from None

    async def close(self) -> None:
        set_links(self.cut, up=True)
        self.cut = []
        for proc, _ in self.watchers.values():
            proc.kill()
            proc.wait()
        await self.primary.close()
        await self.secondary.close()
        if self.id:
            shutil.rmtree(arbiter.token_path(t.DATASTORE, self.id, 1).parent, ignore_errors=True)
