"""Pair records on a directory standing for the datastore: versioned writes that refuse a stale
writer, unreadable records reported (never silently dropped), deletion as a tombstone."""

from __future__ import annotations

import threading

import pytest

from lockstep import records
from lockstep.records import Record, Side, Stale
from lockstep.state import FtState, Reason


def record(name: str = "vm1") -> Record:
    return Record(name=name, guest={"memory_mib": 256}, primary=Side("h1", "primary"), state=FtState.RUNNING)


def test_a_record_round_trips_with_its_version(tmp_path):
    r = record()
    records.create(tmp_path, r)
    assert r.version == 1
    assert records.load(tmp_path, "vm1") == r
    r.reason = Reason.ENTERED_LOCKSTEP
    records.save(tmp_path, r)
    assert records.load(tmp_path, "vm1") == r and r.version == 2


def test_a_writer_that_read_an_older_version_is_refused_and_changes_nothing(tmp_path):
    """Lost update between hosts (review R13/F8): the fenced old owner saves what it read before
    the failover; the new owner's record stays."""
    records.create(tmp_path, record())
    old_owner, new_owner = records.load(tmp_path, "vm1"), records.load(tmp_path, "vm1")
    new_owner.primary, new_owner.state = Side("h2", "secondary"), FtState.NEED_SECONDARY
    records.save(tmp_path, new_owner)
    old_owner.checkpoint_ms = 50
    with pytest.raises(Stale):
        records.save(tmp_path, old_owner)
    assert records.load(tmp_path, "vm1") == new_owner


def test_of_many_writers_of_one_version_exactly_one_lands(tmp_path):
    records.create(tmp_path, record())
    readers = [records.load(tmp_path, "vm1") for _ in range(8)]
    landed, barrier = [], threading.Barrier(8)

    def write(i: int, r: Record) -> None:
        r.checkpoint_ms = 100 + i
        barrier.wait()
        try:
            records.save(tmp_path, r)
            landed.append(i)
        except Stale:
            pass

    threads = [threading.Thread(target=write, args=(i, r)) for i, r in enumerate(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(landed) == 1
    assert records.load(tmp_path, "vm1").checkpoint_ms == 100 + landed[0]


def test_a_torn_or_foreign_record_is_reported_not_dropped(tmp_path):
    records.create(tmp_path, record("vm1"))
    records.create(tmp_path, record("vm2"))
    (records.directory(tmp_path) / "vm2" / "0000000002.json").write_text('{"name": "vm2", ')
    found, unreadable = records.scan(tmp_path)
    assert list(found) == ["vm1"] and list(unreadable) == ["vm2"]


def test_old_versions_are_pruned_and_a_stale_head_hint_is_harmless(tmp_path):
    r = record()
    records.create(tmp_path, r)
    for i in range(10):
        r.checkpoint_ms = i + 1
        records.save(tmp_path, r)
    pair_dir = records.directory(tmp_path) / "vm1"
    assert len(list(pair_dir.glob("*.json"))) == records.KEEP_VERSIONS
    (pair_dir / "head").write_text("1")  # a hint left behind by a writer that died
    assert records.load(tmp_path, "vm1") == r


def test_a_deleted_pairs_name_used_again_continues_its_generations(tmp_path):
    """So the old pair's split-brain tokens (one per generation) never count for the new one."""
    r = record()
    r.generation = 5
    records.create(tmp_path, r)
    records.delete(tmp_path, r)
    assert records.load(tmp_path, "vm1") is None and records.scan(tmp_path) == ({}, {})
    with pytest.raises(Stale):
        records.delete(tmp_path, records.load(tmp_path, "vm1") or record())  # version 0: stale
    again = record()
    records.create(tmp_path, again)
    assert again.generation == 6
    with pytest.raises(Stale, match="exists already"):
        records.create(tmp_path, record())


def test_a_record_whose_name_could_reach_outside_the_engines_files_is_unreadable(tmp_path):
    """Review R22: a record with ../ in its name made a secondary create files as root outside
    run_dir. Anyone who can write the NFS export can write a record."""
    records.create(tmp_path, record("vm1"))
    evil = records.directory(tmp_path) / "evil"
    evil.mkdir()
    good = (records.directory(tmp_path) / "vm1" / "0000000001.json").read_text()
    (evil / "0000000001.json").write_text(good.replace('"name": "vm1"', '"name": "../../etc/evil"'))
    found, unreadable = records.scan(tmp_path)
    assert list(found) == ["vm1"] and "not a valid VM name" in unreadable["evil"]
