"""Ansible as the tests and the main job run it: one module on some hosts, or a playbook, from the
repository (ansible.cfg: the lab inventory, the collection) or from another directory (its own
ansible.cfg, e.g. the collection installed from its tarball)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

from . import collection

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the project's virtualenv


def module(hosts: str, name: str, args: dict, *extra: str, inventory: Path | None = None) -> dict[str, dict]:
    """Run ft.lockstep.NAME on hosts; {host: result} (failed ones included, with "failed")."""
    argv = [BIN / "ansible", hosts, "-o", "-m", f"ft.lockstep.{name}", *extra]
    if args:  # an empty "-a" would be raw parameters, which modules refuse
        argv += ["-a", json.dumps(args)]
    if inventory is not None:
        argv += ["-i", str(inventory)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    results = {}
    for line in proc.stdout.splitlines():
        host, sep, rest = line.partition(" => ")
        if sep and " | " in host:
            name, status = host.split(" | ")[:2]
            results[name] = json.loads(rest) | {"failed": status.startswith("FAILED")}
    if not results:
        raise AssertionError(proc.stdout + proc.stderr)
    return results


RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


@cache
def engine_wheel() -> Path:
    """The engine's wheel in the repository's collection built from engine/ as it is now (once per
    process), so that role ft_engine run from the repository installs the engine of this checkout."""
    return collection.build_engine_wheel()


def playbook(
    path: str, *extra: str, echo_tasks: bool = False, timeout: float = 1800, cwd: Path = REPO
) -> tuple:
    """ansible-playbook PATH in cwd; (exit code, output, {host: {ok, changed, unreachable, failed}}).
    With echo_tasks each task's name is printed as it starts (progress for the operator)."""
    if cwd == REPO:
        engine_wheel()
    proc = subprocess.Popen([BIN / "ansible-playbook", path, *extra], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo_tasks and line.startswith(("TASK [", "RUNNING HANDLER [")):
            print("   ", line.split(" [", 1)[1].rsplit("]", 1)[0], flush=True)
    code = proc.wait(timeout)
    out = "".join(lines)
    recap = {
        m[0]: dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m[1:]), strict=True))
        for m in RECAP.findall(out)
    }
    return code, out, recap
