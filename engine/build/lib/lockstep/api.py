"""lockstepd's HTTP/JSON API: the local one on a root-only Unix socket (ftctl, the Ansible modules)
and the peer one on the FT-logging network, where every request carries an HMAC of its method,
path, time and body under the secret the role distributes.

The servers are the standard library's (http.server in threads); a handler hands each request
to the daemon's asyncio loop and answers with what it returns. Every refusal is a JSON
{"error": ...} with a status that says which kind: 400 malformed, 401 unauthenticated, 404
unknown, 405 wrong method, 409 not possible in this state, 413 too big."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import http.server
import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable

MAX_BODY = 1 << 20
CLOCK_SKEW = 30.0  # seconds a peer request may be old (or early)


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def sign(secret: bytes, method: str, path: str, stamp: str, body: bytes) -> str:
    msg = b"\n".join([method.encode(), path.encode(), stamp.encode(), body])
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def verify(secret: bytes, method: str, path: str, headers, body: bytes) -> None:
    stamp, mac = headers.get("X-FT-Time", ""), headers.get("X-FT-Auth", "")
    try:
        age = abs(time.time() - float(stamp))
    except ValueError:
        raise ApiError(401, "peer request without a valid X-FT-Time") from None
    if age > CLOCK_SKEW:
        raise ApiError(401, f"peer request {age:.0f} s off this host's clock")
    if not hmac.compare_digest(mac, sign(secret, method, path, stamp, body)):
        raise ApiError(401, "peer request not signed with this cluster's secret")


# handler(method, path, body as parsed JSON or None, peer) -> (status, JSON-able) ; may raise ApiError
Dispatch = Callable[[str, str, object, bool], tuple[int, object]]


def make_handler(dispatch: Dispatch, secret: bytes | None):
    """A request handler class; secret set: peer requests (authenticated), else local."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "lockstepd"

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

        def handle_any(self) -> None:
            try:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    raise ApiError(400, "Content-Length is not a number") from None
                if length < 0 or length > MAX_BODY:
                    self.close_connection = True  # do not read a body we refuse
                    raise ApiError(413, f"request body over {MAX_BODY} bytes")
                raw = self.rfile.read(length) if length else b""
                if secret is not None:
                    verify(secret, self.command, self.path, self.headers, raw)
                body = None
                if raw:
                    try:
                        body = json.loads(raw)
                    except (ValueError, UnicodeDecodeError) as e:
                        raise ApiError(400, f"body is not JSON: {e}") from None
                status, payload = dispatch(self.command, self.path, body, secret is not None)
                self.answer(status, payload)
            except ApiError as e:
                self.answer(e.status, {"error": e.message, **e.extra})
            except Exception as e:  # a bug must not take the daemon down with it
                self.answer(500, {"error": f"{type(e).__name__}: {e}"})

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

    return Handler


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("local", 0)  # http.server wants a (host, port) client address


class TcpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_unix(path, dispatch: Dispatch) -> UnixServer:
    """The local API on a Unix socket only root can use."""
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o077)
    try:
        server = UnixServer(str(path), make_handler(dispatch, None))
    finally:
        os.umask(old)
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
    stamp = repr(time.time())
    headers = {"X-FT-Time": stamp, "X-FT-Auth": sign(secret, method, path, stamp, data)}
    try:
        status, answer = _call(
            http.client.HTTPConnection(*address, timeout=timeout), method, path, body, headers
        )
    except OSError as e:
        raise ApiError(503, f"peer {address[0]}:{address[1]} unreachable: {e}") from None
    if status >= 400:
        raise ApiError(status, f"peer {address[0]}: {answer.get('error', status)}")
    return answer
