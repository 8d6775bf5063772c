"""Faults of the shared datastore as one lab host sees it. Every lab host sees the datastore at
the same path of one filesystem; inside a host's own mount namespace that path can be covered:
- "hang": a FUSE mirror of the datastore (bindfs) whose server is then SIGSTOPped - every access
  blocks, as on a hard NFS mount whose server went away;
- "gone": the same mirror with its server killed - every access fails at once (ENOTCONN), as on
  a soft mount (EIO, ESTALE);
- "unmounted": an empty tmpfs over the path - the mount is missing and the directory underneath
  shows through, the case where a host must never decide anything;
- "mirror": the FUSE mirror, working until the `hang()` the context gives is called - so that a
  QEMU started meanwhile opens its files through it, and blocks on them once it hangs.
Only that host is affected; leaving the context puts the datastore back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from . import engine
from . import topology as t
from .proc import LabError, in_node, spawn, wait_for

KINDS = ("hang", "gone", "unmounted", "mirror")


def _in_host(index: int, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        in_node(engine.holder(index), list(cmd)), capture_output=True, text=True, timeout=30
    )


def _mounted(index: int) -> str:
    """The filesystem type mounted at the datastore path in the host, or ''."""
    with open(f"/proc/{engine.holder(index)}/mounts") as f:
        found = [line.split()[2] for line in f if line.split()[1] == str(t.DATASTORE)]
    return found[-1] if found else ""


@contextlib.contextmanager
def datastore(index: int, kind: str):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    server = None
    if kind == "unmounted":
        done = _in_host(index, "mount", "-t", "tmpfs", "none", str(t.DATASTORE))
        if done.returncode:
            raise LabError(f"cannot cover the datastore on lab-h{index}: {done.stderr}")
    else:
        log = t.host(index).dir / "bindfs.log"
        server = spawn(
            in_node(engine.holder(index), ["bindfs", "-f", str(t.DATASTORE), str(t.DATASTORE)]), log
        )
        wait_for(f"the FUSE datastore on lab-h{index}", lambda: _mounted(index).startswith("fuse"), 10)
        if kind != "mirror":
            os.kill(server, signal.SIGSTOP if kind == "hang" else signal.SIGKILL)

    def hang() -> None:
        os.kill(server, signal.SIGSTOP)

    try:
        yield hang
    finally:
        if server is not None and kind in ("hang", "mirror"):
            os.kill(server, signal.SIGCONT)
        while _mounted(index) in ("tmpfs", "fuse", "fuse.bindfs"):
            done = _in_host(index, "umount", "-l", str(t.DATASTORE))
            if done.returncode:
                raise LabError(f"cannot put the datastore back on lab-h{index}: {done.stderr}")
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)
