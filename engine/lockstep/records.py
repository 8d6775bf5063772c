"""Pair records on the shared datastore: one versioned JSON record per protected VM.

Every write is a compare-and-swap: a record read at version N is saved as version N+1 by
hard-linking a fully written file to `<pair>/<N+1>.json`. link() is atomic on a local
filesystem and on NFS (the server decides), so of two writers that read version N only one
lands N+1; the other gets `Stale` and must read again. A stale owner (a fenced primary's daemon,
a host back from a partition) therefore can never overwrite what the new owner wrote. `head`
is only a hint for readers; the newest version file is the truth. A deleted pair is a
tombstone version, so a name used again continues the same sequence."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .state import FtState, Reason

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")  # a VM's name: it names files, sockets and taps
MAX_EVENTS = 50  # the record keeps the latest events; the full history is in each host's log
KEEP_VERSIONS = 4  # older version files are pruned


class Stale(Exception):
    """Another writer saved this record after it was read: read it again and decide again."""


@dataclass
class Side:
    host: str
    slot: str  # the role this QEMU was started in: names its sockets and tap on that host


@dataclass
class Record:
    name: str
    guest: dict  # the VM's spec (vmspec.to_dict; no spec_version: the earlier flat shape)
    primary: Side
    secondary: Side | None = None
    state: FtState = FtState.NOT_CONFIGURED
    reason: Reason = Reason.INITIALIZING
    generation: int = 0
    ports_base: int = 9000
    mode: str = "checkpoint"
    checkpoint_ms: int = 100
    preferred_secondary: str | None = None
    events: list[dict] = field(default_factory=list)
    before_lost: FtState | None = None  # the state it had when it was recorded lost
    version: int = 0  # of the stored record this was read from (0: never stored)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        """A record as stored; ValueError for one whose names could reach outside the engine's
        own files (anyone who can write the export can write a record: review R22)."""
        d = dict(d)
        name = d.get("name")
        if not isinstance(name, str) or not NAME.match(name) or d.get("guest", {}).get("name", name) != name:
            raise ValueError(f"a record named {name!r} is not a valid VM name")
        d["primary"] = Side(**d["primary"])
        d["secondary"] = Side(**d["secondary"]) if d.get("secondary") else None
        d["state"], d["reason"] = FtState(d["state"]), Reason(d["reason"])
        d["before_lost"] = FtState(d["before_lost"]) if d.get("before_lost") else None
        return cls(**d)

    def hosts(self) -> set[str]:
        return {self.primary.host} | ({self.secondary.host} if self.secondary else set())


def directory(datastore: Path) -> Path:
    return Path(datastore) / ".ft" / "pairs"


def _version_file(pair_dir: Path, version: int) -> Path:
    return pair_dir / f"{version:010d}.json"


def _versions(pair_dir: Path) -> list[int]:
    return sorted(int(p.stem) for p in pair_dir.glob("*.json") if p.stem.isdigit())


def _newest(pair_dir: Path) -> int:
    """The newest version of a pair: from the head hint, probing upward (an open() by name is
    close-to-open consistent on NFS, a directory listing may not be)."""
    try:
        version = int((pair_dir / "head").read_text())
    except (OSError, ValueError):
        version = max(_versions(pair_dir), default=0)
    while _version_file(pair_dir, version + 1).exists():
        version += 1
    return version


def read(datastore: Path, name: str) -> tuple[int, dict | None]:
    """(version, the stored dict or None) of a pair; (0, None) when it never existed."""
    pair_dir = directory(datastore) / name
    for _ in range(5):  # a writer may prune the version just found: look again
        version = _newest(pair_dir)
        if version == 0:
            return 0, None
        try:
            data = json.loads(_version_file(pair_dir, version).read_text())
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                (pair_dir / "head").unlink()
            continue
        return version, None if data.get("deleted") else data
    raise OSError(f"{name}: its record kept changing while being read")


def load(datastore: Path, name: str) -> Record | None:
    version, data = read(datastore, name)
    if data is None:
        return None
    record = Record.from_dict(data)
    record.version = version
    return record


def scan(datastore: Path) -> tuple[dict[str, Record], dict[str, str]]:
    """Every pair's record, and the names whose record cannot be read with why (reported, never
    silently dropped: a record nobody can read still holds a VM and its caps)."""
    records, unreadable = {}, {}
    d = directory(datastore)
    for pair_dir in sorted(d.iterdir()) if d.is_dir() else []:
        if not pair_dir.is_dir():
            continue
        try:
            record = load(datastore, pair_dir.name)
        except (ValueError, KeyError, TypeError) as e:
            unreadable[pair_dir.name] = f"{type(e).__name__}: {e}"
            continue
        if record is not None:
            records[record.name] = record
    return records, unreadable


def load_all(datastore: Path) -> dict[str, Record]:
    return scan(datastore)[0]


def _write(datastore: Path, name: str, expected: int, data: dict) -> int:
    pair_dir = directory(datastore) / name
    pair_dir.mkdir(parents=True, exist_ok=True)
    new = expected + 1
    tmp = pair_dir / f".{new}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=1))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, _version_file(pair_dir, new))
        except FileExistsError:
            if os.stat(tmp).st_nlink != 2:  # not a lost reply to our own link: someone else's
                raise Stale(f"{name}: version {new} was written by another host meanwhile") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    hint = pair_dir / f".head.{os.getpid()}.{secrets.token_hex(4)}"
    with contextlib.suppress(OSError):
        hint.write_text(str(new))
        os.rename(hint, pair_dir / "head")
    for old in _versions(pair_dir):
        if old <= new - KEEP_VERSIONS:
            with contextlib.suppress(OSError):
                _version_file(pair_dir, old).unlink()
    return new


def save(datastore: Path, record: Record) -> None:
    """Store the record as the version after the one it was read from (Stale if that is gone)."""
    record.events = record.events[-MAX_EVENTS:]
    data = asdict(record)
    data.pop("version")
    record.version = _write(datastore, record.name, record.version, data)


def create(datastore: Path, record: Record) -> None:
    """Store a new pair's record; Stale if a live record of that name exists. A name used
    before continues its generations, so the split-brain tokens of the old pair never count."""
    version, data = read(datastore, record.name)
    if data is not None:
        raise Stale(f"a VM named {record.name!r} exists already")
    if version:
        old = json.loads(_version_file(directory(datastore) / record.name, version).read_text())
        record.generation = max(record.generation, old.get("generation", 0) + 1)
    record.version = version
    save(datastore, record)


def delete(datastore: Path, record: Record) -> None:
    """A tombstone version after the one the record was read from (Stale if that is gone)."""
    tombstone = {"deleted": True, "name": record.name, "generation": record.generation}
    record.version = _write(datastore, record.name, record.version, tombstone)
