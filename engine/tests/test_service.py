"""lockstepd for real: one daemon in each of three lab hosts, the lab guest as the protected VM,
the client checking every byte of one TCP stream. Failures are injected here (a host's engine,
QEMUs and watchers SIGKILLed and its links cut, a daemon killed); everything after that - failing
over, picking a host, re-protecting - the daemons do on their own."""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

from ftlab import engine
from ftlab import topology as t
from ftlab.colopair import set_links
from ftlab.guest import StreamFollower, client_run
from lockstep import api

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]
MiB = 1 << 20
HOSTS = ("lab-h1", "lab-h2", "lab-h3")


@pytest.fixture(scope="module")
def cluster(lab):
    for i in (1, 2, 3):
        engine.start(i)
    yield


def index(host: str) -> int:
    return HOSTS.index(host) + 1


def protected_vm(name: str, k: int) -> StreamFollower:
    """The lab guest started on lab-h1 and protected; the client following its stream."""
    assert engine.ok(1, "POST", "/vms", engine.guest_body(name, k))["changed"]
    client = StreamFollower(t.guest_ip(k))
    client.wait_for_bytes(1, 120)
    view = engine.ok(1, "POST", f"/vms/{name}/enable", {})["vm"]
    assert view["state"] == "running" and view["secondary_host"] in ("lab-h2", "lab-h3"), view
    client.wait_for_bytes(client.bytes + MiB, 60)
    return client


def test_losing_the_primarys_host_fails_over_and_reprotects_on_the_third_host_byte_exact(cluster):
    client = protected_vm("ftpair", 0)
    first = engine.ok(1, "GET", "/vms/ftpair")
    survivor = first["secondary_host"]
    third = ({"lab-h2", "lab-h3"} - {survivor}).pop()
    links = engine.kill_host(1)
    try:
        view = engine.await_pair(
            "ftpair", lambda v: v["state"] == "running" and v["generation"] > first["generation"]
        )
        assert (view["primary"], view["secondary_host"]) == (survivor, third), view
        client.wait_for_bytes(client.bytes + 2 * MiB, 90)  # through the new primary, replicated again
        result = client.stop()
        assert result["ok"], result
        events = (t.host(index(survivor)).dir / "events.log").read_text()
        assert '"action": "failed_over"' in events and '"action": "reprotect"' in events
    finally:
        set_links(links, up=True)
        engine.start(1)  # the host comes back empty: the pair stays where it is
        engine.power_off("ftpair")


def test_a_killed_and_restarted_daemon_leaves_the_pair_running_and_manages_it_again(cluster):
    client = protected_vm("ftpair2", 1)
    before = engine.ok(1, "GET", "/vms/ftpair2")
    qemus = engine.processes(1, "qemu-system")
    try:
        engine.kill_daemon(1)
        client.wait_for_bytes(client.bytes + MiB, 60)  # the pair runs on without its daemon
        assert engine.processes(1, "qemu-system") == qemus
        engine.start(1)
        status = engine.ok(1, "GET", "/status")
        assert "ftpair2" in status["local_vms"]
        assert engine.ok(1, "GET", "/vms/ftpair2")["state"] == "running"
        # managed again: a drill on the restarted daemon is carried through to running
        assert engine.ok(1, "POST", "/vms/ftpair2/test-restart-secondary", {})["changed"]
        view = engine.await_pair(
            "ftpair2", lambda v: v["state"] == "running" and v["generation"] > before["generation"]
        )
        assert view["primary"] == "lab-h1"
        client.wait_for_bytes(client.bytes + MiB, 60)
        result = client.stop()
        assert result["ok"], result
    finally:
        engine.power_off("ftpair2")


def test_enable_disable_absent_each_twice_the_second_call_changes_nothing(cluster):
    client = protected_vm("ftpair3", 2)
    try:
        steps = [("enable", False, "running"), ("disable", True, "disabled"), ("disable", False, "disabled"),
                 ("enable", True, "running"), ("absent", True, "not_configured"),
                 ("absent", False, "not_configured")]  # fmt: skip
        for op, changed, state in steps:
            answer = engine.ok(1, "POST", f"/vms/ftpair3/{op}", {})
            assert (op, answer["changed"], answer["vm"]["state"]) == (op, changed, state), answer
            client.wait_for_bytes(client.bytes + 256 * 1024, 60)  # the VM runs on through each
        assert engine.ok(1, "GET", "/vms/ftpair3")["secondary_host"] is None
        assert not [pid for i in (2, 3) for pid in engine.processes(i, "qemu-system")]  # no secondary left
        result = client.stop()
        assert result["ok"], result
    finally:
        engine.power_off("ftpair3")


def test_the_secondary_then_the_primary_move_to_other_hosts_byte_exact(cluster):
    client = protected_vm("ftmove", 6)
    try:
        view = engine.ok(1, "GET", "/vms/ftmove")
        other = ({"lab-h2", "lab-h3"} - {view["secondary_host"]}).pop()
        status, refused = engine.call(
            1, "POST", "/vms/ftmove/migrate", {"role": "secondary", "host": "lab-h1"}
        )
        assert status == 409 and "lab-h1 runs the primary" in refused["error"]
        moved = engine.ok(1, "POST", "/vms/ftmove/migrate", {"role": "secondary", "host": other})
        assert moved["changed"] and (moved["vm"]["primary"], moved["vm"]["secondary_host"]) == (
            "lab-h1",
            other,
        )
        again = engine.ok(1, "POST", "/vms/ftmove/migrate", {"role": "secondary", "host": other})
        assert again["changed"] is False
        client.wait_for_bytes(client.bytes + MiB, 60)
        target = ({"lab-h2", "lab-h3"} - {other}).pop()  # the primary goes where no side is yet
        moved = engine.ok(1, "POST", "/vms/ftmove/migrate", {"role": "primary", "host": target})
        assert moved["changed"] and moved["vm"]["primary"] == target, moved
        view = engine.await_pair("ftmove", lambda v: v["state"] == "running" and v["primary"] == target)
        assert view["secondary_host"] not in (None, target)
        client.wait_for_bytes(client.bytes + MiB, 60)
        result = client.stop()
        assert result["ok"], result
    finally:
        engine.power_off("ftmove")


def test_a_guest_that_powers_itself_off_takes_its_secondary_along_and_nothing_fails_over(cluster):
    client = protected_vm("ftoff", 7)
    client.stop()
    ip = t.guest_ip(7)
    code = f"import socket; s = socket.create_connection(('{ip}', 99), 5); print(s.recv(100).decode())"
    off = engine.in_netns(t.CLIENT.netns, code)
    assert "powering off" in off.stdout, off
    deadline = time.monotonic() + 30
    while any(engine.call(i, "GET", "/vms/ftoff")[0] != 404 for i in (1, 2, 3)):
        assert time.monotonic() < deadline, engine.call(1, "GET", "/vms/ftoff")
        time.sleep(0.2)
    assert not [p for i in (1, 2, 3) for p in engine.processes(i, "ftoff")]  # no QEMU, no watcher
    logs = "".join((t.host(i).dir / "events.log").read_text() for i in (1, 2, 3))
    assert '"powered_off", "vm": "ftoff", "by": "guest"' in logs
    assert not [line for line in logs.splitlines() if '"ftoff"' in line and '"failed_over"' in line]


def disk(ip: str, op: str, seed: int) -> None:
    """4 MiB of a seeded pattern to the guest's disk, or read back past its page cache and checked."""
    result = client_run(ip, op, str(4 * MiB), "--seed", str(seed))
    assert result["ok"], result


def test_a_vms_disk_is_copied_to_each_new_secondary_and_survives_two_failovers(cluster):
    ip = t.guest_ip(8)
    engine.ok(1, "POST", "/vms", engine.guest_body("ftdisk", 8) | {"disk_mib": 16})
    try:
        StreamFollower(ip).wait_for_bytes(1, 120)
        disk(ip, "--disk-write", seed=5)  # before FT is on: only the initial copy can carry it
        view = engine.ok(1, "POST", "/vms/ftdisk/enable", {})["vm"]
        engine.ok(1, "POST", "/vms/ftdisk/test-failover", {})
        view = engine.await_running("ftdisk", view["generation"] + 1)
        disk(ip, "--disk-read", seed=5)  # on the former secondary: the copy was whole
        disk(ip, "--disk-write", seed=6)  # replicated to the secondary the engine made anew
        owner = engine.index(view["primary"])
        engine.ok(owner, "POST", "/vms/ftdisk/test-failover", {})
        view = engine.await_running("ftdisk", view["generation"] + 1)
        disk(ip, "--disk-read", seed=6)
    finally:
        engine.power_off("ftdisk")


def test_a_vm_beyond_a_hosts_cap_is_refused_with_the_reason(cluster):
    for i in (1, 2, 3):  # every daemon restarted with a cap of one FT VM per host
        engine.kill_daemon(i)
        engine.start(i, caps={"max_vms": 1})
    try:
        protected_vm("ftcap1", 3)
        engine.ok(1, "POST", "/vms", engine.guest_body("ftcap2", 4))
        status, answer = engine.call(1, "POST", "/vms/ftcap2/enable", {})
        assert status == 409 and "lab-h1 already runs 1 FT VMs (cap 1)" in answer["error"], answer
        assert engine.ok(1, "GET", "/vms/ftcap2")["state"] == "not_configured"
    finally:
        engine.power_off("ftcap1")
        engine.power_off("ftcap2")
        for i in (1, 2, 3):
            engine.kill_daemon(i)
            engine.start(i)


def test_bad_requests_get_a_clear_status_and_change_nothing(cluster):
    assert engine.ok(1, "POST", "/vms", engine.guest_body("ftbad", 5))["changed"]
    try:
        before = engine.ok(1, "GET", "/status")["pairs"]
        sock = engine.socket(1)
        assert engine.call(1, "GET", "/vms/nosuchvm")[0] == 404
        assert "no VM named 'nosuchvm'" in engine.call(1, "POST", "/vms/nosuchvm/enable", {})[1]["error"]
        assert engine.call(1, "GET", "/no/such/thing")[0] == 404
        assert engine.call(1, "GET", "/vms/ftbad/enable")[0] == 405
        malformed = api.exchange(sock, b"POST /vms/ftbad/enable HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope")
        assert malformed.startswith(b"HTTP/1.1 400") and b"body is not JSON" in malformed
        huge = api.exchange(sock, b"POST /vms HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{}")
        assert huge.startswith(b"HTTP/1.1 413")
        status, answer = engine.call(1, "POST", "/vms", {"name": "Bad Name!", "mac": "xx", "memory_mib": 1})
        assert status == 400 and "name must be" in answer["error"] and "mac must be" in answer["error"]
        # the peer API, from lab-h2 on the FT-logging network: signed with another secret, unsigned
        peer, h2 = t.host(1).ip("ft_logging"), t.host(2).netns
        wrong = engine.in_netns(h2, f"from lockstep import api; api.peer(('{peer}', 7411), "
                                    "b'not-the-cluster-secret', 'POST', '/peer/kill/ftbad', {})")  # fmt: skip
        assert "ApiError" in wrong.stderr and "not signed with this cluster's secret" in wrong.stderr
        unsigned = engine.in_netns(h2, f"import http.client as h; c = h.HTTPConnection('{peer}', 7411); "
                                       "c.request('POST', '/peer/kill/ftbad'); r = c.getresponse(); "
                                       "print(r.status, r.read())")  # fmt: skip
        assert unsigned.stdout.startswith("401") and "X-FT-Time" in unsigned.stdout, unsigned
        ftctl = subprocess.run([engine.FTCTL, "enable", "nosuchvm", "--socket", str(sock)],
                               capture_output=True, text=True)  # fmt: skip
        assert ftctl.returncode == 1 and "no VM named 'nosuchvm'" in ftctl.stderr
        fuzz(sock)
        assert engine.ok(1, "GET", "/status")["pairs"] == before
        assert engine.processes(1, "ftbad")  # the VM still runs
    finally:
        engine.power_off("ftbad")


def fuzz(sock, rounds: int = 300) -> None:
    """Random and mangled requests at the local API: each gets an answer or a closed connection,
    and the daemon keeps answering."""
    rng = random.Random(7)
    good = (
        b"POST /vms/ftbad/disable HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    for _ in range(rounds):
        kind = rng.randrange(3)
        if kind == 0:
            data = os.urandom(rng.randrange(1, 2000))
        elif kind == 1:
            data = bytearray(good)
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:
            body = bytes(rng.choice(b'{}[]":,0123456789abcnulltrue ') for _ in range(rng.randrange(1, 60)))
            data = b"POST /vms HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        answer = api.exchange(sock, data)
        assert answer == b"" or answer.startswith(b"HTTP/1."), answer[:200]
        assert not answer.startswith(b"HTTP/1.1 500"), (data, answer[:300])
