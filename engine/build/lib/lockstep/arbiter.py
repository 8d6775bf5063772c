"""Split-brain arbitration on the shared datastore.

When the two sides of a pair lose each other, each may believe the other dead. Before a side
goes live (or continues alone) it must win the token for the pair's current generation,
<datastore>/.ft/<pair>/gen-<N>.token. A side writes its name to a file of its own and hard-links
it to the token name: link() is atomic on a local filesystem and on NFS (the classic NFS lock;
a lost reply to a successful link is recognised by the link count of 2), so exactly one side
wins, and the token never exists without its winner's name in it. A side that cannot reach the
datastore cannot win, and so never goes live."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Verdict:
    won: bool
    holder: str | None  # who holds the token; None when the datastore could not be read
    error: str | None = None


def token_path(datastore: Path, pair: str, generation: int) -> Path:
    return Path(datastore) / ".ft" / pair / f"gen-{generation}.token"


def claim(datastore: Path, pair: str, generation: int, me: str) -> Verdict:
    """Try to take the pair's token for this generation; the verdict says who holds it."""
    token = token_path(datastore, pair, generation)
    mine = token.with_name(f"{token.name}.{me}.{os.getpid()}")
    try:
        token.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text(f"{me}\n")
        try:
            os.link(mine, token)
        except FileExistsError:
            if os.stat(mine).st_nlink != 2:
                holder = token.read_text().strip()
                return Verdict(holder == me, holder)
        return Verdict(True, me)
    except OSError as e:
        return Verdict(False, None, f"datastore unreachable: {e}")
    finally:
        with contextlib.suppress(OSError):
            mine.unlink()
