"""A database client that proves no acknowledged commit is lost (`python -m ftlab.ledger HOST`).

It keeps one connection to the guest's PostgreSQL (lab/debian/build-db: database `ledger`, table
ledger(id bigint primary key)) and commits one unique id per transaction, each as
`BEGIN; INSERT INTO ledger(id) VALUES (id); COMMIT` in one round trip. Every commit the server
acknowledged is logged at once, as a JSON line {"ack": id, "t": unix time}, to --log; an id whose
commit raised is logged {"doubt": id} (it may or may not have committed) and the run ends.

Then, or alone with --check LOG, it reads the table back from the heap (index scans off, so a
duplicate that a broken index would hide is seen) and prints one JSON object: acknowledged,
lost (acknowledged, absent), duplicated, present but never acknowledged (fine: committed, its
acknowledgement lost on the way; never more than the one commit in flight), and whether the
connection was kept: the same backend pid and postmaster start time at its start and its end."""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
import time
from pathlib import Path

import psycopg

IDENTITY = "SELECT pg_backend_pid(), pg_postmaster_start_time()::text"


def connect(host: str, dbname: str, user: str, timeout: float) -> psycopg.Connection:
    """Connect, retrying until `timeout` (the guest may still be starting PostgreSQL)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(host=host, dbname=dbname, user=user, connect_timeout=5,
                                   autocommit=True, keepalives=1, keepalives_idle=30)  # fmt: skip
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def identity(conn: psycopg.Connection) -> dict:
    pid, started = conn.execute(IDENTITY).fetchone()
    return {"backend_pid": pid, "postmaster_start": started}


def run(conn: psycopg.Connection, log: Path, first: int, seconds: float, stop: list[bool]) -> dict:
    """Commit ids first, first+1, ... for `seconds` (or until SIGTERM); log each as it is
    acknowledged. The identity of the connection at the start and, if it lived, at the end."""
    out: dict = {"first": first}
    with open(log, "a") as f:
        start = identity(conn)
        f.write(json.dumps({"start": start, "first": first, "t": time.time()}) + "\n")
        f.flush()
        out["start"] = start
        end = time.monotonic() + seconds
        n = first
        while time.monotonic() < end and not stop[0]:
            try:
                conn.execute(f"BEGIN; INSERT INTO ledger(id) VALUES ({n:d}); COMMIT")
            except psycopg.Error as e:
                f.write(json.dumps({"doubt": n, "error": str(e).strip(), "t": time.time()}) + "\n")
                out["error"] = str(e).strip()
                return out
            f.write(json.dumps({"ack": n, "t": time.time()}) + "\n")
            f.flush()
            n += 1
        try:
            out["end"] = identity(conn)
        except psycopg.Error as e:
            out["error"] = str(e).strip()
        f.write(json.dumps({"end": out.get("end"), "t": time.time()}) + "\n")
    return out


def read_log(log: Path) -> dict:
    acks, times, doubt, start, end, first = [], [], [], None, None, None
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if "ack" in rec:
            acks.append(rec["ack"])
            times.append(rec["t"])
        elif "doubt" in rec:
            doubt.append(rec["doubt"])
        elif "start" in rec:
            start, first = rec["start"], rec["first"]
        elif "end" in rec:
            end = rec["end"]
    return {"acks": acks, "times": times, "doubt": doubt, "start": start, "end": end, "first": first}


def longest_gap(times: list[float]) -> tuple[float, float | None]:
    """The longest time between two acknowledgements, and when it began."""
    gap, at = 0.0, None
    for a, b in itertools.pairwise(times):
        if b - a > gap:
            gap, at = b - a, a
    return gap, at


def check(conn: psycopg.Connection, log: Path) -> dict:
    """The table against the log: every acknowledged id present exactly once."""
    rec = read_log(log)
    acks, first = rec["acks"], rec["first"]
    if first is None:
        return {"ok": False, "error": f"{log}: no run recorded"}
    conn.execute("SET enable_indexscan = off; SET enable_bitmapscan = off; SET enable_indexonlyscan = off")
    rows = conn.execute("SELECT id, count(*) FROM ledger WHERE id >= %s GROUP BY id", (first,)).fetchall()
    present = {i: c for i, c in rows}
    acked = set(acks)
    lost = sorted(acked - present.keys())
    duplicated = sorted(i for i, c in present.items() if c > 1)
    unacked = sorted(present.keys() - acked)
    # At most the one commit in flight may be present unacknowledged: the id after the last ack.
    expected_unacked = {max(acks, default=first - 1) + 1}
    gap, gap_at = longest_gap(rec["times"])
    kept = bool(rec["start"] and rec["end"] and rec["start"] == rec["end"])
    span = rec["times"][-1] - rec["times"][0] if len(rec["times"]) > 1 else 0.0
    return {
        "ok": not lost and not duplicated and set(unacked) <= expected_unacked and kept,
        "acknowledged": len(acks),
        "lost": lost,
        "duplicated": duplicated,
        "unacknowledged_present": unacked,
        "in_doubt": rec["doubt"],
        "connection_kept": kept,
        "start": rec["start"],
        "end": rec["end"],
        "commits_per_s": round((len(acks) - 1) / span, 2) if span else None,
        "longest_gap_s": round(gap, 3),
        "longest_gap_at": gap_at,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftlab.ledger", description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("--db", default="ledger")
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--log", type=Path, required=True, help="the acknowledgements, one JSON line each")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to commit")
    parser.add_argument("--first", type=int, help="the first id (default: the time in ms, unique per run)")
    parser.add_argument("--check", action="store_true", help="only check a run's log against the table")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    try:
        conn = connect(args.host, args.db, args.user, args.connect_timeout)
    except psycopg.Error as e:
        print(json.dumps({"ok": False, "error": str(e).strip()}))
        return 1
    with conn:
        first = args.first if args.first is not None else int(time.time() * 1000) * 1000
        out = {} if args.check else run(conn, args.log, first, args.seconds, stop)
        result = None if "error" in out else check(conn, args.log)
    if result is None:  # the connection is gone: check over a new one
        with connect(args.host, args.db, args.user, args.connect_timeout) as again:
            result = check(again, args.log)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
