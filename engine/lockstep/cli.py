"""ftctl: the operator's command line for the lockstep engine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import __version__, accel, api, colo, probe, watch
from . import config as config_mod

DEFAULT_SOCKET = "/run/lockstepd.sock"
OPERATION_HELP = {
    "enable": "turn FT on: a secondary on another host, in lockstep (waits for running)",
    "disable": "stop the secondary, keep the FT set-up",
    "absent": "turn FT off: secondary and FT set-up removed, the VM keeps running",
    "test-failover": "kill the primary: the secondary takes over, then a new secondary is made",
    "test-restart-secondary": "kill the secondary: the primary runs on, a new secondary is made",
    "poweroff": "power the VM off (its secondary first) and forget it",
}
OPERATIONS = tuple(OPERATION_HELP)


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
    w.add_argument("--guest", required=True, help="guest name (names the VM's taps)")
    w.add_argument("--nics", type=int, default=1, help="the VM's NIC count (each has a tap and filters)")
    w.add_argument("--datastore-id", help="the id in the datastore's .ft-lockstep-datastore (ft_storage's)")
    w.add_argument("--secret-file", type=Path, help="cluster secret (signs heartbeats)")
    w.add_argument("--vm-uplink", help="this host's VM-network uplink (a primary without carrier hands over)")
    for f in dataclasses.fields(watch.WatchConfig):
        if f.type == "float":  # the tunable times
            w.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default,
                           help=f"seconds (default {f.default})")  # fmt: skip
    d = sub.add_parser("daemon", help="run lockstepd, the engine of this host")
    d.add_argument("--config", type=Path, default=Path("/etc/lockstep/lockstepd.yml"))
    d.add_argument("--check", action="store_true", help="validate the configuration and exit")
    sock = argparse.ArgumentParser(add_help=False)
    sock.add_argument("--socket", default=os.environ.get("FTCTL_SOCKET", DEFAULT_SOCKET),
                      help=f"lockstepd's API socket (default $FTCTL_SOCKET or {DEFAULT_SOCKET})")  # fmt: skip
    sock.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    sub.add_parser("status", parents=[sock], help="FT pairs, their state, statistics and alarms")
    v = sub.add_parser("vm-start", parents=[sock], help="start a VM (unprotected) on this host")
    v.add_argument("name")
    v.add_argument("--spec", type=Path, help="the VM's description, a JSON file (vmspec: disks, nics, ...)")
    v.add_argument("--mac", help="the MAC of its one NIC (without --spec)")
    v.add_argument("--memory-mib", type=int)
    v.add_argument("--vcpus", type=int)
    v.add_argument("--kernel")
    v.add_argument("--initrd")
    v.add_argument("--cmdline")
    m = sub.add_parser("migrate", parents=[sock], help="move the primary or the secondary to another host")
    m.add_argument("name")
    m.add_argument("--role", choices=("primary", "secondary"), required=True)
    m.add_argument("--host", required=True)
    for op in OPERATIONS:
        o = sub.add_parser(op, parents=[sock], help=OPERATION_HELP[op])
        o.add_argument("name")
        if op == "enable":
            o.add_argument("--secondary-host", help="preferred host for the secondary")
            o.add_argument("--checkpoint-ms", type=int)
    return p


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}")
    return host, int(port)


def cmd_watch(args) -> int:
    try:  # read as lockstepd's config reads it, so both sides sign with the same bytes
        args.secret = args.secret_file.read_text().strip().encode() if args.secret_file else None
    except OSError as e:
        print(f"ftctl: error: --secret-file {args.secret_file}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.secret == b"":
        print(f"ftctl: error: --secret-file {args.secret_file} is empty", file=sys.stderr)
        return 2
    cfg = watch.WatchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(watch.WatchConfig)})
    return watch.main(cfg, args.qmp, args.qemu_pid, args.guest, args.nics)


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


def cmd_daemon(args) -> int:
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"lockstepd: configuration error: {e}", file=sys.stderr)
        return 2
    if args.check:  # run on the host before a configuration is installed: what only it can tell
        if cfg.vm_uplink and not Path(f"/sys/class/net/{cfg.vm_uplink}").exists():
            print(f"lockstepd: configuration error: vm_uplink {cfg.vm_uplink}: no such network interface "
                  "on this host (a primary would hand every VM over)", file=sys.stderr)  # fmt: skip
            return 2
        print(f"{args.config}: valid ({cfg.host}, {len(cfg.hosts)} hosts)")
        return 0
    from . import daemon

    return daemon.main(cfg)


def request(args, method: str, path: str, body=None) -> tuple[int, dict]:
    try:
        return api.local(args.socket, method, path, body)
    except OSError as e:
        print(f"ftctl: cannot reach lockstepd at {args.socket}: {e.strerror or e}", file=sys.stderr)
        sys.exit(3)


def show(args, status: int, answer: dict, text) -> int:
    if args.json:
        print(json.dumps(answer, indent=1))
    elif status >= 400:
        print(f"ftctl: {answer.get('error', status)}", file=sys.stderr)
    else:
        print(text(answer))
    return 0 if status < 400 else 1


def pair_line(p: dict) -> str:
    st = p.get("stats") or {}
    interval = st.get("lockstep_interval_s")
    return (f"{p['name']:<16} {p['state']:<15} {p['reason']:<25} {p['primary']:<10} "
            f"{p.get('secondary_host') or '-':<10} {p['generation']:>3} "
            f"{'-' if interval is None else interval:>8} {st.get('checkpoints', '-')!s:>6} "
            f"{st.get('pause_ms_p99') or '-'!s:>8} {p['alarm']}")  # fmt: skip


def cmd_status(args) -> int:
    def table(answer: dict) -> str:
        head = (f"{'VM':<16} {'STATE':<15} {'REASON':<25} {'PRIMARY':<10} {'SECONDARY':<10} GEN "
                f"INTERVAL CKPTS P99(ms) ALARM")  # fmt: skip
        here = ", ".join(answer["local_vms"]) or "none"
        lines = [f"host {answer['host']} (mode {answer['mode']}); VMs here: {here}", head,
                 *map(pair_line, answer["pairs"])]  # fmt: skip
        return "\n".join(lines)

    return show(args, *request(args, "GET", "/status"), table)


def cmd_vm_start(args) -> int:
    """The body is the VM's description (vmspec): --spec's file, the flags given on top of it."""
    try:
        body = json.loads(args.spec.read_text()) if args.spec else {}
    except (OSError, ValueError) as e:
        print(f"ftctl: {args.spec}: {e}", file=sys.stderr)
        return 2
    flags = {"mac": args.mac, "memory_mib": args.memory_mib, "vcpus": args.vcpus, "kernel": args.kernel,
             "initrd": args.initrd, "cmdline": args.cmdline}  # fmt: skip
    body |= {"name": args.name} | {k: v for k, v in flags.items() if v is not None}
    return show(args, *request(args, "POST", "/vms", body), changed_line)


def changed_line(answer: dict) -> str:
    return ("changed" if answer["changed"] else "no change") + (
        f": {pair_line(answer['vm'])}" if "vm" in answer else ""
    )


def cmd_operation(args) -> int:
    body = {}
    if args.command == "enable":
        body = {"secondary_host": args.secondary_host, "checkpoint_ms": args.checkpoint_ms}
    elif args.command == "migrate":
        body = {"role": args.role, "host": args.host}
    return show(args, *request(args, "POST", f"/vms/{args.name}/{args.command}", body), changed_line)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help(sys.stderr)
        return 2
    commands = {"probe": cmd_probe, "watch": cmd_watch, "daemon": cmd_daemon, "status": cmd_status,
                "vm-start": cmd_vm_start}  # fmt: skip
    commands |= dict.fromkeys((*OPERATIONS, "migrate"), cmd_operation)
    return commands[args.command](args)
