"""lockstepd on the lab hosts: its configuration, starting and killing it, the lab guest as the VM
it protects, and taking a whole host out of the cluster. What tests/test_engine_service.py and
bench/protect drive; on a real host the ft_engine role does the same with a systemd unit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lockstep import api

from . import ansible, collection, lab, proc
from . import topology as t
from .colopair import lab_qemu, set_links
from .proc import LabError, in_node, netns_inode, pids_in_netns, spawn, wait_for

SECRET = "ftlab-peer-secret-not-for-production"
FTCTL = str(Path(sys.executable).with_name("ftctl"))


def socket(index: int) -> Path:
    return t.host(index).dir / "lockstepd.sock"


def installed_socket(index: int) -> Path:
    """The API socket of the lockstepd the ft_engine role installed in lab host i (its /run is
    the host's own: reached through the host's root)."""
    return Path(f"/proc/{holder(index)}/root/run/lockstepd.sock")


def config(index: int, n_hosts: int = 3, **overrides) -> Path:
    h = t.host(index)
    cfg = {
        "host": h.hostname,
        "hosts": {t.host(i).hostname: t.host(i).ip("ft_logging") for i in range(1, n_hosts + 1)},
        "datastore": str(t.DATASTORE),
        "run_dir": str(h.dir),
        "socket": str(socket(index)),
        "secret": SECRET,
        "qemu": lab_qemu(),
        "bridge": t.VM_BRIDGE,
        "vm_uplink": "vmnet0",  # the host's link to the VM network (ftl-h<N>-vm at the far end)
        "reprotect_retry_s": 2.0,
        **overrides,
    }
    path = h.dir / "lockstepd.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def holder(index: int) -> int:
    state = lab.load_state()
    if state is None:
        raise lab.NotUp("the lab is not up")
    return state["holders"][t.host(index).name]


def start(index: int, crash_after: str | None = None, **overrides) -> int:
    """Start lockstepd inside a lab host; returns its PID once its API answers. crash_after: the
    event ("event" or "event:step") right after which it SIGKILLs itself (LOCKSTEPD_CRASH_AFTER)."""
    path = config(index, **overrides)
    log = t.host(index).dir / "lockstepd.log"
    env = ["env", f"LOCKSTEPD_CRASH_AFTER={crash_after}"] if crash_after else []
    pid = spawn(in_node(holder(index), [*env, FTCTL, "daemon", "--config", str(path)]), log)

    def answers() -> bool:
        if not os.path.exists(f"/proc/{pid}"):
            raise LabError(f"lockstepd on lab-h{index} exited: {log.read_text()[-800:]}")
        try:
            return call(index, "GET", "/status")[0] == 200
        except OSError:
            return False

    try:
        wait_for(f"lockstepd on lab-h{index}", answers, 60, 0.2)
    except LabError as e:
        raise LabError(f"{e}; its log: {log.read_text()[-800:]}") from None
    return pid


def call(index: int, method: str, path: str, body=None) -> tuple[int, dict]:
    return api.local(socket(index), method, path, body)


def ok(index: int, method: str, path: str, body=None) -> dict:
    status, answer = call(index, method, path, body)
    if status != 200:
        vm = re.match(r"/vms/([^/]+)", path)
        told = f"\n{story(vm.group(1))}" if vm else ""
        raise LabError(f"lockstepd on lab-h{index}: {method} {path}: {status} {answer}{told}")
    return answer


def events(index: int) -> list[dict]:
    """The events lockstepd on a lab host has written (events.log), oldest first."""
    path = t.host(index).dir / "events.log"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):  # a line being written
            found.append(json.loads(line))
    return found


STORY_EVENTS = ("transition", "verdict", "dropped", "protecting", "secondary_started", "claimed")


def story(name: str, last: int = 16) -> str:
    """What the daemons recorded of a pair, in time order: its last transitions, verdicts, drops
    and claims on every host (for an error's message: a lab's logs are gone once it is down)."""
    seen = [e for i in (1, 2, 3) for e in events(i) if e.get("vm") == name and e.get("event") in STORY_EVENTS]
    seen.sort(key=lambda e: e["at"])
    keep = ("action", "old", "new", "reason", "generation", "outcome", "why", "step", "won", "holder")

    def line(e: dict) -> str:
        detail = (e.get("verdict") or {}).get("detail")
        fields = " ".join(f"{k}={e[k]}" for k in keep if e.get(k) is not None)
        return f"  {e['at']:.2f} {e['host']} {e['event']} {fields}" + (f" ({detail})" if detail else "")

    return f"{name}'s last events:\n" + "\n".join(line(e) for e in seen[-last:])


def processes(index: int, *words: str) -> list[int]:
    """PIDs in a lab host whose command line contains one of the words."""
    inode = netns_inode(t.host(index).netns)
    found = []
    for pid in pids_in_netns(inode) if inode else []:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(w in cmdline for w in words):
            found.append(pid)
    return found


def kill_daemon(index: int) -> None:
    """SIGKILL the host's lockstepd and wait until it is gone (a new one refuses to start while
    the old one still holds its lock)."""
    pids = processes(index, " daemon --config")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(f"lockstepd on lab-h{index} to exit", lambda: not any(proc.alive(p) for p in pids), 10, 0.02)


def kill_host(index: int) -> list[str]:
    """The host dies as far as FT goes: lockstepd, its QEMUs and watchers SIGKILLed, its FT-logging
    and VM links cut (sshd and libvirtd live on for later tests). Returns the links cut."""
    pids = processes(index, " daemon --config", "qemu-system", " watch --pair")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(f"lab-h{index}'s engine to die", lambda: not any(proc.alive(p) for p in pids), 10, 0.02)
    links = [f"ftl-h{index}-ft", f"ftl-h{index}-vm"]
    set_links(links, up=False)
    return links


def guest_body(name: str, index: int) -> dict:
    """The lab guest (its TCP services checked byte by byte) as a VM for lockstepd."""
    image = lab.GUEST_IMAGES  # on the shared datastore (labctl up copies it there)
    return {
        "name": name, "mac": t.guest_mac(index), "memory_mib": 256, "kernel": f"{image}/vmlinuz",
        "initrd": f"{image}/initrd.img", "cmdline": f"console=ttyS0 ft.ip={t.guest_ip(index)}/24",
    }  # fmt: skip


# --- the main job ---------------------------------------------------------------------------------


def await_pair(name: str, ready, timeout: float = 180) -> dict:
    """Poll every daemon for the pair until ready(view) holds; that view."""
    deadline = time.monotonic() + timeout
    view: dict = {}
    while time.monotonic() < deadline:
        for i in (1, 2, 3):
            try:
                status, answer = call(i, "GET", f"/vms/{name}")
            except OSError:
                continue
            if status == 200:
                view = answer
                if ready(view):
                    return view
        time.sleep(0.1)
    raise LabError(f"{name} did not get there within {timeout:.0f} s; last view {view}\n{story(name)}")


def power_off(name: str, timeout: float = 120) -> None:
    """Power the VM off through whichever daemon runs it, waiting out a refusal that clears (a
    secondary's copy still being adopted, a failover's overlays still being committed). Done when
    a daemon powered it off or none knows it. A VM left running would fail every later test, and
    bench run, that starts one of its name (found by bench/faults: 12 runs failed after one)."""
    deadline = time.monotonic() + timeout
    while True:
        answers: dict[str, object] = {}
        for i in (1, 2, 3):
            try:
                status, answer = call(i, "POST", f"/vms/{name}/poweroff", {})
            except OSError as e:
                answers[f"lab-h{i}"] = f"no answer: {e}"
                continue
            if status == 200:
                return
            answers[f"lab-h{i}"] = (status, answer)
        if all(a[0] == 404 for a in answers.values() if isinstance(a, tuple)):
            return
        if time.monotonic() > deadline:
            raise LabError(f"{name} was not powered off in {timeout:.0f} s: {answers}")
        time.sleep(1)


def await_running(name: str, generation: int, timeout: float = 180) -> dict:
    """The pair running in this generation or a later one (a new secondary made)."""
    return await_pair(name, lambda v: v["state"] == "running" and v["generation"] >= generation, timeout)


def in_netns(netns: str, code: str) -> subprocess.CompletedProcess:
    """Python code run in a lab node's network namespace (the project's interpreter)."""
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def run_playbook(title: str, path: str, *extra: str, cwd: Path = ansible.REPO) -> str:
    """A playbook as the operator runs it (in cwd), its tasks shown as they start; its output."""
    lab.say(f"{title}: ansible-playbook {path} {' '.join(extra)}".rstrip())
    began = time.monotonic()
    code, out, recap = ansible.playbook(path, *extra, echo_tasks=True, cwd=cwd)
    if code != 0:
        raise LabError(f"{path} failed:\n{out[-3000:]}")
    changed = ", ".join(f"{h} changed={r['changed']}" for h, r in sorted(recap.items()))
    lab.say(f"{title}: done in {time.monotonic() - began:.0f} s ({changed})")
    return out


def cmd_demo(args) -> int:
    """The main job, through Ansible as an operator runs it: the lab (3 hosts), site.yml (every
    role: lockstepd on each host), protect.yml (the demo guest, FT on), drill.yml (Test Failover)
    while the client checks every byte of one TCP connection, and a report."""
    from .guest import StreamFollower

    t0 = time.monotonic()
    if lab.load_state() is None:
        lab.up(3)
    else:
        lab.say("the lab is already up: using it")
    if lab.load_state()["hosts"] < 3:
        raise LabError("the demo needs 3 lab hosts: `lab/labctl down`, then run it again")
    # the collection as an operator installs it: its tarball in an empty directory, no repository
    with tempfile.TemporaryDirectory(prefix="ftlab-demo-") as tmp:
        began = time.monotonic()
        work = collection.installed(Path(tmp), lab.INVENTORY.parent)
        tarball = next((work / "dist").glob("*.tar.gz")).name
        lab.say(f"collection: {tarball} built and installed into {work}/collections "
                f"({time.monotonic() - began:.0f} s); the playbooks run from there")  # fmt: skip
        run_playbook("site", "ft.lockstep.site", cwd=work)
        run_playbook("protect", "ft.lockstep.protect", cwd=work)
        before = api.local(installed_socket(1), "GET", "/vms/demo")[1]
        lab.say(f"FT on: demo {before['state']}, primary {before['primary']}, "
                f"secondary {before['secondary_host']}; waiting for the guest to answer")  # fmt: skip
        client = StreamFollower(t.guest_ip(0))
        client.wait_for_bytes(1 << 20, 180)
        lab.say("client: following the guest's stream, checking every byte")
        client.mark()
        out = run_playbook("drill", "ft.lockstep.drill", "-e", "ft_drill_vm=demo", cwd=work)
    after = api.local(installed_socket(1), "GET", "/vms/demo")[1]
    reprotect = re.search(r"protected again ([0-9.]+) s after the drill", out)
    client.wait_for_bytes(client.bytes + (1 << 20), 60)
    result = client.stop()
    follow = result.get("follow", {})
    verdict = "none lost, duplicated or reordered" if result["ok"] else f"FAILED: {result.get('error')}"
    report = [
        "",
        "report",
        f"  before:  {before['state']}, primary {before['primary']}, secondary {before['secondary_host']}",
        f"  drill:   Test Failover (drill.yml): the primary's QEMU killed on {before['primary']}",
        f"  after:   {after['state']}, primary {after['primary']}, secondary {after['secondary_host']} "
        f"(protected again {reprotect[1] if reprotect else '?'} s after the kill, no command given)",
        f"  client:  {follow.get('bytes', 0)} bytes of one TCP connection checked: {verdict}",
        f"           longest pause {follow.get('max_gap', float('nan')):.2f} s (the failover)",
        "  next:    `ansible-playbook ft.lockstep.drill -e ft_drill_vm=demo`; on a host: `ftctl status`;",
        "           `lab/labctl down` removes the lab",
        "",
    ]
    print("\n".join(report))
    lab.say(f"demo done in {time.monotonic() - t0:.0f} s")
    return 0 if result["ok"] else 1


def index(hostname: str) -> int:
    return int(hostname.rsplit("h", 1)[1])
