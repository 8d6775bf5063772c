"""ftctl: the operator's command line for the lockstep engine."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__, accel, probe


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftctl", description=__doc__)
    p.add_argument("--version", action="version", version=f"ftctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    pr = sub.add_parser("probe", help="check this host's QEMU for what an FT pair needs")
    pr.add_argument("--qemu", default="qemu-system-x86_64", help="command that runs QEMU (split on spaces)")
    pr.add_argument("--accel", default="auto", help="auto, kvm or tcg (default auto)")
    pr.add_argument("--json", action="store_true")
    return p


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
                  "accel": choice.accel, "accel_reason": choice.reason}  # fmt: skip
        print(json.dumps(report))
    else:
        verdict = "; ".join(missing) or "has everything an FT pair needs"
        print(f"QEMU {caps.build}: {verdict}")
        print(f"accelerator: {choice.accel} ({choice.reason})")
    return 0 if not missing else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help(sys.stderr)
        return 2
    return {"probe": cmd_probe}[args.command](args)
