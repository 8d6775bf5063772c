"""Capability probe: does a host's QEMU have what an FT pair needs, and is it the same build as
the other host's? Run QEMU with no machine, ask QMP, quit: nothing of a VM is started."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .qmp import connect

NEEDED_OBJECTS = ("colo-compare", "filter-mirror", "filter-redirector", "filter-rewriter")
NEEDED_DRIVERS = ("quorum", "replication", "nbd")


class ProbeError(Exception):
    pass


@dataclass(frozen=True)
class Capabilities:
    version: str  # "7.2.19"
    package: str  # the build, e.g. "Debian 1:7.2+dfsg-7+deb12u18+b3"
    x_colo: bool
    objects: frozenset[str]
    drivers: frozenset[str]
    machines: frozenset[str] = frozenset()  # machine types and their aliases (pc, q35, pc-q35-7.2, ...)

    @property
    def passive_secondary(self) -> bool:
        """Whether this build keeps a secondary started with -S passive (checkpoint mode): the
        lab's QEMU (lab/qemu/build, "+ft-" in its package string) does; stock 7.2 runs it."""
        return "+ft-" in self.package

    def default_mode(self, accel: str) -> str:
        """lockstep (COLO compare) where both sides run at native speed; under TCG a running
        secondary cannot keep pace, so checkpoint mode where this build supports it."""
        if accel == "kvm" or not self.passive_secondary:
            return "lockstep"
        return "checkpoint"

    @property
    def build(self) -> str:
        return f"{self.version} ({self.package})" if self.package else self.version

    def missing(self) -> list[str]:
        """What this QEMU lacks for an FT pair, each as a reason an operator can act on."""
        reasons = []
        if not self.x_colo:
            reasons.append("migration capability x-colo is missing")
        reasons += [f"QOM type {o} is missing" for o in NEEDED_OBJECTS if o not in self.objects]
        reasons += [f"block driver {d} is missing" for d in NEEDED_DRIVERS if d not in self.drivers]
        return reasons


def compare(hosts: dict[str, Capabilities]) -> list[str]:
    """Every reason why these hosts cannot carry an FT pair together; empty when they can."""
    reasons = [f"{h}: {r}" for h, caps in hosts.items() for r in caps.missing()]
    builds = {caps.build for caps in hosts.values()}
    if len(builds) > 1:
        reasons.append(
            "hosts run different QEMU builds: " + ", ".join(f"{h} {c.build}" for h, c in hosts.items())
        )
    return reasons


def _enum_values(schema: list[dict], anchors: set[str]) -> set[str]:
    """Values of the enums that contain all anchors (introspection hides the enums' names)."""
    found = set()
    for entry in schema:
        if entry.get("meta-type") == "enum":
            values = set(entry.get("values", [])) | {m["name"] for m in entry.get("members", [])}
            if anchors <= values:
                found |= values
    return found


async def _probe(qemu: list[str], timeout: float) -> Capabilities:
    with tempfile.TemporaryDirectory(prefix="ft-probe-") as tmp:
        sock = str(Path(tmp) / "qmp.sock")
        argv = [
            *qemu,
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ]
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as e:
            raise ProbeError(f"cannot run {qemu[0]}: {e.strerror}") from None
        try:
            try:
                qmp = await connect(sock, timeout, proc=proc)
            except Exception:
                proc.kill()
                err = proc.communicate()[1].decode(errors="replace").strip()
                raise ProbeError(f"{' '.join(qemu)} did not answer QMP: {err or 'no output'}") from None
            try:
                version = await qmp.execute("query-version")
                schema = await qmp.execute("query-qmp-schema")
                types = {t["name"] for t in await qmp.execute("qom-list-types")}
                machines = await qmp.execute("query-machines")
            finally:
                with contextlib.suppress(Exception):
                    await qmp.disconnect()
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    q = version["qemu"]
    return Capabilities(
        version=f"{q['major']}.{q['minor']}.{q['micro']}",
        package=version.get("package", "").strip(),
        x_colo="x-colo" in _enum_values(schema, {"xbzrle", "postcopy-ram"}),  # MigrationCapability
        objects=frozenset(t for t in types if t in NEEDED_OBJECTS),
        drivers=frozenset(  # BlockdevDriver
            d for d in _enum_values(schema, {"file", "raw", "qcow2"}) if d in NEEDED_DRIVERS
        ),
        machines=frozenset(n for m in machines for n in (m["name"], m.get("alias")) if n),
    )


def probe(qemu: list[str], timeout: float = 15.0) -> Capabilities:
    """Probe one QEMU (qemu: the command that runs it, e.g. ["qemu-system-x86_64"])."""
    return asyncio.run(_probe(qemu, timeout))
