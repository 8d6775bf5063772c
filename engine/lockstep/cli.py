"""ftctl: the operator's command line for the lockstep engine."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from . import __version__, accel, colo, probe, watch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftctl", description=__doc__)
    p.add_argument("--version", action="version", version=f"ftctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    pr = sub.add_parser("probe", help="check this host's QEMU for what an FT pair needs")
    pr.add_argument("--qemu", default="qemu-system-x86_64", help="command that runs QEMU (split on spaces)")
    pr.add_argument("--accel", default="auto", help="auto, kvm or tcg (default auto)")
    pr.add_argument("--json", action="store_true")
    w = sub.add_parser("watch", help="watch one side of a pair: heartbeats, fencing, arbitration, go-live")
    w.add_argument("--pair", required=True)
    w.add_argument("--generation", type=int, required=True)
    w.add_argument("--role", choices=("primary", "secondary"), required=True)
    w.add_argument("--me", required=True, help="this host's name (written into the token)")
    w.add_argument("--listen", type=address, required=True, help="FT-logging IP:PORT of this side")
    w.add_argument("--peer", type=address, required=True, help="FT-logging IP:PORT of the other side")
    w.add_argument("--datastore", type=Path, required=True)
    w.add_argument("--mode", type=colo.Mode, choices=list(colo.Mode), default=colo.Mode.LOCKSTEP)
    w.add_argument("--qmp", required=True, help="QMP socket of this side's QEMU")
    w.add_argument("--qemu-pid", type=int, required=True, help="PID of that QEMU (fenced with SIGKILL)")
    w.add_argument("--guest", required=True, help="guest name (names the VM's tap)")
    for f in dataclasses.fields(watch.WatchConfig):
        if f.type == "float":  # the tunable times
            w.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default,
                           help=f"seconds (default {f.default})")  # fmt: skip
    return p


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}")
    return host, int(port)


def cmd_watch(args) -> int:
    cfg = watch.WatchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(watch.WatchConfig)})
    verdict = asyncio.run(watch.run(cfg, args.qmp, args.qemu_pid, args.guest))
    print(verdict.to_json(), flush=True)
    return 0 if verdict.outcome == "live" else 3


def cmd_probe(args) -> int:
    try:
        caps = probe.probe(args.qemu.split())
        choice = accel.choose(args.accel)
    except (probe.ProbeError, accel.AccelError) as e:
        print(f"ftctl: error: {e}", file=sys.stderr)
        return 1
    missing = caps.missing()
    if args.json:
        report = {"version": caps.version, "package": caps.package, "missing": missing,
                  "accel": choice.accel, "accel_reason": choice.reason,
                  "mode": caps.default_mode(choice.accel)}  # fmt: skip
        print(json.dumps(report))
    else:
        verdict = "; ".join(missing) or "has everything an FT pair needs"
        print(f"QEMU {caps.build}: {verdict}")
        print(f"accelerator: {choice.accel} ({choice.reason})")
        print(f"default mode: {caps.default_mode(choice.accel)}")
    return 0 if not missing else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help(sys.stderr)
        return 2
    return {"probe": cmd_probe, "watch": cmd_watch}[args.command](args)
