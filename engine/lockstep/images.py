"""The secondaries' copies of a VM's disk images, on the shared datastore (ADR 0006).

A secondary's copy of an image lives beside it, as `.<image>.<vm>.ft-<host>-g<generation>`, in
the image's format: one per secondary, since each generation has one. The image's own path
always names the VM's current disk: when a secondary goes live (it holds its generation's token),
its copy is renamed over the image - atomic on one filesystem, and a primary that is not dead yet
keeps writing only to the file it had open, no longer named. So a VM powered off after a
failover starts again from what it ran on, and a restart from the shared disk when no copy
survives finds the newest data under the name it knows.

A copy is removed by the host that made it when its QEMU is gone, and by the pair's owner when
it starts a new generation (a host that never came back cannot remove its own). Every function
here is blocking file work: the daemon runs them through the store's threads (store.call), whose
first argument is the datastore."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

COPY = re.compile(r"^\.(?P<image>.+)\.(?P<vm>[a-z0-9][a-z0-9-]*)\.ft-(?P<host>[\w.-]+)-g(?P<gen>\d+)$")


def copy_path(image: str, vm: str, host: str, generation: int) -> Path:
    p = Path(image)
    return p.with_name(f".{p.name}.{vm}.ft-{host}-g{generation}")


def copies_of(images: list[str], vm: str) -> list[tuple[Path, str, int]]:
    """Every copy of these images on the datastore: (path, host, generation)."""
    found = []
    for image in images:
        p = Path(image)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(p.parent):
                m = COPY.match(entry.name)
                if m and m["image"] == p.name and m["vm"] == vm:
                    found.append((Path(entry.path), m["host"], int(m["gen"])))
    return sorted(found)


def generation_of(copy: str) -> int:
    m = COPY.match(Path(copy).name)
    if not m:
        raise ValueError(f"{copy} is not a copy's name")
    return int(m["gen"])


def adopt(_datastore: Path, copies: dict[str, str]) -> list[str]:
    """Each copy (path -> its image) becomes the image; the caller holds the token of the copy's
    generation for this side. Idempotent: a copy already renamed is not there any more. The
    images adopted."""
    done = []
    for copy, image in copies.items():
        if os.path.exists(copy):
            os.rename(copy, image)
            done.append(image)
    for parent in {Path(i).parent for i in done}:  # the renames are durable before the record says so
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:  # (on NFS a rename is synchronous at the server already, and some refuse a directory's fsync)
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)
    return done


def remove(_datastore: Path, paths: list[str]) -> list[str]:
    """Remove these copies; those removed."""
    gone = []
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
            gone.append(p)
    return gone


def stale(_datastore: Path, images: list[str], vm: str, before: int | None, keep: set[str]) -> list[str]:
    """Copies of generations before `before` (None: of every generation, the VM powered off):
    their secondaries can never go live (the owner took each of those tokens before it started a
    new generation), so they are garbage - except the paths in `keep` (the owner's own copy while
    it is not adopted yet)."""
    return [
        str(p)
        for p, _host, gen in copies_of(images, vm)
        if (before is None or gen < before) and str(p) not in keep
    ]
