"""One driver per pair on this host: every operation, watcher outcome, peer command and tick of a
pair goes through its mailbox and is handled one at a time, with the pair's record read afresh
from the datastore inside each handler (so nothing decides on a record another step changed).

The driver owns this pair's local processes (its entry in LocalProcesses, its QEMU's QMP
connection, its statistics). Long work (protecting: the copy, waiting for the guest) runs as a
task beside the mailbox; a stop that conflicts with it cancels it first, and a cancelled or
failed protect always ends undone: the VM running alone, `need_secondary` with the reason.

Which side runs the VM changes only through the generation's token (failover.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import api, arbiter, colo, failover, images, placement, vmspec
from .config import Config
from .events import EventLog
from .failover import Outcome
from .local import Local, LocalProcesses, Proc
from .peers import Peers
from .records import Record, Side, Stale
from .state import Action, FtState, InvalidTransition, Reason
from .state import Pair as Machine
from .stats import Stats, ft_tx_bytes, latency_band, listen, process_stats
from .store import RecordStore, StoreUnavailable

GUEST_NIC_TIMEOUT_S = 600  # a VM protected while it boots waits this long for its NIC driver
PEER_SEEN_TIMEOUT_S = 20  # both watchers hear each other, or the protect failed
OVERLAY_COMMIT_TIMEOUT_S = 60  # a poweroff right after a failover waits this long for the disk commit


class Conflict(api.ApiError):
    def __init__(self, message: str, **extra) -> None:
        super().__init__(409, message, **extra)


@dataclass
class Cluster:
    """What every driver on this host shares (each piece has one owner, named here)."""

    cfg: Config
    host: colo.Host  # this host, for the data plane
    mode: colo.Mode  # for new pairs
    build: str  # this host's QEMU build: a secondary only goes where the same build runs
    store: RecordStore
    local: LocalProcesses
    peers: Peers
    events: EventLog
    ft_iface: str | None

    @property
    def me(self) -> str:
        return self.cfg.host


class PairDriver:
    def __init__(self, name: str, cluster: Cluster) -> None:
        self.name, self.c = name, cluster
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.vm: colo.Vm | None = None
        self.stats = Stats()
        self.listener: asyncio.Task | None = None
        self.protecting: asyncio.Task | None = None
        self.retry_at = 0.0  # when a failed protect may be tried again
        self.failures = 0  # protects failed in a row (the retry backs off)
        self.resolving = False  # a watcher's end is queued or being handled
        self.cleanup: asyncio.Task | None = None  # stopping a lost side's leftovers
        self.queued: set[str] = set()  # periodic commands waiting in the mailbox
        self.handling = False  # a command is being handled
        self.task = asyncio.create_task(self.run(), name=f"pair {name}")

    # --- the mailbox ----------------------------------------------------------------------

    async def submit(self, op: str, **args):
        future = asyncio.get_running_loop().create_future()
        await self.inbox.put((op, args, future))
        return await future

    def post(self, op: str, **args) -> None:
        """A command nobody waits for (watcher ends, ticks, guest shutdown)."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception())  # consumed: errors are events already
        self.inbox.put_nowait((op, args, future))

    def post_once(self, op: str, **args) -> None:
        """A periodic command, queued only if the last one was handled: a driver slowed by a
        hung datastore must not pile up a tick a second."""
        if op in self.queued:
            return
        self.queued.add(op)
        self.post(op, **args)

    async def run(self) -> None:
        while True:
            op, args, future = await self.inbox.get()
            self.queued.discard(op)
            self.handling = True
            try:
                result = await getattr(self, f"on_{op}")(**args)
            except (api.ApiError, StoreUnavailable, Stale) as e:
                if isinstance(e, api.ApiError):
                    error = e
                else:
                    error = api.ApiError(503 if isinstance(e, StoreUnavailable) else 409, str(e))
                future.done() or future.set_exception(error)
            except Exception as e:  # a bug in one pair's handling must not take the daemon down
                self.c.events.emit("pair_error", vm=self.name, op=op, detail=f"{type(e).__name__}: {e}")
                future.done() or future.set_exception(api.ApiError(500, f"{type(e).__name__}: {e}"))
            else:
                future.done() or future.set_result(result)
            finally:
                self.handling = False

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing being handled, nothing running beside the mailbox."""
        busy = (self.protecting, self.cleanup)
        return self.inbox.empty() and not self.handling and all(t is None or t.done() for t in busy)

    # --- records, events -----------------------------------------------------------------

    async def record(self) -> Record:
        record = await self.c.store.load(self.name)
        if record is None:
            known = ", ".join(await self.c.store.load_all()) or "none"
            raise api.ApiError(404, f"no VM named {self.name!r} (known: {known})")
        return record

    async def owned(self) -> Record:
        record = await self.record()
        entry = self.c.local.get(self.name)
        if record.primary.host != self.c.me or entry is None or entry.role != "primary":
            raise Conflict(f"{self.name}'s primary runs on {record.primary.host}: ask the daemon there",
                           owner=record.primary.host)  # fmt: skip
        return record

    def transition(self, record: Record, action: Action, reason: Reason, **fields) -> None:
        machine = Machine(record.name, record.state, record.reason, record.generation)
        event = machine.apply(action, reason)
        record.state, record.reason, record.generation = machine.state, machine.reason, machine.generation
        line = self.c.events.emit("transition", vm=record.name, action=str(action), old=str(event.old),
                                  new=str(event.new), reason=str(reason), generation=record.generation,
                                  **fields)  # fmt: skip
        record.events.append(line)

    def view(self, record: Record) -> dict:
        here = record.primary.host == self.c.me
        stats = self.stats.view() if here and record.state == FtState.RUNNING else {}
        return view(record, stats, self.c, disks=here)

    # --- the authority --------------------------------------------------------------------

    async def holder(self, generation: int) -> str | None:
        return await self.c.store.call(failover.holder, self.name, generation)

    async def claim(self, generation: int, role: str) -> arbiter.Verdict:
        side = failover.side_id(self.c.me, role)
        verdict = await self.c.store.call(arbiter.claim, self.name, generation, side)
        self.c.events.emit("claimed", vm=self.name, generation=generation, side=side, won=verdict.won,
                           holder=verdict.holder, error=verdict.error)  # fmt: skip
        if verdict.error:
            raise StoreUnavailable(verdict.error)
        return verdict

    async def retire(self, record: Record) -> None:
        """Take this generation's token before stopping anything: from now on a secondary watcher
        that fires loses and fences itself. If the secondary holds it already, it runs the VM:
        this host's copy stops and the operation is refused."""
        verdict = await self.claim(record.generation, "primary")
        if verdict.won or failover.holder_host(verdict.holder) == self.c.me:
            return
        await self.drop_local(f"the secondary holds generation {record.generation}: {verdict.holder}")
        raise Conflict(f"{self.name}: the secondary on {failover.holder_host(verdict.holder)} took over "
                       f"generation {record.generation} meanwhile; ask again")  # fmt: skip

    # --- protection -----------------------------------------------------------------------

    async def start_protect(self, record: Record) -> None:
        """starting is saved; protect in a task of its own, beside the mailbox."""
        self.protecting = asyncio.create_task(self.protect(record), name=f"protect {self.name}")

    async def wait_protected(self) -> dict:
        if self.protecting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.protecting)
        return self.view(await self.record())

    async def stop_protecting(self) -> None:
        if self.protecting is not None and not self.protecting.done():
            self.protecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.protecting

    async def guest_nic_ready(self, record: Record) -> bool:
        """Wait for the guest's NIC driver (colo.nic_driver_ready): a VM protected while it boots
        is protected once its driver is up."""
        deadline = time.monotonic() + GUEST_NIC_TIMEOUT_S
        logged = False
        while not await colo.nic_driver_ready(self.vm):
            if time.monotonic() > deadline:
                return False
            if not logged:
                self.c.events.emit("waiting_for_guest", vm=record.name,
                                   detail="the guest's NIC driver is not up yet")  # fmt: skip
                logged = True
            await asyncio.sleep(0.5)
        return True

    async def protect(self, record: Record) -> None:
        """starting -> running: a secondary on the host placement picks, replication, watchers.
        On any failure or cancellation: everything undone, the VM running alone, need_secondary
        with the reason; retried later with a growing pause."""
        started, chosen = time.monotonic(), None

        def step(name: str) -> None:  # progress of a long step, and where a fault test strikes
            self.c.events.emit("protecting", vm=self.name, step=name, secondary=chosen,
                               generation=record.generation)  # fmt: skip

        try:
            await colo.primary_continue_alone(self.vm, colo.Mode(record.mode))  # clean start
            await self.sweep_copies(record)  # earlier secondaries' copies, from hosts that never came back
            if not await self.guest_nic_ready(record):
                raise colo.DataPlaneError(f"the guest's NIC driver was not up within {GUEST_NIC_TIMEOUT_S} s")
            others = await self.c.store.load_all()
            chosen, why = placement.choose(await self.host_infos(), record, others, self.c.cfg.caps)
            if chosen is None:
                await self.fail_protect(record, None, Reason.NO_COMPATIBLE_HOST, "; ".join(why))
                return
            record.secondary = Side(chosen, "secondary")
            await self.c.store.save(record)
            step("placed")
            gen = {"generation": record.generation}
            sent_before = ft_tx_bytes(self.c.ft_iface)
            await self.c.peers.call(chosen, "POST", f"/peer/secondary/{self.name}", gen)
            step("copying")
            ports = colo.Ports(record.ports_base)
            watchdog = asyncio.create_task(self.abort_if_gone(chosen, ports))
            try:
                await colo.start_replication(self.vm, self.c.cfg.hosts[chosen], ports, record.checkpoint_ms,
                                             colo.Mode(record.mode))  # fmt: skip
            finally:
                watchdog.cancel()
            copied = ft_tx_bytes(self.c.ft_iface) - sent_before  # QEMU reports no RAM stats in COLO
            step("replicating")
            await self.start_watcher(record, "primary", chosen)
            step("watching")
            await self.c.peers.call(chosen, "POST", f"/peer/watch/{self.name}", gen)
            step("peer_watching")
            await self.await_peer_seen()
        except asyncio.CancelledError:
            await self.fail_protect(record, chosen, Reason.USER_ACTION, "cancelled")
            raise
        except Exception as e:
            await self.fail_protect(record, chosen, Reason.START_FAILED, f"{type(e).__name__}: {e}")
            return
        fresh = await self.c.store.load(self.name)
        if fresh is None or fresh.generation != record.generation or fresh.state != FtState.STARTING:
            return  # a watcher's outcome changed the pair meanwhile: that handling owns it now
        self.stats, self.failures = Stats(), 0
        self.transition(fresh, Action.SYNCED, Reason.ENTERED_LOCKSTEP, secondary=chosen,
                        seconds=round(time.monotonic() - started, 2), copied_bytes=copied)  # fmt: skip
        await self.c.store.save(fresh)

    async def fail_protect(self, record: Record, chosen: str | None, reason: Reason, detail: str) -> None:
        self.c.events.emit("protect_failed", vm=self.name, secondary=chosen, detail=detail)
        try:
            peer_lost = chosen is not None and not await self.answers(chosen)
            if peer_lost:  # before any QMP: QEMU may be blocked on a connection to it
                await colo.abort_connections(
                    self.c.host, self.c.cfg.hosts[chosen], colo.Ports(record.ports_base)
                )
            await self.unprotect(record, peer_lost=peer_lost)
        except Exception as e:  # the VM runs alone either way; the next attempt cleans up again
            self.c.events.emit("cleanup_failed", vm=self.name, detail=f"{type(e).__name__}: {e}")
        fresh = await self.c.store.load(self.name)
        if fresh is None or fresh.generation != record.generation or fresh.state != FtState.STARTING:
            return
        fresh.secondary = None
        self.failures += 1
        self.retry_at = time.monotonic() + min(self.c.cfg.reprotect_retry_s * 2 ** (self.failures - 1), 300)
        self.transition(fresh, Action.START_FAILED, reason, detail=detail)
        await self.c.store.save(fresh)

    async def abort_if_gone(self, host: str, ports: colo.Ports) -> None:
        """While the copy runs: a secondary's host that stops answering has its connections
        aborted at once, so a QEMU blocked on one (a connect, a drain) frees itself and the copy
        fails now rather than when TCP gives up."""
        misses = 0
        while misses < 2:
            await asyncio.sleep(0.5)
            misses = 0 if await self.answers(host) else misses + 1
        self.c.events.emit("secondary_gone", vm=self.name, secondary=host, detail="aborting the copy")
        await colo.abort_connections(self.c.host, self.c.cfg.hosts[host], ports)

    async def answers(self, host: str) -> bool:
        try:
            await self.c.peers.call(host, "GET", "/peer/info")
            return True
        except api.ApiError:
            return False

    async def unprotect(self, record: Record, peer_lost: bool = False) -> None:
        """The primary runs on alone: the token first (a secondary that fires from now on
        fences itself), then its own watcher, then the secondary, then the primary's COLO set-up.
        A secondary that cannot be reached is harmless: its watcher loses the token."""
        await self.retire(record)
        entry = self.c.local.get(self.name)
        if entry is not None and entry.watcher is not None:
            await entry.watcher.kill()
            entry.watcher = None
            self.c.local.put(entry)
        if record.secondary is not None:
            try:
                body = {"generation": record.generation}
                await self.c.peers.call(record.secondary.host, "POST", f"/peer/stop/{self.name}", body)
            except api.ApiError as e:
                self.c.events.emit("secondary_not_stopped", vm=self.name, secondary=record.secondary.host,
                                   detail=e.message)  # fmt: skip
                peer_lost = True
            record.secondary = None
        if self.vm is not None:
            await colo.primary_continue_alone(self.vm, colo.Mode(record.mode), peer_lost=peer_lost)

    async def host_infos(self) -> list[placement.HostInfo]:
        async def info(host: str) -> placement.HostInfo:
            try:
                answer = await self.c.peers.call(host, "GET", "/peer/info")
                bridges = answer.get("bridges")  # None from a daemon of before: not checked
                return placement.HostInfo(host, int(answer["free_mib"]), answer.get("build"),
                                          None if bridges is None else frozenset(bridges),
                                          answer.get("bridge"))  # fmt: skip
            except (api.ApiError, KeyError, ValueError, TypeError):
                return placement.HostInfo(host, -1)

        hosts = [h for h in self.c.cfg.hosts if h != self.c.me]
        infos = await asyncio.gather(*(info(h) for h in hosts))
        return [placement.HostInfo(self.c.me, 0, self.c.build), *infos]

    async def start_watcher(self, record: Record, role: str, peer_host: str) -> None:
        entry = self.c.local.get(self.name)
        ports = colo.Ports(record.ports_base)
        journal = self.c.cfg.run_dir / f"{self.name}.{entry.slot}.gen{record.generation}.watch.log"
        argv = watcher_argv(self.c, record, self.vm, entry.qemu.pid, role, peer_host, ports)
        with open(journal, "w") as out, open(journal.with_suffix(".err"), "w") as err:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                        stderr=err, start_new_session=True)  # fmt: skip
        entry.role, entry.generation = role, record.generation
        entry.watcher, entry.journal = Proc.of(proc.pid), str(journal)
        self.c.local.put(entry)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while '"watching"' not in journal.read_text():  # a failure before this would go unseen
            if proc.returncode is not None or not entry.watcher.alive() or loop.time() > deadline:
                raise colo.DataPlaneError(
                    f"the {role}'s watcher did not start: {journal.with_suffix('.err').read_text()[-300:]}"
                )
            await asyncio.sleep(0.05)

    async def await_peer_seen(self) -> None:
        entry = self.c.local.get(self.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PEER_SEEN_TIMEOUT_S
        while not failover.Journal.parse(Path(entry.journal).read_text()).peer_seen:
            if not entry.watcher.alive() or loop.time() > deadline:
                raise colo.DataPlaneError("the watchers did not hear each other")
            await asyncio.sleep(0.05)

    # --- this host's processes -----------------------------------------------------------

    async def launch(self, record: Record, slot: str, argv: list[str], tap_up: bool) -> colo.Vm:
        guest = vmspec.from_record(record.guest)
        vm = colo.Vm(guest, self.c.host, slot, record.generation)
        copies = colo.image_copies(guest, self.c.me, record.generation) if slot == "secondary" else {}
        try:
            await vm.start(argv, tap_up=tap_up)
        except Exception:
            vm.kill()
            with contextlib.suppress(StoreUnavailable):  # else the owner's sweep removes them
                await self.c.store.call(images.remove, list(copies))
            raise
        self.attach(vm)
        self.c.local.put(Local(self.name, slot, slot, Proc.of(vm.proc.pid), record.generation, copies=copies))
        return vm

    def attach(self, vm: colo.Vm) -> None:
        self.vm = vm
        self.listener = listen(vm.qmp, lambda: self.stats, lambda: self.post("guest_shutdown"))

    async def drop_local(self, why: str) -> bool:
        """Stop this host's QEMU of the pair and its watcher: never the copy that holds the VM
        (callers decided that through the token)."""
        entry = self.c.local.get(self.name)
        if self.listener is not None:
            self.listener.cancel()
        if self.vm is not None:
            with contextlib.suppress(Exception):
                await self.vm.qmp.disconnect()
        self.vm = self.listener = None
        if entry is None:
            return False
        if entry.watcher is not None:
            await entry.watcher.kill()
        gone = await entry.qemu.kill()
        if gone:  # its tap is this VM's and side's alone (colo.tap_name)
            for tap in colo.tap_names(self.name, entry.slot):
                with contextlib.suppress(colo.DataPlaneError):
                    await self.c.host.run("ip", "link", "del", tap)
            await self.settle_copies(entry)
        self.c.local.pop(self.name)
        self.c.events.emit(
            "dropped",
            vm=self.name,
            role=entry.role,
            pid=entry.qemu.pid,
            why=why,
            **({} if gone else {"detail": "the QEMU did not exit (stuck in the kernel)"}),
        )
        return True

    async def settle_copies(self, entry: Local) -> None:
        """A QEMU of this host is gone: its copies of the disk images become the images if its
        side holds their generation's token (it ran the VM: their data is the newest), and are
        removed otherwise. One the datastore does not take now is left for the owner's sweep."""
        if not entry.copies:
            return
        try:
            generation = images.generation_of(next(iter(entry.copies)))
            holder = await self.holder(generation)
            if holder == failover.side_id(self.c.me, "secondary"):
                done = await self.c.store.call(images.adopt, entry.copies)
                self.c.events.emit("images_adopted", vm=self.name, images=done, generation=generation)
            else:
                await self.c.store.call(images.remove, list(entry.copies))
            entry.copies = {}
        except StoreUnavailable as e:
            self.c.events.emit("copies_left", vm=self.name, copies=sorted(entry.copies), detail=str(e))

    async def adopt_copies(self, entry: Local) -> None:
        """This side went live on its copies (it holds the token): they become the images, so the
        image paths name the VM's disks again. Retried at each tick while the datastore fails."""
        if not entry.copies:
            return
        try:
            done = await self.c.store.call(images.adopt, entry.copies)
        except StoreUnavailable as e:
            self.c.events.emit("images_not_adopted", vm=self.name, detail=str(e), retry="next tick")
            return
        self.c.events.emit("images_adopted", vm=self.name, images=done,
                           generation=images.generation_of(next(iter(entry.copies))))  # fmt: skip
        entry.copies = {}
        self.c.local.put(entry)

    async def adopt_pending(self, record: Record) -> None:
        """Before the VM is stopped for good, its newest data must be in its images: a failover's
        commit of the replication overlays into the copies has ended, and copies not adopted yet
        become the images; or nothing is stopped."""
        entry = self.c.local.get(self.name)
        if entry is None or entry.role != "primary":
            return
        deadline = time.monotonic() + OVERLAY_COMMIT_TIMEOUT_S
        while (
            entry.slot == "secondary"
            and self.vm is not None
            and (pending := await colo.overlays_pending(self.vm))
        ):
            if time.monotonic() > deadline:
                raise Conflict(f"{self.name}: the failover's commit of {', '.join(pending)} into its disks "
                               f"has not ended within {OVERLAY_COMMIT_TIMEOUT_S} s; ask again")  # fmt: skip
            await asyncio.sleep(0.1)
        if entry.copies:
            await self.adopt_copies(entry)
            if entry.copies:
                raise StoreUnavailable(f"{self.name} runs on copies the datastore does not rename now: "
                                       f"{', '.join(sorted(entry.copies))}; ask again")  # fmt: skip

    async def sweep_copies(self, record: Record, every: bool = False) -> None:
        """Copies of the pair's images that no secondary can use any more: of generations before
        the record's (each of their tokens was taken before a new generation began), or every one
        once the VM is powered off (its token taken). This host's own, not adopted yet, stay."""
        spec = vmspec.from_record(record.guest)
        paths = [d.path for d in spec.disks if not d.create]
        entry = self.c.local.get(self.name)
        keep = set(entry.copies) if entry is not None else set()
        try:
            before = None if every else record.generation
            found = await self.c.store.call(images.stale, paths, self.name, before, keep)
            if found:
                await self.c.store.call(images.remove, found)
                self.c.events.emit("copies_removed", vm=self.name, copies=found)
        except StoreUnavailable as e:
            self.c.events.emit("copies_left", vm=self.name, detail=str(e))

    # --- operations (the local API; only the primary's host takes them) -------------------

    async def on_vm_start(self, guest: vmspec.VmSpec) -> dict:
        """Start an unprotected VM here (its record created first, exclusively, so a VM of that
        name started on another host at the same time loses cleanly)."""
        existing = await self.c.store.load(self.name)
        if existing is not None:
            if existing.primary.host == self.c.me and self.c.local.get(self.name) is not None:
                return {"changed": False, "vm": self.view(existing)}
            raise Conflict(f"a VM named {self.name!r} already runs on {existing.primary.host}")
        base = await self.c.store.call(reserve_ports, self.name)
        record = Record(
            name=self.name,
            guest=vmspec.to_dict(guest),
            primary=Side(self.c.me, "primary"),
            ports_base=base,
            mode=str(self.c.mode),
            checkpoint_ms=self.c.cfg.checkpoint_ms,
        )
        await self.c.store.create(record)
        try:
            vm = await self.launch(record, "primary", colo.primary_argv(guest, self.c.host, colo.Ports(base)),
                                   tap_up=True)  # fmt: skip
        except Exception:
            await self.c.store.delete(record)  # nothing half made: no record of a VM that never ran
            await self.c.store.call(release_ports, base, self.name)
            raise
        self.c.events.emit("vm_started", vm=self.name, pid=vm.proc.pid)
        return {"changed": True, "vm": self.view(record)}

    async def on_enable(self, body: dict) -> dict:
        record = await self.owned()
        interval = body.get("checkpoint_ms")
        if interval is not None and (not isinstance(interval, int) or not 1 <= interval <= 600_000):
            raise api.ApiError(400, "checkpoint_ms must be a whole number of milliseconds, 1 to 600000")
        preferred = body.get("secondary_host") or None
        if preferred is not None and preferred not in self.c.cfg.hosts:
            raise api.ApiError(400, f"secondary_host must be one of {', '.join(self.c.cfg.hosts)}")
        if record.state in (FtState.RUNNING, FtState.STARTING, FtState.NEED_SECONDARY):
            if interval is None or interval == record.checkpoint_ms:
                return {"changed": False, "vm": self.view(record), "wait": self.protecting_wait()}
            if record.state == FtState.RUNNING:  # QEMU takes a new interval while replicating
                await self.vm.execute("migrate-set-parameters", {"x-checkpoint-delay": interval})
            record.checkpoint_ms = interval
            await self.c.store.save(record)
            self.c.events.emit("checkpoint_interval", vm=self.name, checkpoint_ms=interval)
            return {"changed": True, "vm": self.view(record)}
        others = await self.c.store.load_all()
        if why := placement.admit(self.c.me, record.guest, others, self.c.cfg.caps, self.name):
            raise Conflict(f"refused: {'; '.join(why)}")
        await self.retire(record)  # a new generation starts from one this host holds
        record.preferred_secondary = preferred
        if interval is not None:
            record.checkpoint_ms = interval
        self.transition(record, Action.ENABLE, Reason.USER_ACTION)
        await self.c.store.save(record)
        self.failures = 0
        await self.start_protect(record)
        return {"changed": True, "wait": self.protecting_wait()}

    def protecting_wait(self):
        """The API answers an enable once its protect has ended (outside the mailbox)."""
        return self.protecting if self.protecting is not None and not self.protecting.done() else None

    async def on_disable(self, body: dict) -> dict:
        record = await self.owned()
        if record.state in (FtState.DISABLED, FtState.NOT_CONFIGURED):
            return {"changed": False, "vm": self.view(record)}
        await self.stop_protecting()
        record = await self.owned()
        await self.unprotect(record)
        self.transition(record, Action.DISABLE, Reason.USER_ACTION)
        await self.c.store.save(record)
        return {"changed": True, "vm": self.view(record)}

    async def on_absent(self, body: dict) -> dict:
        record = await self.owned()
        if record.state == FtState.NOT_CONFIGURED:
            return {"changed": False, "vm": self.view(record)}
        await self.stop_protecting()
        record = await self.owned()
        if record.state != FtState.DISABLED:
            await self.unprotect(record)
        self.transition(record, Action.TURN_OFF, Reason.USER_ACTION)
        await self.c.store.save(record)
        return {"changed": True, "vm": self.view(record)}

    async def on_poweroff(self, body: dict) -> dict:
        """Power the VM off: the token first, then the secondary, then the primary; the record
        is removed. A pair with no copy left (lost) can be cleaned up from any host."""
        record = await self.record()
        if record.state == FtState.LOST and record.primary.host != self.c.me:
            # whoever holds it, nothing may go live now; a secondary that held it ran the VM last
            verdict = await self.claim(record.generation, "primary")
            if verdict.holder and verdict.holder.endswith("/secondary"):
                spec, host = vmspec.from_record(record.guest), failover.holder_host(verdict.holder)
                copies = colo.image_copies(spec, host, record.generation)
                self.c.events.emit("images_adopted", vm=self.name, generation=record.generation,
                                   images=await self.c.store.call(images.adopt, copies))  # fmt: skip
        else:
            record = await self.owned()
            await self.adopt_pending(record)
            await self.stop_protecting()
            record = await self.owned()
            await self.unprotect(record)
        await self.drop_local("powered off")
        await self.sweep_copies(record, every=True)
        await self.c.store.delete(record)
        await self.c.store.call(release_ports, record.ports_base, self.name)
        self.c.events.emit("powered_off", vm=self.name)
        return {"changed": True}

    async def on_migrate(self, body: dict) -> dict:
        """Move the secondary, or the primary, to another host; one pair, one move at a time.
        The secondary: stopped (through the token), then made anew on the target. The primary:
        its secondary moved to the target first, then a controlled failover to it."""
        role, target = body.get("role"), body.get("host")
        if role not in ("primary", "secondary") or target not in self.c.cfg.hosts:
            raise api.ApiError(
                400, f"migrate needs role primary or secondary and host one of {', '.join(self.c.cfg.hosts)}"
            )
        record = await self.owned()
        if record.state != FtState.RUNNING or record.secondary is None:
            raise Conflict(f"migrate needs a running pair; {self.name} is {record.state}")
        if (record.primary.host if role == "primary" else record.secondary.host) == target:
            return {"changed": False, "vm": self.view(record)}
        if role == "secondary" and target == record.primary.host:
            raise Conflict(f"refused: {target} runs the primary (primary and secondary never share a host)")
        if record.secondary.host != target:
            infos = [h for h in await self.host_infos() if h.name == target]
            others = await self.c.store.load_all()
            if why := placement.refusals(infos[0], record.guest, others, self.c.cfg.caps, record.primary.host,
                                         self.name, self.c.build):  # fmt: skip
                raise Conflict(f"refused: {'; '.join(why)}")
            await self.unprotect(record)
            self.transition(record, Action.SECONDARY_LOST, Reason.USER_ACTION, detail=f"moving to {target}")
            record.preferred_secondary = target
            self.transition(record, Action.REPROTECT, Reason.USER_ACTION)
            await self.c.store.save(record)
            self.failures = 0
            await self.start_protect(record)
            await self.wait_protected()
            record = await self.record()
            if record.state != FtState.RUNNING or record.secondary is None or record.secondary.host != target:
                raise Conflict(
                    f"the secondary could not move to {target}: {record.reason}", vm=self.view(record)
                )
        if role == "secondary":
            return {"changed": True, "vm": self.view(record)}
        self.c.events.emit("switchover", vm=self.name, to=target)
        await self.c.local.get(self.name).qemu.kill()  # the secondary on the target takes over
        return {"changed": True, "await_primary": target}

    async def on_test_failover(self, body: dict) -> dict:
        record = await self.owned()
        if record.state != FtState.RUNNING:
            raise Conflict(f"test failover needs a running pair; {self.name} is {record.state}")
        self.c.events.emit("test_failover", vm=self.name)
        await self.c.local.get(self.name).qemu.kill()  # the watchers take it from here, as for a real loss
        return {"changed": True, "vm": self.view(record)}

    async def on_test_restart_secondary(self, body: dict) -> dict:
        record = await self.owned()
        if record.state != FtState.RUNNING or record.secondary is None:
            raise Conflict(f"test restart secondary needs a running pair; {self.name} is {record.state}")
        self.c.events.emit("test_restart_secondary", vm=self.name, secondary=record.secondary.host)
        await self.c.peers.call(record.secondary.host, "POST", f"/peer/kill/{self.name}",
                                {"generation": record.generation})  # fmt: skip
        return {"changed": True, "vm": self.view(record)}

    # --- what happens on its own -----------------------------------------------------------

    async def on_watcher_ended(self) -> None:
        """This side's watcher has ended: what it says - or, when it died without a verdict,
        the token - decides whether this host's copy runs the VM (and the record follows) or
        stops. The winner is never killed; a datastore that does not answer decides nothing
        (asked again at the next tick)."""
        try:
            entry = self.c.local.get(self.name)
            if entry is None or entry.watcher is None or entry.watcher.alive():
                return
            journal = failover.Journal.parse(await asyncio.to_thread(read_text, entry.journal))
            holder = None if journal.won else await self.holder(entry.generation)
            alive = entry.qemu.alive()
            outcome = failover.outcome(journal, entry.role, holder, self.c.me, alive)
            if outcome is Outcome.CLAIM:
                verdict = await self.claim(entry.generation, entry.role)
                outcome = failover.outcome(journal, entry.role, verdict.holder, self.c.me, alive)
            self.c.events.emit("verdict", vm=self.name, role=entry.role, generation=entry.generation,
                               outcome=str(outcome), verdict=journal.verdict, holder=holder)  # fmt: skip
            if outcome is Outcome.FENCED:
                await self.drop_local(f"fenced: {(journal.verdict or {}).get('detail', holder)}")
                return
            await self.went_live(entry, journal)
        finally:
            self.resolving = False

    async def went_live(self, entry: Local, journal: failover.Journal) -> None:
        record = await self.c.store.load(self.name)
        if (journal.verdict or {}).get("outcome") != "live" or journal.verdict.get("failed_steps"):
            await self.finish_going_live(entry, colo.Mode(record.mode) if record else self.c.mode)
        await self.adopt_copies(entry)  # before the record says so: the images are this side's
        if record is None or record.generation != entry.generation:
            why = "this side holds the VM but the record is of another generation"
            self.c.events.emit("conflict", vm=self.name, generation=entry.generation, detail=why)
        elif not (record.primary.host == self.c.me and record.secondary is None):  # not applied yet
            old = record.state
            action, lost = failover.after_live(record, self.c.me, entry.slot, entry.role)
            try:
                self.transition(record, action, journal.reason, lost=lost)
            except InvalidTransition:  # the record says otherwise; reality wins
                self.c.events.emit("reconciled", vm=self.name, state=str(old), action=str(action))
            await self.c.store.save(record)
            if lost is not None:  # off the mailbox: a host that is really gone does not answer
                self.cleanup = asyncio.create_task(self.stop_remote(lost, record.generation))
        entry.watcher, entry.role = None, "primary"
        self.c.local.put(entry)
        self.stats, self.retry_at, self.failures = Stats(), 0.0, 0

    async def finish_going_live(self, entry: Local, mode: colo.Mode) -> None:
        """The watcher won but did not finish going live: the daemon does, step by step."""
        if self.vm is None:
            return
        try:
            if entry.role == "secondary":
                await colo.secondary_takeover(self.vm, mode)
            else:
                await colo.primary_continue_alone(self.vm, mode, peer_lost=True)
        except Exception as e:
            self.c.events.emit("go_live_incomplete", vm=self.name, detail=f"{type(e).__name__}: {e}")

    async def stop_remote(self, host: str, generation: int) -> None:
        """Whatever is left of a lost side must not run (a host that is really gone does not answer)."""
        with contextlib.suppress(api.ApiError):
            await self.c.peers.call(host, "POST", f"/peer/stop/{self.name}", {"generation": generation})

    async def on_guest_shutdown(self) -> None:
        """The guest powered itself off (QEMU stays up, -no-shutdown): its secondary goes too and
        nothing fails over; the VM is forgotten like after `poweroff`."""
        entry = self.c.local.get(self.name)
        if entry is None or entry.role != "primary":
            return  # a secondary's guest shuts down with its primary's: the primary's daemon acts
        await self.stop_protecting()
        record = await self.record()
        await self.adopt_pending(record)
        await self.unprotect(record)
        await self.drop_local("the guest powered off")
        await self.sweep_copies(record, every=True)
        await self.c.store.delete(record)
        await self.c.store.call(release_ports, record.ports_base, self.name)
        self.c.events.emit("powered_off", vm=self.name, by="guest")

    async def on_tick(self) -> None:
        """What needs doing without being asked: a watcher that ended; re-protection when due; a
        pair left starting by a daemon that stopped mid-protect finished or undone; a primary that
        died while nothing watched it recorded lost (and found again if its host comes back); a
        half-made secondary nobody will ever watch dropped."""
        entry = self.c.local.get(self.name)
        if entry is None or (self.protecting and not self.protecting.done()):
            return
        if entry.watcher is not None and not entry.watcher.alive() and not self.resolving:
            self.resolving = True
            await self.on_watcher_ended()
            return
        record = await self.c.store.load(self.name)
        if entry.role == "secondary":
            silent = self.c.peers.silent_for(record.primary.host) if record is not None else 0.0
            if (
                entry.watcher is None
                and self.unwatched_replication(record, silent)
                and await self.replicating_here()
            ):
                # The primary's daemon went away after replication began and before the watchers
                # started: nothing watches the pair. Dropping this copy would stall a primary still
                # in COLO with it (bench/faults: 2 runs in 20); this side's watcher watches instead,
                # and takes over if no primary's watcher ever answers (the token decides).
                why = f"the daemon on {record.primary.host} went silent mid-protect"
                self.c.events.emit("watching_unasked", vm=self.name, generation=record.generation, detail=why)
                await self.start_watcher(record, "secondary", record.primary.host)
                return
            if entry.watcher is None and (
                record is None or record.generation != entry.generation or record.state != FtState.STARTING
                or record.secondary is None or record.secondary.host != self.c.me
                or self.c.peers.silent_for(record.primary.host) > self.c.cfg.lost_after_s
            ):  # fmt: skip
                await self.drop_local("a secondary of a generation that will never run")
            return
        if record is None or record.primary.host != self.c.me:
            if record is not None and entry.watcher is None:  # another side took over meanwhile
                holder = await self.holder(record.generation)
                if holder is not None and failover.holder_host(holder) != self.c.me:
                    await self.drop_local(f"{holder} holds generation {record.generation}")
            return
        if entry.copies:  # went live, but the datastore did not take the renames then
            await self.adopt_copies(entry)
        if not entry.qemu.alive() and entry.watcher is None:
            await self.drop_local("the QEMU exited")
            if record.state != FtState.LOST:
                record.before_lost = record.state
                self.transition(record, Action.LOST, Reason.VM_EXITED)
                await self.c.store.save(record)
            return
        if record.state == FtState.LOST:  # its host is back and so is the VM: it runs alone
            before = record.before_lost
            self.transition(record, Action.FOUND, Reason.ENGINE_RESTARTED)
            if before in (FtState.DISABLED, FtState.NOT_CONFIGURED):
                action = Action.DISABLE if before == FtState.DISABLED else Action.TURN_OFF
                self.transition(record, action, Reason.USER_ACTION)
            record.before_lost = None
            await self.c.store.save(record)
        elif record.state == FtState.STARTING:
            journal = failover.Journal.parse(read_text(entry.journal)) if entry.watcher else None
            if journal is not None and journal.peer_seen:  # it got there while the daemon was away
                self.transition(record, Action.SYNCED, Reason.ENTERED_LOCKSTEP)
                await self.c.store.save(record)
            else:
                await self.fail_protect(
                    record,
                    record.secondary.host if record.secondary else None,
                    Reason.ENGINE_RESTARTED,
                    "lockstepd restarted while protecting",
                )
        elif record.state == FtState.NEED_SECONDARY and time.monotonic() >= self.retry_at:
            await self.retire(record)  # the lost generation's token is this host's before the next
            self.transition(record, Action.REPROTECT, record.reason)
            await self.c.store.save(record)
            await self.start_protect(record)

    async def on_mark_lost(self, silent: dict[str, float]) -> None:
        """No host that could run a copy of this pair has answered for lost_after_s: the cluster
        records it lost rather than starting (or running) with nothing behind it."""
        record = await self.c.store.load(self.name)
        entry = self.c.local.get(self.name)
        if record is None or record.state == FtState.LOST or (entry is not None and entry.role == "primary"):
            return
        quiet = silent.get(record.primary.host, 0.0)
        if self.unwatched_replication(record, quiet) and await self.replicating_here():
            return  # a copy of the VM is here, and its watcher decides (on_tick)
        hosts = [record.primary.host] + ([record.secondary.host] if record.state == FtState.RUNNING else [])
        if all(silent.get(h, 0) > self.c.cfg.lost_after_s for h in hosts):
            if any([await self.answers(h) for h in hosts]):  # asked now, not what was last heard
                return
            record.before_lost = record.state
            self.transition(record, Action.LOST, Reason.HOST_UNREACHABLE, hosts=hosts)
            await self.c.store.save(record)

    def unwatched_replication(self, record: Record | None, primary_silent_s: float) -> bool:
        """This host's secondary belongs to the protect in progress, and its primary's daemon has
        been silent for lost_after_s (it died before both watchers were started)."""
        entry = self.c.local.get(self.name)
        return (
            entry is not None and entry.role == "secondary" and record is not None
            and record.state == FtState.STARTING and record.generation == entry.generation
            and record.secondary is not None and record.secondary.host == self.c.me
            and primary_silent_s > self.c.cfg.lost_after_s
        )  # fmt: skip

    async def replicating_here(self) -> bool:
        """Whether this host's secondary QEMU is in COLO: it holds a copy of the VM."""
        try:
            return self.vm is not None and (await self.vm.execute("query-colo-status"))["mode"] == "secondary"
        except Exception:  # a QEMU that does not answer is not known to hold anything
            return False

    # --- the secondary's side (peer API) ---------------------------------------------------

    async def on_peer_secondary(self, body: dict) -> dict:
        record = await self.record()
        if body.get("generation") != record.generation:
            raise Conflict(f"{self.name} is at generation {record.generation}, not {body.get('generation')}")
        entry = self.c.local.get(self.name)
        if entry is not None and entry.role == "primary":
            raise Conflict(f"{self.name}'s primary runs here: no secondary of it here")
        await self.drop_local("a new secondary replaces it")
        primary = colo.Host(
            name=record.primary.host, ft_ip=self.c.cfg.hosts[record.primary.host], run_dir=Path()
        )
        ports = colo.Ports(record.ports_base)
        guest = vmspec.from_record(record.guest)
        mode = colo.Mode(record.mode)
        argv = colo.secondary_argv(guest, self.c.host, primary, ports, mode, record.generation)
        vm = await self.launch(record, "secondary", argv, tap_up=False)
        await colo.prepare_secondary(vm, ports)
        self.c.events.emit("secondary_started", vm=self.name, primary=record.primary.host, pid=vm.proc.pid,
                           generation=record.generation)  # fmt: skip
        return {"pid": vm.proc.pid}

    async def on_peer_watch(self, body: dict) -> dict:
        record = await self.record()
        entry = self.c.local.get(self.name)
        if entry is None or entry.role != "secondary" or entry.generation != body.get("generation"):
            raise Conflict(f"no secondary of {self.name} generation {body.get('generation')} runs here")
        if entry.watcher is not None and entry.watcher.alive():
            return {"watching": True}  # asked twice: one watcher
        await self.start_watcher(record, "secondary", record.primary.host)
        return {"watching": True}

    async def on_peer_stop(self, body: dict) -> dict:
        entry = self.c.local.get(self.name)
        generation = body.get("generation")
        if entry is not None and isinstance(generation, int) and entry.generation > generation:
            return {"stopped": False}  # a late stop of an older generation: not this secondary
        if entry is not None and entry.role == "primary":
            return {"stopped": False}  # it holds the VM: only its own daemon stops it
        return {"stopped": await self.drop_local("stopped by the primary's daemon")}

    async def on_peer_kill(self, body: dict) -> dict:
        entry = self.c.local.get(self.name)
        if entry is None or entry.role != "secondary":
            raise Conflict(f"no secondary of {self.name} runs here")
        await entry.qemu.kill()
        return {"killed": entry.qemu.pid}

    async def on_view(self) -> dict:
        return self.view(await self.record())

    async def on_peer_vm(self, body: dict) -> dict:
        entry = self.c.local.get(self.name)
        return process_stats(entry.qemu.pid) if entry else {}


def watcher_argv(c: Cluster, record: Record, vm: colo.Vm, pid: int, role: str, peer: str,
                 ports: colo.Ports) -> list[str]:  # fmt: skip
    ftctl = str(Path(sys.executable).with_name("ftctl"))
    return [
        ftctl, "watch", "--pair", record.name, "--generation", str(record.generation), "--role", role,
        "--me", c.me, "--listen", f"{c.cfg.ft_ip}:{ports.heartbeat}",
        "--peer", f"{c.cfg.hosts[peer]}:{ports.heartbeat}", "--datastore", str(c.cfg.datastore),
        "--mode", record.mode, "--qmp", str(vm.engine_qmp_path), "--qemu-pid", str(pid),
        "--guest", record.name, "--nics", str(len(vm.guest.nics)), "--timeout", str(c.cfg.watch_timeout),
        "--secret-file", str(secret_file(c.cfg)),
        *(["--datastore-id", c.cfg.datastore_id] if c.cfg.datastore_id else []),
        *(["--vm-uplink", c.cfg.vm_uplink] if c.cfg.vm_uplink else []),
    ]  # fmt: skip


def secret_file(cfg: Config) -> Path:
    """The cluster secret where the watchers read it (they sign heartbeats with it): written by
    the daemon at start, root-only, so an inline `secret` in the configuration works too."""
    return cfg.run_dir / "peer.secret"


def write_secret_file(cfg: Config) -> None:
    path = secret_file(cfg)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cfg.secret)
    os.chmod(path, 0o600)


def view(record: Record, stats: dict, c: Cluster, disks: bool) -> dict:
    alarm = {"need_secondary": "red", "disabled": "yellow", "lost": "red"}.get(record.state, "green")
    if record.state == FtState.RUNNING:
        alarm = latency_band(stats.get("lockstep_interval_s"))
    return {
        "name": record.name, "state": record.state, "reason": record.reason,
        "generation": record.generation, "primary": record.primary.host,
        "secondary_host": record.secondary.host if record.secondary else None,
        "mode": record.mode, "checkpoint_ms": record.checkpoint_ms, "alarm": alarm, "stats": stats,
        "preferred_secondary": record.preferred_secondary, "guest": record.guest,
        "datastore": str(c.cfg.datastore),
        # the primary's disks (the secondary keeps copies of its own): known on the primary's host
        "disks": primary_disks(record, c.host) if disks else [],
    }  # fmt: skip


def primary_disks(record: Record, host: colo.Host) -> list[str]:
    spec = vmspec.from_record(record.guest)
    return [colo.primary_source(spec, host, w)[0] for w in colo.disks(spec)]


def read_text(path: str | None) -> str:
    try:
        return Path(path).read_text() if path else ""
    except OSError:
        return ""


PORTS_FIRST, PORTS_LAST, PORTS_STEP = 9000, 60000, 20


def reserve_ports(datastore: Path, name: str) -> int:
    """A ports base of its own for a pair: `.ft/ports/<base>` created exclusively (O_EXCL, which
    NFS v3/v4 honour), so two hosts starting VMs at once never share one. A name keeps its base."""
    d = Path(datastore) / ".ft" / "ports"
    d.mkdir(parents=True, exist_ok=True)
    for base in range(PORTS_FIRST, PORTS_LAST, PORTS_STEP):
        path = d / str(base)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if path.read_text().strip() == name:
                    return base
            continue
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
        return base
    raise api.ApiError(409, "every ports base is taken: too many VMs on this datastore")


def release_ports(datastore: Path, base: int, name: str) -> None:
    path = Path(datastore) / ".ft" / "ports" / str(base)
    with contextlib.suppress(OSError):
        if path.read_text().strip() == name:
            path.unlink()
