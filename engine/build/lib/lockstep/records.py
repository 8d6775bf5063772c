"""Pair records on the shared datastore: one JSON file per protected VM, written atomically
(write a temporary file, then rename over the old one - atomic on a local filesystem and NFS), so
a restarted daemon, or any other host, picks every pair up where it was."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .state import FtState, Reason

MAX_EVENTS = 50  # the record keeps the latest events; the full history is in each host's log


@dataclass
class Side:
    host: str
    slot: str  # the role this QEMU was started in: names its sockets and tap on that host


@dataclass
class Record:
    name: str
    guest: dict  # colo.Guest's fields
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        d = dict(d)
        d["primary"] = Side(**d["primary"])
        d["secondary"] = Side(**d["secondary"]) if d.get("secondary") else None
        d["state"], d["reason"] = FtState(d["state"]), Reason(d["reason"])
        return cls(**d)

    def hosts(self) -> set[str]:
        return {self.primary.host} | ({self.secondary.host} if self.secondary else set())


def directory(datastore: Path) -> Path:
    return Path(datastore) / ".ft" / "pairs"


def save(datastore: Path, record: Record) -> None:
    d = directory(datastore)
    d.mkdir(parents=True, exist_ok=True)
    record.events = record.events[-MAX_EVENTS:]
    tmp = d / f".{record.name}.json.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(record.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, d / f"{record.name}.json")


def load(datastore: Path, name: str) -> Record | None:
    try:
        return Record.from_dict(json.loads((directory(datastore) / f"{name}.json").read_text()))
    except FileNotFoundError:
        return None


def load_all(datastore: Path) -> dict[str, Record]:
    out = {}
    d = directory(datastore)
    if d.is_dir():
        for path in sorted(d.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
                r = Record.from_dict(json.loads(path.read_text()))
                out[r.name] = r
    return out


def delete(datastore: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory(datastore) / f"{name}.json").unlink()
