"""Failure detection and the go-live decision for one side of a pair.

Each side runs a watcher beside its QEMU (on a real host, in lockstepd; in the lab, a process
inside the lab host). Every interval it
- asks its own QEMU over QMP whether it runs: an in-band query-status, and while that one is
  unanswered an out-of-band command, which QEMU's monitor thread answers even while its main
  loop is blocked (loading a checkpoint under the big lock). A QEMU that answers neither within
  the timeout (dead, hung, SIGSTOPped) is fenced - SIGKILLed, so it can never wake up and send
  anything - and the watcher stops;
- sends a heartbeat to the other side's watcher over the FT-logging network, only once its own
  QEMU has answered since the last one, so a heartbeat vouches for a running QEMU and not just a
  live host. A slow in-band answer never holds a heartbeat back: the other side would take
  a QEMU busy with a checkpoint for a lost one (CI, stop 18: a secondary lost 0.7 s after it
  was made, its heartbeat 0.59 s late behind a 0.5 s query-status). Heartbeats
  carry a sequence number and an HMAC under the cluster secret: a forged or replayed one would
  hold off a real failover;
- on the primary, watches replication progress: every checkpoint resumes the VM (a RESUME
  event); none for progress_timeout means replication is stuck even if heartbeats still come.
When no heartbeat came for the timeout (or replication is stuck) the other side is lost, and
this side races for the pair's token of this generation on the datastore (arbiter.claim):
the winner goes live (a secondary takes over, a primary continues alone), the loser fences its
own QEMU. The secondary waits secondary_delay before it claims, so that in a partition the
primary - whose guest needs no rollback - normally wins.

A claim the datastore does not answer (in claim_timeout, or with an error) is neither a win nor
a loss: an earlier link() may yet land, so fencing now could kill the side that holds the token.
The side asks again until it has an answer. Waiting is safe: neither side is live meanwhile
(the secondary's tap is down, the primary's output is held by colo-compare).

A side that won goes live whatever fails on the way: every go-live step is tried, a failing
one is retried once and then listed in the verdict. Killing a QEMU that holds the token would
lose the VM, since the other side has fenced or is gone.

Every step is a JSON line in the journal (stdout); the last one is the verdict."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from . import arbiter, colo
from .qmp import BoundedListener, connect
from .state import Reason

MAC_LEN = 64  # hex digits of an HMAC-SHA256, in front of a signed heartbeat


@dataclass(frozen=True)
class WatchConfig:
    pair: str
    generation: int
    role: str  # "primary" or "secondary"
    me: str  # this host's name; the token names the side as "<me>/<role>"
    listen: tuple[str, int]  # this side's FT-logging address and heartbeat port
    peer: tuple[str, int]  # the other side's
    datastore: Path
    mode: colo.Mode = colo.Mode.LOCKSTEP
    interval: float = 0.1
    timeout: float = 0.5
    progress_timeout: float = 1.5
    claim_timeout: float = 5.0  # after this a claim is pending: logged, still awaited
    secondary_delay: float = 0.2  # the primary's head start in the race (two heartbeats' jitter)
    startup_grace: float = 10.0  # until the other side's first heartbeat: its watcher may start later
    busy_limit: float = 10.0  # own QEMU answers out of band, its main loop blocked this long: hung
    datastore_id: str | None = None  # the id in ft_storage's id file; None: the file need only exist
    secret: bytes | None = field(default=None, repr=False)  # signs heartbeats; None: unsigned
    vm_uplink: str | None = None  # the VM network's uplink here: its carrier goes in each heartbeat

    @property
    def peer_role(self) -> str:
        return "secondary" if self.role == "primary" else "primary"

    @property
    def side(self) -> str:
        return f"{self.me}/{self.role}"


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "live" or "fenced"
    reason: Reason
    detail: str
    generation: int
    failed_steps: tuple[str, ...] = ()  # go-live steps that failed (live only)

    def to_json(self) -> str:
        return json.dumps({"verdict": asdict(self)})


def sign(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).hexdigest().encode()


def heartbeat(cfg: WatchConfig, seq: int, vm_net: bool | None = None) -> bytes:
    msg = {"pair": cfg.pair, "generation": cfg.generation, "role": cfg.role, "seq": seq, "vm_net": vm_net}
    body = json.dumps(msg).encode()
    return body if cfg.secret is None else sign(cfg.secret, body) + body


class Heartbeats(asyncio.DatagramProtocol):
    """Receives the other side's heartbeats; remembers when the last one came. Anything else
    (malformed, unsigned, wrongly signed, another pair's or generation's, replayed) is dropped
    without a word: logging it would let anyone on the network fill the journal."""

    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.last = time.monotonic()  # the grace period starts when watching starts
        self.seen = False  # a heartbeat came: from now on the timeout applies
        self.seq = -1  # the last sequence number accepted
        self.peer_vm_net: bool | None = None  # whether the other side's VM network works (None: unknown)

    def datagram_received(self, data: bytes, addr) -> None:
        if self.accept(data):
            self.last, self.seen = time.monotonic(), True

    def accept(self, data: bytes) -> bool:
        if self.cfg.secret is not None:
            mac, data = data[:MAC_LEN], data[MAC_LEN:]
            if not hmac.compare_digest(mac, sign(self.cfg.secret, data)):
                return False
        try:
            msg = json.loads(data)
        except ValueError:  # not JSON, or not UTF-8
            return False
        if not isinstance(msg, dict):
            return False
        ours = (msg.get("pair"), msg.get("generation"), msg.get("role")) == (
            self.cfg.pair, self.cfg.generation, self.cfg.peer_role,
        )  # fmt: skip
        seq = msg.get("seq")
        if not ours or type(seq) is not int or seq <= self.seq:
            return False
        self.seq = seq
        self.peer_vm_net = msg.get("vm_net") if isinstance(msg.get("vm_net"), bool) else None
        return True


def carrier(ifname: str | None) -> bool | None:
    """Whether this host's VM-network uplink has a carrier (None: not watched). A missing or
    administratively down interface has none."""
    if not ifname:
        return None
    try:
        return Path(f"/sys/class/net/{ifname}/carrier").read_text().strip() == "1"
    except OSError:
        return False


class Probe:
    """The in-band query-status to a side's own QEMU, asked without waiting for it: one in flight
    at a time (QEMU answers in-band commands in order, so a second one behind a blocked main
    loop would tell nothing more), the next one asked once it is answered."""

    def __init__(self, vm: colo.Vm, limit: float) -> None:
        self.vm, self.limit = vm, limit
        self.ask()

    def ask(self) -> None:
        self.task = asyncio.ensure_future(self.vm.execute("query-status", timeout=2 * self.limit))
        self.asked = time.monotonic()

    @property
    def waiting(self) -> float:
        """How long the query in flight has waited for its answer."""
        return time.monotonic() - self.asked

    def check(self) -> str | None:
        """None when the query was answered since the last check (the next one is then asked);
        else what is wrong: it failed (the QMP connection gone with its QEMU; asked again), or
        it is still unanswered."""
        if not self.task.done():
            return f"no in-band answer for {self.waiting:.2f} s"
        e = None if self.task.cancelled() else self.task.exception()
        self.ask()
        return None if e is None else f"query-status failed: {type(e).__name__}"

    def close(self) -> None:
        self.task.cancel()


class Watcher:
    """One side's watcher: watches, decides, and writes each step and the verdict to its journal."""

    def __init__(self, cfg: WatchConfig, vm: colo.Vm, qemu_pid: int, journal: TextIO | None = None) -> None:
        self.cfg, self.vm, self.qemu_pid = cfg, vm, qemu_pid
        self.journal = journal if journal is not None else sys.stdout
        self.won = False  # this side holds the token: from here on the verdict is live
        self.reason, self.detail = Reason.LOST_CONNECTION, ""  # why the peer was lost
        self.failed_steps: list[str] = []
        self.verdict: Verdict | None = None  # once it is in the journal

    def log(self, what: str, durable: bool = False, **fields) -> None:
        self.write(json.dumps({"at": round(time.time(), 3), "event": what, **fields}), durable)

    def write(self, line: str, durable: bool = False) -> None:
        self.journal.write(line + "\n")
        self.journal.flush()
        if durable:  # a daemon reading the journal after a crash must find it
            with contextlib.suppress(OSError, ValueError):  # a pipe or a terminal cannot fsync
                os.fsync(self.journal.fileno())

    def finish(self, verdict: Verdict) -> Verdict:
        if self.verdict is None:
            self.verdict = verdict
            self.write(verdict.to_json(), durable=True)
        return self.verdict

    def crashed(self, e: BaseException) -> Verdict:
        """The verdict after an unexpected error: live once the token is ours, fenced before."""
        traceback.print_exception(e, file=sys.stderr)
        what = f"watcher error: {type(e).__name__}: {e}"
        if self.won:
            self.failed_steps.append(what)
            return self.live()
        return self.fence(Reason.PARTIAL_HARDWARE_FAILURE, what)

    async def run(self) -> Verdict:
        """Watch until this side goes live or fences; the verdict always ends the journal."""
        try:
            verdict = await self.watch()
        except Exception as e:
            verdict = self.crashed(e)
        return self.finish(verdict)

    def fence(self, reason: Reason, detail: str) -> Verdict:
        """SIGKILL this side's QEMU: it must never run (or send) again."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.qemu_pid, signal.SIGKILL)
        self.log("fenced", detail=detail)
        return Verdict("fenced", reason, f"{detail}: fenced", self.cfg.generation)

    def step_failed(self, step: str, attempt: int, e: Exception) -> None:
        self.log("step-failed", step=step, attempt=attempt, error=f"{type(e).__name__}: {e}")

    def live(self) -> Verdict:
        reason = Reason.PARTIAL_HARDWARE_FAILURE if self.cfg.role == "secondary" else self.reason
        return Verdict("live", reason, self.detail, self.cfg.generation, tuple(self.failed_steps))

    async def watch(self) -> Verdict:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        transport, beats = await loop.create_datagram_endpoint(lambda: Heartbeats(cfg), local_addr=cfg.listen)
        resumes = BoundedListener(("RESUME",))
        self.vm.qmp.register_listener(resumes)
        disk_errors = BoundedListener(("QUORUM_REPORT_BAD",))  # quorum acks a write its local child took
        self.vm.qmp.register_listener(disk_errors)
        last_progress = time.monotonic()
        seq = time.time_ns()  # a restarted watcher goes on above its predecessor's numbers
        hello = {"pair": cfg.pair, "generation": cfg.generation, "role": cfg.role}
        self.log("watching", **hello, peer=f"{cfg.peer[0]}:{cfg.peer[1]}", timeout=cfg.timeout)
        announced = False
        busy = False  # own QEMU's main loop is blocked (it answers only out of band)
        vm_net_down_since: float | None = None
        handing_over = False  # the primary has gone quiet so that the secondary takes over
        probe = Probe(self.vm, cfg.busy_limit)
        try:
            while True:
                await asyncio.sleep(cfg.interval)
                if (why := probe.check()) is not None:
                    if not await self.answers(probe):
                        detail = f"own QEMU did not answer ({why}, nor out of band within {cfg.timeout} s)"
                        return self.fence(Reason.PARTIAL_HARDWARE_FAILURE, detail)
                    if probe.waiting > cfg.busy_limit:
                        return self.fence(Reason.PARTIAL_HARDWARE_FAILURE,
                                          f"own QEMU's main loop blocked for {cfg.busy_limit} s")  # fmt: skip
                    if probe.waiting > cfg.timeout and not busy:  # alive: on a peer gone mid-checkpoint?
                        busy = True
                        self.log("own-busy", detail=f"{why}, but it answers out of band")
                else:
                    busy = False
                now = time.monotonic()
                vm_net = carrier(cfg.vm_uplink)
                vm_net_down_since = None if vm_net is not False else (vm_net_down_since or now)
                failed = disk_failures(disk_errors.clear()) if cfg.role == "primary" else {}
                peer_there = beats.seen and now - beats.last < cfg.timeout
                vm_net_gone = vm_net_down_since is not None and now - vm_net_down_since > cfg.timeout
                why = handover_reason(cfg, vm_net_gone, beats.peer_vm_net, failed)
                if why and cfg.role == "primary" and peer_there and not handing_over:
                    handing_over = True
                    self.log(
                        "handing-over", detail=f"{why}: heartbeats stop so that the secondary takes over"
                    )
                if not handing_over:
                    seq += 1
                    transport.sendto(heartbeat(cfg, seq, vm_net), cfg.peer)
                if resumes.clear():
                    last_progress = time.monotonic()
                if beats.seen and not announced:
                    self.log("peer-seen")  # both sides watch each other now
                    announced = True
                if now - beats.last > (cfg.timeout if beats.seen else cfg.startup_grace):
                    reason = Reason.LOST_CONNECTION
                    detail = f"no heartbeat from the {cfg.peer_role} for {now - beats.last:.2f} s"
                elif cfg.role == "primary" and now - last_progress > cfg.progress_timeout:
                    reason, detail = Reason.CHECKPOINT_ERROR, f"no checkpoint for {now - last_progress:.2f} s"
                elif failed.get("secondary"):
                    reason = Reason.SECONDARY_DISK_ERROR
                    detail = f"the secondary's disk failed: {failed['secondary']}"
                else:
                    continue
                self.log("peer-lost", reason=reason, detail=detail)
                if handing_over:  # the secondary's claim first; the token decides all the same
                    await asyncio.sleep(cfg.timeout + cfg.secondary_delay)
                if cfg.role == "secondary":
                    await asyncio.sleep(cfg.secondary_delay)
                    if time.monotonic() - beats.last < cfg.timeout:
                        self.log("peer-back")
                        continue
                if busy and not await self.unblock():
                    return self.fence(
                        Reason.PARTIAL_HARDWARE_FAILURE, "own QEMU stayed blocked after its peer went"
                    )
                return await self.decide(reason, detail)
        finally:
            probe.close()
            self.vm.qmp.remove_listener(resumes)
            self.vm.qmp.remove_listener(disk_errors)
            transport.close()

    async def answers(self, probe: Probe) -> bool:
        """Whether this side's QEMU process runs at all: the in-band query in flight or an
        out-of-band command, whichever answers first within the timeout. The out-of-band one is
        answered by its monitor thread even while the main loop is blocked (a checkpoint stuck on
        a peer that stopped mid-transfer holds QEMU's big lock); a stopped or dead QEMU answers
        nothing."""
        oob = asyncio.ensure_future(self.vm.qmp.execute("yank", {"instances": []}, oob=True))
        pending, deadline = {oob, probe.task}, time.monotonic() + self.cfg.timeout
        try:
            while pending and (left := deadline - time.monotonic()) > 0:
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if any(not t.cancelled() and t.exception() is None for t in done):
                    return True
            return False
        finally:
            oob.cancel()

    async def unblock(self) -> bool:
        """The peer is gone and this QEMU's main loop is blocked on it: break its connection to
        the peer (yank, as colod does before failing over), then it must answer again."""
        instances = [{"type": "migration"}]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.vm.qmp.execute("yank", {"instances": instances}, oob=True), self.cfg.timeout
            )
        self.log("yanked", instances=["migration"])
        for _ in range(int(self.cfg.busy_limit / self.cfg.timeout) + 1):
            with contextlib.suppress(Exception):
                await self.vm.execute("query-status", timeout=self.cfg.timeout)
                return True
        return False

    async def decide(self, reason: Reason, detail: str) -> Verdict:
        self.reason, self.detail = reason, detail
        answer = await self.claim()
        self.won = answer.won
        self.log("claimed", durable=True, won=answer.won, holder=answer.holder,
                 generation=self.cfg.generation, error=answer.error)  # fmt: skip
        if not answer.won:
            why = f"the token of generation {self.cfg.generation} is held by {answer.holder}"
            return self.fence(Reason.LOST_ARBITRATION, f"{detail}; {why}")
        return await self.go_live()

    async def claim(self) -> arbiter.Verdict:
        """Claim the token until the datastore answers who holds it. The blocking claim runs in a
        daemon thread: one stuck in a hung NFS call delays nothing else, and never keeps the
        process from exiting. There is at most one attempt at a time: a late one is waited for,
        not joined by another."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        started, last_log = time.monotonic(), -math.inf

        def pending(error: str) -> None:
            nonlocal last_log
            if time.monotonic() - last_log >= 1.0:  # at most once a second
                last_log = time.monotonic()
                self.log("claim-pending", error=error, waited=round(last_log - started, 1))

        while True:
            answer: asyncio.Future[arbiter.Verdict] = loop.create_future()

            def attempt(answer=answer) -> None:
                try:
                    v = arbiter.claim(cfg.datastore, cfg.pair, cfg.generation, cfg.side, cfg.datastore_id)
                except Exception as e:  # an answer all the same: ask again
                    v = arbiter.Verdict(False, None, f"claim failed: {type(e).__name__}: {e}")
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    loop.call_soon_threadsafe(lambda: answer.done() or answer.set_result(v))

            threading.Thread(target=attempt, name=f"claim-{cfg.pair}", daemon=True).start()
            asked, wait = time.monotonic(), cfg.claim_timeout
            while not (await asyncio.wait({answer}, timeout=wait))[0]:
                pending(f"the datastore did not answer within {time.monotonic() - asked:.1f} s")
                wait = 1.0
            verdict = answer.result()
            if verdict.error is None:
                return verdict
            pending(verdict.error)
            await asyncio.sleep(cfg.interval)

    async def go_live(self) -> Verdict:
        takeover = colo.secondary_takeover if self.cfg.role == "secondary" else colo.primary_continue_alone
        if self.cfg.role == "primary":  # the lost secondary's host may be dead: nothing may wait on it
            await colo.abort_connections(
                self.vm.host, self.cfg.peer[0], colo.Ports.of_heartbeat(self.cfg.listen[1])
            )
        try:
            await takeover(BestEffort(self.vm, self), self.cfg.mode)
        except Exception as e:  # not a step's failure (those are caught): the rest cannot run
            traceback.print_exception(e, file=sys.stderr)
            self.failed_steps.append(f"{takeover.__name__}: {type(e).__name__}: {e}")
        verdict = self.live()
        self.log("live", reason=verdict.reason, failed_steps=self.failed_steps)
        return verdict


# A query that failed during go-live answers "there is something to undo", so its step is tried.
UNKNOWN = {  # what a failed query is taken to say: that the undo step it guards is needed
    "query-status": {"running": False, "status": "unknown"},
    "query-block-exports": [{}],
    "query-named-block-nodes": [{"node-name": "replication0"}],
    "qom-list": [{"name": f["id"]} for f in colo.COLO_FILTERS],
    "query-colo-status": {"mode": "primary"},
}


class BestEffort:
    """The Vm as the go-live steps see it: a QMP command or host command that fails is logged,
    retried once (not after a timeout: the QEMU is busy or hung, and waiting again only delays
    the rest) and then listed in failed_steps, and the steps go on."""

    def __init__(self, vm: colo.Vm, watcher: Watcher) -> None:
        self._vm, self._watcher = vm, watcher
        self.host = _BestEffortHost(vm.host, watcher)

    def __getattr__(self, name: str):
        return getattr(self._vm, name)

    async def execute(self, cmd: str, args: dict | None = None, timeout: float = 10.0):
        step = f"{cmd} {json.dumps(args, sort_keys=True)}" if args else cmd
        for attempt in (1, 2):
            try:
                out = await self._vm.execute(cmd, args, timeout)
                if cmd == "human-monitor-command" and out.strip():  # HMP reports errors as output
                    raise colo.DataPlaneError(out.strip())
                return out
            except Exception as e:
                self._watcher.step_failed(step, attempt, e)
                if isinstance(e, TimeoutError):
                    break
                await asyncio.sleep(0.1)
        self._watcher.failed_steps.append(step)
        return UNKNOWN.get(cmd, "" if cmd == "human-monitor-command" else {})


class _BestEffortHost:
    def __init__(self, host: colo.Host, watcher: Watcher) -> None:
        self._host, self._watcher = host, watcher

    def __getattr__(self, name: str):
        return getattr(self._host, name)

    async def run(self, *cmd: str) -> None:
        step = " ".join(cmd)
        for attempt in (1, 2):
            try:
                return await self._host.run(*cmd)
            except Exception as e:
                self._watcher.step_failed(step, attempt, e)
        self._watcher.failed_steps.append(step)


async def run(watcher: Watcher, qmp_path: str) -> Verdict:
    """Connect to this side's QEMU and watch it."""
    grace = watcher.cfg.timeout * 10
    try:  # a hung QEMU accepts the connection but never greets
        qmp = await asyncio.wait_for(connect(qmp_path, grace, name=f"watch.{watcher.cfg.role}"), grace)
    except Exception as e:
        detail = f"own QEMU's QMP did not answer ({type(e).__name__})"
        return watcher.finish(watcher.fence(Reason.PARTIAL_HARDWARE_FAILURE, detail))
    watcher.vm.qmp = qmp
    try:
        return await watcher.run()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), 1.0)


def handover_reason(
    cfg: WatchConfig, vm_net_gone: bool, peer_vm_net: bool | None, failed: dict
) -> str | None:
    """Why the primary's own side is the faulty one, so that the secondary should run the VM."""
    if failed.get("local") and not failed.get("secondary"):  # the secondary's copy has every write
        return f"own disk failed: {failed['local']}"
    if vm_net_gone and peer_vm_net is True:  # its clients cannot reach it here, there they can
        return f"{cfg.vm_uplink} has no carrier; the secondary's VM network works"
    return None


def disk_failures(events: list) -> dict[str, str]:
    """What failed in the primary's quorum, by side. Quorum (vote-threshold 1) acknowledges a
    write that one child took: a failed replication child (the secondary's disk over NBD) leaves
    the secondary's copy behind, never to be failed over to (review R9); a failed local child
    leaves the primary's own disk behind, and the secondary's copy is the good one (R11)."""
    found: dict[str, list[str]] = {}
    for e in events:
        d = e.get("data", {})
        side = "secondary" if str(d.get("node-name", "")).startswith("replication") else "local"
        what = f"{d.get('type', 'io')} at sector {d.get('sector-num')}: {d.get('error', '?')}"
        found.setdefault(side, []).append(what)
    return {side: "; ".join(what) for side, what in found.items()}


WATCHER_NICE = -10  # ahead of the guests' vCPU threads: a starved watcher misses heartbeats (R10)


def prioritise() -> None:
    """The watcher decides failovers: it is never the OOM killer's pick (its QEMU would run on
    unwatched) and it runs ahead of the vCPU threads on a busy host. Best effort: needs root."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, WATCHER_NICE)
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("-1000")


def main(cfg: WatchConfig, qmp_path: str, qemu_pid: int, guest: str, nics: int = 1) -> int:
    """ftctl watch: exit 0 when this side went live, 3 when it fenced its QEMU."""
    prioritise()
    host = colo.Host(name=cfg.me, ft_ip=cfg.listen[0], run_dir=Path(qmp_path).parent)
    watcher = Watcher(cfg, colo.Vm(colo.Guest(name=guest, nics=nics), host, cfg.role), qemu_pid)
    try:
        asyncio.run(run(watcher, qmp_path))
    except Exception as e:  # whatever went wrong, the journal ends with the verdict
        if watcher.verdict is None:
            watcher.finish(watcher.crashed(e))
        else:
            traceback.print_exception(e, file=sys.stderr)
    assert watcher.verdict is not None
    return 0 if watcher.verdict.outcome == "live" else 3
