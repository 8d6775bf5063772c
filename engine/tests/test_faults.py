"""Faults in the engine's own paths, for real: three lockstepd in lab hosts, the lab guest, the
client checking every byte of one TCP stream. Each fault is injected at the moment it hurts
(a daemon stopped while the primary's daemon stops the pair, a host lost during a copy, a daemon
killed mid-protect) and each test ends with the audit (ftlab.audit): one copy talks on the VM
network, the record equals what runs, nothing of the pair is left over, every lockstepd answers.
The repetitions (with counts of outcomes) are bench/faults; here a few runs per case."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time

import pytest

from ftlab import audit, engine, faults
from ftlab import topology as t
from ftlab.colopair import set_links
from ftlab.engine import events
from ftlab.guest import StreamFollower, client_run
from ftlab.proc import LabError, wait_for
from lockstep import qmp

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]
MiB = 1 << 20
LOST_AFTER_S = 8.0  # short, so a pair with no copy left is recorded lost within the test
HOSTS = ("lab-h1", "lab-h2", "lab-h3")


SETTINGS = {"lost_after_s": LOST_AFTER_S, "diagnostic_monitor": True}


@pytest.fixture(scope="module")
def cluster(lab):
    for i in (1, 2, 3):
        engine.start(i, **SETTINGS)
    yield


def daemon_pid(index: int) -> int:
    (pid,) = engine.processes(index, " daemon --config")
    return pid


def await_event(index: int, ready, timeout: float = 120) -> dict:
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [e for e in events(index) if ready(e)]
        return bool(found)

    wait_for(f"an event on lab-h{index}", seen, timeout, 0.02)
    return found[0]


def protected(name: str, k: int, **vm) -> tuple[StreamFollower, dict]:
    """The lab guest started on lab-h1 and protected; the client following its stream."""
    assert engine.ok(1, "POST", "/vms", engine.guest_body(name, k) | vm)["changed"]
    client = StreamFollower(t.guest_ip(k), timeout=300)
    client.wait_for_bytes(1, 120)
    view = engine.ok(1, "POST", f"/vms/{name}/enable", {})["vm"]
    assert view["state"] == "running", view
    client.wait_for_bytes(client.bytes + MiB // 4, 60)
    return client, view


def ends_clean(name: str, client: StreamFollower, more: int = MiB // 4) -> None:
    """The audit, then the client's stream goes on and was byte-exact throughout."""
    audit.clean(name)
    client.wait_for_bytes(client.bytes + more, 60)
    result = client.stop()
    assert result["ok"], result


def diagnosis(name: str, last: int = 12) -> dict:
    """What the daemons say of a pair, for an assertion's message: each one's view of it, its
    last events about it, and the last lines of each watcher's journal there."""
    found: dict[str, object] = {}
    for i in (1, 2, 3):
        try:
            found[f"lab-h{i} view"] = engine.call(i, "GET", f"/vms/{name}")
        except OSError as e:
            found[f"lab-h{i} view"] = f"no answer: {e}"
        found[f"lab-h{i} events"] = [e for e in events(i) if e.get("vm") == name][-last:]
        for journal in sorted(t.host(i).dir.glob(f"{name}.*.watch.log")):
            found[f"lab-h{i} {journal.name}"] = journal.read_text().splitlines()[-last:]
    return found


@contextlib.contextmanager
def daemon_stopped(index: int):
    """lockstepd on a host SIGSTOPped (a daemon restarting, hung, or its loop blocked)."""
    pid = daemon_pid(index)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def host_back(index: int, links: list[str]) -> None:
    set_links(links, up=True)
    engine.start(index, **SETTINGS)


# --- planned stops while the secondary's daemon is down (review F1 / R1) ----------------------


@pytest.mark.parametrize("op", ["disable", "poweroff"])
def test_a_planned_stop_while_the_secondarys_daemon_is_stopped_leaves_one_copy(cluster, op):
    """Before: 6 of 6 runs had two copies of the VM running with their taps up for ~14 s, and
    after SIGCONT the secondary's daemon stopped the primary: the VM was lost."""
    name, k = f"ftstop-{op}", 10 + ["disable", "poweroff"].index(op)
    client, view = protected(name, k)
    secondary = engine.index(view["secondary_host"])
    try:
        with daemon_stopped(secondary):
            answer = engine.ok(1, "POST", f"/vms/{name}/{op}", {})
            assert answer["changed"]
            # the secondary's watcher fires without heartbeats, finds the token taken, fences
            wait_for("the secondary's watcher to end", lambda: not audit.watchers(secondary, name), 30)
            assert audit.talking(name) == ([1] if op == "disable" else [])  # never two copies
            if op == "disable":
                client.wait_for_bytes(client.bytes + MiB // 4, 60)  # one copy, serving
        audit.clean(name, gone=op == "poweroff")  # its daemon, back, changes nothing
        if op == "disable":
            client.wait_for_bytes(client.bytes + MiB // 4, 60)
            result = client.stop()
            assert result["ok"], result
            assert engine.ok(1, "GET", f"/vms/{name}")["state"] == "disabled"
    finally:
        engine.power_off(name)


# --- a host lost while a copy is on the wire (R5, R12) ---------------------------------------


def enable_in_background(index: int, name: str) -> dict:
    answer: dict = {}

    def enable() -> None:
        try:
            answer.update(engine.call(index, "POST", f"/vms/{name}/enable", {})[1])
        except OSError as e:  # the daemon died under it (a crash test): no answer
            answer["error"] = repr(e)

    thread = threading.Thread(target=enable)
    thread.start()
    answer["thread"] = thread
    return answer


def test_enable_whose_secondary_host_dies_during_the_first_copy_keeps_the_vm_and_a_retry_succeeds(cluster):
    """Before: enable answered after 123 s, the guest was unreachable from then on, and every later
    attempt failed with "attempt to add duplicate property 'redire0'"."""
    name, k = "ftcopy", 12
    assert engine.ok(1, "POST", "/vms", engine.guest_body(name, k) | {"disk_mib": 64})["changed"]
    client = StreamFollower(t.guest_ip(k), timeout=300)
    client.wait_for_bytes(1, 120)
    links: list[str] = []
    victim = None
    try:
        answer = enable_in_background(1, name)
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            for i in (2, 3):
                if any(e.get("vm") == name and e["event"] == "secondary_started" for e in events(i)):
                    victim = i
            time.sleep(0.02)
        assert victim is not None
        links = engine.kill_host(victim)
        answer["thread"].join(120)
        client.wait_for_bytes(client.bytes + MiB // 2, 60)  # the VM served on through it all
        # FT comes back on its own, on the host that is left (the retry is not refused any more)
        view = engine.await_pair(name, lambda v: v["state"] == "running", 120)
        assert view["secondary_host"] == HOSTS[5 - victim - 1], view
        events_h1 = [e for e in events(1) if e.get("vm") == name]
        assert any(e["event"] == "protect_failed" for e in events_h1), events_h1
        client.wait_for_bytes(client.bytes + MiB // 2, 60)
        host_back(victim, links)
        links = []
        audit.clean(name)
        result = client.stop()
        assert result["ok"], result
    finally:
        if links:
            host_back(victim, links)
        engine.power_off(name)


def test_a_second_host_lost_during_the_reprotection_copy_leaves_the_survivor_serving(cluster):
    """Before: the surviving primary stopped serving (the copy's `stop` never undone) and stayed
    need_secondary/start_failed; when the third host came back it was not re-protected."""
    name, k = "ftdouble", 13
    client, view = protected(name, k, disk_mib=64)
    survivor = engine.index(view["secondary_host"])
    third = 5 - survivor  # 2 <-> 3
    first_links = engine.kill_host(1)
    third_links: list[str] = []
    try:
        await_event(third, lambda e: e.get("vm") == name and e["event"] == "secondary_started", 60)
        third_links = engine.kill_host(third)
        view = engine.await_pair(
            name, lambda v: v["state"] == "need_secondary" and v["primary"] == HOSTS[survivor - 1], 90
        )
        client.wait_for_bytes(client.bytes + MiB // 2, 90)  # the survivor serves, alone
        host_back(third, third_links)
        third_links = []
        view = engine.await_pair(name, lambda v: v["state"] == "running", 120)
        assert view["primary"] == HOSTS[survivor - 1]
        client.wait_for_bytes(client.bytes + MiB // 2, 60)
        result = client.stop()
        assert result["ok"], result
    finally:
        host_back(1, first_links)
        if third_links:
            host_back(third, third_links)
        with contextlib.suppress(LabError):
            audit.clean(name, timeout=30)
        engine.power_off(name)


def test_the_survivor_lost_during_its_reprotection_copy_is_recorded_lost_and_cleaned_up(cluster):
    """Before: the record stayed `starting` with no VM anywhere, pointing at a dead host."""
    name, k = "ftlast", 14
    client, view = protected(name, k)
    survivor = engine.index(view["secondary_host"])
    third = 5 - survivor
    first_links = engine.kill_host(1)
    survivor_links: list[str] = []
    try:
        await_event(third, lambda e: e.get("vm") == name and e["event"] == "secondary_started", 60)
        survivor_links = engine.kill_host(survivor)
        view = engine.await_pair(name, lambda v: v["state"] == "lost", LOST_AFTER_S + 60)
        assert view["reason"] == "host_unreachable", view
        wait_for("the half-made secondary to go", lambda: not audit.qemus(third, name), 60)
        assert engine.ok(third, "POST", f"/vms/{name}/poweroff", {})["changed"]  # cleaned up from anywhere
        client.stop()
    finally:
        host_back(1, first_links)
        if survivor_links:
            host_back(survivor, survivor_links)
    audit.clean(name, gone=True)


# --- lockstepd killed mid-protect and mid-failover (R6, R12) ---------------------------------


# The primary's daemon crashes right after each step of protect (LOCKSTEPD_CRASH_AFTER, a
# failpoint: deterministic, where a kill timed from outside lands a step late or early).
PROTECT_STEPS = ("placed", "copying", "replicating", "watching", "peer_watching")


def restarted_plain(*indexes: int) -> None:
    """Each host's lockstepd (crashed, or still armed with a crash point) running without one."""
    for i in indexes:
        engine.kill_daemon(i)
        engine.start(i, **SETTINGS)


def crashed(index: int, timeout: float = 120) -> None:
    wait_for(f"lockstepd on lab-h{index} to crash at its crash point",
             lambda: not engine.processes(index, " daemon --config"), timeout, 0.05)  # fmt: skip


@pytest.mark.parametrize("step", PROTECT_STEPS)
def test_lockstepd_killed_at_each_protect_step_and_restarted_protects_the_vm_again(cluster, step):
    """Before issue 12 (killed in the copy): the pair stayed `starting` forever."""
    name, k = f"ftcrash-{PROTECT_STEPS.index(step)}", 30 + PROTECT_STEPS.index(step)
    engine.kill_daemon(1)
    engine.start(1, crash_after=f"protecting:{step}", **SETTINGS)
    try:
        assert engine.ok(1, "POST", "/vms", engine.guest_body(name, k) | {"disk_mib": 64})["changed"]
        client = StreamFollower(t.guest_ip(k), timeout=300)
        client.wait_for_bytes(1, 120)
        answer = enable_in_background(1, name)
        crashed(1)
        answer["thread"].join(60)
        client.wait_for_bytes(client.bytes + MiB // 4, 60)  # the VM runs without its daemon
        engine.start(1, **SETTINGS)
        view = engine.await_pair(name, lambda v: v["state"] == "running", 120)
        took_over = any(
            e.get("vm") == name and e["event"] == "watching_unasked" for i in (2, 3) for e in events(i)
        )
        assert view["primary"] == "lab-h1" or (step == "replicating" and took_over), view
        if step in ("placed", "copying", "replicating") and not took_over:  # the half-made protect was undone
            assert any(e.get("vm") == name and e.get("reason") == "engine_restarted" for e in events(1))
        ends_clean(name, client)
    finally:
        restarted_plain(1)
        engine.power_off(name)


def test_the_secondarys_lockstepd_killed_as_it_starts_the_secondary_leaves_one_protected_copy(cluster):
    """Its QEMU is left behind without its daemon; the primary's protect goes on or fails over to
    another host, and the daemon, back, keeps or drops that QEMU by the record."""
    name, k = "ftcrash-sec", 35
    for i in (2, 3):  # whichever placement picks
        engine.kill_daemon(i)
        engine.start(i, crash_after="secondary_started", **SETTINGS)
    try:
        assert engine.ok(1, "POST", "/vms", engine.guest_body(name, k) | {"disk_mib": 64})["changed"]
        client = StreamFollower(t.guest_ip(k), timeout=300)
        client.wait_for_bytes(1, 120)
        answer = enable_in_background(1, name)
        up = lambda i: engine.processes(i, " daemon --config")  # noqa: E731
        wait_for("a secondary's lockstepd to crash", lambda: not (up(2) and up(3)), 120, 0.05)
        restarted_plain(2, 3)
        answer["thread"].join(180)
        view = engine.await_pair(name, lambda v: v["state"] == "running", 180)
        assert view["primary"] == "lab-h1"
        ends_clean(name, client)
    finally:
        restarted_plain(2, 3)
        engine.power_off(name)


def test_the_new_primarys_lockstepd_killed_as_it_reads_the_failover_verdict_records_it_when_back(cluster):
    """The watcher went live on its own; the daemon dies between reading its verdict and writing
    the record: back, it reads the verdict again and applies it once."""
    name, k = "ftcrash-verdict", 36
    client, view = protected(name, k)
    secondary = engine.index(view["secondary_host"])
    try:
        engine.kill_daemon(secondary)  # the watcher and the secondary QEMU run on without it
        engine.start(secondary, crash_after="verdict", **SETTINGS)
        engine.ok(1, "POST", f"/vms/{name}/test-failover", {})
        crashed(secondary)
        client.wait_for_bytes(client.bytes + MiB // 2, 60)  # the new primary serves meanwhile
        engine.start(secondary, **SETTINGS)
        engine.await_pair(
            name, lambda v: v["state"] == "running" and v["primary"] == HOSTS[secondary - 1], 180
        )
        ends_clean(name, client, MiB // 2)
    finally:
        restarted_plain(secondary)
        engine.power_off(name)


def test_a_failover_while_the_new_primarys_daemon_is_dead_is_recorded_when_it_returns(cluster):
    name, k = "ftblind", 16
    client, view = protected(name, k)
    secondary = engine.index(view["secondary_host"])
    try:
        engine.kill_daemon(secondary)
        try:
            engine.ok(1, "POST", f"/vms/{name}/test-failover", {})  # the watchers act without it
            client.wait_for_bytes(client.bytes + MiB // 2, 60)
        finally:
            engine.start(secondary, **SETTINGS)
        view = engine.await_pair(
            name, lambda v: v["state"] == "running" and v["primary"] == HOSTS[secondary - 1]
        )
        ends_clean(name, client, MiB // 2)
    finally:
        engine.power_off(name)


def test_a_primary_whose_vm_network_link_is_cut_hands_over_and_the_client_stream_goes_on(cluster):
    """Only the primary host's VM-network link is cut (FT logging and storage work): its clients
    cannot reach the guest there. Before: no failover, the service down until the link came back (R25)."""
    name, k = "ftuplink", 37
    client, _ = protected(name, k)
    link = ["ftl-h1-vm"]
    try:
        set_links(link, up=False)
        engine.await_pair(name, lambda v: v["primary"] != "lab-h1", 60)
        client.wait_for_bytes(client.bytes + MiB // 2, 60)  # served from the secondary, byte-exact
        set_links(link, up=True)
        engine.await_pair(name, lambda v: v["state"] == "running" and v["primary"] != "lab-h1", 180)
        ends_clean(name, client)
    finally:
        set_links(link, up=True)
        engine.power_off(name)


# --- a QEMU hung in the middle of a checkpoint ------------------------------------------------


def qemu_pid(index: int, name: str, slot: str) -> int:
    (pid,) = engine.processes(index, f"-name {name} ({slot})")
    return pid


def stop_at_checkpoint(primary: int, name: str, victim: tuple[int, str]) -> None:
    """SIGSTOP a QEMU of the pair the moment the primary stops its guest for a checkpoint (QMP
    STOP on the primary's diagnostic monitor): its RAM is on the wire then."""
    pid = qemu_pid(victim[0], name, victim[1])

    async def watch() -> None:
        client = await qmp.connect(str(t.host(primary).dir / f"{name}.primary.diag.qmp"), 10)
        stops = qmp.BoundedListener(("STOP",))
        client.register_listener(stops)
        await asyncio.wait_for(stops.get(), 30)
        os.kill(pid, signal.SIGSTOP)
        await client.disconnect()

    asyncio.run(watch())


@pytest.mark.parametrize("victim", ["primary", "secondary"])
def test_a_qemu_hung_during_a_checkpoint_leaves_exactly_one_copy_serving_byte_exact(cluster, victim):
    """Before: the primary SIGSTOPped while a checkpoint's RAM was on the wire left no QEMU of
    the pair alive in 10 of 17 runs: the secondary, blocked loading the checkpoint under QEMU's
    big lock, looked hung to its own watcher, which fenced it."""
    name, k = f"fthang-{victim}", 19 + (victim == "secondary")
    client, view = protected(name, k)
    secondary = engine.index(view["secondary_host"])
    try:
        hung = (1, "primary") if victim == "primary" else (secondary, "secondary")
        stop_at_checkpoint(1, name, hung)
        survivor = secondary if victim == "primary" else 1
        view = engine.await_pair(
            name, lambda v: v["primary"] == HOSTS[survivor - 1] and v["generation"] > 1, 60
        )
        client.wait_for_bytes(client.bytes + MiB // 2, 60)  # one copy serves, on the same connection
        view = engine.await_pair(name, lambda v: v["state"] == "running", 120)  # and FT is back
        audit.clean(name)
        result = client.stop()
        assert result["ok"], result
    finally:
        engine.power_off(name)


# --- the datastore unreachable from one side (R7, R14, F6) ----------------------------------


def journal_says(index: int, name: str, slot: str, generation: int, text: str) -> bool:
    path = t.host(index).dir / f"{name}.{slot}.gen{generation}.watch.log"
    return path.exists() and text in path.read_text()


def test_a_primary_whose_datastore_hangs_when_its_secondary_dies_waits_for_it_then_runs_on(cluster):
    """Before: a claim that took longer than 5 s fenced the side that was about to win."""
    name, k = "ftnfs-hang", 21
    client, view = protected(name, k)
    secondary, generation = engine.index(view["secondary_host"]), view["generation"]
    try:
        with faults.datastore(1, "hang"):
            os.kill(qemu_pid(secondary, name, "secondary"), signal.SIGKILL)
            wait_for(
                "the claim pending", lambda: journal_says(1, name, "primary", generation, "claim-pending"), 60
            )
            assert audit.talking(name) == [1] and qemu_pid(1, name, "primary")  # kept, not fenced
        view = engine.await_pair(
            name, lambda v: v["state"] == "running" and v["generation"] > generation, 120
        )
        assert view["primary"] == "lab-h1"
        client.wait_for_bytes(client.bytes + MiB // 2, 90)
        audit.clean(name)
        result = client.stop()
        assert result["ok"], result
    finally:
        engine.power_off(name)


def test_a_secondary_without_its_datastore_never_goes_live_and_takes_over_once_it_is_back(cluster):
    """Before: the claim created a token on the host's own disk (mkdir -p) and won it there."""
    name, k = "ftnfs-gone", 22
    client, view = protected(name, k)
    secondary, generation = engine.index(view["secondary_host"]), view["generation"]
    try:
        with faults.datastore(secondary, "unmounted"):
            engine.ok(1, "POST", f"/vms/{name}/test-failover", {})
            wait_for("the refused claim", lambda: journal_says(secondary, name, "secondary", generation,
                                                               "not the shared datastore"), 60)  # fmt: skip
            assert audit.talking(name) == []  # nobody went live on a private datastore
        view = engine.await_pair(
            name, lambda v: v["primary"] == HOSTS[secondary - 1] and v["state"] == "running"
        )
        client.wait_for_bytes(client.bytes + MiB // 2, 120)
        audit.clean(name)
        result = client.stop()
        assert result["ok"], result
    finally:
        engine.power_off(name)


def test_a_secondary_whose_datastore_hangs_under_its_disk_copy_leaves_the_primary_serving(cluster):
    """A secondary's copy of a disk image lives on the datastore (ADR 0006): when only its host's
    datastore hangs, its QEMU blocks on the copy and the primary's replicated writes wait for it.
    The primary must go on alone (as for a secondary hung at a checkpoint), its disk writable."""
    name, k = "ftcopy-hang", 23
    image = t.DATASTORE / "vm-model" / f"{name}.raw"
    image.parent.mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "32M"], check=True)
    body = engine.guest_body(name, k)
    spec = {"spec_version": 1, "name": name, "memory_mib": body["memory_mib"], "kernel": body["kernel"],
            "initrd": body["initrd"], "cmdline": body["cmdline"], "disks": [{"path": str(image)}],
            "nics": [{"mac": t.guest_mac(k)}]}  # fmt: skip
    try:
        with faults.datastore(2, "mirror") as hang2, faults.datastore(3, "mirror") as hang3:
            assert engine.ok(1, "POST", "/vms", spec)["changed"]
            client = StreamFollower(t.guest_ip(k), timeout=300)
            client.wait_for_bytes(1, 120)
            view = engine.ok(1, "POST", f"/vms/{name}/enable", {})["vm"]
            assert view["state"] == "running", view
            (hang2 if view["secondary_host"] == "lab-h2" else hang3)()
            result = client_run(t.guest_ip(k), "--disk-write", str(MiB), "--seed", "31", "--disk", "1")
            # The primary's disk is not held by the hung secondary.
            assert result["ok"], (result, diagnosis(name))
            client.wait_for_bytes(client.bytes + MiB // 2, 90)
            view = engine.await_pair(name, lambda v: v["primary"] == "lab-h1" and v["state"] != "running", 90)
        engine.await_pair(name, lambda v: v["state"] == "running", 180)  # protected again once it is back
        assert client_run(t.guest_ip(k), "--disk-read", str(MiB), "--seed", "31", "--disk", "1")["ok"]
        ends_clean(name, client)
    finally:
        engine.power_off(name)
        image.unlink(missing_ok=True)


# --- names (R3) ----------------------------------------------------------------------------------


def test_two_pairs_with_long_similar_names_keep_their_own_taps_through_a_failover(cluster):
    """Before: their taps were both ftp-webserver-0, and starting one deleted the other's."""
    names = ("webserver-01", "webserver-02")
    followers = {}
    try:
        for i, name in enumerate(names):
            followers[name], _ = protected(name, 17 + i)
        engine.ok(1, "POST", f"/vms/{names[0]}/test-failover", {})
        for name in names:
            engine.await_pair(name, lambda v: v["state"] == "running" and v["generation"] >= 1, 120)
            followers[name].wait_for_bytes(followers[name].bytes + MiB // 2, 90)
            audit.clean(name)
        for name in names:
            result = followers[name].stop()
            assert result["ok"], (name, result)
    finally:
        for name in names:
            engine.power_off(name)
