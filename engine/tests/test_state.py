import itertools

import pytest

from lockstep.state import TRANSITIONS, Action, FtState, InvalidTransition, Pair, Reason


def test_a_pair_goes_through_its_life_and_every_transition_is_an_event():
    p = Pair("db1")
    steps = [
        (Action.ENABLE, Reason.USER_ACTION, FtState.STARTING),
        (Action.SYNCED, Reason.ENTERED_LOCKSTEP, FtState.RUNNING),
        (Action.FAILED_OVER, Reason.PARTIAL_HARDWARE_FAILURE, FtState.NEED_SECONDARY),
        (Action.REPROTECT, Reason.INITIALIZING, FtState.STARTING),
        (Action.SYNCED, Reason.ENTERED_LOCKSTEP, FtState.RUNNING),
        (Action.SECONDARY_LOST, Reason.LOST_CONNECTION, FtState.NEED_SECONDARY),
        (Action.DISABLE, Reason.USER_ACTION, FtState.DISABLED),
        (Action.ENABLE, Reason.USER_ACTION, FtState.STARTING),
        (Action.TURN_OFF, Reason.USER_ACTION, FtState.NOT_CONFIGURED),
    ]
    for i, (action, reason, want) in enumerate(steps):
        event = p.apply(action, reason, now=float(i))
        assert (event.action, event.new, event.reason, event.at) == (action, want, reason, float(i))
        assert (p.state, p.reason) == (want, reason)
    assert [e.old for e in p.history[1:]] == [e.new for e in p.history[:-1]]
    assert p.generation == 3  # one per secondary started


@pytest.mark.parametrize(
    "state, action", [(s, a) for s, a in itertools.product(FtState, Action) if s not in TRANSITIONS[a][0]]
)
def test_a_transition_not_allowed_is_refused_and_changes_nothing(state, action):
    p = Pair("db1", state=state, reason=Reason.USER_ACTION, generation=7)
    with pytest.raises(InvalidTransition, match=f"cannot {action} while {state}"):
        p.apply(action, Reason.USER_ACTION)
    assert (p.state, p.reason, p.generation, p.history) == (state, Reason.USER_ACTION, 7, [])


def test_a_failover_is_recorded_from_starting_and_running_only():
    # watchers (the only ones that can make a secondary go live) start once COLO runs, before
    # running is saved: a primary lost in that moment leaves a complete copy that went live.
    # A secondary still being copied has no watcher, so nothing can make it go live.
    assert TRANSITIONS[Action.FAILED_OVER][0] == {FtState.STARTING, FtState.RUNNING}
