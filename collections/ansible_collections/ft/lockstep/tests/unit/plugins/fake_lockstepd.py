# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""FAKE lockstepd for tests: a stub HTTP/JSON server on a Unix socket that answers the calls the
modules and operator playbooks make (module_utils/engine.py), from an in-memory table of pairs.
It is not the engine: no QEMU, no peers, no datastore. A pair in a transient state (starting,
need_secondary) becomes running after `settle` further GETs of it, so waiting can be tested."""

import json
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler


def pair(name, state="running", primary="h1", secondary_host="h2", generation=1, **extra):
    """A pair's view with the keys lockstepd's GET /vms/NAME has."""
    view = {
        "name": name,
        "state": state,
        "reason": extra.pop("reason", "entered_lockstep" if state == "running" else "user_action"),
        "generation": generation,
        "primary": primary,
        "secondary_host": secondary_host if state in ("running", "starting") else None,
        "mode": "checkpoint",
        "checkpoint_ms": 100,
        "alarm": {"need_secondary": "red", "disabled": "yellow"}.get(state, "green"),
        "stats": {},
        "preferred_secondary": None,
        "guest": {"name": name, "mac": "52:54:00:00:00:01", "memory_mib": 256, "vcpus": 1},
        "datastore": "/ds",
        "disks": [],
    }
    view.update(extra)
    return view


class FakeLockstepd(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path, vms=None, host="h1", settle=1):
        self.path = str(path)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.vms = {v["name"]: v for v in (vms or [])}
        self.host = host
        self.settle = settle
        self.pending = {}  # name -> GETs left before a transient state becomes running
        self.calls = []  # (method, path, body)
        self.status_extra = {}  # more keys in GET /status (as a newer daemon may add)
        self.lock = threading.Lock()
        super().__init__(self.path, _Handler)

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        os.unlink(self.path)

    def mutations(self):
        return [c for c in self.calls if c[0] == "POST"]

    # --- the API --------------------------------------------------------------------------

    def answer(self, method, path, body):
        parts = [p for p in path.split("/") if p]
        if method == "GET" and parts == ["status"]:
            pairs = list(self.vms.values())
            return 200, {
                "host": self.host,
                "mode": "checkpoint",
                "pairs": pairs,
                "local_vms": [],
                "hosts": {"h1": "10.0.0.1", "h2": "10.0.0.2"},
                "datastore": "/ds",
                "caps": {"max_vms": 0, "max_vcpus": 0, "ft_bandwidth_mbps": 0},
                "alarms": [
                    {"vm": p["name"], "level": p["alarm"], "state": p["state"], "reason": p["reason"]}
                    for p in pairs
                    if p["alarm"] != "green"
                ],
                **self.status_extra,
            }
        if method == "POST" and parts == ["vms"]:
            self.vms[body["name"]] = pair(body["name"], "not_configured", guest=body)
            return 200, {"changed": True, "vm": self.vms[body["name"]]}
        if len(parts) < 2 or parts[0] != "vms":
            return 404, {"error": f"no route {method} {path}"}
        name = parts[1]
        if name not in self.vms:
            return 404, {"error": f"no FT VM named {name}"}
        vm = self.vms[name]
        if method == "GET" and len(parts) == 2:
            if name in self.pending:
                self.pending[name] -= 1
                if self.pending[name] < 0:
                    del self.pending[name]
                    vm.update(state="running", reason="entered_lockstep", alarm="green")
                    vm["secondary_host"] = vm["secondary_host"] or "h2"
            return 200, vm
        op = parts[2] if len(parts) == 3 and method == "POST" else None
        if op == "enable":
            if vm["state"] in ("running", "starting", "need_secondary"):
                return 200, {"changed": False, "vm": vm}
            vm.update(state="starting", reason="user_action", secondary_host=None, alarm="green")
            self.pending[name] = self.settle
        elif op in ("disable", "absent"):
            new = "disabled" if op == "disable" else "not_configured"
            if vm["state"] == new or (op == "disable" and vm["state"] == "not_configured"):
                return 200, {"changed": False, "vm": vm}
            vm.update(state=new, reason="user_action", secondary_host=None)
        elif op in ("test-failover", "test-restart-secondary"):
            if vm["state"] != "running":
                return 409, {"error": f"{op} needs a running pair; {name} is {vm['state']}"}
            if op == "test-failover":
                vm["primary"] = vm["secondary_host"]
            vm.update(state="starting", secondary_host=None, generation=vm["generation"] + 1)
            self.pending[name] = self.settle
        elif op == "migrate":
            role, target = body.get("role"), body.get("host")
            if role not in ("primary", "secondary"):
                return 400, {"error": "migrate needs role primary or secondary and host one of h1, h2"}
            if vm["state"] != "running":
                return 409, {"error": f"migrate needs a running pair; {name} is {vm['state']}"}
            key = "primary" if role == "primary" else "secondary_host"
            if vm[key] == target:
                return 200, {"changed": False, "vm": vm}
            vm[key] = target
        else:
            return 404, {"error": f"no route {method} {path}"}
        return 200, {"changed": True, "vm": vm}


class _Handler(BaseHTTPRequestHandler):
    def address_string(self):
        return "unix"

    def log_message(self, *args):
        pass

    def handle_any(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else {}
        with self.server.lock:
            self.server.calls.append((method, self.path, body))
            status, payload = self.server.answer(method, self.path, body)
            data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")
