import multiprocessing
import os

from lockstep.arbiter import claim, token_path


def test_the_first_claim_wins_and_the_other_side_loses(tmp_path):
    assert claim(tmp_path, "db1", 3, "host-a").won
    lost = claim(tmp_path, "db1", 3, "host-b")
    assert (lost.won, lost.holder) == (False, "host-a")
    again = claim(tmp_path, "db1", 3, "host-a")  # the winner asking again (a restarted daemon)
    assert (again.won, again.holder) == (True, "host-a")
    assert token_path(tmp_path, "db1", 3).read_text() == "host-a\n"
    assert sorted(os.listdir(tmp_path / ".ft" / "db1")) == ["gen-3.token"]


def test_each_generation_has_its_own_token(tmp_path):
    assert claim(tmp_path, "db1", 1, "host-a").won
    assert claim(tmp_path, "db1", 2, "host-b").won
    assert claim(tmp_path, "db2", 1, "host-b").won


def test_an_unreachable_datastore_never_wins(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    v = claim(blocked, "db1", 1, "host-a")
    assert not v.won and v.holder is None and "datastore unreachable" in v.error


def _race(args):
    path, me, start = args
    start.wait()
    return claim(path, "db1", 1, me).won


def test_exactly_one_of_many_racing_processes_wins(tmp_path):
    with multiprocessing.Manager() as m:
        start = m.Event()
        with multiprocessing.Pool(8) as pool:
            result = pool.map_async(_race, [(tmp_path, f"host-{i}", start) for i in range(8)])
            start.set()
            assert sum(result.get(30)) == 1
