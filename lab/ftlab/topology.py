"""Names and addresses of everything the lab makes: one place, so that up, down, the inventory
and the tests agree."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

STATE_DIR = Path(os.environ.get("FTLAB_STATE", "/var/lib/ftlab"))
CACHE_DIR = Path(os.environ.get("FTLAB_CACHE", "/var/cache/ftlab"))
STATE_FILE = STATE_DIR / "state.json"
DATASTORE = STATE_DIR / "datastore"  # the shared datastore: same path on every host
SSH_KEY = STATE_DIR / "ssh" / "id_ed25519"
MAX_HOSTS = 20

# Root-namespace bridges, one per network. Only the management bridge has an address of the
# controller's (this machine's root namespace); the others are plain L2 segments.
BRIDGES = {
    "mgmt": "ftl-mgmt",
    "migration": "ftl-mig",
    "ft_logging": "ftl-ftlog",
    "vm": "ftl-vmnet",
}
SUBNETS = {"mgmt": "10.77.0", "migration": "10.77.1", "ft_logging": "10.77.2", "vm": "10.77.3"}
CONTROLLER_IP = "10.77.0.1"
STORAGE_IP = "10.77.0.2"
CLIENT_IP = "10.77.3.2"
ISCSI_IQN = "iqn.2026-11.lab.ft:datastore"
NFS_EXPORT = f"nfs://{STORAGE_IP}{DATASTORE}"
VM_BRIDGE = "vmbr0"  # inside every host, the bridge guests' taps join
LIBVIRT_TCP_PORT = 16509


@dataclass(frozen=True)
class Node:
    """A namespace "machine": a lab host, the storage server or the client."""

    name: str  # short name: h1, h2, ..., storage, client
    hostname: str
    netns: str

    @property
    def dir(self) -> Path:
        return STATE_DIR / "nodes" / self.name


@dataclass(frozen=True)
class Host(Node):
    index: int

    def ip(self, network: str) -> str:
        return f"{SUBNETS[network]}.{10 + self.index}"

    @property
    def libvirt_uri(self) -> str:
        return f"qemu+tcp://{self.ip('mgmt')}/system"

    @property
    def host_uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{self.hostname}.ftlab"))


def host(index: int) -> Host:
    return Host(name=f"h{index}", hostname=f"lab-h{index}", netns=f"ftl-h{index}", index=index)


STORAGE = Node(name="storage", hostname="lab-storage", netns="ftl-storage")
CLIENT = Node(name="client", hostname="lab-client", netns="ftl-client")


def guest_ip(index: int) -> str:
    """Address of the index-th guest VM on the VM network."""
    return f"{SUBNETS['vm']}.{100 + index}"


def guest_mac(index: int) -> str:
    return f"52:54:00:77:03:{100 + index:02x}"
