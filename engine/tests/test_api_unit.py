"""The API's defences, on real sockets (loopback) with a stand-in dispatcher: peer requests that are
replayed, meant for another host or malformed; the body left unread until the headers pass;
idle and slowloris connections; one server per socket."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from lockstep import api

SECRET = b"s" * 16
ME = "127.0.0.1"


class Servers:
    def __init__(self, tmp_path) -> None:
        self.calls: list[tuple[str, str, object, bool]] = []
        self.hold = threading.Event()
        self.sock = tmp_path / "api.sock"
        self.unix = api.serve_unix(self.sock, self.dispatch)
        self.peer = api.serve_peer((ME, 0), self.dispatch, SECRET)
        self.address = self.peer.server_address

    def dispatch(self, method, path, body, peer):
        self.calls.append((method, path, body, peer))
        if path == "/hold":
            self.hold.wait(10)
        return 200, {"ok": True}

    def close(self) -> None:
        self.hold.set()
        for server in (self.unix, self.peer):
            server.shutdown()
            server.server_close()


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    s.close()


def send(address, headers: dict, path: str = "/peer/x", body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=5)
    try:
        conn.request("POST", path, body=body or None, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def signed(address, path: str = "/peer/x", body: bytes = b"", sender: str = ME, **fields) -> dict:
    """Headers for a peer request to address; fields replace the stamp or nonce before signing."""
    headers = api.auth_headers(SECRET, "POST", path, body, api.endpoint(address), sender)
    headers |= {f"X-FT-{k.title()}": v for k, v in fields.items()}
    headers["X-FT-Auth"] = api.sign(SECRET, "POST", path, headers["X-FT-Time"], headers["X-FT-Nonce"],
                                    headers["X-FT-To"], headers["X-FT-From"], body)  # fmt: skip
    return headers


def test_a_replayed_peer_request_is_refused_and_dispatched_once(servers):
    headers = signed(servers.address, "/peer/kill/vm1")
    assert send(servers.address, headers, "/peer/kill/vm1")[0] == 200
    for _ in range(3):
        status, answer = send(servers.address, headers, "/peer/kill/vm1")
        assert status == 401 and b"replayed" in answer
    assert servers.calls == [("POST", "/peer/kill/vm1", None, True)]
    assert api.peer(servers.address, SECRET, "GET", "/peer/info") == {"ok": True}  # fresh nonces pass
    assert api.peer(servers.address, SECRET, "GET", "/peer/info") == {"ok": True}


def test_a_peer_request_for_another_host_or_from_another_sender_is_refused(servers):
    other = api.serve_peer((ME, 0), servers.dispatch, SECRET)  # another host, same secret
    try:
        status, answer = send(other.server_address, signed(servers.address))
        assert status == 401 and b"meant for" in answer
        forged = signed(servers.address) | {"X-FT-To": api.endpoint(other.server_address)}
        status, answer = send(other.server_address, forged)
        assert status == 401 and b"not signed with this cluster's secret" in answer
        status, answer = send(servers.address, signed(servers.address, sender="10.0.2.9"))
        assert status == 401 and b"sent by 127.0.0.1" in answer
    finally:
        other.shutdown()
        other.server_close()
    assert servers.calls == []


def test_malformed_times_and_auth_headers_are_401(servers):
    for stamp in ("nan", "inf", "-inf", "9" * 400, "", "soon"):
        status, answer = send(servers.address, signed(servers.address, time=stamp))
        assert status == 401 and b"valid X-FT-Time" in answer, stamp
    for bad in ({"X-FT-Auth": "\xe9" * 64}, {"X-FT-Auth": "ab"}, {"X-FT-Nonce": "\xe9" * 32},
                {"X-FT-Nonce": "g" * 32}, {"X-FT-Nonce": ""}):  # fmt: skip
        status, answer = send(servers.address, signed(servers.address) | bad)
        assert status == 401 and b"valid X-FT-Nonce and X-FT-Auth" in answer, bad
    status, answer = send(servers.address, signed(servers.address, body=b"{}"), body=b'{"a": 1}')
    assert status == 401 and b"not signed" in answer  # the body is covered
    assert servers.calls == []


def test_no_body_is_read_before_the_headers_pass(servers):
    """A 1 MiB body announced and never sent: the refusal comes at once, the connection closes."""
    for headers in ({"X-FT-Time": "nan"}, signed(servers.address, time=repr(time.time() - 100)),
                    signed(servers.address) | {"X-FT-To": "10.0.2.2:7411"}):  # fmt: skip
        with socket.create_connection(servers.address, timeout=2) as s:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            s.sendall(f"POST /peer/x HTTP/1.1\r\nContent-Length: {1 << 20}\r\n{head}\r\n".encode())
            answer = b""
            while chunk := s.recv(65536):  # the server closes: it does not wait for the body
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401"), answer
    replayed = signed(servers.address)
    assert send(servers.address, replayed)[0] == 200
    with socket.create_connection(servers.address, timeout=2) as s:  # a known nonce: no body either
        head = "".join(f"{k}: {v}\r\n" for k, v in replayed.items())
        s.sendall(f"POST /peer/x HTTP/1.1\r\nContent-Length: 1000\r\n{head}\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 401")


def test_the_nonce_cache_forgets_after_its_window_and_is_capped():
    nonces = api.Nonces(keep=0.3, cap=2)
    assert nonces.add("a") and nonces.add("b") and not nonces.add("a") and nonces.seen("a")
    with pytest.raises(api.ApiError) as e:  # full of live nonces: refuse, never forget one
        nonces.add("c")
    assert e.value.status == 503
    time.sleep(0.35)
    assert not nonces.seen("a") and nonces.add("a") and nonces.add("c") and len(nonces.expiry) == 2
    assert api.Nonces().keep == 2 * api.CLOCK_SKEW


@pytest.mark.parametrize("which", ["peer", "unix"])
def test_500_idle_connections_hold_no_threads_and_the_api_still_answers(servers, which):
    def connect():
        if which == "peer":
            return socket.create_connection(servers.address, timeout=5)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(servers.sock))
        return s

    before = threading.active_count()
    idle = [connect() for _ in range(500)]
    idle[-1].sendall(b"GET /x HTT")  # and a slowloris one
    try:
        time.sleep(0.5)
        assert threading.active_count() <= before + api.MAX_CONNECTIONS + 5
        start = time.monotonic()
        if which == "peer":
            assert api.peer(servers.address, SECRET, "GET", "/peer/info") == {"ok": True}
        else:
            assert api.local(servers.sock, "GET", "/status") == (200, {"ok": True})
        assert time.monotonic() - start < 1.0
    finally:
        for s in idle:
            s.close()


def test_a_silent_connection_is_dropped_after_the_timeout(servers, monkeypatch):
    monkeypatch.setattr(api, "IDLE_TIMEOUT", 0.3)
    peer = api.serve_peer((ME, 0), servers.dispatch, SECRET)
    try:
        for partial in (b"", b"POST /peer/x HTTP/1.1\r\nContent-Le"):
            with socket.create_connection(peer.server_address, timeout=3) as s:
                s.sendall(partial)
                start = time.monotonic()
                assert s.recv(100) == b"" and time.monotonic() - start < 2
    finally:
        peer.shutdown()
        peer.server_close()


def test_when_every_connection_is_busy_a_new_one_is_closed_at_once(servers):
    servers.unix.max_connections = 2
    busy = [threading.Thread(target=api.local, args=(servers.sock, "POST", "/hold")) for _ in range(2)]
    for t in busy:
        t.start()
    while len(servers.calls) < 2:
        time.sleep(0.01)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(servers.sock))
        assert s.recv(100) == b""  # closed at once, not queued behind the busy ones
    servers.hold.set()
    for t in busy:
        t.join(5)
    assert api.local(servers.sock, "GET", "/status") == (200, {"ok": True})


def test_a_second_server_on_the_same_socket_is_refused_and_the_first_still_answers(servers):
    with pytest.raises(api.AlreadyRunning, match=r"another lockstepd \(pid \d+\) holds .*api.sock.lock"):
        api.serve_unix(servers.sock, servers.dispatch)
    assert api.local(servers.sock, "GET", "/status") == (200, {"ok": True})
    servers.unix.shutdown()
    servers.unix.server_close()  # the lock goes with the server: the socket left may be replaced
    servers.unix = api.serve_unix(servers.sock, servers.dispatch)
    assert api.local(servers.sock, "GET", "/status") == (200, {"ok": True})
