"""Statistics of a pair whose primary runs here: every checkpoint stops the primary and resumes
it (QMP STOP, RESUME), so they are counted and their pauses timed; the time since the last one
is the lockstep interval. Bounded: the latest pauses only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import qmp

PAUSES_KEPT = 1000


@dataclass
class Stats:
    checkpoints: int = 0
    pauses_ms: deque = field(default_factory=lambda: deque(maxlen=PAUSES_KEPT))
    last_checkpoint: float | None = None
    stopped_at: float | None = None
    transferred: int | None = None
    sampled_at: float | None = None
    log_mbps: float = 0.0
    secondary: dict = field(default_factory=dict)

    def view(self) -> dict:
        pauses = sorted(self.pauses_ms)
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

    def on_event(self, event: dict) -> None:
        at = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
        if event["event"] == "STOP":
            self.stopped_at = at
        elif event["event"] == "RESUME" and self.stopped_at is not None:
            self.checkpoints += 1
            self.pauses_ms.append((at - self.stopped_at) * 1000)
            self.last_checkpoint, self.stopped_at = at, None


def latency_band(interval: float | None) -> str:
    if interval is None or interval < 2:
        return "green"
    return "yellow" if interval < 6 else "red"


def listen(client, stats: Callable[[], Stats], on_guest_shutdown: Callable[[], None]) -> asyncio.Task:
    """Count a QEMU's checkpoints into stats() and report the guest powering itself off; the
    task ends when the QMP connection does (cancel it when the VM is dropped)."""
    listener = qmp.BoundedListener(("STOP", "RESUME", "SHUTDOWN"))
    client.register_listener(listener)

    async def consume() -> None:
        try:
            async for event in listener:
                if event["event"] == "SHUTDOWN":
                    if event.get("data", {}).get("guest"):
                        on_guest_shutdown()
                else:
                    stats().on_event(event)
        finally:
            with contextlib.suppress(Exception):
                client.remove_listener(listener)

    return asyncio.create_task(consume())


def ft_tx_bytes(iface: str | None) -> int:
    """Bytes this host sent on its FT-logging interface (its network namespace's /proc/net/dev).
    QEMU counts no bytes per pair in COLO, so the log bandwidth is the link's."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, counters = line.partition(":")
        if name.strip() == iface:
            return int(counters.split()[8])
    return 0


def free_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


def process_stats(pid: int) -> dict:
    """CPU (percent of one CPU since the process started) and resident memory of a QEMU."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - int(fields[19]) / ticks
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        return {"cpu_percent": round(100 * cpu / age, 1) if age > 0 else None, "rss_mib": round(rss, 1)}
    return {}
