"""The audit every fault test ends with: one copy of the pair talks on the VM network, the record
equals what runs, nothing of the pair is left where it should not be, every lockstepd answers.
Read from the lab hosts themselves (their processes, links and the datastore), never from what
the engine says about itself."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from lockstep import colo, images, records, vmspec

from . import engine
from . import topology as t
from .proc import LabError

HOSTS = (1, 2, 3)


def qemus(index: int, name: str) -> list[int]:
    return engine.processes(index, f"-name {name} (")


def watchers(index: int, name: str) -> list[int]:
    return [p for p in engine.processes(index, f" watch --pair {name} ") if stopped(p) is not None]


def stopped(pid: int) -> bool | None:
    """Whether a process is stopped (SIGSTOP), None when it is gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else state == "T"


def taps(index: int, name: str) -> dict[str, bool]:
    """The pair's taps on a lab host and whether each is up."""
    out = subprocess.run(["ip", "netns", "exec", t.host(index).netns, "ip", "-j", "link"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    mine = {tap for role in ("primary", "secondary") for tap in colo.tap_names(name, role)}  # every NIC's
    return {
        link["ifname"]: "UP" in link.get("flags", []) for link in json.loads(out) if link["ifname"] in mine
    }


def talking(name: str) -> list[int]:
    """The lab hosts where a running QEMU of the pair has its tap up: where it talks."""
    return [
        i for i in HOSTS if [p for p in qemus(i, name) if stopped(p) is False] and any(taps(i, name).values())
    ]


def problems(name: str, gone: bool = False) -> list[str]:
    """Everything wrong with the pair now; empty when all is as it must be (gone: the pair was
    powered off, nothing of it may be left)."""
    found: list[str] = []
    record = records.load(t.DATASTORE, name)
    running = {i: [p for p in qemus(i, name) if stopped(p) is False] for i in HOSTS}
    tap_state = {i: taps(i, name) for i in HOSTS}
    talking = {i: [tap for tap, up in tap_state[i].items() if up] for i in HOSTS}
    live = [i for i in HOSTS if running[i] and talking[i]]
    for i in HOSTS:
        try:
            answers = engine.call(i, "GET", "/status")[0] == 200
        except OSError:
            answers = False
        if not answers:
            found.append(f"lockstepd on lab-h{i} does not answer")
        if talking[i] and not running[i]:
            found.append(f"lab-h{i}: tap {talking[i]} up with no running QEMU of {name}")
        if len(running[i]) > 1:
            found.append(f"lab-h{i} runs {len(running[i])} QEMUs of {name}")
    if gone or record is None:
        if left := sorted(p.name for p in t.DATASTORE.rglob(f".*.{name}.ft-*")):
            found.append(f"copies of {name}'s images left on the datastore: {left}")
        if record is not None:
            found.append(f"{name} was powered off but its record remains ({record.state})")
        found += [f"lab-h{i} still runs a QEMU of {name}" for i in HOSTS if qemus(i, name)]
        found += [f"lab-h{i} still has taps of {name}: {sorted(tap_state[i])}" for i in HOSTS if tap_state[i]]
        found += [f"lab-h{i} still runs a watcher of {name}" for i in HOSTS if watchers(i, name)]
        return found
    if record.state == "lost":
        found += [f"{name} is recorded lost but lab-h{i} runs it" for i in live]
        return found
    if len(live) != 1:
        found.append(
            f"{len(live)} copies of {name} talk on the VM network (on {[f'lab-h{i}' for i in live]})"
        )
    primary = engine.index(record.primary.host)
    if primary not in live:
        found.append(f"the record says {record.primary.host} runs {name}, but it does not talk there")
    secondary = engine.index(record.secondary.host) if record.secondary else None
    if record.state == "running" and (secondary is None or not running[secondary]):
        found.append(f"{name} is running but no secondary QEMU runs on {record.secondary}")
    expected_hosts = {primary} | (
        {secondary} if record.state in ("running", "starting") and secondary else set()
    )
    for i in HOSTS:
        if i not in expected_hosts and qemus(i, name):
            found.append(f"lab-h{i} runs a QEMU of {name} that the record does not know (orphan)")
        if i not in expected_hosts and tap_state[i]:
            found.append(f"lab-h{i} has a tap of {name} that nothing uses: {sorted(tap_state[i])}")
        if watchers(i, name) and (record.state not in ("running", "starting") or i not in expected_hosts):
            found.append(f"lab-h{i} runs a watcher of {name} while it is {record.state}")
    paths = [d.path for d in vmspec.from_record(record.guest).disks if not d.create]
    copies = {(host, gen) for _p, host, gen in images.copies_of(paths, name)}
    wanted = {(record.secondary.host, record.generation)} if record.secondary else set()
    if record.state == "running" and copies != (wanted if paths else set()):
        found.append(f"copies of {name}'s images: {sorted(copies)}, where only the secondary's "
                     f"{sorted(wanted)} may be")  # fmt: skip
    token_dir = t.DATASTORE / ".ft" / name
    future = [
        p.name
        for p in token_dir.glob("gen-*.token")
        if int(p.name.split("-")[1].split(".")[0]) > record.generation
    ]
    if future:
        found.append(f"tokens of generations after the record's {record.generation}: {future}")
    return found


def settled(name: str, timeout: float = 60, gone: bool = False) -> list[str]:
    """Wait until the audit is clean (the engine converges on its own), or the deadline; what
    is still wrong then."""
    deadline = time.monotonic() + timeout
    while found := problems(name, gone):
        if time.monotonic() > deadline:
            return found
        time.sleep(0.25)
    return []


def clean(name: str, timeout: float = 60, gone: bool = False) -> None:
    if found := settled(name, timeout, gone):
        raise LabError(f"audit of {name}: " + "; ".join(found))
