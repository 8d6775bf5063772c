"""The data plane for real: a COLO pair of QEMU VMs on two lab hosts, the client holding a TCP
stream to the guest, then a failure. Every byte the client reads is checked (ftlab.client).

The failures are injected here; detecting them and failing over is the pair's own work: each
side runs its watcher (lockstep.watch, `ftctl watch`) inside its lab host, with heartbeats over
the FT-logging link and the split-brain token on the lab's NFS datastore."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import pytest

from ftlab.colopair import MiB, Pair, lab_host, lab_qemu
from ftlab.guest import client_run
from lockstep import colo

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]
MODES = [colo.Mode.LOCKSTEP, colo.Mode.CHECKPOINT]


@pytest.fixture(scope="module")
def qemu() -> str:
    return lab_qemu()


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 400))


async def stream_survives(pair: Pair, client, survivor: colo.Vm) -> None:
    """The client reads 2 MiB more through the surviving side, every byte checked, on the same
    connection; the survivor runs outside replication."""
    await asyncio.to_thread(client.wait_for_bytes, client.bytes + 2 * MiB, 90)
    result = client.stop()
    assert result["ok"], result
    assert (await survivor.execute("query-status"))["running"]
    assert (await survivor.execute("query-colo-status"))["mode"] == "none"


def gone(vm: colo.Vm, within: float = 0.0) -> bool:
    """Whether the VM's QEMU has exited, waiting up to `within` seconds for it: a SIGKILLed
    QEMU takes a moment to die after its watcher has said so."""
    if vm.proc is None:
        return False
    try:
        vm.proc.wait(within)
    except subprocess.TimeoutExpired:
        return False
    return True


@pytest.mark.parametrize("mode", MODES)
def test_primary_killed_and_cut_off_secondary_goes_live_byte_exact(lab, qemu, mode):
    async def scenario():
        async with Pair(qemu, mode) as pair:
            client = await pair.start()
            pair.watch()
            pair.primary.kill()
            pair.cut_off(pair.primary)
            verdict = pair.verdict("secondary")
            assert (verdict["outcome"], verdict["failed_steps"]) == ("live", []), verdict
            await stream_survives(pair, client, pair.secondary)

    run(scenario)


def disk_roundtrip(pair: Pair, seed: int) -> None:
    """Write 4 MiB of a seeded pattern to the guest's disk, then read it back past the cache."""
    for op in ("--disk-write", "--disk-read"):
        result = client_run(pair.ip, op, str(4 * MiB), "--seed", str(seed))
        assert result["ok"], result


@pytest.mark.parametrize("mode", MODES)
def test_secondary_killed_primary_continues_alone_byte_exact(lab, qemu, mode):
    async def scenario():
        async with Pair(qemu, mode, disk_mib=16) as pair:
            client = await pair.start()
            pair.watch()
            pair.secondary.kill()
            verdict = pair.verdict("primary")
            assert (verdict["outcome"], verdict["failed_steps"]) == ("live", []), verdict
            assert not await colo.has_block_node(pair.primary, "replication0")  # replica dropped
            disk_roundtrip(pair, seed=3)  # its disk, without the lost secondary's replica
            await stream_survives(pair, client, pair.primary)

    run(scenario)


def test_hung_primary_is_fenced_and_secondary_goes_live(lab, qemu):
    async def scenario():
        async with Pair(qemu, colo.Mode.LOCKSTEP) as pair:
            client = await pair.start()
            pair.watch()
            os.kill(pair.primary.proc.pid, signal.SIGSTOP)
            primary, secondary = pair.verdict("primary"), pair.verdict("secondary")
            assert primary["outcome"] == "fenced" and "did not answer" in primary["detail"], primary
            assert secondary["outcome"] == "live", secondary
            assert gone(pair.primary, within=10)  # SIGKILLed while stopped: it can never wake up and send
            await stream_survives(pair, client, pair.secondary)

    run(scenario)


def test_partition_exactly_one_side_continues_decided_by_the_datastore(lab, qemu):
    async def scenario():
        async with Pair(qemu, colo.Mode.LOCKSTEP) as pair:
            client = await pair.start()
            pair.watch()
            await asyncio.to_thread(client.wait_for_bytes, client.bytes + MiB, 60)
            assert pair.watching() == {"primary", "secondary"}  # no failover while nothing failed
            pair.cut_off(pair.primary, which=("ft",))  # the FT-logging link only: both sides alive
            verdicts = {role: pair.verdict(role) for role in ("primary", "secondary")}
            outcomes = sorted(v["outcome"] for v in verdicts.values())
            assert outcomes == ["fenced", "live"], verdicts
            (winner,) = [r for r, v in verdicts.items() if v["outcome"] == "live"]
            (loser,) = [r for r, v in verdicts.items() if v["outcome"] == "fenced"]
            assert verdicts[loser]["reason"] == "lost_arbitration", verdicts
            survivor, fenced = (pair.primary, pair.secondary)
            if winner == "secondary":
                survivor, fenced = fenced, survivor
            assert gone(fenced, within=10) and not gone(survivor)
            await stream_survives(pair, client, survivor)

    run(scenario)


def test_hosts_with_different_qemu_builds_are_refused_before_anything_starts(lab, qemu):
    async def scenario():
        pair = Pair(qemu, colo.Mode.LOCKSTEP)
        pair.secondary = colo.Vm(pair.guest, lab_host(2, "qemu-system-x86_64"), "secondary")  # stock 7.2
        with pytest.raises(colo.DataPlaneError, match="refused: hosts run different QEMU builds"):
            await pair.start()
        assert pair.primary.proc is None and pair.secondary.proc is None  # nothing started

    run(scenario)


@pytest.mark.parametrize("mode", MODES)
def test_disk_writes_survive_the_primary_and_the_new_primary_keeps_writing(lab, qemu, mode):
    """Block replication: what the guest wrote and synced before the failover is on the new
    primary's disk (read past the guest's page cache), and the disk works after it."""

    async def scenario():
        async with Pair(qemu, mode, disk_mib=16) as pair:
            client = await pair.start()
            assert client_run(pair.ip, "--disk-write", str(4 * MiB), "--seed", "1")["ok"]
            pair.watch()
            pair.primary.kill()
            pair.cut_off(pair.primary)
            assert pair.verdict("secondary")["outcome"] == "live"
            exports = await pair.secondary.execute("query-block-exports")
            assert all(e["shutting-down"] for e in exports), exports  # the NBD server is stopped
            result = client_run(pair.ip, "--disk-read", str(4 * MiB), "--seed", "1")
            assert result["ok"], result
            disk_roundtrip(pair, seed=2)
            await stream_survives(pair, client, pair.secondary)

    run(scenario)
