"""This host's processes of the pairs: each pair's QEMU here, its watcher and its journal, kept in
run_dir/lockstepd.json so that a restarted daemon adopts them (QEMUs and watchers outlive it).

A process is known by its PID *and* its start time, so a PID the kernel reused after a reboot
or a crash is never taken for (or killed as) one of ours. Killing waits without blocking the
event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path


def start_time(pid: int | None) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None when it
    is not running (a zombie is not running: it is reaped here if it is our child). A zombie
    thread-group leader whose other threads still exit is running: they hold its files and locks
    (found by bench/faults: a VM started again right after its QEMU was killed could not lock its
    disk, 1 run in 20)."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X") and len(list_dir(f"/proc/{pid}/task")) > 1:
        return int(fields[19])
    if fields[0] in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return int(fields[19])


def list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


@dataclass(frozen=True)
class Proc:
    pid: int
    started: int | None  # start_time() when it was launched

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, start_time(pid))

    def alive(self) -> bool:
        return self.started is not None and start_time(self.pid) == self.started

    async def kill(self, within: float = 10.0) -> bool:
        """SIGKILL, then wait (polling, off nothing) until it is gone; whether it went."""
        if not self.alive():
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.alive():
            if loop.time() > deadline:
                return False  # in D state on a hung NFS: it cannot run; say so, do not hang
            await asyncio.sleep(0.02)
        return True


@dataclass
class Local:
    """A QEMU of a pair on this host, and its watcher."""

    name: str
    slot: str  # the role it was started in (names its sockets and tap)
    role: str  # what it is now: primary or secondary
    qemu: Proc
    generation: int = 0
    watcher: Proc | None = None
    journal: str | None = None  # the watcher's JSON lines
    # a secondary's copies of the disk images on the datastore (copy -> image, images.py): they
    # become the images if this side goes live, and go when its QEMU goes otherwise
    copies: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Local:
        d = dict(d)
        d["qemu"] = Proc(**d["qemu"])
        d["watcher"] = Proc(**d["watcher"]) if d.get("watcher") else None
        return cls(**d)


class LocalProcesses:
    """The owner of `lockstepd.json`. Each pair's driver changes only its own entry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Local] = {}

    def saved(self) -> dict[str, Local]:
        """What a previous run of the daemon left (entries it cannot read are reported, not lost)."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise ValueError(f"{self.path} is not JSON: {e}") from None
        return {name: Local.from_dict(entry) for name, entry in raw.items()}

    def get(self, name: str) -> Local | None:
        return self.entries.get(name)

    def put(self, entry: Local) -> None:
        self.entries[entry.name] = entry
        self.persist()

    def pop(self, name: str) -> Local | None:
        entry = self.entries.pop(name, None)
        self.persist()
        return entry

    def persist(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: e.to_dict() for n, e in self.entries.items()}))
        os.rename(tmp, self.path)
