"""lockstepd's parts without VMs: the configuration check, placement, and the API's request
handling (auth, limits, a fuzzed parser) on a real socket with a stand-in dispatcher."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lockstep import api, config, placement
from lockstep.records import Record, Side
from lockstep.state import FtState

BASE = {
    "host": "h1",
    "hosts": {"h1": "10.0.2.1", "h2": "10.0.2.2", "h3": "10.0.2.3"},
    "datastore": "/ds",
    "run_dir": "/run/ft",
    "socket": "/run/lockstepd.sock",
    "secret": "0123456789abcdef",
}


def test_a_valid_configuration_loads_with_its_defaults():
    cfg = config.parse(BASE)
    assert cfg.ft_ip == "10.0.2.1" and cfg.caps == config.Caps(4, 8, 0) and cfg.secret == b"0123456789abcdef"


def test_every_configuration_problem_is_named_at_once():
    bad = {k: v for k, v in BASE.items() if k != "socket"} | {
        "host": "h9", "hosts": {"h1": "10.0.2.1", "h2": "not-an-ip"}, "secret": "short", "mode": "fast",
        "caps": {"max_vms": -1}, "colour": "blue",
    }  # fmt: skip
    with pytest.raises(config.ConfigError) as e:
        config.parse(bad, "lockstepd.yml")
    message = str(e.value)
    for part in (
        "unknown setting 'colour'",
        "socket is required",
        "hosts.h2: 'not-an-ip' is not an IP address",
        "host 'h9' is not one of hosts",
        "at least 16 characters",
        "mode must be auto, lockstep or",
        "caps.max_vms must be a whole number >= 0",
    ):
        assert part in message, message
    with pytest.raises(config.ConfigError, match="expected a mapping"):
        config.parse(["h1"])


def test_a_secret_file_others_can_read_and_a_webhook_that_is_no_url_are_refused(tmp_path):
    secret = tmp_path / "peer.secret"
    secret.write_text("0123456789abcdef\n")
    secret.chmod(0o644)
    bad = {k: v for k, v in BASE.items() if k != "secret"} | {"secret_file": str(secret), "webhook": "alerts"}
    with pytest.raises(config.ConfigError) as e:
        config.parse(bad)
    assert "is open to group or others (mode 0644): chmod 600 it" in str(e.value)
    assert "webhook must be an http:// or https:// URL, not 'alerts'" in str(e.value)
    secret.chmod(0o600)
    cfg = config.parse(bad | {"webhook": "https://alerts.example/ft"})
    assert cfg.secret == b"0123456789abcdef" and cfg.webhook == "https://alerts.example/ft"


def record(
    name: str, primary: str, secondary: str | None = None, memory: int = 256, vcpus: int = 1
) -> Record:
    second = Side(secondary, "secondary") if secondary else None
    guest = {"memory_mib": memory, "vcpus": vcpus}
    return Record(
        name=name, guest=guest, primary=Side(primary, "primary"), secondary=second, state=FtState.RUNNING
    )


def hosts(**free) -> list[placement.HostInfo]:
    return [placement.HostInfo(name, mib) for name, mib in free.items()]


def test_placement_never_picks_the_primarys_host_and_prefers_the_least_loaded():
    new = record("vm", "h1")
    existing = {"a": record("a", "h2", "h3"), "b": record("b", "h1", "h2")}
    assert placement.choose(hosts(h1=9000, h2=9000, h3=9000), new, existing, config.Caps()) == ("h3", [])
    assert placement.choose(hosts(h1=9000), new, {}, config.Caps()) == (None, ["h1 runs the primary"])


def test_placement_honours_the_preferred_host_memory_and_every_cap():
    new = record("vm", "h1", memory=1024, vcpus=2)
    new.preferred_secondary = "h2"
    assert placement.choose(hosts(h2=4096, h3=8000), new, {}, config.Caps())[0] == "h2"
    host, why = placement.choose(hosts(h2=2000, h3=-1), new, {}, config.Caps())
    assert host is None and why == ["h2 has 2000 MiB free, the secondary needs 2048", "h3 did not answer"]
    busy = {str(i): record(str(i), "h2", vcpus=2) for i in range(4)}
    host, why = placement.choose(hosts(h2=9000), new, busy, config.Caps())
    assert why == ["h2 already runs 4 FT VMs (cap 4)", "h2 already runs 8 FT vCPUs (cap 8)"]
    assert placement.choose(hosts(h2=9000), new, busy, config.Caps(0, 0, 0))[0] == "h2"  # 0: no cap
    host, why = placement.choose(hosts(h2=9000), new, {}, config.Caps(ft_bandwidth_mbps=500))
    assert why == ["h2's FT-logging budget of 500 Mb/s is used up (0)"]


def test_placement_refuses_a_host_that_lacks_a_bridge_of_the_vms_nics():
    """Before: the secondary's host was not checked, and the protect failed late (its tap could
    not join the bridge) or, worse, the VM came up at failover on a network that is not there."""
    new = record("vm", "h1")
    nics = [{"mac": "52:54:00:00:00:01"}, {"mac": "52:54:00:00:00:02", "bridge": "vmbr1"}]
    new.guest = {"spec_version": 1, "name": "vm", "kernel": "/k", "disks": [], "nics": nics}
    h2 = placement.HostInfo("h2", 9000, bridges=frozenset({"vmbr0"}), default_bridge="vmbr0")
    h3 = placement.HostInfo("h3", 9000, bridges=frozenset({"vmbr0", "vmbr1"}), default_bridge="vmbr0")
    assert placement.choose([h2, h3], new, {}, config.Caps()) == ("h3", [])
    lacking = placement.HostInfo("h3", 9000, bridges=frozenset(), default_bridge="br9")
    assert placement.choose([h2, lacking], new, {}, config.Caps()) == (None, [
        "h2: nics[1]: bridge vmbr1 does not exist on this host",
        "h3: nics[0]: bridge br9 does not exist on this host",
        "h3: nics[1]: bridge vmbr1 does not exist on this host",
    ])  # fmt: skip


def test_turning_ft_on_counts_the_primary_against_its_hosts_cap():
    existing = {str(i): record(str(i), "h1", "h2") for i in range(4)}
    assert placement.admit("h1", {"vcpus": 1}, existing, config.Caps(), "new") == [
        "h1 already runs 4 FT VMs (cap 4)"
    ]
    assert placement.admit("h3", {"vcpus": 1}, existing, config.Caps(), "new") == []
    off = {"x": record("x", "h3")}
    off["x"].state = FtState.NOT_CONFIGURED  # a VM without FT is not an FT VM
    assert placement.admit("h3", {"vcpus": 1}, off, config.Caps(max_vms=1), "new") == []


@pytest.fixture
def server(tmp_path):
    calls = []

    def dispatch(method, path, body, peer):
        calls.append((method, path, body, peer))
        if path == "/boom":
            raise RuntimeError("a bug")
        return 200, {"ok": True}

    path = tmp_path / "api.sock"
    unix = api.serve_unix(path, dispatch)
    peer = api.serve_peer(("127.0.0.1", 0), dispatch, b"s" * 16)
    yield path, peer.server_address, calls
    for s in (unix, peer):
        s.shutdown()
        s.server_close()


def test_the_local_socket_is_root_only_and_answers_json(server):
    path, _peer, calls = server
    assert os.stat(path).st_mode & 0o077 == 0  # nobody but its owner (root)
    assert api.local(path, "POST", "/x", {"a": 1}) == (200, {"ok": True})
    assert calls == [("POST", "/x", {"a": 1}, False)]
    assert api.local(path, "GET", "/boom") == (500, {"error": "RuntimeError: a bug"})


def test_peers_must_sign_with_the_secret_recently(server):
    _path, peer, calls = server
    assert api.peer(peer, b"s" * 16, "POST", "/peer/x", {"b": 2}) == {"ok": True}
    assert calls == [("POST", "/peer/x", {"b": 2}, True)]
    with pytest.raises(api.ApiError, match="not signed with this cluster's secret"):
        api.peer(peer, b"t" * 16, "POST", "/peer/x", {})
    headers = api.auth_headers(b"s" * 16, "POST", "/peer/x", b"", api.endpoint(peer), "127.0.0.1")
    stamp = headers["X-FT-Time"] = repr(time.time() - 100)  # rightly signed, but old
    headers["X-FT-Auth"] = api.sign(
        b"s" * 16, "POST", "/peer/x", stamp, headers["X-FT-Nonce"], api.endpoint(peer), "127.0.0.1", b""
    )
    conn = http.client.HTTPConnection(*peer, timeout=5)
    conn.request("POST", "/peer/x", headers=headers)
    reply = conn.getresponse()
    assert reply.status == 401 and b"off this host's clock" in reply.read()
    assert len(calls) == 1


def test_malformed_and_oversized_requests_are_refused_before_dispatch(server):
    path, _peer, calls = server
    head = b"POST /x HTTP/1.1\r\nContent-Length: "
    assert api.exchange(path, head + b"3\r\n\r\n{x}").startswith(b"HTTP/1.1 400")
    assert api.exchange(path, head + b"9999999999\r\n\r\n").startswith(b"HTTP/1.1 413")
    assert api.exchange(path, head + b"nine\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert calls == []


def test_a_fuzzed_request_stream_never_crashes_the_server(server):
    path, _peer, calls = server
    rng = random.Random(11)
    template = (
        b"POST /vms/x/enable HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
        b'{"a": [1]}\n'
    )
    for _ in range(2000):
        data = bytearray(template if rng.random() < 0.7 else os.urandom(rng.randrange(1, 300)))
        for _ in range(rng.randrange(0, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        answer = api.exchange(path, bytes(data))
        assert answer == b"" or answer.startswith(b"HTTP/1."), answer[:100]
        assert b" 500 " not in answer[:20]
    for _method, _path, body, _peer in calls:  # whatever got through was parsed JSON
        json.dumps(body)
    assert api.local(path, "GET", "/still-there") == (200, {"ok": True})
    assert threading.active_count() < 50


def test_a_crash_point_kills_the_daemon_right_after_its_event_and_only_there(tmp_path):
    """LOCKSTEPD_CRASH_AFTER, the fault tests' failpoint: the event is on disk, nothing after it."""
    script = (
        "import sys; from pathlib import Path; from lockstep.events import EventLog\n"
        "log = EventLog('h', Path(sys.argv[1]), crash_after='protecting:copying')\n"
        "log.emit('protecting', step='placed'); log.emit('protecting', step='copying'); log.emit('after')\n"
    )
    path = tmp_path / "events.log"
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert [json.loads(line).get("step") for line in path.read_text().splitlines()] == ["placed", "copying"]


def test_the_event_log_is_rotated_at_its_size_cap(tmp_path):
    from lockstep.events import EventLog

    log = EventLog("h1", tmp_path / "events.log")
    log.log_bytes = 1000
    for i in range(100):
        log.emit("tick", n=i)
    assert (tmp_path / "events.log").stat().st_size <= 1000 + 100
    assert (tmp_path / "events.log.1").stat().st_size <= 1000 + 100
    last = [json.loads(line)["n"] for line in (tmp_path / "events.log").read_text().splitlines()]
    assert last[-1] == 99
