"""A real database under FT on the lab (issue 13): lab/debian/build-db's Debian guest (PostgreSQL 15
with data checksums, fsync and synchronous commit; systemd; its address from its own networkd
file) booted by lockstepd from its own disk (SeaBIOS, then GRUB from the disk's MBR, the guest's
own kernel from its root partition), an image on the shared datastore, 2 vCPUs, 1024 MiB, and
protected while it runs. From the client namespace the ledger client
(lab/ftlab/ledger.py: one connection, one unique id committed per transaction, each acknowledged
commit logged) and pgbench write while the primary's host is killed. Then: every acknowledged
commit present exactly once, none present that was not acknowledged beyond the one in flight,
pgbench's balances consistent (no transaction half applied), the same postmaster (PID and start
time), the ledger's and pgbench's connections kept. After re-protection the same again across a
second failover; then amcheck, pg_checksums with PostgreSQL stopped, the audit, and both disk
copies byte-identical with the guest's root filesystem frozen. The repetitions, with the hung
primary too and pgbench's TPS protected and not, are bench/database."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlab import audit, engine, lab, ledger
from ftlab import topology as t
from ftlab.colopair import set_links
from ftlab.proc import LabError, in_node, wait_for
from lockstep import images

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]
LAB = Path(__file__).resolve().parents[2] / "lab"
BUILD_DB = LAB / "debian" / "build-db"
NAME = "ftdb"
IP, MAC = "10.77.3.140", "52:54:00:77:03:8c"  # the image's own networkd file: t.guest_ip(40), t.guest_mac(40)
LOST_AFTER_S = 8.0  # short, as in test_faults
SETTINGS = {"lost_after_s": LOST_AFTER_S, "diagnostic_monitor": True}
HOSTS = ("lab-h1", "lab-h2", "lab-h3")
CHECKPOINT_MS = 200  # bench/database-local's runs at 200 ms passed in both modes (docs/PERFORMANCE.md)
BOOT_TIMEOUT_S = 240  # PostgreSQL answered 38-70 s after QEMU started in bench/database-local
REPROTECT_TIMEOUT_S = 600  # the takeover, then a new secondary: the 3 GiB disk and 1 GiB RAM copied
PGBENCH_S = 60  # pgbench's run through each failover (it has no clean stop)
ACKS_BEFORE = 25  # the fault comes once the ledger has this many commits acknowledged
ACKS_AFTER = 10  # and it stops once this many more came after the re-protection
PSQL = ["psql", "-h", IP, "-U", "postgres", "-d", "ledger", "-X", "-At", "-v", "ON_ERROR_STOP=1"]
PG_DATA = "/var/lib/postgresql/15/main"
PG_BIN = "/usr/lib/postgresql/15/bin"

# Run as root in the guest over ssh: freeze the root filesystem (the kernel writes back every
# dirty page and flushes the disk first; no write reaches the disk after), say so, wait for a line
# on stdin (or EOF, or 10 minutes), thaw. Everything it needs is loaded before the freeze; while
# the filesystem is frozen the ssh session only moves bytes.
FREEZE = b"""
import fcntl, os, select, sys
fd = os.open("/", os.O_RDONLY)
fcntl.ioctl(fd, 0xC0045877, 0)  # FIFREEZE
print("frozen", flush=True)
try:
    select.select([sys.stdin], [], [], 600)
finally:
    fcntl.ioctl(fd, 0xC0045878, 0)  # FITHAW
    print("thawed", flush=True)
"""


@pytest.fixture(scope="module")
def cluster(lab):
    for i in (1, 2, 3):
        engine.start(i, **SETTINGS)
    yield


def image_dir() -> Path:
    """lab/debian/build-db's image directory (built once, then cached)."""
    out = subprocess.run([str(BUILD_DB)], capture_output=True, text=True)
    if out.returncode != 0:
        raise LabError(f"lab/debian/build-db failed: {out.stderr.strip()[-800:]}")
    return Path(out.stdout.split()[-1])


@contextlib.contextmanager
def vm_files():
    """The guest's disk (a sparse copy of the image) on the shared datastore, where every host's
    QEMU finds it (a secondary may start on any host); removed after, with any copy of it a failed
    run left."""
    source, d = image_dir(), t.DATASTORE / "vm-model"
    d.mkdir(exist_ok=True)
    files = {"disk": d / f"{NAME}-disk.raw"}

    def remove() -> None:
        for path in [*files.values(), *d.glob(f".{files['disk'].name}.*")]:
            path.unlink(missing_ok=True)

    remove()
    subprocess.run(["cp", "--sparse=always", str(source / "disk.img"), str(files["disk"])], check=True)
    try:
        yield files | {"key": source / "id_ed25519"}
    finally:
        remove()


def spec(files: dict) -> dict:
    return {
        "spec_version": 1, "name": NAME, "memory_mib": 1024, "vcpus": 2, "serial": True,
        "disks": [{"path": str(files["disk"])}], "nics": [{"mac": MAC}],
    }  # fmt: skip


# --- the lab ----------------------------------------------------------------------------------


def daemons(mode: str) -> None:
    """lockstepd on every host in this mode. A pair's mode is set when its VM starts, from the
    daemon it starts on (the record keeps it through failovers); the setting is per daemon, so
    the daemons that run another one are started again with it."""
    for i in (1, 2, 3):
        try:
            running = engine.ok(i, "GET", "/status")["mode"]
        except (OSError, LabError):
            running = None
        if running != mode:
            engine.kill_daemon(i)
            engine.start(i, mode=mode, **SETTINGS)


def host_back(index: int, links: list[str], mode: str) -> None:
    set_links(links, up=True)
    engine.start(index, mode=mode, **SETTINGS)


def fail(fault: str, index: int) -> list[str]:
    """The primary on lab-h<index> fails: its host killed (the links cut are returned), or its
    QEMU hung (SIGSTOP; its watcher fences it)."""
    if fault == "kill":
        return engine.kill_host(index)
    (pid,) = audit.qemus(index, NAME)  # the primary's, started as "(primary)" or "(secondary)"
    os.kill(pid, signal.SIGSTOP)
    return []


# --- the client -------------------------------------------------------------------------------


def client(cmd: list[str]) -> list[str]:
    return in_node(lab.load_state()["holders"]["client"], cmd)


def client_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(LAB), "PGCONNECT_TIMEOUT": "10"}


def psql(sql: str, timeout: float = 120) -> str:
    out = subprocess.run(client([*PSQL, "-c", sql]), capture_output=True, text=True, env=client_env(),
                         timeout=timeout)  # fmt: skip
    if out.returncode != 0:
        raise LabError(f"psql {sql!r}: {out.stderr.strip()}")
    return out.stdout.strip()


def postgres_answers() -> bool:
    with contextlib.suppress(LabError, subprocess.TimeoutExpired):
        return psql("SELECT 1", timeout=20) == "1"
    return False


def postmaster() -> str:
    """The postmaster's PID (the first line of postmaster.pid) and start time."""
    return psql(
        r"SELECT split_part(pg_read_file('postmaster.pid'), E'\n', 1) || ' ' || pg_postmaster_start_time()"
    )


def ssh(files: dict, command: str) -> list[str]:
    return client(["ssh", "-i", str(files["key"]), "-o", "StrictHostKeyChecking=no", "-o",
                   "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                   "-o", "LogLevel=ERROR", f"root@{IP}", command])  # fmt: skip


def pgbench_argv(seconds: int, clients: int = 2) -> list[str]:
    return ["pgbench", "-h", IP, "-U", "postgres", "-n", "-c", str(clients), "-j", str(clients),
            "-T", str(seconds), "ledger"]  # fmt: skip


def pgbench_result(out: str, rc: int) -> dict:
    tps = re.search(r"^tps = ([0-9.]+)", out, re.M)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    return {"rc": rc, "tps": float(tps[1]) if tps else None, "transactions": int(done[1]) if done else None,
            "failed": int(failed[1]) if failed else None, "tail": out.strip()[-300:]}  # fmt: skip


def pgbench(seconds: int) -> dict:
    out = subprocess.run(client(pgbench_argv(seconds)), capture_output=True, text=True, env=client_env(),
                         timeout=seconds + 300)  # fmt: skip
    return pgbench_result(out.stdout + out.stderr, out.returncode)


class Load:
    """The ledger client and pgbench writing from the client namespace."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.ledger = subprocess.Popen(
            client([sys.executable, "-m", "ftlab.ledger", IP, "--log", str(log), "--seconds", "3600"]),
            stdout=subprocess.PIPE, text=True, env=client_env(),
        )  # fmt: skip
        self.pgbench = subprocess.Popen(client(pgbench_argv(PGBENCH_S)), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=client_env())  # fmt: skip

    def acks(self) -> list[float]:
        """When each commit was acknowledged (the client's clock)."""
        return ledger.read_log(self.log)["times"] if self.log.exists() else []

    def await_acks(self, n: int, timeout: float) -> None:
        def there() -> bool:
            if self.ledger.poll() is not None:
                raise LabError(f"the ledger client ended: {self.ledger.stdout.read().strip()[-500:]}")
            return len(self.acks()) >= n

        wait_for(f"{n} commits acknowledged to the ledger client", there, timeout, 0.2)

    def stop(self) -> tuple[dict, dict]:
        """The ledger's check of its run (SIGTERM: it stops, then reads the table back), and
        pgbench's result once its run ends."""
        self.ledger.terminate()
        out, _ = self.ledger.communicate(timeout=300)
        lines = out.strip().splitlines()
        checked = json.loads(lines[-1]) if lines else {"ok": False, "error": "the ledger printed nothing"}
        bench, _ = self.pgbench.communicate(timeout=PGBENCH_S + 300)
        return checked, pgbench_result(bench, self.pgbench.returncode)

    def kill(self) -> None:
        for proc in (self.ledger, self.pgbench):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def pause(times: list[float], at: float) -> float | None:
    """The client-visible pause of a failover: from the last acknowledgement before the fault to
    the first after it."""
    before, after = [x for x in times if x <= at], [x for x in times if x > at]
    return round(after[0] - before[-1], 3) if before and after else None


def consistent() -> str | None:
    """pgbench's TPC-B balances add up (every transaction updates an account, its teller and branch
    by the same delta and records it in the history, all from 0): None, or the four sums."""
    sums = psql("SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
                "(SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), "
                "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)", 600)  # fmt: skip
    return None if len(set(sums.split("|"))) == 1 else sums


def amcheck() -> list[str]:
    """amcheck over every B-tree index of the database (heapallindexed: every heap tuple is in its
    index) and over the heaps of the ledger and pgbench_accounts (as bench/database-local does)."""
    try:
        psql("CREATE EXTENSION IF NOT EXISTS amcheck")
        indexes = psql(
            "SELECT c.relname || bt_index_check(c.oid, true)::text FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
            "WHERE a.amname = 'btree' AND c.relnamespace = 'public'::regnamespace",
            900,
        ).split()
        heap = psql("SELECT count(*) FROM (SELECT verify_heapam('ledger') UNION ALL "
                    "SELECT verify_heapam('pgbench_accounts')) v", 900)  # fmt: skip
    except LabError as e:  # amcheck raises on a corrupt index
        return [f"amcheck: {e}"]
    problems = [] if heap == "0" else [f"verify_heapam found {heap} problems"]
    if len(indexes) < 4:  # ledger's and pgbench's three primary keys
        problems.append(f"bt_index_check checked only {indexes}")
    return problems


def pg_checksums(files: dict) -> list[str]:
    """PostgreSQL stopped (a clean shutdown), then pg_checksums over its data directory."""
    out = subprocess.run(ssh(files, f"systemctl stop postgresql@15-main && runuser -u postgres -- "
                                    f"{PG_BIN}/pg_checksums --check -D {PG_DATA}"),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    bad = re.search(r"Bad checksums:\s+(\d+)", out.stdout)
    if out.returncode != 0 or not bad or bad[1] != "0":
        return [f"pg_checksums: rc {out.returncode}: {(out.stdout + out.stderr).strip()[-500:]}"]
    return []


def copies_identical(files: dict, view: dict) -> list[str]:
    """With the guest's root filesystem frozen (written back and flushed: no write reaches its disk
    while frozen), the primary's disk - the image - and the secondary's copy of it on the
    datastore, byte by byte. The VM keeps running and checkpointing throughout: lockstepd has no
    pause, and a VM stopped by hand would be resumed by the next checkpoint."""
    copy = images.copy_path(str(files["disk"]), NAME, view["secondary_host"], view["generation"])
    if not copy.exists():
        return [f"the secondary's copy {copy.name} is not on the datastore"]
    code = base64.b64encode(FREEZE).decode()
    freezer = subprocess.Popen(ssh(files, f"python3 -c 'exec(__import__(\"base64\").b64decode(\"{code}\"))'"),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready, _, _ = select.select([freezer.stdout], [], [], 120)
        line = freezer.stdout.readline().strip() if ready else ""
        if line != "frozen":
            return [f"the guest's root filesystem did not freeze: {line!r}"]
        cmp = subprocess.run(["nice", "-n", "19", "cmp", str(files["disk"]), str(copy)], capture_output=True,
                             text=True, timeout=900)  # fmt: skip
        freezer.stdin.write("thaw\n")
        freezer.stdin.flush()
        out, _ = freezer.communicate(timeout=120)
        problems = [] if "thawed" in out else [f"the guest's root filesystem did not thaw: {out!r}"]
        if cmp.returncode != 0:
            problems.append(f"the disk copies differ: {(cmp.stdout + cmp.stderr).strip()}")
        return problems
    finally:
        if freezer.poll() is None:
            freezer.kill()  # the guest thaws on EOF
            freezer.wait()


# --- the scenario -----------------------------------------------------------------------------


def failover(fault: str, log: Path, mode: str, down: dict[int, list[str]], started: str) -> dict:
    """The ledger client and pgbench write; the primary fails; the survivor runs on and is
    protected again; the ledger stops a few commits later. What it saw, and the problems."""
    load = Load(log)
    try:
        load.await_acks(ACKS_BEFORE, 180)
        view = engine.await_pair(NAME, lambda v: v["state"] == "running", 60)  # who is the primary now
        old = view["primary"]
        primary = engine.index(old)
        at = time.time()
        if links := fail(fault, primary):
            down[primary] = links
        view = engine.await_pair(NAME, lambda v: v["state"] == "running" and v["primary"] != old,
                                 REPROTECT_TIMEOUT_S)  # fmt: skip
        with contextlib.suppress(LabError):  # a ledger that ended (its connection lost) is checked next
            load.await_acks(len(load.acks()) + ACKS_AFTER, 120)
        checked, bench = load.stop()
    finally:
        load.kill()
    problems = []
    if not checked.get("ok"):
        problems.append(f"the ledger's check failed: {checked}")
    if bench["rc"] != 0 or bench["failed"]:
        problems.append(f"pgbench through the failover: {bench}")
    if (now := postmaster()) != started:
        problems.append(f"the postmaster is {now}, not {started} as before")
    if sums := consistent():
        problems.append(f"pgbench's balances do not add up (accounts|tellers|branches|history): {sums}")
    for i in list(down):  # every host back before the next fault and the audit
        host_back(i, down.pop(i), mode)
    return {"from": old, "to": view["primary"], "pause_s": pause(load.acks(), at),
            "acknowledged": checked.get("acknowledged", 0), "lost": checked.get("lost", []),
            "duplicated": checked.get("duplicated", []), "connection_kept": checked.get("connection_kept"),
            "pgbench": bench, "problems": problems}  # fmt: skip


def scenario(mode: str, fault: str, work: Path, bench_s: int = 0, result: dict | None = None) -> dict:
    """Boot the database guest, protect it, fail its primary twice under load, check everything;
    power it off. bench_s: pgbench's TPS over that many seconds unprotected and protected.
    result: filled in as it goes (what a run that raised got to)."""
    result = {} if result is None else result
    result.update(mode=mode, fault=fault, failovers=[], problems=[])
    daemons(mode)
    down: dict[int, list[str]] = {}
    with vm_files() as files:
        try:
            assert engine.ok(1, "POST", "/vms", spec(files))["changed"]
            began = time.monotonic()
            wait_for("PostgreSQL in the guest to answer the client", postgres_answers, BOOT_TIMEOUT_S, 1)
            result["boot_s"] = round(time.monotonic() - began, 1)
            started = postmaster()
            if bench_s:
                result["pgbench_unprotected"] = pgbench(bench_s)
            began = time.monotonic()
            view = engine.ok(1, "POST", f"/vms/{NAME}/enable", {"checkpoint_ms": CHECKPOINT_MS})["vm"]
            if view["state"] != "running":  # a finding; lockstepd retries on its own, the rest goes on
                result["problems"].append(f"the first protect did not end running: {view['reason']}")
                view = engine.await_pair(NAME, lambda v: v["state"] == "running", REPROTECT_TIMEOUT_S)
            assert view["mode"] == mode, view
            result["protect_s"] = round(time.monotonic() - began, 1)
            if bench_s:
                result["pgbench_protected"] = pgbench(bench_s)
            # The second failover is a fault like the first: with the first primary's host back,
            # the new primary's host (or QEMU) fails, and the survivor is protected again on the
            # host that came back. (A test-failover would kill only the QEMU.)
            for n in (1, 2):
                run = failover(fault, work / f"ledger{n}.log", mode, down, started)
                result["failovers"].append(run)
                result["problems"] += [f"failover {n}: {p}" for p in run["problems"]]
            argv = [sys.executable, "-m", "ftlab.ledger", IP, "--log", str(work / "ledger1.log"), "--check"]
            again = subprocess.run(
                client(argv), capture_output=True, text=True, env=client_env(), timeout=600
            )
            first = json.loads(again.stdout.strip().splitlines()[-1])
            if first.get("lost") or first.get("duplicated") or "error" in first:
                result["problems"].append(f"the first run's commits after the second failover: {first}")
            result["problems"] += amcheck()
            result["problems"] += pg_checksums(files)  # PostgreSQL stays stopped from here
            audit.clean(NAME)
            view = engine.await_pair(NAME, lambda v: v["state"] == "running", 60)
            result["problems"] += copies_identical(files, view)
            audit.clean(NAME)
            engine.power_off(NAME)
            audit.clean(NAME, gone=True)
        finally:
            for i in list(down):
                host_back(i, down.pop(i), mode)
            engine.power_off(NAME)
    return result


@pytest.mark.parametrize("mode", ["checkpoint", "lockstep"])
def test_postgresql_keeps_every_acknowledged_commit_through_two_host_failures(cluster, mode, tmp_path):
    result = scenario(mode, "kill", tmp_path)
    assert not result["problems"], result
    for run in result["failovers"]:
        assert run["acknowledged"] >= ACKS_BEFORE + ACKS_AFTER and run["connection_kept"], run
        assert run["to"] != run["from"], run
