"""The secondaries' copies of a VM's disk images (lockstep.images) and what a pair's driver does
with them (issue 13, deliverable 2), without the lab: the same rig as test_pairs_unit (the real
driver, record store, token and processes; QMP and the other daemons faked at their process
boundaries). The files are real files in a directory standing for the datastore."""

from __future__ import annotations

import asyncio

import pytest
from test_pairs_unit import Rig, journal, run

from lockstep import arbiter, images, pairs, records, vmspec
from lockstep.records import Record, Side
from lockstep.state import FtState


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.cleanup()


def with_images(rig: Rig, state: FtState, primary: str, secondary: str | None, generation: int = 3) -> dict:
    """The pair's record with a spec of two disk images on the datastore, each holding 'image'."""
    spec = vmspec.parse({
        "spec_version": 1, "name": "vm", "kernel": "/k",
        "disks": [{"path": str(rig.datastore / "root.raw")},
                  {"path": str(rig.datastore / "data.qcow2"), "format": "qcow2"}],
        "nics": [{"mac": "52:54:00:00:00:01"}],
    })  # fmt: skip
    for d in spec.disks:
        images.Path(d.path).write_text("image")
    r = Record(name="vm", guest=vmspec.to_dict(spec), primary=Side(primary, "primary"), state=state,
               secondary=Side(secondary, "secondary") if secondary else None)  # fmt: skip
    records.create(rig.datastore, r)
    r.generation = generation
    records.save(rig.datastore, r)
    return {str(images.copy_path(d.path, "vm", rig.me, generation)): d.path for d in spec.disks}


def made(copies: dict, text: str = "copy") -> None:
    for copy in copies:
        images.Path(copy).write_text(text)


def contents(rig: Rig) -> dict[str, str]:
    """The images and this VM's copies on the datastore, by name."""
    files = [
        p
        for p in sorted(rig.datastore.iterdir())
        if p.name in ("root.raw", "data.qcow2") or ".vm.ft-" in p.name
    ]
    return {p.name: p.read_text() for p in files}


async def secondary_that_won(rig: Rig):
    """h1 runs the secondary of a pair with two images, made its copies, and its watcher won the
    token and ended: the driver and the copies."""
    copies = with_images(rig, FtState.RUNNING, primary="h2", secondary="h1")
    made(copies)
    driver = await rig.driver()
    won = journal({"event": "claimed", "won": True, "holder": "h1/secondary", "generation": 3})
    entry = await rig.running_side(driver, "secondary", journal=won)
    entry.copies = copies
    rig.local.put(entry)
    return driver, copies


def test_a_secondary_that_goes_live_makes_its_copies_the_images(rig):
    """Before: the VM ran on the secondary's copies in its run directory after a failover, so a
    VM powered off and started from its spec came back with the disks of the failover's moment."""

    async def scenario():
        driver, copies = await secondary_that_won(rig)
        await driver.submit("watcher_ended")
        assert contents(rig) == {"data.qcow2": "copy", "root.raw": "copy"}  # and no copy left beside them
        assert rig.local.get("vm").copies == {}
        assert records.load(rig.datastore, "vm").primary.host == "h1"
        assert [sorted(e["images"]) for e in rig.events() if e["event"] == "images_adopted"] == [
            sorted(copies.values())
        ]

    run(scenario())


def test_a_secondary_that_lost_removes_its_copies_and_never_touches_the_images(rig):
    async def scenario():
        copies = with_images(rig, FtState.RUNNING, primary="h2", secondary="h1")
        made(copies)
        assert arbiter.claim(rig.datastore, "vm", 3, "h2/primary").won  # the primary runs on
        driver = await rig.driver()
        entry = await rig.running_side(driver, "secondary", journal=journal({"event": "peer-lost"}))
        entry.copies = copies
        rig.local.put(entry)
        await driver.submit("watcher_ended")
        assert not entry.qemu.alive()
        assert contents(rig) == {"data.qcow2": "image", "root.raw": "image"}

    run(scenario())


def test_a_rename_the_datastore_refuses_is_retried_and_the_copies_are_never_swept(rig, monkeypatch):
    async def scenario():
        driver, copies = await secondary_that_won(rig)
        real = images.adopt

        def refused(*_):
            raise OSError(116, "Stale file handle")

        monkeypatch.setattr(images, "adopt", refused)
        await driver.submit("watcher_ended")
        assert records.load(rig.datastore, "vm").primary.host == "h1"  # the record follows reality
        assert rig.local.get("vm").copies == copies
        with pytest.raises(Exception, match="runs on copies the datastore does not rename now"):
            await driver.submit("poweroff", body={})  # its newest data would be left under a copy's name
        assert rig.local.get("vm").qemu.alive()
        await driver.sweep_copies(records.load(rig.datastore, "vm"), every=True)
        assert all(
            images.Path(c).read_text() == "copy" for c in copies
        )  # its own copies, not adopted yet, stay
        monkeypatch.setattr(images, "adopt", real)
        await driver.submit("tick")
        assert contents(rig) == {"data.qcow2": "copy", "root.raw": "copy"}

    run(scenario())


def test_copies_of_earlier_generations_are_swept_and_poweroff_leaves_only_the_images(rig):
    async def scenario():
        with_images(rig, FtState.NEED_SECONDARY, primary="h1", secondary=None, generation=5)
        record = records.load(rig.datastore, "vm")
        spec = vmspec.from_record(record.guest)
        old = {
            str(images.copy_path(d.path, "vm", "h3", 4)) for d in spec.disks
        }  # a host that never came back
        current = {str(images.copy_path(d.path, "vm", "h2", 5)) for d in spec.disks}
        made(old | current)
        (rig.datastore / ".root.raw.other.ft-h3-g1").write_text("another VM's")
        driver = await rig.driver()
        await rig.running_side(driver, "primary", generation=5, watcher=False)
        await driver.sweep_copies(record)
        assert {str(p) for p, _h, _g in images.copies_of([d.path for d in spec.disks], "vm")} == current
        await driver.submit("poweroff", body={})
        assert images.copies_of([d.path for d in spec.disks], "vm") == []
        assert contents(rig) == {"data.qcow2": "image", "root.raw": "image"}
        assert (rig.datastore / ".root.raw.other.ft-h3-g1").exists()

    run(scenario())


def test_a_lost_pair_powered_off_keeps_the_data_of_the_secondary_that_ran_it_last(rig):
    """Its secondary went live (it holds the token) and then its host died before its daemon
    renamed anything: the newest data is in that secondary's copies."""

    async def scenario():
        with_images(rig, FtState.LOST, primary="h2", secondary="h3")
        spec = vmspec.from_record(records.load(rig.datastore, "vm").guest)
        h3 = {str(images.copy_path(d.path, "vm", "h3", 3)): d.path for d in spec.disks}
        made(h3, "newest")
        assert arbiter.claim(rig.datastore, "vm", 3, "h3/secondary").won
        driver = await rig.driver()
        await driver.submit("poweroff", body={})
        assert contents(rig) == {"data.qcow2": "newest", "root.raw": "newest"}
        assert records.load(rig.datastore, "vm") is None

    run(scenario())


def test_a_copys_name_says_whose_it_is():
    copy = images.copy_path("/ds/vms/db1-root.qcow2", "db1", "lab-h2", 12)
    assert copy == images.Path("/ds/vms/.db1-root.qcow2.db1.ft-lab-h2-g12")
    assert images.generation_of(str(copy)) == 12
    m = images.COPY.match(copy.name)
    assert (m["image"], m["vm"], m["host"]) == ("db1-root.qcow2", "db1", "lab-h2")


def test_a_poweroff_right_after_a_failover_waits_for_the_disk_commit(rig):
    """Found by bench/database-local: after a takeover QEMU commits block replication's overlays
    (in the run directory) into the copies in an internal job. A VM powered off before it ended
    lost its newest writes: the adopted image lacked them. A real QMP client against a fake QEMU
    whose overlay node goes once the commit ends."""

    async def scenario():
        rig.record(FtState.NEED_SECONDARY, primary="h1", secondary=None)
        driver = await rig.driver()
        entry = await rig.running_side(driver, "secondary", watcher=False)
        entry.role = "primary"  # this host's secondary took over
        rig.local.put(entry)
        rig.qmp.answers["query-named-block-nodes"] = [
            {"node-name": "#b1", "file": str(rig.run_dir / "vm.active.qcow2")}
        ]
        alive_when_committed = []

        async def commit_ends():
            await asyncio.sleep(0.5)
            alive_when_committed.append(entry.qemu.alive())
            rig.qmp.answers["query-named-block-nodes"] = []

        ender = asyncio.create_task(commit_ends())
        await driver.submit("poweroff", body={})
        await ender
        assert alive_when_committed == [True] and not entry.qemu.alive()

    run(scenario())


def test_a_disk_commit_that_does_not_end_refuses_the_poweroff_and_stops_nothing(rig, monkeypatch):
    async def scenario():
        monkeypatch.setattr(pairs, "OVERLAY_COMMIT_TIMEOUT_S", 0.3)
        rig.record(FtState.NEED_SECONDARY, primary="h1", secondary=None)
        driver = await rig.driver()
        entry = await rig.running_side(driver, "secondary", watcher=False)
        entry.role = "primary"
        rig.local.put(entry)
        rig.qmp.answers["query-named-block-nodes"] = [
            {"node-name": "#b1", "file": str(rig.run_dir / "vm.hidden.qcow2")}
        ]
        refused = r"vm\.hidden\.qcow2 into its disks has not ended within 0\.3 s"
        with pytest.raises(pairs.Conflict, match=refused):
            await driver.submit("poweroff", body={})
        assert entry.qemu.alive() and records.load(rig.datastore, "vm") is not None

    run(scenario())
