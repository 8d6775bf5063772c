"""Failure detection and the go-live decision for one side of a pair.

Each side runs a watcher beside its QEMU (on a real host, in lockstepd; in the lab, a process
inside the lab host). Every interval it
- asks its own QEMU over QMP whether it runs: a QEMU that does not answer within the timeout
  (dead, hung, SIGSTOPped) is fenced - SIGKILLed, so it can never wake up and send anything -
  and the watcher stops;
- sends a heartbeat to the other side's watcher over the FT-logging network, only while its own
  QEMU answers, so a heartbeat vouches for a working QEMU and not just a live host;
- on the primary, watches replication progress: every checkpoint resumes the VM (a RESUME
  event); none for progress_timeout means replication is stuck even if heartbeats still come.
When no heartbeat came for the timeout (or replication is stuck) the other side is lost, and
this side races for the pair's token of this generation on the datastore (arbiter.claim):
the winner goes live (a secondary takes over, a primary continues alone), the loser fences its
own QEMU. A side that cannot reach the datastore within claim_timeout also fences itself: it
never goes live. The secondary waits secondary_delay before it claims, so that in a partition
the primary - whose guest needs no rollback - normally wins.

Every step is a JSON line on stdout; the last one is the verdict."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qemu.qmp import EventListener

from . import arbiter, colo
from .qmp import connect
from .state import Action, FtState, Reason
from .state import Pair as PairState


@dataclass(frozen=True)
class WatchConfig:
    pair: str
    generation: int
    role: str  # "primary" or "secondary"
    me: str  # this host's name, written into the token
    listen: tuple[str, int]  # this side's FT-logging address and heartbeat port
    peer: tuple[str, int]  # the other side's
    datastore: Path
    mode: colo.Mode = colo.Mode.LOCKSTEP
    interval: float = 0.1
    timeout: float = 0.5
    progress_timeout: float = 1.5
    claim_timeout: float = 5.0
    secondary_delay: float = 0.2  # the primary's head start in the race (two heartbeats' jitter)
    startup_grace: float = 10.0  # until the other side's first heartbeat: its watcher may start later

    @property
    def peer_role(self) -> str:
        return "secondary" if self.role == "primary" else "primary"


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "live" or "fenced"
    reason: Reason
    state: FtState | None  # the pair's state when this side went live
    detail: str

    def to_json(self) -> str:
        return json.dumps({"verdict": asdict(self)})


def log(what: str, **fields) -> None:
    print(json.dumps({"at": round(time.time(), 3), "event": what, **fields}), flush=True)


class Heartbeats(asyncio.DatagramProtocol):
    """Receives the other side's heartbeats; remembers when the last one came."""

    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.last = time.monotonic()  # the grace period starts when watching starts
        self.seen = False  # a heartbeat came: from now on the timeout applies

    def datagram_received(self, data: bytes, addr) -> None:
        with contextlib.suppress(ValueError):
            msg = json.loads(data)
            if (msg.get("pair"), msg.get("generation"), msg.get("role")) == (
                self.cfg.pair, self.cfg.generation, self.cfg.peer_role,
            ):  # fmt: skip
                self.last, self.seen = time.monotonic(), True


def fence(pid: int, reason: Reason, detail: str) -> Verdict:
    """SIGKILL this side's QEMU: it must never run (or send) again."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    log("fenced", detail=detail)
    return Verdict("fenced", reason, None, f"{detail}: fenced")


async def watch(cfg: WatchConfig, vm: colo.Vm, qemu_pid: int) -> Verdict:
    """Watch until this side either goes live or fences its QEMU; vm has its QMP connected."""
    loop = asyncio.get_running_loop()
    transport, beats = await loop.create_datagram_endpoint(lambda: Heartbeats(cfg), local_addr=cfg.listen)
    resumes = EventListener(("RESUME",))
    vm.qmp.register_listener(resumes)
    last_progress = time.monotonic()
    hello = {"pair": cfg.pair, "generation": cfg.generation, "role": cfg.role}
    log("watching", **hello, peer=f"{cfg.peer[0]}:{cfg.peer[1]}", timeout=cfg.timeout)
    announced = False
    try:
        while True:
            await asyncio.sleep(cfg.interval)
            try:
                await vm.execute("query-status", timeout=cfg.timeout)
            except Exception as e:  # timeout, or the QMP connection is gone with its QEMU
                detail = f"own QEMU did not answer within {cfg.timeout} s ({type(e).__name__})"
                return fence(qemu_pid, Reason.PARTIAL_HARDWARE_FAILURE, detail)
            transport.sendto(json.dumps(hello).encode(), cfg.peer)
            if resumes.clear():
                last_progress = time.monotonic()
            now = time.monotonic()
            if beats.seen and not announced:
                log("peer-seen")  # both sides watch each other now
                announced = True
            if now - beats.last > (cfg.timeout if beats.seen else cfg.startup_grace):
                reason = Reason.LOST_CONNECTION
                detail = f"no heartbeat from the {cfg.peer_role} for {now - beats.last:.2f} s"
            elif cfg.role == "primary" and now - last_progress > cfg.progress_timeout:
                reason, detail = Reason.CHECKPOINT_ERROR, f"no checkpoint for {now - last_progress:.2f} s"
            else:
                continue
            log("peer-lost", reason=reason, detail=detail)
            if cfg.role == "secondary":
                await asyncio.sleep(cfg.secondary_delay)
                if time.monotonic() - beats.last < cfg.timeout:
                    log("peer-back")
                    continue
            return await decide(cfg, vm, qemu_pid, reason, detail)
    finally:
        vm.qmp.remove_listener(resumes)
        transport.close()


async def decide(cfg: WatchConfig, vm: colo.Vm, qemu_pid: int, reason: Reason, detail: str) -> Verdict:
    try:
        verdict = await asyncio.wait_for(
            asyncio.to_thread(arbiter.claim, cfg.datastore, cfg.pair, cfg.generation, cfg.me),
            cfg.claim_timeout,
        )
    except TimeoutError:
        verdict = arbiter.Verdict(False, None, f"datastore did not answer within {cfg.claim_timeout} s")
    log("claimed", won=verdict.won, holder=verdict.holder, error=verdict.error)
    if not verdict.won:
        why = verdict.error or f"the token of generation {cfg.generation} is held by {verdict.holder}"
        return fence(qemu_pid, Reason.LOST_ARBITRATION, f"{detail}; {why}")
    state = PairState(cfg.pair, FtState.RUNNING, Reason.ENTERED_LOCKSTEP, cfg.generation)
    if cfg.role == "secondary":
        await colo.secondary_takeover(vm, cfg.mode)
        event = state.apply(Action.FAILED_OVER, Reason.PARTIAL_HARDWARE_FAILURE)
    else:
        await colo.primary_continue_alone(vm, cfg.mode)
        event = state.apply(Action.SECONDARY_LOST, reason)
    log("live", action=event.action, state=event.new, reason=event.reason)
    return Verdict("live", event.reason, event.new, detail)


async def run(cfg: WatchConfig, qmp_path: str, qemu_pid: int, guest: str) -> Verdict:
    host = colo.Host(name=cfg.me, ft_ip=cfg.listen[0], run_dir=Path(qmp_path).parent)
    vm = colo.Vm(colo.Guest(name=guest, mac=""), host, cfg.role)
    grace = cfg.timeout * 10
    try:  # a hung QEMU accepts the connection but never greets
        vm.qmp = await asyncio.wait_for(connect(qmp_path, grace, name=f"watch.{cfg.role}"), grace)
    except Exception as e:
        detail = f"own QEMU's QMP did not answer ({type(e).__name__})"
        return fence(qemu_pid, Reason.PARTIAL_HARDWARE_FAILURE, detail)
    try:
        return await watch(cfg, vm, qemu_pid)
    finally:
        with contextlib.suppress(Exception):
            await vm.qmp.disconnect()
