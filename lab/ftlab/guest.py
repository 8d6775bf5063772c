"""Guest VMs on lab hosts (through each host's own libvirtd) and the client's byte check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape

from . import lab
from . import topology as t
from .proc import LabError, in_node

GUEST_BUILD = Path(__file__).resolve().parents[1] / "guest" / "build"

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{image}/vmlinuz</kernel>
    <initrd>{image}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet ft.ip={ip}/24</cmdline>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='{console}'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def build_image() -> Path:
    """The guest kernel + initramfs directory (built once, then cached)."""
    proc = subprocess.run([str(GUEST_BUILD)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"building the guest image failed: {proc.stderr.strip()}")
    return Path(proc.stdout.strip().splitlines()[-1])


def domain_xml(name: str, host: t.Host, index: int, memory_mib: int = 256) -> str:
    return DOMAIN_XML.format(
        name=escape(name),
        memory=memory_mib,
        image=build_image(),
        ip=t.guest_ip(index),
        bridge=t.VM_BRIDGE,
        mac=t.guest_mac(index),
        console=host.dir / f"{name}.console",
    )


def host_by_name(name: str) -> t.Host:
    state = lab.load_state()
    if state is None:
        raise lab.NotUp("the lab is not up: run `lab/labctl up` first")
    for i in range(1, state["hosts"] + 1):
        h = t.host(i)
        if name in (h.name, h.hostname):
            return h
    raise LabError(f"no lab host {name!r} (the lab has h1..h{state['hosts']})")


def start_vm(name: str, host: t.Host, index: int = 0) -> str:
    """Define and start a guest on a host through that host's libvirtd; return its address."""
    import libvirt

    xml = domain_xml(name, host, index)
    try:
        conn = libvirt.open(host.libvirt_uri)
        try:
            conn.defineXML(xml).create()
        finally:
            conn.close()
    except libvirt.libvirtError as e:
        raise LabError(f"starting {name} on {host.hostname}: {e}") from None
    return t.guest_ip(index)


def client_command(ip: str, *args: str) -> tuple[list[str], dict]:
    """The command line and environment that run ftlab.client in the lab's client namespace."""
    state = lab.load_state()
    if state is None:
        raise lab.NotUp("the lab is not up")
    cmd = in_node(state["holders"]["client"], [sys.executable, "-m", "ftlab.client", ip, *args])
    return cmd, {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def client_check(
    ip: str, stream_bytes: int = 1 << 20, echo_bytes: int = 64 << 10, timeout: float = 120
) -> dict:
    """Run the byte check from the client namespace; return its JSON result."""
    return client_run(ip, "--stream-bytes", str(stream_bytes), "--echo-bytes", str(echo_bytes),
                      "--timeout", str(timeout))  # fmt: skip


def client_run(ip: str, *args: str) -> dict:
    """Run ftlab.client with these arguments in the client namespace; its JSON result."""
    cmd, env = client_command(ip, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise LabError(f"the client printed no result: {proc.stderr.strip()}") from None


def print_check(result: dict) -> None:
    if result["ok"]:
        s, e = result["stream"], result["echo"]
        print(
            f"client -> {result['ip']}: stream {s['bytes']} bytes in order, none lost or "
            f"duplicated ({s['seconds']} s); echo {e['bytes']} bytes returned intact ({e['seconds']} s)"
        )
    else:
        print(f"client -> {result['ip']}: FAILED: {result['error']}")


# --- commands -------------------------------------------------------------------------------


def cmd_vm_start(args) -> int:
    host = host_by_name(args.host)
    lab.say(f"starting guest {args.name} on {host.hostname} (TCG)")
    ip = start_vm(args.name, host, args.index)
    lab.say(f"{args.name} is at {ip}; console log {host.dir / (args.name + '.console')}")
    return 0


def cmd_check(args) -> int:
    result = client_check(args.ip, args.stream_bytes, args.echo_bytes, args.timeout)
    print_check(result)
    return 0 if result["ok"] else 1


def add_commands(sub) -> None:
    vm = sub.add_parser("vm", help="guest VMs on lab hosts")
    vsub = vm.add_subparsers(dest="vm_command", required=True)
    start = vsub.add_parser("start", help="start a guest on a host")
    start.add_argument("name")
    start.add_argument("--host", default="h1")
    start.add_argument("--index", type=int, default=0, help="guest number: address 10.77.3.(100+N)")
    start.set_defaults(func=cmd_vm_start)
    check = sub.add_parser("check", help="the client's byte check against a guest")
    check.add_argument("ip")
    check.add_argument("--stream-bytes", type=int, default=1 << 20)
    check.add_argument("--echo-bytes", type=int, default=64 << 10)
    check.add_argument("--timeout", type=float, default=120)
    check.set_defaults(func=cmd_check)


class StreamFollower:
    """The client holding one stream connection to a guest open (ftlab.client --follow) while a
    test does things to the VM; wait_for_bytes() awaits progress, stop() returns the verdict."""

    def __init__(self, ip: str, timeout: float = 180) -> None:
        cmd, env = client_command(ip, "--follow", "--timeout", str(timeout))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        self.bytes = 0
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            self.lines.append(msg)
            self.bytes = msg.get("bytes", self.bytes)

    def wait_for_bytes(self, n: int, timeout: float) -> int:
        """Wait until n bytes were verified; LabError if the client failed or time ran out."""
        deadline = time.monotonic() + timeout
        while self.bytes < n:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise LabError(f"the client stopped: {self.lines[-1] if self.lines else 'no output'}")
            if time.monotonic() > deadline:
                raise LabError(f"the stream stalled at {self.bytes} bytes (waited for {n})")
            time.sleep(0.05)
        return self.bytes

    def mark(self) -> None:
        """From now on max_gap counts only pauses from here (and the one in progress): the
        pause a failover causes, not the pause of entering replication."""
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)
        self._reader.join(5)
        return self.lines[-1] if self.lines else {"ok": False, "error": "no output"}
