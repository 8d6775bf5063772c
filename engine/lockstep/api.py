"""lockstepd's HTTP/JSON API: the local one on a root-only Unix socket (ftctl, the Ansible modules)
and the peer one on the FT-logging network, where every request carries an HMAC of its method,
path, time, a nonce, both ends of its connection and its body, under the secret the role distributes.

The servers are the standard library's (http.server in threads); a handler hands each request
to the daemon's asyncio loop and answers with what it returns. Every refusal is a JSON
{"error": ...} with a status that says which kind: 400 malformed, 401 unauthenticated, 404
unknown, 405 wrong method, 408 too slow, 409 not possible in this state, 413 too big, 503 overloaded."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import hmac
import http.client
import http.server
import json
import math
import os
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable

MAX_BODY = 1 << 20
CLOCK_SKEW = 30.0  # seconds a peer request may be old (or early)
MAX_NONCES = 100_000  # peer requests remembered per 2 * CLOCK_SKEW: far above what a cluster sends
MAX_CONNECTIONS = 64  # per server: each has a thread
IDLE_TIMEOUT = 10.0  # seconds a connection may stay silent while a request is read or awaited


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class AlreadyRunning(RuntimeError):
    """Another process serves this socket (another lockstepd on this host)."""


# --- peer authentication ---------------------------------------------------------------------


def sign(
    secret: bytes, method: str, path: str, stamp: str, nonce: str, to: str, sender: str, body: bytes
) -> str:
    """The MAC of a peer request. `to` is the server's "ip:port", `sender` the client's ip, both as
    the connection sees them: a request captured on its way to one host is no good at another, nor
    from another sender. JSON keeps the fields apart whatever they hold."""
    fields = json.dumps([method, path, stamp, nonce, to, sender]).encode()
    return hmac.new(secret, fields + b"\n" + body, hashlib.sha256).hexdigest()


def auth_headers(secret: bytes, method: str, path: str, body: bytes, to: str, sender: str) -> dict:
    stamp, nonce = repr(time.time()), os.urandom(16).hex()
    mac = sign(secret, method, path, stamp, nonce, to, sender, body)
    return {"X-FT-Time": stamp, "X-FT-Nonce": nonce, "X-FT-To": to, "X-FT-From": sender, "X-FT-Auth": mac}


class Nonces:
    """The nonces of the peer requests accepted lately. A request's time passes the window for at
    most 2 * CLOCK_SKEW of this host's time, so a nonce is kept that long; then its request is
    refused as too old anyway."""

    def __init__(self, keep: float = 2 * CLOCK_SKEW, cap: int = MAX_NONCES) -> None:
        self.keep, self.cap = keep, cap
        self.expiry: collections.OrderedDict[str, float] = collections.OrderedDict()  # oldest first
        self.lock = threading.Lock()

    def seen(self, nonce: str) -> bool:
        with self.lock:
            return self.expiry.get(nonce, 0.0) > time.monotonic()

    def add(self, nonce: str) -> bool:
        """Remember the nonce; False if it was used already."""
        now = time.monotonic()
        with self.lock:
            while self.expiry and next(iter(self.expiry.values())) <= now:
                self.expiry.popitem(last=False)
            if nonce in self.expiry:
                return False
            if len(self.expiry) >= self.cap:  # refuse rather than forget a nonce that could come back
                raise ApiError(503, "too many peer requests lately")
            self.expiry[nonce] = now + self.keep
            return True


def endpoint(address: tuple) -> str:
    return f"{address[0]}:{address[1]}"


HEX32, HEX64 = re.compile(r"[0-9a-f]{32}"), re.compile(r"[0-9a-f]{64}")


def check_headers(headers, to: str, sender: str, nonces: Nonces) -> tuple[str, str, str]:
    """What can be checked before reading the body: time, format, addressee, sender, no replay.
    The stamp, nonce and MAC."""
    stamp = headers.get("X-FT-Time", "")
    try:
        when = float(stamp)
    except ValueError:
        when = math.nan
    if not math.isfinite(when):
        raise ApiError(401, "peer request without a valid X-FT-Time")
    age = abs(time.time() - when)
    if age > CLOCK_SKEW:
        raise ApiError(401, f"peer request {age:.0f} s off this host's clock")
    nonce, mac = headers.get("X-FT-Nonce", ""), headers.get("X-FT-Auth", "")
    if not HEX32.fullmatch(nonce) or not HEX64.fullmatch(mac):  # also: compare_digest wants ASCII
        raise ApiError(401, "peer request without a valid X-FT-Nonce and X-FT-Auth")
    if headers.get("X-FT-To") != to:
        raise ApiError(401, f"peer request meant for {headers.get('X-FT-To')}, not this host ({to})")
    if headers.get("X-FT-From") != sender:
        raise ApiError(401, f"peer request signed for sender {headers.get('X-FT-From')}, sent by {sender}")
    if nonces.seen(nonce):
        raise ApiError(401, "peer request replayed (its nonce was used already)")
    return stamp, nonce, mac


# handler(method, path, body as parsed JSON or None, peer) -> (status, JSON-able) ; may raise ApiError
Dispatch = Callable[[str, str, object, bool], tuple[int, object]]


def make_handler(dispatch: Dispatch, secret: bytes | None):
    """A request handler class; secret set: peer requests (authenticated), else local."""
    nonces = Nonces()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "lockstepd"
        timeout = IDLE_TIMEOUT  # a silent client (idle, slowloris) is dropped, its thread freed

        def log_message(self, *args) -> None:  # the daemon logs events, not every request
            pass

        def answer(self, status: int, payload: object) -> None:
            text = isinstance(payload, bytes)  # Prometheus metrics
            body = payload if text else json.dumps(payload).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4" if text else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (bad request line, headers): JSON too, with a status
            line even for what looked like HTTP/0.9."""
            self.request_version = "HTTP/1.1"
            self.close_connection = True
            self.answer(code, {"error": message or explain or self.responses.get(code, ("error",))[0]})

        def read_request(self) -> object:
            """The request's body, parsed; authenticated first if it came from a peer."""
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise ApiError(400, "Content-Length is not a number") from None
            if length < 0 or length > MAX_BODY:
                raise ApiError(413, f"request body over {MAX_BODY} bytes")
            if secret is not None:  # before the body: an unauthenticated client costs no reading
                to, sender = endpoint(self.connection.getsockname()), self.client_address[0]
                stamp, nonce, mac = check_headers(self.headers, to, sender, nonces)
            try:
                raw = self.rfile.read(length) if length else b""
            except TimeoutError:
                raise ApiError(408, f"request body not sent within {IDLE_TIMEOUT:.0f} s") from None
            if len(raw) < length:
                raise ApiError(400, "request body shorter than its Content-Length")
            if secret is not None:
                expected = sign(secret, self.command, self.path, stamp, nonce, to, sender, raw)
                if not hmac.compare_digest(mac, expected):
                    raise ApiError(401, "peer request not signed with this cluster's secret")
                if not nonces.add(nonce):  # a copy that came in at the same time
                    raise ApiError(401, "peer request replayed (its nonce was used already)")
            if not raw:
                return None
            try:
                return json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"body is not JSON: {e}") from None

        def handle_any(self) -> None:
            try:
                body = self.read_request()
                if not self.server.claim(self.connection):  # pushed out while it was read: do nothing
                    self.close_connection = True
                    return
                try:
                    status, payload = dispatch(self.command, self.path, body, secret is not None)
                finally:
                    self.server.release(self.connection)
                self.answer(status, payload)
            except ApiError as e:
                self.close_connection = True  # its body may be unread: it must not pass for a request
                self.answer(e.status, {"error": e.message, **e.extra})
            except Exception as e:  # a bug must not take the daemon down with it
                self.answer(500, {"error": f"{type(e).__name__}: {e}"})

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

    return Handler


class Bounded(socketserver.ThreadingMixIn):
    """At most MAX_CONNECTIONS connections, a thread each. A new connection pushes out the oldest
    one still waiting for (or reading) its request; only when every one is busy in dispatch is the
    new one closed at once. Idle and slowloris clients hold neither threads nor the API."""

    daemon_threads = True
    request_queue_size = 128  # a burst of connections is accepted (and sorted out) without SYN retries
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args, **kwargs) -> None:
        self.open: dict[socket.socket, bool] = {}  # connection -> busy in dispatch; oldest first
        self.guard = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self.guard:
            if len(self.open) >= self.max_connections:
                waiting = next((c for c, busy in self.open.items() if not busy), None)
                if waiting is None:
                    self.shutdown_request(request)
                    return
                del self.open[waiting]
                with contextlib.suppress(OSError):
                    waiting.shutdown(socket.SHUT_RDWR)  # its thread reads the end and goes
            self.open[request] = False
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.guard:
                self.open.pop(request, None)

    def claim(self, conn: socket.socket) -> bool:
        """Mark a connection busy, not to be pushed out; False if it was already."""
        with self.guard:
            if conn not in self.open:
                return False
            self.open[conn] = True
            return True

    def release(self, conn: socket.socket) -> None:
        with self.guard:
            if conn in self.open:
                self.open[conn] = False

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client gone or pushed out is no bug
            super().handle_error(request, client_address)


class UnixServer(Bounded, socketserver.UnixStreamServer):
    lock_fd: int | None = None

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("local", 0)  # http.server wants a (host, port) client address

    def server_close(self) -> None:
        super().server_close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


class TcpServer(Bounded, http.server.HTTPServer):
    allow_reuse_address = True


def hold_lock(path) -> int:
    """An exclusive flock on <socket>.lock, for as long as the fd is open (the process lives): one
    lockstepd per host, and a socket is only ever replaced when its daemon is gone."""
    lock = f"{path}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 20).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another lockstepd (pid {holder}) holds {lock}: it serves {path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def serve_unix(path, dispatch: Dispatch, lock_fd: int | None = None) -> UnixServer:
    """The local API on a Unix socket only root can use, once this process holds its lock
    (lock_fd: taken already with hold_lock; AlreadyRunning if another process holds it)."""
    fd = hold_lock(path) if lock_fd is None else lock_fd
    try:
        if os.path.exists(path):  # left by a daemon that is gone: it held the lock
            os.unlink(path)
        old = os.umask(0o077)
        try:
            server = UnixServer(str(path), make_handler(dispatch, None))
        finally:
            os.umask(old)
    except BaseException:
        os.close(fd)
        raise
    server.lock_fd = fd
    threading.Thread(target=server.serve_forever, name="api-local", daemon=True).start()
    return server


def serve_peer(address: tuple[str, int], dispatch: Dispatch, secret: bytes) -> TcpServer:
    server = TcpServer(address, make_handler(dispatch, secret))
    threading.Thread(target=server.serve_forever, name="api-peer", daemon=True).start()
    return server


# --- clients ---------------------------------------------------------------------------------


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def _call(
    conn: http.client.HTTPConnection, method: str, path: str, body: object, headers: dict
) -> tuple[int, dict]:
    data = b"" if body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data or None, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        text = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text) if text else {}
    except ValueError:
        return resp.status, {"error": text.decode(errors="replace")}


def exchange(socket_path, data: bytes, timeout: float = 10) -> bytes:
    """Raw bytes to the local API and its whole answer: for probing the parser with what no
    HTTP client sends (tests, diagnostics)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def local(socket_path, method: str, path: str, body: object = None, timeout: float = 600) -> tuple[int, dict]:
    return _call(UnixConnection(str(socket_path), timeout), method, path, body, {})


def peer(address: tuple[str, int], secret: bytes, method: str, path: str, body: object = None,
         timeout: float = 120) -> dict:  # fmt: skip
    """A signed call to another host's daemon; its answer, or ApiError with its status."""
    data = b"" if body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.connect()  # first: the signature names both ends of this connection
        to, sender = endpoint(conn.sock.getpeername()), conn.sock.getsockname()[0]
        headers = auth_headers(secret, method, path, data, to, sender)
        status, answer = _call(conn, method, path, body, headers)
    except OSError as e:
        conn.close()
        raise ApiError(503, f"peer {address[0]}:{address[1]} unreachable: {e}") from None
    if status >= 400:
        raise ApiError(status, f"peer {address[0]}: {answer.get('error', status)}")
    return answer
