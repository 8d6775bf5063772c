"""QMP connections to QEMU processes, through the qemu.qmp library.

qemu.qmp (0.0.5) keeps every event it hears: each QMPClient registers a default all-events
EventListener (client.events) whose queue nobody drains, and every EventListener appends each
event to its _history as well. STOP and RESUME come with every checkpoint, so a connection to a
replicating QEMU grows by about 2 KB per checkpoint, for ever. connect() therefore returns a
client without the default listener, and consumers listen with a BoundedListener."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterable

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.message import Message


class BoundedListener(EventListener):
    """An EventListener that keeps no history and at most maxsize pending events: when full, the
    oldest pending event is dropped for the new one (a consumer that counts or waits for events
    loses nothing it needs, and a consumer that stopped reading costs nothing)."""

    def __init__(self, names: Iterable[str] | str | None = None, maxsize: int = 1000) -> None:
        super().__init__(names if isinstance(names, str | None) else tuple(names))
        self._queue = asyncio.Queue(maxsize)

    @property
    def history(self) -> tuple[Message, ...]:
        return ()

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(event)


def client(name: str | None = None) -> QMPClient:
    """A QMPClient without the library's default all-events listener."""
    c = QMPClient(name)
    # remove_listener() refuses the default listener, so it is taken out of the list directly
    c._listeners.remove(c.events)
    return c


async def connect(
    path: str, timeout: float = 10.0, name: str | None = None, proc: subprocess.Popen | None = None
) -> QMPClient:
    """Connect to a QEMU's QMP server socket, retrying until QEMU has created it (or, given
    its process, until that process has exited). The client keeps no events of its own:
    register a BoundedListener for those you need."""
    deadline = time.monotonic() + timeout
    while True:
        c = client(name)
        try:
            await c.connect(path)
            return c
        except Exception:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise
            await asyncio.sleep(0.05)
