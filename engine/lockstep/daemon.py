"""lockstepd: the engine on one host. It runs the QEMUs of the pairs whose primary or secondary is
here, a watcher beside each (watch.py, `ftctl watch`), and owns - drives and records - every pair
whose primary is here: turning FT on and off, re-protection after any loss, statistics, events.

Where things live:
- each pair's record on the shared datastore (records.py): whoever holds the primary writes it;
  any host reads it, so a restarted daemon, or the host a secondary took over on, carries on;
- this host's own processes (QEMU and watcher PIDs) in run_dir/lockstepd.json, so a restarted
  daemon adopts them: the QEMUs and watchers are not stopped when the daemon stops;
- events: run_dir/events.log (JSON lines; the journal gets the same on stdout) and a webhook.

Concurrency: one asyncio loop; API requests arrive from http.server threads and run on it; one
lock per pair serialises operations on that pair."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from qemu.qmp import EventListener

from . import accel, api, colo, placement, probe, records
from .config import Config
from .qmp import connect
from .records import Record, Side
from .state import Action, FtState, InvalidTransition, Reason
from .state import Pair as PairState

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
GUEST_NIC_TIMEOUT_S = 600  # a VM protected while it boots waits this long for its NIC driver


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie child is dead too
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            os.waitpid(pid, os.WNOHANG)
            return False
    return True


def kill(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


@dataclass
class Local:
    """A QEMU of a pair on this host, and its watcher."""

    name: str
    slot: str  # the role it was started in (names its sockets and tap)
    role: str  # what it is now: primary or secondary
    pid: int
    generation: int = 0
    watcher_pid: int | None = None
    watcher_log: str | None = None


@dataclass
class Stats:
    checkpoints: int = 0
    pauses_ms: list[float] = field(default_factory=list)
    last_checkpoint: float | None = None
    stopped_at: float | None = None
    transferred: int | None = None
    sampled_at: float | None = None
    log_mbps: float = 0.0
    secondary: dict = field(default_factory=dict)

    def view(self) -> dict:
        pauses = sorted(self.pauses_ms[-1000:])
        q = statistics.quantiles(pauses, n=100) if len(pauses) >= 2 else pauses * 99 or [None] * 99
        interval = time.time() - self.last_checkpoint if self.last_checkpoint else None
        return {
            "checkpoints": self.checkpoints,
            "pause_ms_p50": q[49] and round(q[49], 1),
            "pause_ms_p99": q[98] and round(q[98], 1),
            "lockstep_interval_s": interval and round(interval, 2),
            "log_bandwidth_mbps": round(self.log_mbps, 2),
            "secondary_cpu_percent": self.secondary.get("cpu_percent"),
            "secondary_rss_mib": self.secondary.get("rss_mib"),
        }


def latency_band(interval: float | None) -> str:
    if interval is None or interval < 2:
        return "green"
    return "yellow" if interval < 6 else "red"


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.host = colo.Host(name=cfg.host, ft_ip=cfg.ft_ip, run_dir=cfg.run_dir, qemu=cfg.qemu,
                              bridge=cfg.bridge, accel=accel.choose(cfg.accel).accel)  # fmt: skip
        self.mode = colo.Mode(cfg.mode) if cfg.mode != "auto" else None
        self.local: dict[str, Local] = {}
        self.vms: dict[str, colo.Vm] = {}
        self.stats: dict[str, Stats] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.last_attempt: dict[str, float] = {}
        self.tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.state_file = cfg.run_dir / "lockstepd.json"
        self.events_log = cfg.run_dir / "events.log"
        self.registry = CollectorRegistry()
        self.g_state = Gauge(
            "ft_pair_state", "1 for the pair's FT state", ["vm", "state"], registry=self.registry
        )
        self.g_stat = Gauge("ft_pair_stat", "FT statistics of a pair this host owns", ["vm", "stat"],
                            registry=self.registry)  # fmt: skip

    # --- start-up --------------------------------------------------------------------------

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if self.mode is None:
            caps = await asyncio.to_thread(probe.probe, list(self.cfg.qemu))
            self.mode = colo.Mode(caps.default_mode(self.host.accel))
        self.ft_iface = ft_interface(self.cfg.ft_ip)
        await self.adopt()
        self.local_server = api.serve_unix(self.cfg.socket, self.dispatch_threadsafe)
        self.peer_server = api.serve_peer((self.cfg.ft_ip, self.cfg.peer_port), self.dispatch_threadsafe,
                                          self.cfg.secret)  # fmt: skip
        self.log("started", host=self.cfg.host, mode=str(self.mode), adopted=sorted(self.local))
        ticks = 0
        while True:
            await asyncio.sleep(0.2)
            await self.supervise()
            ticks += 1
            if ticks % 5 == 0:
                await self.reprotect_due()
                await self.sample_stats()

    async def adopt(self) -> None:
        """Take back the QEMUs and watchers a previous run of the daemon left running."""
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            saved = {}
        for name, entry in saved.items():
            local = Local(**entry)
            record = records.load(self.cfg.datastore, name)
            if not alive(local.pid) or record is None:
                kill(local.watcher_pid)
                continue
            vm = colo.Vm(colo.Guest(**record.guest), self.host, local.slot)
            try:
                vm.qmp = await connect(str(vm.qmp_path), 5, name=f"{name}.{local.slot}")
            except Exception as e:
                self.log("adopt_failed", vm=name, detail=str(e))
                continue
            self.local[name], self.vms[name] = local, vm
            self.listen_checkpoints(name, vm)
        self.save_local()

    def save_local(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(entry) for n, entry in self.local.items()}))
        os.rename(tmp, self.state_file)

    # --- events ----------------------------------------------------------------------------

    def log(self, event: str, **fields) -> dict:
        line = {"at": round(time.time(), 3), "host": self.cfg.host, "event": event, **fields}
        print(json.dumps(line), flush=True)
        with open(self.events_log, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.cfg.webhook:
            threading.Thread(target=self.post_webhook, args=(line,), daemon=True).start()
        return line

    def post_webhook(self, line: dict) -> None:
        with contextlib.suppress(Exception):
            req = urllib.request.Request(self.cfg.webhook, json.dumps(line).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
            urllib.request.urlopen(req, timeout=5).close()

    def transition(self, record: Record, action: Action, reason: Reason, **fields) -> None:
        pair = PairState(record.name, record.state, record.reason, record.generation)
        event = pair.apply(action, reason)
        record.state, record.reason, record.generation = pair.state, pair.reason, pair.generation
        line = self.log("transition", vm=record.name, action=str(action), old=str(event.old),
                        new=str(event.new), reason=str(reason), generation=record.generation,
                        **fields)  # fmt: skip
        record.events.append(line)

    def save(self, record: Record) -> None:
        records.save(self.cfg.datastore, record)

    # --- the API ---------------------------------------------------------------------------

    def dispatch_threadsafe(self, method: str, path: str, body, peer: bool):
        future = asyncio.run_coroutine_threadsafe(self.dispatch(method, path, body, peer), self.loop)
        return future.result(timeout=900)

    async def dispatch(self, method: str, path: str, body, peer: bool):
        parts = [p for p in path.split("?")[0].split("/") if p]
        if body is not None and not isinstance(body, dict):
            raise api.ApiError(400, "body must be a JSON object")
        body = body or {}
        if not peer and (owner := self.owner_elsewhere(method, parts)):
            return 200, await self.forward(owner, method, path, body)
        routes = self.peer_routes() if peer else self.local_routes()
        matches = [
            (m, pattern, handler)
            for (m, pattern), handler in routes.items()
            if len(pattern) == len(parts) and all(p in ("*", x) for p, x in zip(pattern, parts, strict=True))
        ]
        for m, pattern, handler in matches:
            if m == method:
                args = [x for p, x in zip(pattern, parts, strict=True) if p == "*"]
                return 200, await handler(*args, body)
        if matches:
            raise api.ApiError(405, f"{method} not allowed on {path}")
        raise api.ApiError(404, f"no such endpoint: {method} {path}")

    def owner_elsewhere(self, method: str, parts: list[str]) -> str | None:
        """The host whose daemon drives the pair a local request is about, when it is not this one:
        any host's socket answers for every pair (Ansible and AWX talk to whichever host they reach)."""
        if len(parts) < 2 or parts[0] != "vms" or (method, len(parts)) not in (("GET", 2), ("POST", 3)):
            return None
        record = records.load(self.cfg.datastore, parts[1])
        if record is None or record.primary.host in (self.cfg.host, None):
            return None
        return record.primary.host if record.primary.host in self.cfg.hosts else None

    async def forward(self, owner: str, method: str, path: str, body) -> dict:
        try:
            request = {"method": method, "path": path, "body": body}
            return await self.call(owner, "POST", "/peer/forward", request, timeout=900)
        except api.ApiError:
            if method == "GET":  # the owner is unreachable: the record still tells the state
                return self.view(self.record(path.split("?")[0].rstrip("/").split("/")[-1]))
            raise

    async def peer_forward(self, body) -> dict:
        method, path = body.get("method"), body.get("path")
        if method not in ("GET", "POST") or not isinstance(path, str) or not path.startswith("/vms/"):
            raise api.ApiError(400, "forward takes method GET or POST and a /vms/ path")
        parts = [p for p in path.split("?")[0].split("/") if p]
        if self.owner_elsewhere(method, parts):
            raise api.ApiError(409, f"{parts[1]}'s primary is not on {self.cfg.host} any more: ask again")
        return (await self.dispatch(method, path, body.get("body"), peer=False))[1]

    def local_routes(self):
        return {
            ("GET", ("status",)): self.op_status,
            ("GET", ("metrics",)): self.op_metrics,
            ("POST", ("vms",)): self.op_vm_start,
            ("GET", ("vms", "*")): self.op_vm,
            ("POST", ("vms", "*", "enable")): self.op_enable,
            ("POST", ("vms", "*", "disable")): self.op_disable,
            ("POST", ("vms", "*", "absent")): self.op_absent,
            ("POST", ("vms", "*", "test-failover")): self.op_test_failover,
            ("POST", ("vms", "*", "poweroff")): self.op_poweroff,
            ("POST", ("vms", "*", "migrate")): self.op_migrate,
            ("POST", ("vms", "*", "test-restart-secondary")): self.op_test_restart_secondary,
        }

    def peer_routes(self):
        return {
            ("GET", ("peer", "info")): self.peer_info,
            ("POST", ("peer", "forward")): self.peer_forward,
            ("POST", ("peer", "secondary", "*")): self.peer_start_secondary,
            ("POST", ("peer", "watch", "*")): self.peer_watch,
            ("POST", ("peer", "stop", "*")): self.peer_stop,
            ("POST", ("peer", "kill", "*")): self.peer_kill,
            ("GET", ("peer", "vm", "*")): self.peer_vm,
        }

    def record(self, name: str) -> Record:
        record = records.load(self.cfg.datastore, name)
        if record is None:
            raise api.ApiError(
                404,
                f"no VM named {name!r} (known: {', '.join(records.load_all(self.cfg.datastore)) or 'none'})",
            )
        return record

    def owned(self, name: str) -> Record:
        record = self.record(name)
        if record.primary.host != self.cfg.host or name not in self.local:
            raise api.ApiError(409, f"{name}'s primary runs on {record.primary.host}: ask the daemon there",
                               owner=record.primary.host)  # fmt: skip
        return record

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def view(self, record: Record) -> dict:
        here = record.primary.host == self.cfg.host
        stats = self.stats.get(record.name, Stats()).view() if here else {}
        alarm = {"need_secondary": "red", "disabled": "yellow"}.get(record.state, "green")
        if record.state == "running":
            alarm = latency_band(stats.get("lockstep_interval_s"))
        return {
            "name": record.name, "state": record.state, "reason": record.reason,
            "generation": record.generation, "primary": record.primary.host,
            "secondary_host": record.secondary.host if record.secondary else None,
            "mode": record.mode, "checkpoint_ms": record.checkpoint_ms, "alarm": alarm, "stats": stats,
            "preferred_secondary": record.preferred_secondary, "guest": record.guest,
            "datastore": str(self.cfg.datastore),
            # the primary's disk image (each side keeps its own copy): known on the primary's host
            "disks": [str(colo.disk_path(colo.Guest(**record.guest), self.host))]
            if here and record.guest.get("disk_mib") else [],
        }  # fmt: skip

    async def op_status(self, body) -> dict:
        pairs = [self.view(r) for r in records.load_all(self.cfg.datastore).values()]
        local = [f"{n} (secondary)" if e.role == "secondary" else n for n, e in sorted(self.local.items())]
        return {"host": self.cfg.host, "mode": str(self.mode), "pairs": pairs, "local_vms": local,
                "hosts": self.cfg.hosts, "datastore": str(self.cfg.datastore), "caps": asdict(self.cfg.caps),
                "alarms": [{"vm": p["name"], "level": p["alarm"], "state": p["state"], "reason": p["reason"]}
                           for p in pairs if p["alarm"] != "green"]}  # fmt: skip

    async def op_metrics(self, body) -> bytes:
        return generate_latest(self.registry)

    async def op_vm(self, name: str, body) -> dict:
        return self.view(self.record(name))

    # --- VM start (an unprotected VM this daemon runs) ------------------------------------------

    async def op_vm_start(self, body) -> dict:
        guest = self.guest_from(body)
        async with self.lock(guest.name):
            existing = records.load(self.cfg.datastore, guest.name)
            if existing is not None:
                if existing.primary.host == self.cfg.host and guest.name in self.local:
                    return {"changed": False, "vm": self.view(existing)}
                raise api.ApiError(409, f"a VM named {guest.name!r} already runs on {existing.primary.host}")
            taken = {r.ports_base for r in records.load_all(self.cfg.datastore).values()}
            base = next(b for b in range(9000, 60000, 20) if b not in taken)
            vm = colo.Vm(guest, self.host, "primary")
            await vm.start(colo.primary_argv(guest, self.host, colo.Ports(base)), tap_up=True)
            # old split-brain tokens of an earlier pair of this name must not count
            shutil.rmtree(Path(self.cfg.datastore) / ".ft" / guest.name, ignore_errors=True)
            record = Record(name=guest.name, guest=asdict(guest), primary=Side(self.cfg.host, "primary"),
                            ports_base=base, mode=str(self.mode),
                            checkpoint_ms=self.cfg.checkpoint_ms)  # fmt: skip
            self.local[guest.name] = Local(guest.name, "primary", "primary", vm.proc.pid)
            self.vms[guest.name] = vm
            self.listen_checkpoints(guest.name, vm)
            self.save_local()
            self.save(record)
            self.log("vm_started", vm=guest.name, pid=vm.proc.pid)
            return {"changed": True, "vm": self.view(record)}

    def guest_from(self, body: dict) -> colo.Guest:
        problems = []
        name = body.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            problems.append("name must be 1-31 lower-case letters, digits or dashes")
        for key, low, high in (("memory_mib", 64, 1 << 20), ("vcpus", 1, 64)):
            value = body.get(key, 256 if key == "memory_mib" else 1)
            if not isinstance(value, int) or not low <= value <= high:
                problems.append(f"{key} must be a whole number from {low} to {high}")
        if not isinstance(body.get("mac"), str) or not MAC.match(body["mac"]):
            problems.append("mac must be a MAC address like 52:54:00:12:34:56")
        disk = body.get("disk_mib")
        if disk is not None and (not isinstance(disk, int) or not 1 <= disk <= 1 << 24):
            problems.append("disk_mib must be a whole number from 1 to 16777216")
        unknown = set(body) - {
            "name",
            "memory_mib",
            "vcpus",
            "mac",
            "kernel",
            "initrd",
            "cmdline",
            "disk_mib",
        }
        if unknown:
            problems.append(f"unknown fields: {', '.join(sorted(unknown))}")
        if problems:
            raise api.ApiError(400, "; ".join(problems))
        return colo.Guest(name=name, mac=body["mac"], memory_mib=body.get("memory_mib", 256),
                          vcpus=body.get("vcpus", 1), kernel=body.get("kernel"), initrd=body.get("initrd"),
                          cmdline=body.get("cmdline", ""), disk_mib=body.get("disk_mib"))  # fmt: skip

    # --- operations ------------------------------------------------------------------------

    async def op_enable(self, name: str, body) -> dict:
        async with self.lock(name):
            record = self.owned(name)
            interval = body.get("checkpoint_ms")
            if interval is not None and (not isinstance(interval, int) or not 1 <= interval <= 600_000):
                raise api.ApiError(400, "checkpoint_ms must be a whole number of milliseconds, 1 to 600000")
            preferred = body.get("secondary_host") or None
            if preferred is not None and preferred not in self.cfg.hosts:
                raise api.ApiError(400, f"secondary_host must be one of {', '.join(self.cfg.hosts)}")
            if record.state in (FtState.RUNNING, FtState.STARTING, FtState.NEED_SECONDARY):
                if interval is None or interval == record.checkpoint_ms:
                    return {"changed": False, "vm": self.view(record)}
                if record.state == FtState.RUNNING:  # QEMU takes a new interval while replicating
                    await self.vms[name].execute("migrate-set-parameters", {"x-checkpoint-delay": interval})
                record.checkpoint_ms = interval
                self.save(record)
                self.log("checkpoint_interval", vm=name, checkpoint_ms=interval)
                return {"changed": True, "vm": self.view(record)}
            others = records.load_all(self.cfg.datastore)
            if why := placement.admit(self.cfg.host, record.guest, others, self.cfg.caps, name):
                raise api.ApiError(409, f"refused: {'; '.join(why)}")
            record.preferred_secondary = preferred
            if interval is not None:
                record.checkpoint_ms = interval
            self.transition(record, Action.ENABLE, Reason.USER_ACTION)
            self.save(record)
            await self.protect(record)
            return {"changed": True, "vm": self.view(record)}

    async def op_disable(self, name: str, body) -> dict:
        async with self.lock(name):
            record = self.owned(name)
            if record.state in (FtState.DISABLED, FtState.NOT_CONFIGURED):
                return {"changed": False, "vm": self.view(record)}
            await self.unprotect(record)
            self.transition(record, Action.DISABLE, Reason.USER_ACTION)
            self.save(record)
            return {"changed": True, "vm": self.view(record)}

    async def op_absent(self, name: str, body) -> dict:
        async with self.lock(name):
            record = self.owned(name)
            if record.state == FtState.NOT_CONFIGURED:
                return {"changed": False, "vm": self.view(record)}
            if record.state != FtState.DISABLED:
                await self.unprotect(record)
            self.transition(record, Action.TURN_OFF, Reason.USER_ACTION)
            self.save(record)
            return {"changed": True, "vm": self.view(record)}

    async def op_migrate(self, name: str, body) -> dict:
        """Move the secondary, or the primary, to another host; one pair, one move at a time.
        The secondary: stopped, then made anew on the target (the VM runs unprotected for the
        copy, ~1-4 s here). The primary: its secondary moved to the target first, then a
        controlled failover to it (a pause like a failover's); the new owner re-protects on a
        third host."""
        role, target = body.get("role"), body.get("host")
        if role not in ("primary", "secondary") or target not in self.cfg.hosts:
            raise api.ApiError(
                400, f"migrate needs role primary or secondary and host one of {', '.join(self.cfg.hosts)}"
            )
        async with self.lock(name):
            record = self.owned(name)
            if record.state != FtState.RUNNING or record.secondary is None:
                raise api.ApiError(409, f"migrate needs a running pair; {name} is {record.state}")
            if (record.primary.host if role == "primary" else record.secondary.host) == target:
                return {"changed": False, "vm": self.view(record)}
            if role == "secondary" and target == record.primary.host:
                raise api.ApiError(
                    409, f"refused: {target} runs the primary (primary and secondary never share a host)"
                )
            if record.secondary.host != target:
                infos = [h for h in await self.host_infos() if h.name == target]
                others = records.load_all(self.cfg.datastore)
                if why := placement.refusals(
                    infos[0], record.guest, others, self.cfg.caps, record.primary.host, name
                ):
                    raise api.ApiError(409, f"refused: {'; '.join(why)}")
                await self.unprotect(record)
                self.transition(
                    record, Action.SECONDARY_LOST, Reason.USER_ACTION, detail=f"moving to {target}"
                )
                record.preferred_secondary = target
                self.transition(record, Action.REPROTECT, Reason.USER_ACTION)
                self.save(record)
                await self.protect(record)
                if record.state != FtState.RUNNING or record.secondary.host != target:
                    raise api.ApiError(
                        409,
                        f"the secondary could not move to {target}: {record.reason}",
                        vm=self.view(record),
                    )
            if role == "secondary":
                return {"changed": True, "vm": self.view(record)}
            self.log("switchover", vm=name, to=target)
            kill(self.local[name].pid)  # the secondary on the target takes over, as in a failover
        view = await self.await_record(
            name, lambda r: r.primary.host == target and r.state == FtState.RUNNING
        )
        return {"changed": True, "vm": view}

    async def await_record(self, name: str, ready, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = records.load(self.cfg.datastore, name)
            if record is not None and ready(record):
                return self.view(record)
            await asyncio.sleep(0.2)
        raise api.ApiError(504, f"{name} did not get there within {timeout:.0f} s")

    async def op_poweroff(self, name: str, body) -> dict:
        """Power the VM off: the secondary goes first (so nothing fails over), then the primary;
        the record is removed."""
        async with self.lock(name):
            record = self.owned(name)
            if record.state != FtState.NOT_CONFIGURED:
                await self.unprotect(record)
            await self.drop_local(name)
            records.delete(self.cfg.datastore, name)
            self.log("powered_off", vm=name)
            return {"changed": True}

    async def op_test_failover(self, name: str, body) -> dict:
        async with self.lock(name):
            record = self.owned(name)
            if record.state != FtState.RUNNING:
                raise api.ApiError(409, f"test failover needs a running pair; {name} is {record.state}")
            self.log("test_failover", vm=name)
            kill(self.local[name].pid)  # the watchers take it from here, as for a real loss
            return {"changed": True, "vm": self.view(record)}

    async def op_test_restart_secondary(self, name: str, body) -> dict:
        async with self.lock(name):
            record = self.owned(name)
            if record.state != FtState.RUNNING or record.secondary is None:
                raise api.ApiError(
                    409, f"test restart secondary needs a running pair; {name} is {record.state}"
                )
            self.log("test_restart_secondary", vm=name, secondary=record.secondary.host)
            await self.call(record.secondary.host, "POST", f"/peer/kill/{name}")
            return {"changed": True, "vm": self.view(record)}

    # --- protection ------------------------------------------------------------------------

    async def call(self, host: str, method: str, path: str, body=None, timeout: float = 120) -> dict:
        address = (self.cfg.hosts[host], self.cfg.peer_port)
        return await asyncio.to_thread(api.peer, address, self.cfg.secret, method, path, body, timeout)

    async def host_infos(self) -> list[placement.HostInfo]:
        async def info(host: str) -> placement.HostInfo:
            if host == self.cfg.host:
                return placement.HostInfo(host, free_mib())
            try:
                return placement.HostInfo(
                    host, int((await self.call(host, "GET", "/peer/info", timeout=1))["free_mib"])
                )
            except (api.ApiError, KeyError, ValueError):
                return placement.HostInfo(host, -1)

        return list(await asyncio.gather(*(info(h) for h in self.cfg.hosts)))

    async def guest_nic_ready(self, record: Record) -> bool:
        """Wait for the guest's NIC driver (colo.nic_driver_ready): a VM protected while it boots
        is protected once its driver is up."""
        deadline = time.monotonic() + GUEST_NIC_TIMEOUT_S
        logged = False
        while not await colo.nic_driver_ready(self.vms[record.name]):
            if time.monotonic() > deadline:
                return False
            if not logged:
                self.log("waiting_for_guest", vm=record.name, detail="the guest's NIC driver is not up yet")
                logged = True
            await asyncio.sleep(0.5)
        return True

    async def protect(self, record: Record) -> None:
        """starting -> running: a secondary on the host placement picks, replication, watchers.
        On any failure: need_secondary with the reason, nothing left half-made."""
        self.last_attempt[record.name] = time.monotonic()
        if not await self.guest_nic_ready(record):
            detail = f"the guest's NIC driver was not up within {GUEST_NIC_TIMEOUT_S} s"
            self.transition(record, Action.START_FAILED, Reason.START_FAILED, detail=detail)
            self.save(record)
            return
        chosen, why = placement.choose(await self.host_infos(), record, records.load_all(self.cfg.datastore),
                                       self.cfg.caps)  # fmt: skip
        if chosen is None:
            self.transition(record, Action.START_FAILED, Reason.NO_COMPATIBLE_HOST, detail="; ".join(why))
            self.save(record)
            return
        record.secondary = Side(chosen, "secondary")
        self.save(record)
        vm, local = self.vms[record.name], self.local[record.name]
        ports = colo.Ports(record.ports_base)
        started, sent_before = time.monotonic(), self.ft_tx_bytes()
        try:
            await self.call(
                chosen, "POST", f"/peer/secondary/{record.name}", {"generation": record.generation}
            )
            await colo.start_replication(
                vm, self.cfg.hosts[chosen], ports, record.checkpoint_ms, colo.Mode(record.mode)
            )
            copied = self.ft_tx_bytes() - sent_before  # the initial copy (QEMU reports no RAM stats in COLO)
            await asyncio.to_thread(self.start_watcher, record, local, "primary", chosen)
            await self.call(chosen, "POST", f"/peer/watch/{record.name}", {"generation": record.generation})
            await asyncio.to_thread(wait_in_log, local.watcher_log, '"peer-seen"', 10)  # both watch now
        except Exception as e:
            detail = str(e)
            self.log("protect_failed", vm=record.name, secondary=chosen, detail=detail)
            await self.unprotect(record)
            self.transition(record, Action.START_FAILED, Reason.START_FAILED, detail=detail)
            self.save(record)
            return
        self.stats[record.name] = Stats()
        self.transition(record, Action.SYNCED, Reason.ENTERED_LOCKSTEP, secondary=chosen,
                        seconds=round(time.monotonic() - started, 2), copied_bytes=copied)  # fmt: skip
        self.save(record)

    async def unprotect(self, record: Record) -> None:
        """Stop the watchers and the secondary; the primary runs on alone."""
        local = self.local.get(record.name)
        if local is not None:
            kill(local.watcher_pid)
            local.watcher_pid = None
            self.save_local()
        if record.secondary is not None:
            with contextlib.suppress(api.ApiError):
                await self.call(record.secondary.host, "POST", f"/peer/stop/{record.name}", {})
            record.secondary = None
        vm = self.vms.get(record.name)
        if vm is not None and await replicating(vm):
            await colo.primary_continue_alone(vm, colo.Mode(record.mode))

    def start_watcher(self, record: Record, local: Local, role: str, peer_host: str) -> None:
        ports = colo.Ports(record.ports_base)
        vm = self.vms[record.name]
        log = self.cfg.run_dir / f"{record.name}.{local.slot}.watch.log"
        ftctl = str(Path(sys.executable).with_name("ftctl"))
        argv = [
            ftctl, "watch", "--pair", record.name, "--generation", str(record.generation), "--role", role,
            "--me", self.cfg.host, "--listen", f"{self.cfg.ft_ip}:{ports.heartbeat}",
            "--peer", f"{self.cfg.hosts[peer_host]}:{ports.heartbeat}",
            "--datastore", str(self.cfg.datastore),
            "--mode", record.mode, "--qmp", str(vm.engine_qmp_path), "--qemu-pid", str(local.pid),
            "--guest", record.name, "--timeout", str(self.cfg.watch_timeout),
        ]  # fmt: skip
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        local.role, local.generation, local.watcher_pid, local.watcher_log = (
            role,
            record.generation,
            proc.pid,
            str(log),
        )
        self.save_local()
        deadline = time.monotonic() + 20
        while '"watching"' not in log.read_text():  # a failure before this would go unseen
            if proc.poll() is not None or time.monotonic() > deadline:
                raise colo.DataPlaneError(f"the {role}'s watcher did not start: {log.read_text()[-300:]}")
            time.sleep(0.05)

    # --- peer side -------------------------------------------------------------------------

    async def peer_info(self, body) -> dict:
        return {"host": self.cfg.host, "free_mib": free_mib()}

    async def peer_start_secondary(self, name: str, body) -> dict:
        record = self.record(name)
        async with self.lock(name):
            await self.drop_local(name)
            vm = colo.Vm(colo.Guest(**record.guest), self.host, "secondary")
            primary = colo.Host(
                name=record.primary.host, ft_ip=self.cfg.hosts[record.primary.host], run_dir=Path()
            )
            ports = colo.Ports(record.ports_base)
            argv = colo.secondary_argv(vm.guest, self.host, primary, ports, colo.Mode(record.mode))
            await vm.start(argv, tap_up=False)
            self.local[name] = Local(name, "secondary", "secondary", vm.proc.pid, body.get("generation", 0))
            self.vms[name] = vm
            self.listen_checkpoints(name, vm)  # counted once it is the primary
            self.save_local()
            await colo.prepare_secondary(vm, ports)
            self.log("secondary_started", vm=name, primary=record.primary.host, pid=vm.proc.pid)
            return {"pid": vm.proc.pid}

    async def peer_watch(self, name: str, body) -> dict:
        record = self.record(name)
        local = self.local.get(name)
        if local is None:
            raise api.ApiError(409, f"no secondary of {name} runs here")
        await asyncio.to_thread(self.start_watcher, record, local, "secondary", record.primary.host)
        return {"watching": True}

    async def peer_stop(self, name: str, body) -> dict:
        async with self.lock(name):
            return {"stopped": await self.drop_local(name)}

    async def peer_kill(self, name: str, body) -> dict:
        local = self.local.get(name)
        if local is None:
            raise api.ApiError(409, f"no VM of {name} runs here")
        kill(local.pid)
        return {"killed": local.pid}

    async def peer_vm(self, name: str, body) -> dict:
        local = self.local.get(name)
        return process_stats(local.pid) if local else {}

    async def drop_local(self, name: str) -> bool:
        local, vm = self.local.pop(name, None), self.vms.pop(name, None)
        if local is None:
            return False
        kill(local.watcher_pid)
        if vm is not None:
            with contextlib.suppress(Exception):
                await vm.qmp.disconnect()
        kill(local.pid)
        self.save_local()
        return True

    # --- watching the watchers ---------------------------------------------------------------

    async def supervise(self) -> None:
        for name, local in list(self.local.items()):
            if local.watcher_pid and not alive(local.watcher_pid):
                await self.on_verdict(name, local, read_verdict(local.watcher_log))

    async def on_verdict(self, name: str, local: Local, verdict: dict | None) -> None:
        local.watcher_pid = None
        self.save_local()
        self.log("verdict", vm=name, role=local.role, verdict=verdict)
        record = records.load(self.cfg.datastore, name)
        if verdict is None or verdict.get("outcome") != "live":
            await self.drop_local(name)  # fenced (or the watcher died): this side's QEMU is gone
            return
        if record is None or record.generation != local.generation:
            return
        async with self.lock(name):
            reason = Reason(verdict.get("reason", Reason.LOST_CONNECTION))
            lost = (
                record.secondary.host if local.role == "primary" and record.secondary else record.primary.host
            )
            if local.role == "secondary":  # went live: this host holds the primary now
                record.primary, local.role = Side(self.cfg.host, local.slot), "primary"
                self.save_local()
                self.transition(record, Action.FAILED_OVER, reason, lost=lost)
            else:
                self.transition(record, Action.SECONDARY_LOST, reason, lost=lost)
            record.secondary = None
            self.stats.pop(name, None)
            self.save(record)
        self.last_attempt.pop(name, None)  # re-protect at once
        self.background(self.stop_remote(lost, name))

    async def stop_remote(self, host: str, name: str) -> None:
        """Whatever is left of a lost side must not run (a host that is really gone does not answer)."""
        with contextlib.suppress(api.ApiError):
            await self.call(host, "POST", f"/peer/stop/{name}", {}, timeout=3)

    def background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)

    async def on_guest_shutdown(self, name: str) -> None:
        """The guest powered itself off (QEMU stays up, -no-shutdown): its secondary goes too and
        nothing fails over; the VM is forgotten like after `poweroff`."""
        async with self.lock(name):
            local = self.local.get(name)
            if local is None or local.role != "primary":
                return  # a secondary's guest shuts down with its primary's: the primary's daemon acts
            kill(local.watcher_pid)  # no verdict from here on
            local.watcher_pid = None
            record = records.load(self.cfg.datastore, name)
            if record is not None and record.secondary is not None:
                with contextlib.suppress(api.ApiError):
                    await self.call(record.secondary.host, "POST", f"/peer/stop/{name}", {}, timeout=5)
            await self.drop_local(name)
            records.delete(self.cfg.datastore, name)
            self.log("powered_off", vm=name, by="guest")

    async def reprotect_due(self) -> None:
        for record in records.load_all(self.cfg.datastore).values():
            if record.primary.host != self.cfg.host or record.state != FtState.NEED_SECONDARY:
                continue
            if record.name not in self.local or self.lock(record.name).locked():
                continue
            last = self.last_attempt.get(record.name)
            if last is not None and time.monotonic() - last < self.cfg.reprotect_retry_s:
                continue
            self.background(self.reprotect(record.name))

    async def reprotect(self, name: str) -> None:
        async with self.lock(name):
            record = records.load(self.cfg.datastore, name)
            if (
                record is None
                or record.state != FtState.NEED_SECONDARY
                or record.primary.host != self.cfg.host
            ):
                return
            try:
                self.transition(record, Action.REPROTECT, record.reason)
            except InvalidTransition:
                return
            self.save(record)
            await self.protect(record)

    # --- statistics --------------------------------------------------------------------------

    def ft_tx_bytes(self) -> int:
        """Bytes this host sent on its FT-logging interface (its network namespace's /proc/net/dev).
        QEMU counts no bytes per pair in COLO, so the log bandwidth is the link's."""
        for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
            name, _, counters = line.partition(":")
            if name.strip() == self.ft_iface:
                return int(counters.split()[8])
        return 0

    def listen_checkpoints(self, name: str, vm: colo.Vm) -> None:
        """Every checkpoint stops the primary and resumes it: count them and time the pauses."""
        listener = EventListener(("STOP", "RESUME", "SHUTDOWN"))
        vm.qmp.register_listener(listener)

        async def consume() -> None:
            async for event in listener:
                stats = self.stats.setdefault(name, Stats())
                at = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
                if event["event"] == "SHUTDOWN":
                    if event.get("data", {}).get("guest"):
                        self.background(self.on_guest_shutdown(name))
                elif event["event"] == "STOP":
                    stats.stopped_at = at
                elif stats.stopped_at is not None:
                    stats.checkpoints += 1
                    stats.pauses_ms.append((at - stats.stopped_at) * 1000)
                    stats.last_checkpoint, stats.stopped_at = at, None

        self.background(consume())

    async def sample_stats(self) -> None:
        self.g_state.clear()
        for record in records.load_all(self.cfg.datastore).values():
            if record.primary.host != self.cfg.host:
                continue
            self.g_state.labels(record.name, record.state).set(1)
            stats, vm = self.stats.get(record.name), self.vms.get(record.name)
            if stats is None or vm is None or record.state != FtState.RUNNING:
                continue
            sent, now = self.ft_tx_bytes(), time.monotonic()
            if stats.transferred is not None and now > stats.sampled_at:
                stats.log_mbps = (sent - stats.transferred) * 8 / 1e6 / (now - stats.sampled_at)
            stats.transferred, stats.sampled_at = sent, now
            if record.secondary is not None:
                with contextlib.suppress(api.ApiError):
                    stats.secondary = await self.call(record.secondary.host, "GET", f"/peer/vm/{record.name}",
                                                      timeout=2)  # fmt: skip
            for key, value in stats.view().items():
                if value is not None:
                    self.g_stat.labels(record.name, key).set(value)


def ft_interface(ip: str) -> str | None:
    """The interface that holds this host's FT-logging address."""
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        for link in json.loads(
            subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout
        ):
            if any(a.get("local") == ip for a in link.get("addr_info", [])):
                return link["ifname"]
    return None


async def replicating(vm: colo.Vm) -> bool:
    with contextlib.suppress(Exception):
        return (await vm.execute("query-colo-status", timeout=3))["mode"] == "primary"
    return False


def wait_in_log(log: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in Path(log).read_text():
        if time.monotonic() > deadline:
            raise colo.DataPlaneError(
                f"{text} not in {log} within {timeout} s: {Path(log).read_text()[-300:]}"
            )
        time.sleep(0.05)


def read_verdict(log: str | None) -> dict | None:
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        return json.loads(Path(log).read_text().strip().splitlines()[-1])["verdict"]
    return None


def free_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


def process_stats(pid: int) -> dict:
    """CPU (percent of one CPU since the process started) and resident memory of a QEMU."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - int(fields[19]) / ticks
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        return {"cpu_percent": round(100 * cpu / age, 1) if age > 0 else None, "rss_mib": round(rss, 1)}
    return {}


def main(cfg: Config) -> int:
    daemon = Daemon(cfg)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(daemon.run())
    return 0
