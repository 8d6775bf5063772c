"""labctl: the lab's command line. Exit codes: 0 done, 1 failed, 2 bad usage, 3 wrong lab
state (down when nothing is up, up when already up), 4 missing prerequisite (root, packages)."""

from __future__ import annotations

import argparse
import sys

from . import debian, engine, guest, lab, topology
from .proc import LabError


def host_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= n <= topology.MAX_HOSTS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {topology.MAX_HOSTS}, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labctl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the lab: hosts, networks, storage, client")
    up.add_argument("--hosts", type=host_count, default=3, help="number of hosts (default 3)")
    sub.add_parser("down", help="remove everything the lab made")
    st = sub.add_parser("status", help="list nodes and their services")
    st.add_argument("--json", action="store_true")
    guest.add_commands(sub)
    deb = sub.add_parser("debian", help="the Debian guest (bonds, NFS, iSCSI, systemd) as host debian")
    deb.add_argument("action", choices=["start", "stop"])
    deb.set_defaults(func=debian.cmd_debian)
    demo = sub.add_parser("demo", help="the main job: lab up, lockstepd, a guest protected, a failover drill")
    demo.set_defaults(func=engine.cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "up":
            lab.up(args.hosts)
        elif args.command == "down":
            lab.down()
        elif args.command == "status":
            lab.status(args.json)
        else:
            return args.func(args)
    except LabError as e:
        print(f"labctl: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("labctl: interrupted", file=sys.stderr)
        return 130
    return 0
