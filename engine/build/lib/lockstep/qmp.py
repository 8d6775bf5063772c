"""QMP connections to QEMU processes, through the qemu.qmp library."""

from __future__ import annotations

import asyncio
import subprocess
import time

from qemu.qmp import QMPClient


async def connect(
    path: str, timeout: float = 10.0, name: str | None = None, proc: subprocess.Popen | None = None
) -> QMPClient:
    """Connect to a QEMU's QMP server socket, retrying until QEMU has created it (or, given
    its process, until that process has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        client = QMPClient(name)
        try:
            await client.connect(path)
            return client
        except Exception:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise
            await asyncio.sleep(0.05)
