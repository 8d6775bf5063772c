"""Who runs the VM: the one authority, and what lockstepd does with a watcher's outcome.

The authority is the pair's token of the current generation on the shared datastore
(arbiter.claim: exactly one side ever holds it). Every change of which side runs the VM goes
through it:
- a failure: each side's watcher (watch.py) claims it; the winner goes live, the loser fences;
- a planned stop (disable, absent, poweroff, moving the secondary, a guest's own power-off, a
  protect that failed): the owner claims it *before* it stops anything (`retire`), so a
  secondary watcher that fires later loses and fences itself instead of going live beside the
  primary; if the owner loses, the secondary holds the VM and the owner's copy must stop;
- a new generation (a new secondary) starts only once the old one's token is held by the host
  that runs the VM.
So the tokens, one per generation, are the history of who ran the VM.

A watcher's journal (its JSON lines) tells how its side ended. `outcome()` turns it, and when
the journal ends without a verdict the token itself, into what the daemon must do. `after_live`
is what the pair's record becomes when this host's side holds the VM. Both are pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .arbiter import token_path
from .records import Record, Side
from .state import Action, Reason


class Outcome(StrEnum):
    LIVE = "live"  # this side holds the token: it runs the VM (finish going live if need be)
    FENCED = "fenced"  # the other side holds it (or this side is a secondary that never won)
    CLAIM = "claim"  # nobody holds it and this side is the primary: claim it, then ask again


def side_id(host: str, role: str) -> str:
    """How a side names itself in the token: host and role (`lab-h1/primary`)."""
    return f"{host}/{role}"


def holder(datastore: Path, pair: str, generation: int) -> str | None:
    """Who holds a generation's token (None: nobody claimed it yet); OSError if unreadable."""
    try:
        return token_path(datastore, pair, generation).read_text().strip()
    except FileNotFoundError:
        return None


def holder_host(holder: str | None) -> str | None:
    return holder.split("/", 1)[0] if holder else None


@dataclass
class Journal:
    """What a watcher's journal says: every event, its verdict, whether it won the token."""

    events: list[dict] = field(default_factory=list)
    verdict: dict | None = None
    won: bool = False
    peer_seen: bool = False

    @classmethod
    def parse(cls, text: str) -> Journal:
        journal = cls()
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line: the watcher died mid-write
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("verdict"), dict):
                journal.verdict = entry["verdict"]
            elif "event" in entry:
                journal.events.append(entry)
                if entry["event"] == "claimed" and entry.get("won"):
                    journal.won = True
                journal.peer_seen |= entry["event"] == "peer-seen"
        return journal

    @property
    def reason(self) -> Reason:
        for source in (self.verdict or {}, *reversed(self.events)):
            if source.get("reason") in Reason.__members__.values():
                return Reason(source["reason"])
        return Reason.LOST_CONNECTION


def outcome(journal: Journal, role: str, holder: str | None, me: str, qemu_alive: bool) -> Outcome:
    """What this host's side of a pair is, now that its watcher has ended; holder is the
    generation's token as read after that (None: nobody claimed it)."""
    verdict = (journal.verdict or {}).get("outcome")
    if verdict == "live" or journal.won:
        return Outcome.LIVE  # it won (and perhaps died going live): finish the job, never kill the winner
    if verdict == "fenced" or not qemu_alive:
        return Outcome.FENCED  # its QEMU is gone: the token is the other side's to take
    if holder_host(holder) == me:
        return Outcome.LIVE
    if holder is not None or role == "secondary":
        return Outcome.FENCED  # a secondary never claims for itself outside its watcher
    return Outcome.CLAIM


def after_live(record: Record, me: str, slot: str, role: str) -> tuple[Action, str | None]:
    """This host's side holds the VM: the record's new primary and secondary, the action for the
    state machine, and the host that was lost (whose leftovers must stop)."""
    if role == "secondary":  # went live: this host holds the primary now
        lost = record.primary.host
        record.primary = Side(me, slot)
        action = Action.FAILED_OVER
    else:
        lost = record.secondary.host if record.secondary else None
        action = Action.SECONDARY_LOST
    record.secondary = None
    return action, lost
