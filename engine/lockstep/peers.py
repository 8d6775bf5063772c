"""Calls to the other hosts' daemons (the signed peer API, api.peer), off the event loop on a
pool of their own, each with the timeout its kind of call deserves: a dead host costs one
timeout, never a stalled daemon."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from . import api

TIMEOUTS = {"info": 1.0, "vm": 2.0, "stop": 5.0, "kill": 5.0, "watch": 25.0, "secondary": 60.0,
            "forward": 900.0}  # fmt: skip


class Peers:
    def __init__(self, hosts: dict[str, str], port: int, secret: bytes) -> None:
        self.hosts, self.port, self.secret = hosts, port, secret
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="peers")
        self.started = time.monotonic()
        self.answered: dict[str, float] = {}  # host -> when it last answered anything
        self.probing: set[str] = set()

    def silent_for(self, host: str) -> float:
        """Seconds since the host's daemon last answered (since this daemon started, if never)."""
        return time.monotonic() - self.answered.get(host, self.started)

    def probe(self, host: str) -> None:
        """Ask a host that has been quiet whether it is there (one question at a time)."""
        if host in self.probing or self.silent_for(host) < 2:
            return
        self.probing.add(host)
        task = asyncio.create_task(self.call(host, "GET", "/peer/info"))
        task.add_done_callback(lambda t: (self.probing.discard(host), t.exception()))

    async def call(self, host: str, method: str, path: str, body=None, timeout: float | None = None) -> dict:
        """The peer's answer; ApiError (503 when unreachable) otherwise."""
        if host not in self.hosts:
            raise api.ApiError(409, f"{host} is not one of this cluster's FT hosts")
        kind = path.split("/")[2] if path.startswith("/peer/") else "forward"
        wait = timeout or TIMEOUTS.get(kind, 10.0)
        address = (self.hosts[host], self.port)
        loop = asyncio.get_running_loop()
        try:
            request = (address, self.secret, method, path, body, wait)
            answer = await loop.run_in_executor(self.pool, api.peer, *request)
        except api.ApiError as e:
            if e.status != 503:
                self.answered[host] = time.monotonic()  # it answered, with a refusal
            raise
        self.answered[host] = time.monotonic()
        return answer
