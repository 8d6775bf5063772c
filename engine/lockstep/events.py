"""lockstepd's events: JSON lines on stdout (the journal under systemd), in run_dir/events.log
and, when configured, POSTed to a webhook by one worker with a bounded queue (an event storm or a
dead webhook costs a counter, not a thread per event)."""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
import urllib.request
from pathlib import Path

WEBHOOK_QUEUE = 1000
LOG_BYTES = 16 << 20  # events.log is moved to events.log.1 past this size (the journal keeps all)


class EventLog:
    def __init__(
        self, host: str, path: Path, webhook: str | None = None, crash_after: str | None = None
    ) -> None:
        self.host, self.path, self.webhook = host, path, webhook
        self.crash_after = crash_after
        self.log_bytes = LOG_BYTES
        self.webhook_failures = 0
        self.webhook_dropped = 0
        self.pending: queue.Queue[dict] = queue.Queue(WEBHOOK_QUEUE)
        if webhook:
            threading.Thread(target=self._post_forever, name="webhook", daemon=True).start()

    def emit(self, event: str, **fields) -> dict:
        line = {"at": round(time.time(), 3), "host": self.host, "event": event, **fields}
        text = json.dumps(line, default=str)
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")
            full = f.tell() > self.log_bytes
        if full:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        if self.crash_after and self.crash_after in (event, f"{event}:{fields.get('step')}"):
            os.kill(os.getpid(), signal.SIGKILL)  # a fault test's crash point (LOCKSTEPD_CRASH_AFTER)
        if self.webhook:
            try:
                self.pending.put_nowait(line)
            except queue.Full:
                self.webhook_dropped += 1
        return line

    def _post_forever(self) -> None:
        while True:
            line = self.pending.get()
            request = urllib.request.Request(self.webhook, json.dumps(line, default=str).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            try:
                urllib.request.urlopen(request, timeout=5).close()
            except Exception:  # the webhook's health is a metric, not the daemon's problem
                self.webhook_failures += 1
