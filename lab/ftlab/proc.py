"""Running commands on the controller and inside namespace nodes, and finding their processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class LabError(Exception):
    """A failure the operator can act on; the CLI prints it without a traceback."""

    exit_code = 1


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    """Run a command, return its stdout; on failure raise LabError with the command's stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def succeeds(cmd: Sequence[str]) -> bool:
    return subprocess.run(list(cmd), capture_output=True).returncode == 0


def in_node(holder_pid: int, cmd: Sequence[str]) -> list[str]:
    """The command line that runs cmd inside the network, mount and UTS namespaces of a node."""
    return ["nsenter", "-t", str(holder_pid), "--net", "--mount", "--uts", "--", *cmd]


def spawn(cmd: Sequence[str], log: Path) -> int:
    """Start a long-running process detached from us, output to log; return its PID."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    return proc.pid


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_for(what: str, ready: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
    """Poll ready() until it holds or the deadline passes (then LabError naming what)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def netns_inode(netns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{netns}").st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(inode: int) -> list[int]:
    """Every process whose network namespace is the one with this inode."""
    want = f"net:[{inode}]"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == want:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def terminate(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM the processes, then SIGKILL whatever is still there after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            wait_for("processes to exit", lambda: not any(alive(p) for p in pids), grace, 0.05)
            return
        except LabError:
            continue
