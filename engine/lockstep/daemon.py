"""lockstepd: the engine on one host, wired together here. It runs the QEMUs of the pairs whose
primary or secondary is on this host, a watcher beside each (watch.py, `ftctl watch`), and drives
every pair whose primary is here: turning FT on and off, re-protection after any loss,
statistics, events.

Where things live, each with one owner:
- each pair's record on the shared datastore (records.py, through store.RecordStore: versioned,
  compare-and-swap, off the event loop, the datastore's identity checked);
- this host's own processes (QEMU and watcher) in run_dir/lockstepd.json (local.py), adopted by a
  restarted daemon: the QEMUs and watchers do not stop when the daemon does;
- every pair's work in its own serial driver (pairs.py), which owns the pair's local state;
- who runs a VM: the generation's token on the datastore (failover.py);
- events in events.py, statistics in stats.py, calls to other hosts in peers.py.

Concurrency: one asyncio loop; API requests arrive from http.server threads and are handed to the
pair's driver; blocking work (the datastore, peer calls) runs in small pools of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from . import accel, api, colo, probe, vmspec
from .config import Config
from .events import EventLog
from .local import LocalProcesses
from .pairs import Cluster, PairDriver, view, write_secret_file
from .peers import Peers
from .qmp import connect
from .state import FtState
from .stats import free_mib, ft_tx_bytes
from .store import RecordStore, StoreUnavailable


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.host = colo.Host(name=cfg.host, ft_ip=cfg.ft_ip, run_dir=cfg.run_dir, qemu=cfg.qemu,
                              bridge=cfg.bridge, accel=accel.choose(cfg.accel).accel,
                              diagnostic_monitor=cfg.diagnostic_monitor)  # fmt: skip
        self.store = RecordStore(cfg.datastore, cfg.datastore_id)
        # LOCKSTEPD_CRASH_AFTER ("event" or "event:step"): the daemon SIGKILLs itself right after
        # that event - the fault tests' way to crash it at an exact step (a failpoint, off by default)
        self.events = EventLog(cfg.host, cfg.run_dir / "events.log", cfg.webhook,
                               crash_after=os.environ.get("LOCKSTEPD_CRASH_AFTER"))  # fmt: skip
        self.local = LocalProcesses(cfg.run_dir / "lockstepd.json")
        self.peers = Peers(cfg.hosts, cfg.peer_port, cfg.secret)
        self.drivers: dict[str, PairDriver] = {}
        self.machines: frozenset[str] = frozenset()  # the machine types this host's QEMU runs (probe)
        self.cluster: Cluster | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store_problem: str | None = None
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
        lock = api.hold_lock(self.cfg.socket)  # before anything: a second daemon must touch nothing
        write_secret_file(self.cfg)
        caps = await asyncio.to_thread(probe.probe, list(self.cfg.qemu))
        self.machines = caps.machines
        mode = colo.Mode(self.cfg.mode if self.cfg.mode != "auto" else caps.default_mode(self.host.accel))
        self.cluster = Cluster(self.cfg, self.host, mode, caps.build, self.store, self.local, self.peers,
                               self.events, ft_interface(self.cfg.ft_ip))  # fmt: skip
        await self.adopt()
        self.local_server = api.serve_unix(self.cfg.socket, self.dispatch_threadsafe, lock_fd=lock)
        self.peer_server = api.serve_peer((self.cfg.ft_ip, self.cfg.peer_port), self.dispatch_threadsafe,
                                          self.cfg.secret)  # fmt: skip
        self.events.emit("started", mode=str(mode), build=caps.build, adopted=sorted(self.local.entries))
        ticks, second = 0, None
        while True:
            await asyncio.sleep(0.2)
            self.supervise()
            ticks += 1
            if ticks % 5 == 0 and (second is None or second.done()):  # a hung datastore slows only it
                second = asyncio.create_task(self.guarded(self.every_second()))

    async def adopt(self) -> None:
        """Take back the QEMUs and watchers a previous run of the daemon left running. A QEMU
        whose QMP does not answer now is kept and named: it is still a copy of the VM."""
        for name, entry in self.local.saved().items():
            if not entry.qemu.alive():  # it died while the daemon was away: nothing of it stays
                if entry.watcher is not None and entry.watcher.alive():
                    await entry.watcher.kill()
                for tap in colo.tap_names(name, entry.slot):
                    with contextlib.suppress(colo.DataPlaneError):
                        await self.host.run("ip", "link", "del", tap)
                await self.driver(name).settle_copies(entry)
                self.events.emit(
                    "dropped", vm=name, role=entry.role, pid=entry.qemu.pid, why="exited meanwhile"
                )
                continue
            self.local.entries[name] = entry
            driver = self.driver(name)
            vm = colo.Vm(colo.Guest(name=name), self.host, entry.slot)
            try:
                vm.qmp = await connect(str(vm.qmp_path), 5, name=f"{name}.{entry.slot}")
                record = await self.store.load(name)
                if record is not None:
                    vm.guest = vmspec.from_record(record.guest)
                driver.attach(vm)
            except Exception as e:
                self.events.emit("adopt_incomplete", vm=name, detail=f"{type(e).__name__}: {e}")
        self.local.persist()

    def driver(self, name: str) -> PairDriver:
        if name not in self.drivers:
            self.drivers[name] = PairDriver(name, self.cluster)
        return self.drivers[name]

    # --- what runs on its own ----------------------------------------------------------------

    def supervise(self) -> None:
        """A watcher that ended goes to its pair's driver (once)."""
        for name, entry in list(self.local.entries.items()):
            driver = self.driver(name)
            if entry.watcher is not None and not driver.resolving and not entry.watcher.alive():
                driver.resolving = True
                driver.post("watcher_ended")

    async def guarded(self, work) -> None:
        """A bug in periodic work is an event; the daemon goes on (it used to end it)."""
        try:
            await work
        except Exception as e:
            self.events.emit("daemon_error", detail=f"{type(e).__name__}: {e}")

    async def every_second(self) -> None:
        try:
            records, unreadable = await self.store.scan()
            self.store_problem = None
        except StoreUnavailable as e:
            if self.store_problem != str(e):
                self.events.emit("datastore_unavailable", detail=str(e))
            self.store_problem = str(e)
            return
        for name, why in unreadable.items():
            self.events.emit("record_unreadable", vm=name, detail=why)
        for name in self.local.entries:
            self.driver(name).post_once("tick")
        for host in self.cfg.hosts:
            if host != self.cfg.host:
                self.peers.probe(host)
        silent = {h: self.peers.silent_for(h) for h in self.cfg.hosts if h != self.cfg.host}
        for record in records.values():
            if record.name not in self.local.entries and any(
                s > self.cfg.lost_after_s for s in silent.values()
            ):
                self.driver(record.name).post_once("mark_lost", silent=silent)
        self.g_state.clear()
        for record in records.values():
            if record.primary.host != self.cfg.host:
                continue
            self.g_state.labels(record.name, record.state).set(1)
            driver = self.drivers.get(record.name)
            if driver is None or record.state != FtState.RUNNING:
                continue
            await self.sample(driver, record)
        gone = [
            n for n, d in self.drivers.items() if n not in records and n not in self.local.entries and d.idle
        ]
        for name in gone:  # a pair that is gone from here, and a driver with nothing left to do
            self.drivers.pop(name).task.cancel()

    async def sample(self, driver: PairDriver, record) -> None:
        stats = driver.stats
        sent, now = ft_tx_bytes(self.cluster.ft_iface), time.monotonic()
        if stats.transferred is not None and now > stats.sampled_at:
            stats.log_mbps = (sent - stats.transferred) * 8 / 1e6 / (now - stats.sampled_at)
        stats.transferred, stats.sampled_at = sent, now
        if record.secondary is not None:
            with contextlib.suppress(api.ApiError):
                stats.secondary = await self.peers.call(
                    record.secondary.host, "GET", f"/peer/vm/{record.name}"
                )
        for key, value in stats.view().items():
            if value is not None:
                self.g_stat.labels(record.name, key).set(value)

    # --- the API ---------------------------------------------------------------------------

    def dispatch_threadsafe(self, method: str, path: str, body, peer: bool):
        future = asyncio.run_coroutine_threadsafe(self.dispatch(method, path, body, peer), self.loop)
        return future.result()

    async def dispatch(self, method: str, path: str, body, peer: bool):
        parts = [p for p in path.split("?")[0].split("/") if p]
        if body is not None and not isinstance(body, dict):
            raise api.ApiError(400, "body must be a JSON object")
        body = body or {}
        if not peer and (owner := await self.owner_elsewhere(method, parts)):
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
                try:
                    return 200, await handler(*args, body)
                except StoreUnavailable as e:
                    raise api.ApiError(503, f"the datastore: {e}") from None
        if matches:
            raise api.ApiError(405, f"{method} not allowed on {path}")
        raise api.ApiError(404, f"no such endpoint: {method} {path}")

    async def owner_elsewhere(self, method: str, parts: list[str]) -> str | None:
        """The host whose daemon drives the pair a local request is about, when it is not this one:
        any host's socket answers for every pair (Ansible and AWX talk to whichever host they reach)."""
        if len(parts) < 2 or parts[0] != "vms" or (method, len(parts)) not in (("GET", 2), ("POST", 3)):
            return None
        try:
            record = await self.store.load(parts[1])
        except StoreUnavailable:
            return None
        if record is None or record.primary.host in (self.cfg.host, None) or record.state == FtState.LOST:
            return None
        return record.primary.host if record.primary.host in self.cfg.hosts else None

    async def forward(self, owner: str, method: str, path: str, body) -> dict:
        try:
            request = {"method": method, "path": path, "body": body}
            return await self.peers.call(owner, "POST", "/peer/forward", request)
        except api.ApiError as e:
            if method == "GET" and e.status == 503:  # the owner is unreachable: the record still tells
                return await self.driver(path.split("?")[0].rstrip("/").split("/")[-1]).submit("view")
            raise

    async def peer_forward(self, body) -> dict:
        method, path = body.get("method"), body.get("path")
        if method not in ("GET", "POST") or not isinstance(path, str) or not path.startswith("/vms/"):
            raise api.ApiError(400, "forward takes method GET or POST and a /vms/ path")
        parts = [p for p in path.split("?")[0].split("/") if p]
        if await self.owner_elsewhere(method, parts):
            raise api.ApiError(409, f"{parts[1]}'s primary is not on {self.cfg.host} any more: ask again")
        return (await self.dispatch(method, path, body.get("body"), peer=False))[1]

    def local_routes(self):
        ops = (
            "enable",
            "disable",
            "absent",
            "test-failover",
            "poweroff",
            "migrate",
            "test-restart-secondary",
        )
        return {
            ("GET", ("status",)): self.op_status,
            ("GET", ("metrics",)): self.op_metrics,
            ("POST", ("vms",)): self.op_vm_start,
            ("GET", ("vms", "*")): lambda name, body: self.driver(name).submit("view"),
            **{("POST", ("vms", "*", op)): self.operation(op) for op in ops},
        }

    def operation(self, op: str):
        async def handler(name: str, body: dict) -> dict:
            driver = self.driver(name)
            answer = await driver.submit(op.replace("-", "_"), body=body)
            if (wait := answer.pop("wait", None)) is not None:  # an enable: answered once protected
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(wait)
                answer["vm"] = await driver.submit("view")
            if (target := answer.pop("await_primary", None)) is not None:  # a switchover
                answer["vm"] = await self.await_pair(
                    name, lambda v: v["primary"] == target and v["state"] == FtState.RUNNING
                )
            return answer

        return handler

    async def await_pair(self, name: str, ready, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(api.ApiError, StoreUnavailable):
                record = await self.store.load(name)
                if record is not None and ready(v := view(record, {}, self.cluster, disks=False)):
                    return v
            await asyncio.sleep(0.2)
        raise api.ApiError(504, f"{name} did not get there within {timeout:.0f} s")

    def peer_routes(self):
        def to_driver(op):
            return lambda name, body: self.driver(name).submit(op, body=body)

        return {
            ("GET", ("peer", "info")): self.peer_info,
            ("POST", ("peer", "forward")): self.peer_forward,
            **{
                ("POST", ("peer", op, "*")): to_driver(f"peer_{op}")
                for op in ("secondary", "watch", "stop", "kill")
            },
            ("GET", ("peer", "vm", "*")): to_driver("peer_vm"),
        }

    async def op_status(self, body) -> dict:
        records, unreadable = await self.store.scan()
        pairs = []
        for record in records.values():
            driver = self.drivers.get(record.name)
            here = record.primary.host == self.cfg.host and record.state == FtState.RUNNING
            pairs.append(
                view(record, driver.stats.view() if driver and here else {}, self.cluster, disks=False)
            )
        local = [
            f"{n} (secondary)" if e.role == "secondary" else n for n, e in sorted(self.local.entries.items())
        ]
        alarms = [{"vm": p["name"], "level": p["alarm"], "state": p["state"], "reason": p["reason"]}
                  for p in pairs if p["alarm"] != "green"]  # fmt: skip
        alarms += [
            {"vm": n, "level": "red", "state": "unreadable", "reason": why} for n, why in unreadable.items()
        ]
        return {"host": self.cfg.host, "mode": str(self.cluster.mode), "build": self.cluster.build,
                "pairs": pairs, "local_vms": local, "hosts": self.cfg.hosts,
                "datastore": str(self.cfg.datastore), "caps": asdict(self.cfg.caps),
                "alarms": alarms}  # fmt: skip

    async def op_metrics(self, body) -> bytes:
        return generate_latest(self.registry)

    async def op_vm_start(self, body) -> dict:
        """Start a VM from its description, checked first against this host (its datastore,
        images, bridges, QEMU build) and the other pairs (their MACs and images): every reason
        at once, nothing started."""
        spec = spec_from(body)
        others = {n: vmspec.from_record(r.guest) for n, r in (await self.store.load_all()).items()}
        facts = await asyncio.to_thread(vmspec.host_facts, spec, self.cfg.datastore, self.cfg.bridge,
                                        set(self.machines), self.host.prefix)  # fmt: skip
        if problems := vmspec.check_host(spec, facts, others):
            raise api.ApiError(400, "refused: " + "; ".join(problems), reasons=problems)
        return await self.driver(spec.name).submit("vm_start", guest=spec)

    async def peer_info(self, body) -> dict:
        bridges = await asyncio.to_thread(vmspec.host_bridges, self.host.prefix)
        return {"host": self.cfg.host, "free_mib": free_mib(), "build": self.cluster.build,
                "bridges": sorted(bridges), "bridge": self.cfg.bridge}  # fmt: skip


def spec_from(body: dict) -> vmspec.VmSpec:
    """The API's VM body as a VmSpec: 400 with every problem at once."""
    try:
        return vmspec.parse(body)
    except vmspec.SpecError as e:
        raise api.ApiError(400, str(e), reasons=e.problems) from None


def ft_interface(ip: str) -> str | None:
    """The interface that holds this host's FT-logging address."""
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        for link in json.loads(
            subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout
        ):
            if any(a.get("local") == ip for a in link.get("addr_info", [])):
                return link["ifname"]
    return None


def main(cfg: Config) -> int:
    daemon = Daemon(cfg)
    try:
        asyncio.run(daemon.run())
    except KeyboardInterrupt:
        pass
    except api.AlreadyRunning as e:
        print(f"lockstepd: {e}", file=sys.stderr)
        return 1
    return 0
