"""The client's byte check, run inside the lab's client namespace (`python -m ftlab.client`).

The guest serves (lab/guest/init) an echo on port 7 and, on port 19, a stream whose n-th line is
n in 11 zero-padded digits. StreamVerifier proves a received stream has no byte lost, duplicated
or reordered; echo_check proves the echo returned exactly what was sent. Results are printed as
one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time

STREAM_PORT = 19
ECHO_PORT = 7
SPIN_PORT = 9
DISK_IN_PORT = 5
DISK_OUT_PORT = 6
SECOND_DISK = 10  # the second disk's services are the first's plus this (15, 16)
LINE = 12  # bytes per stream line: 11 digits and a newline


class StreamMismatch(Exception):
    pass


class StreamVerifier:
    """Feed it the bytes of the stream in any chunking; it raises at the first wrong byte."""

    def __init__(self) -> None:
        self.offset = 0  # bytes verified so far
        self._partial = b""

    def feed(self, data: bytes) -> None:
        buf = self._partial + data
        start = self.offset - len(self._partial)  # stream offset of buf[0], a line start
        whole = len(buf) - len(buf) % LINE
        first = start // LINE
        expected = b"".join(b"%011d\n" % n for n in range(first, first + whole // LINE))
        if buf[:whole] != expected:
            at = next(i for i in range(whole) if buf[i] != expected[i])
            raise StreamMismatch(
                f"stream byte {start + at}: got {buf[at : at + LINE]!r}, "
                f"expected {expected[at : at + LINE]!r}"
            )
        tail = buf[whole:]
        if tail != (b"%011d\n" % (first + whole // LINE))[: len(tail)]:
            raise StreamMismatch(f"stream byte {start + whole}: got {tail!r}")
        self._partial = tail
        self.offset = start + len(buf)


def connect(ip: str, port: int, deadline: float) -> socket.socket:
    """Connect, retrying until the deadline (the guest may still be booting)."""
    while True:
        try:
            return socket.create_connection((ip, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stream_check(ip: str, nbytes: int, deadline: float) -> dict:
    verifier = StreamVerifier()
    t0 = time.monotonic()
    with connect(ip, STREAM_PORT, deadline) as s:
        while verifier.offset < nbytes:
            data = s.recv(min(65536, nbytes - verifier.offset))
            if not data:
                raise StreamMismatch(f"connection closed after {verifier.offset} bytes")
            verifier.feed(data)
    elapsed = time.monotonic() - t0
    return {"bytes": verifier.offset, "seconds": round(elapsed, 3)}


def follow(ip: str, deadline: float, report_every: float = 1.0) -> dict:
    """Hold a stream connection open until SIGTERM, verifying every byte. Prints a JSON progress
    line each report_every seconds; returns the totals and the longest gap between two reads,
    which is what a client sees of a failover. SIGUSR1 restarts the longest-gap count (the
    pause in progress still counts whole)."""
    stop = False
    max_gap, last = 0.0, None

    def on_term(*_):
        nonlocal stop
        stop = True

    def on_mark(*_):
        nonlocal max_gap
        max_gap = 0.0

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_mark)
    verifier = StreamVerifier()
    with connect(ip, STREAM_PORT, deadline) as s:
        s.settimeout(0.2)
        start = next_report = time.monotonic()
        while not stop:
            try:
                data = s.recv(65536)
            except TimeoutError:
                data = None
            now = time.monotonic()
            if data == b"":
                raise StreamMismatch(f"connection closed after {verifier.offset} bytes")
            if data:
                verifier.feed(data)
                if last is not None:
                    max_gap = max(max_gap, now - last)
                last = now
            if now >= next_report:
                print(json.dumps({"t": round(now - start, 2), "bytes": verifier.offset}), flush=True)
                next_report = now + report_every
    return {"bytes": verifier.offset, "max_gap": round(max_gap, 3)}


def echo_check(ip: str, nbytes: int, deadline: float, chunk: int = 4096) -> dict:
    sent = os.urandom(nbytes)
    got = bytearray()
    t0 = time.monotonic()
    with connect(ip, ECHO_PORT, deadline) as s:
        for i in range(0, nbytes, chunk):
            s.sendall(sent[i : i + chunk])
            want = min(i + chunk, nbytes)
            while len(got) < want:
                data = s.recv(want - len(got))
                if not data:
                    raise StreamMismatch(f"echo closed after {len(got)} bytes")
                got += data
    if bytes(got) != sent:
        at = next(i for i in range(nbytes) if got[i] != sent[i])
        raise StreamMismatch(f"echo byte {at} differs")
    return {"bytes": nbytes, "seconds": round(time.monotonic() - t0, 3)}


def measure(ip: str, seconds: float, deadline: float) -> dict:
    """What bench/overhead compares: echo round trips of 64 bytes (rate and latency), the
    stream's throughput, and the wall time of the guest's CPU-bound loop (port 9)."""
    rtts = []
    with connect(ip, ECHO_PORT, deadline) as s:
        end = time.monotonic() + seconds
        while (t0 := time.monotonic()) < end:
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                data = s.recv(64 - got)
                if not data:
                    raise StreamMismatch("echo closed")
                got += len(data)
            rtts.append(time.monotonic() - t0)
    verifier = StreamVerifier()
    with connect(ip, STREAM_PORT, deadline) as s:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            verifier.feed(s.recv(65536))
        bulk = verifier.offset / (time.monotonic() - t0)
    with connect(ip, SPIN_PORT, deadline) as s:
        s.settimeout(600)
        t0 = time.monotonic()
        while s.recv(64):
            pass
        spin = time.monotonic() - t0
    rtts.sort()
    return {
        "rr_per_s": round(len(rtts) / seconds, 1),
        "rr_p50_ms": round(rtts[len(rtts) // 2] * 1000, 2),
        "rr_p99_ms": round(rtts[int(len(rtts) * 0.99)] * 1000, 2),
        "bulk_bytes_per_s": round(bulk),
        "spin_s": round(spin, 3),
    }


def disk_pattern(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def disk_write(ip: str, nbytes: int, seed: int, deadline: float, disk: int = 1) -> dict:
    """Write nbytes of a seeded pattern to the start of the guest's disk (1: vda, 2: vdb); the guest syncs."""
    with connect(ip, DISK_IN_PORT + SECOND_DISK * (disk - 1), deadline) as s:
        s.settimeout(120)
        s.sendall(disk_pattern(nbytes, seed))
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(64)
    if reply.strip() != b"written":
        raise StreamMismatch(f"the guest did not confirm the write: {reply!r}")
    return {"bytes": nbytes, "seed": seed}


def disk_read(ip: str, nbytes: int, seed: int, deadline: float, disk: int = 1) -> dict:
    """Read the start of the guest's disk (past its page cache) and compare with the pattern."""
    got = bytearray()
    with connect(ip, DISK_OUT_PORT + SECOND_DISK * (disk - 1), deadline) as s:
        s.settimeout(120)
        while len(got) < nbytes and (data := s.recv(65536)):
            got += data
    want = disk_pattern(nbytes, seed)
    if bytes(got[:nbytes]) != want:
        at = next((i for i in range(min(len(got), nbytes)) if got[i] != want[i]), len(got))
        raise StreamMismatch(f"disk byte {at} differs from what was written (read {len(got)} bytes)")
    return {"bytes": nbytes, "seed": seed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ftlab.client")
    p.add_argument("ip")
    p.add_argument("--stream-bytes", type=int, default=1 << 20)
    p.add_argument("--echo-bytes", type=int, default=64 << 10)
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the guest")
    p.add_argument("--follow", action="store_true", help="read the stream until SIGTERM")
    p.add_argument("--measure", type=float, metavar="SECONDS", help="rates for bench/overhead")
    p.add_argument("--disk-write", type=int, metavar="BYTES", help="write a seeded pattern to the disk")
    p.add_argument("--disk-read", type=int, metavar="BYTES", help="check the disk holds the pattern")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disk", type=int, choices=(1, 2), default=1, help="which disk: 1 (vda) or 2 (vdb)")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    result: dict = {"ip": args.ip}
    try:
        if args.follow:
            result["follow"] = follow(args.ip, deadline)
        elif args.measure:
            result["measure"] = measure(args.ip, args.measure, deadline)
        elif args.disk_write:
            result["disk_write"] = disk_write(args.ip, args.disk_write, args.seed, deadline, args.disk)
        elif args.disk_read:
            result["disk_read"] = disk_read(args.ip, args.disk_read, args.seed, deadline, args.disk)
        else:
            result["stream"] = stream_check(args.ip, args.stream_bytes, deadline)
            result["echo"] = echo_check(args.ip, args.echo_bytes, deadline)
        result["ok"] = True
    except (OSError, StreamMismatch) as e:
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
    json.dump(result, sys.stdout)
    print()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
