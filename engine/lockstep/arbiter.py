"""Split-brain arbitration on the shared datastore.

When the two sides of a pair lose each other, each may believe the other dead. Before a side
goes live (or continues alone) it must win the token for the pair's current generation,
<datastore>/.ft/<pair>/gen-<N>.token. A side writes its name to a file of its own and hard-links
it to the token name: link() is atomic on a local filesystem and on NFS (the classic NFS lock;
a lost reply to a successful link is recognised by the link count of 2, or by reading the token
back), so exactly one side wins, and the token never exists without its winner's name in it.
A side names itself "<host>/<role>", so asking again (after a timeout, an error, a restart)
finds out whether an earlier attempt won.

Only the shared datastore may decide: its root holds ft_storage's id file, and a claim refuses
a directory without it (a mount that is missing, so the local root filesystem shows through,
would otherwise let each host win a token of its own). A side that cannot reach the datastore
cannot win, and so never goes live."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

ID_FILE = ".ft-lockstep-datastore"  # written by ft_storage: one UUID line, the same on every host


@dataclass(frozen=True)
class Verdict:
    won: bool
    holder: str | None  # who holds the token; None when the datastore could not be read
    error: str | None = None  # the datastore could not answer: worth asking again


def token_path(datastore: Path, pair: str, generation: int) -> Path:
    return Path(datastore) / ".ft" / pair / f"gen-{generation}.token"


def check_datastore(datastore: Path, datastore_id: str | None = None) -> str | None:
    """Why this directory is not the shared datastore (None when it is)."""
    id_file = Path(datastore) / ID_FILE
    try:
        found = id_file.read_text().strip()
    except OSError as e:
        return f"not the shared datastore: {id_file}: {e.strerror or e}"
    if datastore_id is not None and found != datastore_id:
        return f"not the shared datastore: {id_file} holds {found!r}, expected {datastore_id!r}"
    return None


def claim(datastore: Path, pair: str, generation: int, me: str, datastore_id: str | None = None) -> Verdict:
    """Try to take the pair's token for this generation; the verdict says who holds it.
    me names the side ("<host>/<role>"); a verdict with an error is worth retrying."""
    wrong = check_datastore(datastore, datastore_id)
    if wrong:
        return Verdict(False, None, wrong)
    token = token_path(datastore, pair, generation)
    mine = token.with_name(f"{token.name}.{me.replace('/', '_')}.{os.getpid()}")
    try:
        for d in (token.parent.parent, token.parent):  # .ft and .ft/<pair> only, never above
            with contextlib.suppress(FileExistsError):
                d.mkdir()
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
