# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one client the modules use for lockstepd's local API: HTTP/JSON on its root-only Unix
socket (engine/lockstep/api.py serves it). Any host's daemon answers for every pair: it forwards
an operation to the daemon that drives the pair."""

import http.client
import json
import socket
import time

DEFAULT_SOCKET = "/run/lockstepd.sock"


class EngineError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Engine:
    def __init__(self, socket_path=DEFAULT_SOCKET, timeout=600):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method, path, body=None):
        """The answer's JSON; EngineError with the daemon's reason on any error status, or when
        the daemon does not answer (status 0)."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        data = None if body is None else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise EngineError(0, f"lockstepd does not answer on {self.socket_path}: {e}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(text) if text else {}
        except ValueError:
            answer = {"error": text.decode(errors="replace")}
        if resp.status >= 400:
            raise EngineError(resp.status, answer.get("error") or f"status {resp.status}")
        return answer

    def vm(self, name):
        """The pair's view, or None when the engine knows no VM of that name."""
        try:
            return self.request("GET", f"/vms/{name}")
        except EngineError as e:
            if e.status == 404:
                return None
            raise

    def await_vm(self, name, ready, timeout, poll=0.5):
        """Poll the pair's view until ready(view); (view, True) or, at the deadline, (last view, False)."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.vm(name)
            if view is not None and ready(view):
                return view, True
            if time.monotonic() >= deadline:
                return view, False
            time.sleep(poll)
