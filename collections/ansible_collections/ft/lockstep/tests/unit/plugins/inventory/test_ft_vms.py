# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ft_vms inventory plugin through ansible-inventory, asking a FAKE lockstepd per FT host
(tests/unit/plugins/fake_lockstepd.py, a Unix-socket server) through a FAKE ssh (fake_ssh.py, which
runs the remote command here) and the engine's real ftctl."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ansible_collections.ft.lockstep.tests.unit.plugins.fake_lockstepd import FakeLockstepd, pair
from ansible_collections.ft.lockstep.tests.unit.plugins.fake_ssh import write_fake_ssh

BIN = Path(sys.executable).parent
COLLECTIONS = Path(__file__).resolve().parents[7]  # .../collections (holding ansible_collections)


class Unavailable(FakeLockstepd):
    def answer(self, method, path, body):
        return 503, {"error": "the datastore: /ds is not mounted"}


@pytest.fixture
def site(tmp_path):
    """A config for FT hosts h1, h2, h3 (as the fake ssh reaches them) and the pairs h1 and h2 serve."""
    pairs = [
        pair("db1", "running", primary="h1", secondary_host="h2", generation=3),
        pair("web-1", "need_secondary", primary="h2"),
        pair("mq", "disabled", primary="h3"),
    ]
    fakes = [FakeLockstepd(tmp_path / f"{h}.sock", pairs, host=h) for h in ("h1", "h2")]
    config = {
        "plugin": "ft.lockstep.ft_vms",
        "hosts": ["h1", "h2", "h3"],
        "ssh_executable": str(write_fake_ssh(tmp_path)),
        "ftctl": str(BIN / "ftctl"),
        "connect_timeout": 3,
    }
    with fakes[0], fakes[1]:
        yield tmp_path, config


def inventory(tmp_path, config, *extra, name="site.ft_vms.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
    }
    done = subprocess.run([BIN / "ansible-inventory", "-i", path, "--list", *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    listing = json.loads(done.stdout) if done.returncode == 0 else None
    return done.returncode, listing, " ".join(done.stderr.split())


def calls(tmp_path):
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plain(value):
    """A value as the plugin set it: ansible-core 2.19 lists strings from lockstepd (untrusted data,
    never templated) as {"__ansible_unsafe": ...}."""
    if isinstance(value, dict):
        return (
            value["__ansible_unsafe"]
            if set(value) == {"__ansible_unsafe"}
            else {k: plain(v) for k, v in value.items()}
        )
    return value


def members(listing, group):
    return sorted(listing.get(group, {}).get("hosts", []))


def test_each_vm_is_a_host_with_its_pairs_vars_in_groups_by_state_alarm_and_host(site):
    tmp_path, config = site
    key = tmp_path / "id_ed25519"
    key.write_text("a key\n")
    known = tmp_path / "known_hosts"
    known.write_text("h1 ssh-ed25519 AAAA\n")
    config |= {
        "known_hosts_file": str(known),
        "user": "ansible",
        "port": 2222,
        "private_key_file": str(key),
        "ssh_args": ["-o", "StrictHostKeyChecking=yes"],
        "compose": {"vm_memory": "ft_guest.memory_mib"},
        "groups": {"ft_unprotected": "ft_state != 'running'"},
        "keyed_groups": [{"key": "ft_mode", "prefix": "mode"}],
    }
    code, listing, err = inventory(tmp_path, config)
    assert code == 0, err
    assert "WARNING" not in err, err
    assert members(listing, "ft_vms") == ["db1", "mq", "web-1"]
    assert members(listing, "ft_state_running") == ["db1"]
    assert members(listing, "ft_state_need_secondary") == ["web-1"]
    assert members(listing, "ft_state_disabled") == ["mq"]
    assert members(listing, "ft_primary_h1") == ["db1"] and members(listing, "ft_secondary_h2") == ["db1"]
    assert members(listing, "ft_primary_h2") == ["web-1"] and members(listing, "ft_primary_h3") == ["mq"]
    assert members(listing, "ft_alarm_red") == ["web-1"] and members(listing, "ft_alarm_yellow") == ["mq"]
    assert members(listing, "ft_unprotected") == ["mq", "web-1"]
    assert members(listing, "mode_checkpoint") == ["db1", "mq", "web-1"]
    db1 = plain(listing["_meta"]["hostvars"]["db1"])
    expected = {
        "ft_state": "running",
        "ft_reason": "entered_lockstep",
        "ft_primary": "h1",
        "ft_secondary": "h2",
        "ft_mode": "checkpoint",
        "ft_generation": 3,
        "ft_checkpoint_ms": 100,
        "ft_alarm": "green",
        "ft_answered_by": "h1",
        "ft_engine_host": "h1",
        "vm_memory": 256,
    }
    assert {k: db1.get(k) for k in expected} == expected, db1
    assert "ansible_host" not in db1 and listing["_meta"]["hostvars"]["web-1"]["ft_secondary"] is None
    [argv] = calls(tmp_path)  # the first host answered: nobody else was asked
    assert argv[:4] == ["-o", "BatchMode=yes", "-o", "ConnectTimeout=3"], argv
    known_args = ["-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes"]
    extra = ["-o", "StrictHostKeyChecking=yes"]  # ssh_args, after the plugin's own
    assert argv[4:] == ["-p", "2222", "-i", str(key), *known_args, "-l", "ansible", *extra,
                        "--", "h1", f"{BIN / 'ftctl'} status --json"]  # fmt: skip


def test_a_host_down_is_a_warning_and_the_next_host_answers(site):
    tmp_path, config = site
    (tmp_path / "h1.down").touch()
    code, listing, err = inventory(tmp_path, config)
    assert code == 0, err
    assert (
        "FT host h1 did not answer (ssh failed: ssh: connect to host h1 port 22: Connection refused); h2 did"
        in err
    )
    assert members(listing, "ft_state_running") == ["db1"]
    assert plain(listing["_meta"]["hostvars"]["db1"]["ft_answered_by"]) == "h2"
    assert [argv[-2] for argv in calls(tmp_path)] == ["h1", "h2"]


def test_no_host_answering_fails_naming_every_host_and_why(site):
    tmp_path, config = site
    (tmp_path / "h1.down").touch()
    config["hosts"] = ["h1", "h4", "h3"]
    with Unavailable(tmp_path / "h4.sock"):  # h4's lockstepd answers, but with an error; h3 has none
        code, listing, err = inventory(tmp_path, config)
    assert code != 0 and listing is None
    assert (
        "no FT host answered: h1: ssh failed: ssh: connect to host h1 port 22: Connection refused; " in err
    ), err
    assert "h4: lockstepd: the datastore: /ds is not mounted; " in err, err
    assert f"h3: ftctl status exited 3: ftctl: cannot reach lockstepd at {tmp_path / 'h3.sock'}" in err, err


def test_become_runs_ftctl_through_sudo_and_a_socket_is_passed_on(site):
    tmp_path, config = site
    (tmp_path / "h1.down").touch()  # so that the fake runs nothing: only the command is checked
    config |= {
        "hosts": ["h1"],
        "become": True,
        "socket": "/run/ft sock",
        "ftctl": "/opt/lockstep/venv/bin/ftctl",
    }
    code, _listing, err = inventory(tmp_path, config)
    assert code != 0 and "no FT host answered: h1: ssh failed" in err, err
    assert (
        calls(tmp_path)[0][-1]
        == "sudo -n -- /opt/lockstep/venv/bin/ftctl status --json --socket '/run/ft sock'"
    )


def test_a_bad_config_is_refused_with_every_reason_and_nothing_asked(site):
    tmp_path, config = site
    config |= {"hosts": ["h1", "h1", "-oProxyCommand=x"], "port": 0, "connect_timeout": 0, "timeout": -1,
               "private_key_file": str(tmp_path / "missing"),
               "known_hosts_file": str(tmp_path / "no-known-hosts"), "ssh_executable": "no-such-ssh",
               "ftctl": "ftctl"}  # fmt: skip
    code, _listing, err = inventory(tmp_path, config)
    assert code != 0
    for reason in (
        "hosts must be SSH destinations (names or addresses, not empty, not starting with -)",
        "hosts lists a host twice",
        "port must be from 1 to 65535, not 0",
        "connect_timeout must be a positive number of seconds, not 0",
        "timeout must be a positive number of seconds, not -1",
        f"private_key_file {tmp_path / 'missing'} is not a readable file",
        f"known_hosts_file {tmp_path / 'no-known-hosts'} is not a readable file",
        "ssh_executable no-such-ssh is not found",
        "ftctl must be an absolute path on the FT hosts, not ftctl",
    ):
        assert reason in err, (reason, err)
    assert calls(tmp_path) == []


def test_only_files_named_ft_vms_yml_are_taken(site):
    tmp_path, config = site
    code, _listing, err = inventory(tmp_path, config, name="site.yml")
    assert code != 0 and "ft.lockstep.ft_vms" in err and calls(tmp_path) == [], err


def test_the_cache_answers_while_every_host_is_down_until_flushed(site):
    tmp_path, config = site
    config |= {"cache": True, "cache_plugin": "ansible.builtin.jsonfile", "cache_timeout": 3600,
               "cache_connection": str(tmp_path / "cache")}  # fmt: skip
    code, first, err = inventory(tmp_path, config)
    assert code == 0 and members(first, "ft_state_running") == ["db1"], err
    for h in ("h1", "h2", "h3"):
        (tmp_path / f"{h}.down").touch()
    code, cached, err = inventory(tmp_path, config)
    assert code == 0 and cached == first, err
    assert len(calls(tmp_path)) == 1  # the cached run asked no host
    code, _listing, err = inventory(tmp_path, config, "--flush-cache")
    assert code != 0 and "no FT host answered" in err, err
