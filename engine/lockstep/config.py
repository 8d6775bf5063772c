"""lockstepd's configuration file (YAML), validated at start: every problem named at once."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Caps:
    """Per-host limits on FT VMs; primaries and secondaries both count; 0 means no limit."""

    max_vms: int = 4
    max_vcpus: int = 8
    ft_bandwidth_mbps: int = 0  # FT-logging budget: the sum of the pairs' estimates must fit


@dataclass(frozen=True)
class Config:
    host: str  # this host's name, as in hosts
    hosts: dict[str, str]  # every FT host: name -> FT-logging address
    datastore: Path  # shared by every host at the same path: pair records, split-brain tokens
    run_dir: Path  # this host's QMP sockets, consoles, logs, the daemon's own state
    socket: Path  # the local API (root only)
    secret: bytes = field(repr=False)  # peer authentication, distributed by the role
    peer_port: int = 7411
    qemu: tuple[str, ...] = ("qemu-system-x86_64",)
    bridge: str = "vmbr0"
    accel: str = "auto"
    mode: str = "auto"  # auto: lockstep on KVM, checkpoint under TCG when QEMU supports it
    checkpoint_ms: int = 100
    watch_timeout: float = 0.5
    caps: Caps = field(default_factory=Caps)
    webhook: str | None = None
    reprotect_retry_s: float = 5.0
    diagnostic_monitor: bool = False  # each QEMU gets a third QMP socket for tools (colo.Host)
    vm_uplink: str | None = None  # the VM bridge's uplink: a primary whose carrier is gone hands over
    lost_after_s: float = 30.0  # no host of a pair not running answered this long: recorded lost
    # the id in the datastore's .ft-lockstep-datastore (ft_storage's datastore_id): with it, a
    # different filesystem mounted at the path is refused too, not only a missing one
    datastore_id: str | None = None

    @property
    def ft_ip(self) -> str:
        return self.hosts[self.host]


KNOWN = {f for f in Config.__dataclass_fields__} | {"secret_file"}


def load(path: Path) -> Config:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML: {e}") from None
    return parse(raw, str(path))


def parse(raw, where: str = "config") -> Config:
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
    for key in sorted(set(raw) - KNOWN):
        problems.append(f"unknown setting {key!r}")
    for key in ("host", "hosts", "datastore", "run_dir", "socket"):
        if key not in raw:
            problems.append(f"{key} is required")
    hosts = raw.get("hosts") or {}
    if not isinstance(hosts, dict) or not hosts:
        problems.append("hosts must map each FT host's name to its FT-logging address")
        hosts = {}
    for name, ip in hosts.items():
        try:
            ipaddress.ip_address(str(ip))
        except ValueError:
            problems.append(f"hosts.{name}: {ip!r} is not an IP address")
    if "host" in raw and hosts and raw["host"] not in hosts:
        problems.append(f"host {raw['host']!r} is not one of hosts ({', '.join(hosts)})")
    secret = raw.get("secret")
    if raw.get("secret_file"):
        path = Path(raw["secret_file"])
        try:
            if path.stat().st_mode & 0o077:  # the key to every peer command and heartbeat
                problems.append(f"secret_file {path} is open to group or others "
                                f"(mode {path.stat().st_mode & 0o777:04o}): chmod 600 it")  # fmt: skip
            secret = path.read_text().strip()
        except OSError as e:
            problems.append(f"secret_file {path}: {e.strerror}")
    uplink = raw.get("vm_uplink")
    if uplink is not None and not (
        isinstance(uplink, str) and re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", uplink)
    ):
        problems.append(f"vm_uplink must be a network interface's name, not {uplink!r}")
    webhook = raw.get("webhook")
    if webhook is not None and not (isinstance(webhook, str) and webhook.startswith(("https://", "http://"))):
        problems.append(f"webhook must be an http:// or https:// URL, not {webhook!r}")
    if not secret or len(str(secret)) < 16:
        problems.append("secret (or secret_file) must give a peer secret of at least 16 characters")
    for key in ("mode",):
        if raw.get(key, "auto") not in ("auto", "lockstep", "checkpoint"):
            problems.append(f"mode must be auto, lockstep or checkpoint, not {raw[key]!r}")
    caps_raw = raw.get("caps") or {}
    if not isinstance(caps_raw, dict) or set(caps_raw) - set(Caps.__dataclass_fields__):
        problems.append(f"caps takes {', '.join(Caps.__dataclass_fields__)}")
        caps_raw = {}
    for key, value in caps_raw.items():
        if not isinstance(value, int) or value < 0:
            problems.append(f"caps.{key} must be a whole number >= 0 (0: no limit), not {value!r}")
    if raw.get("datastore_id") is not None and not (
        isinstance(raw["datastore_id"], str) and raw["datastore_id"]
    ):
        problems.append(f"datastore_id must be the datastore's id (a string), not {raw['datastore_id']!r}")
    for key in ("peer_port", "checkpoint_ms"):
        if key in raw and (not isinstance(raw[key], int) or raw[key] <= 0):
            problems.append(f"{key} must be a positive whole number, not {raw[key]!r}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    values = {k: v for k, v in raw.items() if k in Config.__dataclass_fields__}
    values.update(
        hosts={str(k): str(v) for k, v in hosts.items()},
        secret=str(secret).encode(),
        caps=Caps(**caps_raw),
        datastore=Path(raw["datastore"]),
        run_dir=Path(raw["run_dir"]),
        socket=Path(raw["socket"]),
    )
    if isinstance(values.get("qemu"), str):
        values["qemu"] = tuple(values["qemu"].split())
    return Config(**values)
