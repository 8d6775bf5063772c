import multiprocessing
import os

import pytest

from lockstep.arbiter import ID_FILE, claim, token_path

DATASTORE_ID = "0b7f5a52-3c1e-4d0e-9a53-5d1f4c2e8a11"


@pytest.fixture
def datastore(tmp_path):
    """A directory made a datastore the way ft_storage makes one: its id file at the root."""
    (tmp_path / ID_FILE).write_text(DATASTORE_ID + "\n")
    return tmp_path


def test_the_first_claim_wins_and_the_other_side_loses(datastore):
    assert claim(datastore, "db1", 3, "host-a/primary").won
    lost = claim(datastore, "db1", 3, "host-b/secondary")
    assert (lost.won, lost.holder) == (False, "host-a/primary")
    again = claim(datastore, "db1", 3, "host-a/primary")  # the winner asking again (a restarted watcher)
    assert (again.won, again.holder) == (True, "host-a/primary")
    assert token_path(datastore, "db1", 3).read_text() == "host-a/primary\n"
    assert sorted(os.listdir(datastore / ".ft" / "db1")) == ["gen-3.token"]


def test_the_token_names_the_side_not_just_the_host(datastore):
    """Both sides on one host (a lab, a test) are still two contenders."""
    assert claim(datastore, "db1", 1, "h1/primary").won
    assert not claim(datastore, "db1", 1, "h1/secondary").won


def test_each_generation_has_its_own_token(datastore):
    assert claim(datastore, "db1", 1, "host-a/primary").won
    assert claim(datastore, "db1", 2, "host-b/secondary").won
    assert claim(datastore, "db2", 1, "host-b/secondary").won


def test_an_unreachable_datastore_never_wins(datastore):
    (datastore / ".ft").write_text("")  # .ft cannot be made a directory: the claim's writes fail
    v = claim(datastore, "db1", 1, "host-a/primary")
    assert not v.won and v.holder is None and "datastore unreachable" in v.error


def test_a_directory_without_the_id_file_is_not_the_datastore_and_gets_nothing_made(tmp_path):
    """The datastore's mount is missing: its mount point on the local root fs must not let this
    host win a token of its own (R14), nor get .ft made in it."""
    mount_point = tmp_path / "datastore"
    mount_point.mkdir()
    v = claim(mount_point, "db1", 1, "host-a/primary", DATASTORE_ID)
    assert (v.won, v.holder) == (False, None)
    assert v.error.startswith("not the shared datastore: ") and ID_FILE in v.error
    assert os.listdir(mount_point) == []
    v = claim(tmp_path / "gone", "db1", 1, "host-a/primary")  # nor above it
    assert not v.won and "not the shared datastore" in v.error
    assert sorted(os.listdir(tmp_path)) == ["datastore"]


def test_another_datastore_is_refused_when_the_id_is_given(datastore):
    v = claim(datastore, "db1", 1, "host-a/primary", "another-datastore-id")
    assert not v.won and v.error.startswith("not the shared datastore: ")
    assert DATASTORE_ID in v.error and "another-datastore-id" in v.error
    assert not (datastore / ".ft").exists()
    assert claim(datastore, "db1", 1, "host-a/primary", DATASTORE_ID).won  # the right one: it proceeds


def test_a_claim_whose_link_landed_but_failed_finds_itself_the_holder(datastore, monkeypatch):
    """NFS: the server made the link, the client got an error (or no reply): asking again answers."""
    real_link = os.link

    def link_then_fail(src, dst):
        real_link(src, dst)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "link", link_then_fail)
    first = claim(datastore, "db1", 1, "host-a/primary")
    assert not first.won and "datastore unreachable" in first.error
    monkeypatch.setattr(os, "link", real_link)
    assert claim(datastore, "db1", 1, "host-a/primary").won
    assert not claim(datastore, "db1", 1, "host-b/secondary").won


def _race(args):
    path, me, start = args
    start.wait()
    return claim(path, "db1", 1, me).won


def test_exactly_one_of_many_racing_processes_wins(datastore):
    with multiprocessing.Manager() as m:
        start = m.Event()
        with multiprocessing.Pool(8) as pool:
            result = pool.map_async(_race, [(datastore, f"host-{i}/primary", start) for i in range(8)])
            start.set()
            assert sum(result.get(30)) == 1
