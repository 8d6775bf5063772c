"""The lab's full Debian guest (lab/debian/build) booted under TCG as one more managed host, for
what the lab hosts' kernel cannot do: bonding, NFS mounts, iSCSI logins, systemd.

Its first NIC is on the management network (sshd, the storage server); the others are bond
material on the lab's migration and FT-logging segments, with a link speed the guest's virtio
driver reports like a real NIC's. A copy-on-write overlay keeps the cached image clean."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from . import lab
from . import topology as t
from .proc import LabError, run, wait_for

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "lab" / "debian" / "build"
MGMT_MAC = "52:54:00:77:00:fe"  # lab/debian/build's networkd match
ADDRESS = f"{t.SUBNETS['mgmt']}.30"
# (tap, bridge, MAC, Mb/s): two NICs per FT network and one slow NIC to be refused.
NICS = [
    ("ftl-deb1", "migration", "52:54:00:77:0d:01", 10000),
    ("ftl-deb2", "migration", "52:54:00:77:0d:02", 10000),
    ("ftl-deb3", "ft_logging", "52:54:00:77:0d:03", 10000),
    ("ftl-deb4", "ft_logging", "52:54:00:77:0d:04", 10000),
    ("ftl-deb5", "migration", "52:54:00:77:0d:05", 100),
]


class DebianGuest:
    """Boots the guest (`with DebianGuest() as g`) and stops it; the lab must be up."""

    def __init__(self, memory_mib: int = 1024):
        self.memory_mib = memory_mib
        self.image = Path(run([str(BUILD)]).strip())
        self.key = self.image / "id_ed25519"
        self.dir = t.STATE_DIR / "nodes" / "debian"  # `labctl down` removes it, and stops the QEMU
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.console = self.dir / "console.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> DebianGuest:
        overlay = self.dir / "root.qcow2"
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(self.image / "rootfs.img"),
                str(overlay),
            ]
        )
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            str(self.memory_mib),
            "-smp",
            "2",
            "-display",
            "none",
            "-serial",
            f"file:{self.console}",
            "-monitor",
            "none",
            "-kernel",
            str(self.image / "vmlinuz"),
            "-initrd",
            str(self.image / "initrd.img"),
            "-append",
            f"root=/dev/vda rw console=ttyS0 ft.mgmt={ADDRESS}/24",
            "-drive",
            f"file={overlay},if=virtio,format=qcow2",
            "-netdev",
            "tap,id=mgmt,ifname=ftl-deb0,script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=mgmt,mac={MGMT_MAC}",
        ]
        for i, (tap, _net, mac, speed) in enumerate(NICS, 1):
            argv += [
                "-netdev",
                f"tap,id=n{i},ifname={tap},script=no,downscript=no",
                "-device",
                f"virtio-net-pci,netdev=n{i},mac={mac},speed={speed},duplex=full",
            ]
        with open(self.dir / "qemu.log", "wb") as log:  # not the caller's stdout: it may be a pipe
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        state = lab.load_state()
        if state is None:
            self.__exit__(None, None, None)
            raise lab.NotUp("the Debian guest joins the lab: bring it up first")
        state.setdefault("pids", []).append(self.proc.pid)
        lab.save_state(state)
        try:
            wait_for(
                "the Debian guest's taps",
                lambda: Path("/sys/class/net/ftl-deb0").exists() or self._died(),
                20,
            )
            run(["ip", "link", "set", "ftl-deb0", "master", t.BRIDGES["mgmt"], "up"])
            for tap, net, _mac, _speed in NICS:
                run(["ip", "link", "set", tap, "master", t.BRIDGES[net], "up"])
            wait_for("ssh in the Debian guest (about a minute under TCG)", self._answers, 240, 1)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _died(self) -> bool:
        if self.proc.poll() is not None:
            raise LabError(f"the Debian guest's QEMU exited: {(self.dir / 'qemu.log').read_text()[-500:]}")
        return False

    def _answers(self) -> bool:
        self._died()
        return self.ssh("true", check=False, timeout=10).returncode == 0

    def ssh(self, command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [
                "ssh",
                "-i",
                str(self.key),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                f"root@{ADDRESS}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise LabError(f"debian guest: {command}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def nic(self, mac: str) -> str:
        """The guest's name for the NIC with this MAC."""
        out = self.ssh(f"grep -l {mac} /sys/class/net/*/address").stdout.split()
        if not out:
            raise LabError(f"debian guest: no NIC with MAC {mac}")
        return out[0].split("/")[4]

    def inventory(self) -> Path:
        """An Ansible inventory with this guest as host `debian`."""
        path = self.dir / "inventory.yml"
        path.write_text(
            "all:\n  hosts:\n    debian:\n"
            f"      ansible_host: {ADDRESS}\n      ansible_user: root\n"
            f"      ansible_ssh_private_key_file: {self.key}\n"
            "      ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null\n"
            "      ansible_python_interpreter: /usr/bin/python3\n"
        )
        return path

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


LAB_INVENTORY = lab.INVENTORY.with_name("debian.yml")  # beside the lab hosts' hosts.yml


def start() -> None:
    """`labctl debian start`: boot the guest and leave it running, as host `debian` (group
    ft_kernel) in the lab's inventory."""
    if PID_FILE.exists():
        raise LabError("the Debian guest is already running: `labctl debian stop` first")
    guest = DebianGuest().__enter__()
    PID_FILE.write_text(str(guest.proc.pid))
    text = guest.inventory().read_text().replace("all:\n  hosts:", "ft_kernel:\n  hosts:", 1)
    LAB_INVENTORY.write_text("# Written by `lab/labctl debian start`; removed by `stop` and `down`.\n" + text)
    lab.say(f"Debian guest up at {ADDRESS}; inventory {LAB_INVENTORY.relative_to(REPO)}")


def stop() -> None:
    LAB_INVENTORY.unlink(missing_ok=True)
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(PID_FILE.read_text()), signal.SIGKILL)
    shutil.rmtree(PID_FILE.parent, ignore_errors=True)


def cmd_debian(args) -> int:
    if lab.load_state() is None:
        raise lab.NotUp("the Debian guest joins the lab: `labctl up` first")
    start() if args.action == "start" else stop()
    return 0


PID_FILE = t.STATE_DIR / "nodes" / "debian" / "qemu.pid"
