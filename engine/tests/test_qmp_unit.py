"""lockstep.qmp against FakeQemu, a fake of QEMU's QMP server: the real QMP protocol on a Unix
socket (greeting, capabilities negotiation, commands, events), with canned answers. The
watcher's tests (test_watch_unit.py) use it as their QEMU."""

from __future__ import annotations

import asyncio
import gc
import json

from qemu.qmp import EventListener, QMPClient

from lockstep import qmp

VERSION = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}
GREETING = {"QMP": {"version": VERSION, "capabilities": []}}


class FakeQemu:
    """A fake QEMU's QMP server. Commands are answered from `answers` (default {}), recorded in
    `commands`; a command in `hang` is not answered until release() (QEMU answers in-band commands
    once its main loop is free), one in `fail` gets a GenericError."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.commands: list[tuple[str, dict | None]] = []
        self.answers: dict = {
            "query-status": {"running": True, "status": "running"},
            "query-block-exports": [],
            "query-named-block-nodes": [],
            "human-monitor-command": "",
            "query-colo-status": {"mode": "primary", "last-mode": "none", "reason": "none"},
            "query-migrate": {"status": "colo"},
            "qom-list": [],
            "query-block-jobs": [],
            "query-yank": [],
        }
        self.hang: set[str] = set()  # in-band commands not answered (its main loop blocked)
        self.held: list[tuple[asyncio.StreamWriter, dict]] = []  # hung commands, answered by release()
        self.fail: set[str] = set()
        self.oob = False  # offers out-of-band execution, answered even while in-band commands hang
        self.stopped = False  # answers nothing at all (the process is stopped)
        self.on_command = None  # called with each command's name before it is answered
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.ticker: asyncio.Task | None = None

    async def __aenter__(self) -> FakeQemu:
        self.server = await asyncio.start_unix_server(self.serve, self.path)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.ticker:
            self.ticker.cancel()
        for w in self.writers:
            w.close()
        self.server.close()

    def received(self, name: str) -> bool:
        return any(cmd == name for cmd, _ in self.commands)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        greeting = {"QMP": GREETING["QMP"] | {"capabilities": ["oob"] if self.oob else []}}
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        decoder, buf = json.JSONDecoder(), ""
        while data := await reader.read(65536):
            buf += data.decode()
            while buf.strip():  # qemu.qmp sends objects back to back, without newlines
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                self.answer(writer, msg)

    def answer(self, writer: asyncio.StreamWriter, msg: dict) -> None:
        oob = "exec-oob" in msg
        cmd = msg["exec-oob"] if oob else msg["execute"]
        if cmd != "qmp_capabilities":
            self.commands.append((cmd, msg.get("arguments")))
            if self.on_command:
                self.on_command(cmd)
        if self.stopped:
            return
        if cmd in self.hang and not oob:
            self.held.append((writer, msg))
            return
        self.reply(writer, msg, cmd, oob)

    def reply(self, writer: asyncio.StreamWriter, msg: dict, cmd: str, oob: bool = False) -> None:
        if cmd in self.fail or (oob and not self.oob):  # QEMU refuses exec-oob unless it was offered
            reply = {"error": {"class": "GenericError", "desc": f"{cmd} failed (FakeQemu)"}}
        else:
            reply = {"return": self.answers.get(cmd, {})}
        writer.write(json.dumps(reply | {"id": msg.get("id")}).encode() + b"\r\n")

    def release(self, cmd: str) -> None:
        """The main loop is free again: the held commands are answered, in order."""
        self.hang.discard(cmd)
        held, self.held = self.held, []
        for writer, msg in held:
            self.reply(writer, msg, msg["execute"])

    async def emit(self, *names: str, times: int = 1, data: dict | None = None) -> None:
        """Send events (a checkpoint is STOP then RESUME) to every client, as fast as they read."""
        for i in range(times):
            for name in names:
                event = {"event": name, "timestamp": {"seconds": 1_700_000_000 + i, "microseconds": 0}}
                event |= {"data": data} if data is not None else {}
                line = json.dumps(event).encode() + b"\r\n"
                for w in self.writers:
                    w.write(line)
            if i % 500 == 0:
                for w in self.writers:
                    await w.drain()
        for w in self.writers:
            await w.drain()

    def checkpoint_every(self, interval: float) -> None:
        """RESUME events at this interval, as a replicating primary sends them."""

        async def tick() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.emit("STOP", "RESUME")

        self.ticker = asyncio.create_task(tick())


async def watcher_like(path: str) -> tuple[QMPClient, EventListener]:
    """The watcher's set-up: lockstep.qmp's client with a BoundedListener for RESUME."""
    client = await qmp.connect(path, 5)
    resumes = qmp.BoundedListener(("RESUME",))
    client.register_listener(resumes)
    return client, resumes


async def library_default(path: str) -> tuple[QMPClient, EventListener]:
    """The set-up before the fix: qemu.qmp's client and its EventListener."""
    client = QMPClient()
    await client.connect(path)
    resumes = EventListener(("RESUME",))
    client.register_listener(resumes)
    return client, resumes


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def growth(tmp_path, setup, checkpoints: int) -> int:
    """How much this process's RSS grew while a client set up so read this many checkpoints,
    clearing its listener every 0.1 s as the watcher does."""
    async with FakeQemu(tmp_path / "qmp.sock") as fake:
        client, resumes = await setup(fake.path)

        async def consume() -> None:
            while True:
                await asyncio.sleep(0.1)
                resumes.clear()

        consumer = asyncio.create_task(consume())
        try:
            gc.collect()
            before = rss()
            await fake.emit("STOP", "RESUME", times=checkpoints)
            await client.execute("query-status")  # its answer comes after every event: all read
            resumes.clear()
            gc.collect()
            return rss() - before
        finally:
            consumer.cancel()
            await client.disconnect()


BOUND = 16 * 1024 * 1024  # the library's defaults keep about 2 KB per checkpoint


def test_a_watchers_connection_keeps_no_events(tmp_path):
    """R4: 200 000 events (100 000 checkpoints) cost the watcher's connection nothing that stays."""
    assert asyncio.run(growth(tmp_path, watcher_like, 100_000)) < BOUND


def test_the_librarys_default_set_up_keeps_every_event(tmp_path):
    """The test above can fail: with qemu.qmp's defaults half as many checkpoints exceed the bound."""
    assert asyncio.run(growth(tmp_path, library_default, 50_000)) > 2 * BOUND


def test_a_bounded_listener_drops_the_oldest_and_keeps_no_history(tmp_path):
    async def main():
        async with FakeQemu(tmp_path / "qmp.sock") as fake:
            client = await qmp.connect(fake.path, 5)
            listener = qmp.BoundedListener(("STOP", "RESUME", "SHUTDOWN"), maxsize=3)
            client.register_listener(listener)
            assert client.events not in client._listeners  # the library's default listener is gone
            await fake.emit("STOP", "RESUME", "POWERDOWN", times=3)
            await client.execute("query-status")
            got = [(e["event"], e["timestamp"]["seconds"] - 1_700_000_000) for e in listener.clear()]
            assert got == [("RESUME", 1), ("STOP", 2), ("RESUME", 2)]
            assert listener.history == ()
            await client.disconnect()

    asyncio.run(main())
