"""The FT pair state machine: pure, no I/O. vSphere's words: a pair is not_configured, starting
(Enabled-Starting), running (Enabled-Running), need_secondary (Enabled-Needs Secondary) or
disabled (infrastructure kept, secondary stopped). Every transition is returned as an Event."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum


class FtState(StrEnum):
    NOT_CONFIGURED = "not_configured"
    STARTING = "starting"
    RUNNING = "running"
    NEED_SECONDARY = "need_secondary"
    DISABLED = "disabled"
    LOST = "lost"  # no copy of the VM runs any more (both sides, or the only one, gone)


class Reason(StrEnum):
    INITIALIZING = "initializing"
    USER_ACTION = "user_action"
    LOST_CONNECTION = "lost_connection"  # the other side stopped answering heartbeats
    PARTIAL_HARDWARE_FAILURE = "partial_hardware_failure"  # the primary's host or QEMU was lost
    CHECKPOINT_ERROR = "checkpoint_error"  # replication stopped making progress or failed
    START_FAILED = "start_failed"
    NO_COMPATIBLE_HOST = "no_compatible_host"
    LOST_ARBITRATION = "lost_arbitration"  # the other side won the datastore race
    ENTERED_LOCKSTEP = "entered_lockstep"
    DATASTORE_UNREACHABLE = "datastore_unreachable"
    ENGINE_RESTARTED = "engine_restarted"  # lockstepd stopped in the middle of protecting
    VM_EXITED = "vm_exited"  # the QEMU stopped with no other copy to take over
    HOST_UNREACHABLE = "host_unreachable"  # no host that ran a copy has answered for a while
    SECONDARY_DISK_ERROR = "secondary_disk_error"  # a write to its disk failed: the copy is behind


class Action(StrEnum):
    ENABLE = "enable"  # turn FT on / re-enable: a secondary is being created
    SYNCED = "synced"  # the secondary reached lockstep
    SECONDARY_LOST = "secondary_lost"  # primary continues alone
    FAILED_OVER = "failed_over"  # the secondary went live as the new primary
    REPROTECT = "reprotect"  # a new secondary is being created after a loss
    START_FAILED = "start_failed"
    DISABLE = "disable"  # stop the secondary, keep the FT set-up
    TURN_OFF = "turn_off"  # remove the secondary and the FT set-up; the VM keeps running
    LOST = "lost"  # the last copy stopped, or no host that could run one answers
    FOUND = "found"  # a copy the cluster had given up on runs after all (its host is back)


S = FtState
# action -> (states it is allowed from, state it leads to)
TRANSITIONS: dict[Action, tuple[frozenset[FtState], FtState]] = {
    Action.ENABLE: (frozenset({S.NOT_CONFIGURED, S.DISABLED}), S.STARTING),
    Action.SYNCED: (frozenset({S.STARTING}), S.RUNNING),
    Action.SECONDARY_LOST: (frozenset({S.STARTING, S.RUNNING}), S.NEED_SECONDARY),
    # from starting too: the primary can die once both watchers run, before running is saved
    Action.FAILED_OVER: (frozenset({S.STARTING, S.RUNNING}), S.NEED_SECONDARY),
    Action.REPROTECT: (frozenset({S.NEED_SECONDARY}), S.STARTING),
    Action.START_FAILED: (frozenset({S.STARTING}), S.NEED_SECONDARY),
    Action.DISABLE: (frozenset({S.STARTING, S.RUNNING, S.NEED_SECONDARY}), S.DISABLED),
    Action.TURN_OFF: (frozenset({S.STARTING, S.RUNNING, S.NEED_SECONDARY, S.DISABLED}), S.NOT_CONFIGURED),
    Action.LOST: (frozenset(set(S) - {S.LOST}), S.LOST),
    Action.FOUND: (frozenset({S.LOST}), S.NEED_SECONDARY),
}


class InvalidTransition(ValueError):
    pass


@dataclass(frozen=True)
class Event:
    pair: str
    action: Action
    old: FtState
    new: FtState
    reason: Reason
    generation: int
    at: float


@dataclass
class Pair:
    """One protected VM. generation counts the primary/secondary configurations: it grows each
    time a new secondary is started, and the split-brain token is per generation."""

    name: str
    state: FtState = FtState.NOT_CONFIGURED
    reason: Reason = Reason.INITIALIZING
    generation: int = 0
    history: list[Event] = field(default_factory=list)

    def apply(self, action: Action, reason: Reason, now: float | None = None) -> Event:
        allowed, new = TRANSITIONS[action]
        if self.state not in allowed:
            raise InvalidTransition(f"{self.name}: cannot {action} while {self.state}")
        if new is FtState.STARTING:
            self.generation += 1
        event = Event(
            self.name, action, self.state, new, reason, self.generation, time.time() if now is None else now
        )
        self.state, self.reason = new, reason
        self.history.append(event)
        return event
