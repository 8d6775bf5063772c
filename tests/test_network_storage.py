"""ft.lockstep.ft_network and ft_storage against real kernels, over SSH like any managed host.

The lab hosts' kernel has no bonding, NFS client or iSCSI initiator (shared/LAB-FACTS.md), so those
run in the lab's Debian guest (ftlab.debian: its real kernel, systemd-networkd, open-iscsi, libvirt)
against the lab's own storage server (nfs-ganesha, tgtd). What the lab hosts can do - a dir
datastore and its libvirt pool, refusing an unsupported network stack - runs on them. Every change
is made twice: the second run must report no change."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from ftlab import debian
from ftlab import topology as t
from ftlab.ansible import module

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv" / "bin"

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]


def twice(hosts, name, args, inventory=None) -> list[dict]:
    """The module run in check mode, then for real, then again: the results on the first host."""
    runs = [module(hosts, name, args, *extra, inventory=inventory) for extra in (["--check"], [], [])]
    return [next(iter(r.values())) for r in runs]


@pytest.fixture(scope="module")
def guest(lab):
    with debian.DebianGuest() as g:
        yield g


@pytest.fixture(scope="module")
def nics(guest) -> list[str]:
    return [guest.nic(mac) for _tap, _net, mac, _speed in debian.NICS]


MIGRATION = dict(role="migration", address="10.77.1.30/24", mtu=9000, vm_interfaces=["vmbr0"])


@pytest.fixture(scope="module")
def migration_bond(guest, nics) -> list[dict]:
    """The migration network bonded over the guest's first two NICs: check mode, first, second run."""
    return twice("debian", "ft_network", MIGRATION | {"members": nics[0:2]}, guest.inventory())


# What a refused request must leave as it was: the links (which exist, master, MTU, up, alias,
# kind), their addresses and the persisted files - not kernel bookkeeping such as the qdisc a
# NIC keeps from having been opened.
KERNEL_VIEW = """python3 -c '
import json, subprocess
links = json.loads(subprocess.check_output(["ip", "-j", "-d", "addr"]))
print(json.dumps(sorted([l["ifname"], l.get("master"), l["mtu"], "UP" in l["flags"], l.get("ifalias"),
                         l.get("linkinfo", {}).get("info_kind"), sorted(a["local"] for a in l["addr_info"])]
                        for l in links)))
'; ls /etc/systemd/network"""


def kernel_view(guest) -> str:
    return guest.ssh(KERNEL_VIEW).stdout


def wait_in_guest(guest, command: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        done = guest.ssh(command, check=False)
        if done.returncode == 0:
            return done.stdout
        assert time.monotonic() < deadline, f"{command}: {done.stdout}{done.stderr}"
        time.sleep(0.5)


# --- ft_network ------------------------------------------------------------------------------------


def test_bonds_for_both_networks_carry_traffic_survive_a_reload_and_a_second_run_changes_nothing(
    guest, nics, migration_bond
):
    inv = guest.inventory()
    log = dict(role="ft_logging", members=nics[2:4], address="10.77.2.30/24", bond_mode="balance-rr")
    for check, first, second in (migration_bond, twice("debian", "ft_network", log, inv)):
        assert check["changed"] and check["steps"] == first["steps"] and check["files"] == first["files"]
        assert first["changed"] and first["stack"] == "systemd-networkd", first
        assert second["changed"] is False and second["steps"] == [] and second["files"] == [], second
    bonding = guest.ssh("cat /proc/net/bonding/ft-mig /proc/net/bonding/ft-log").stdout
    assert "Bonding Mode: fault-tolerance (active-backup)" in bonding
    assert "Bonding Mode: load balancing (round-robin)" in bonding
    assert all(f"Slave Interface: {nic}" in bonding for nic in nics[:4])
    assert '"mtu":9000' in guest.ssh("ip -j link show ft-mig").stdout.replace(" ", "")
    # traffic over each bond to lab-h1 on that network, from the bond's own address
    guest.ssh(f"ping -c 2 -W 2 -I 10.77.1.30 {t.host(1).ip('migration')}")
    guest.ssh(f"ping -c 2 -W 2 -I 10.77.2.30 {t.host(1).ip('ft_logging')}")
    # the persisted files bring a deleted bond back, members and address included
    guest.ssh("ip link del ft-log && networkctl reload")
    wait_in_guest(
        guest,
        "ip -br addr show ft-log | grep -q 10.77.2.30/24 && grep -c 'Slave Interface' "
        "/proc/net/bonding/ft-log | grep -qx 2",
        30,
    )

    absent = dict(role="ft_logging", state="absent")
    _check, first, second = twice("debian", "ft_network", absent, inv)
    assert first["changed"] and "delete bond ft-log" in first["steps"][0]
    assert sorted(first["files"]) == sorted(
        f"/etc/systemd/network/40-ft-ft-logging{suffix}"
        for suffix in (".netdev", ".network", f"-{nics[2]}.network", f"-{nics[3]}.network")
    )
    assert second["changed"] is False
    assert guest.ssh("ip link show ft-log", check=False).returncode != 0
    assert "40-ft-ft-logging" not in guest.ssh("ls /etc/systemd/network").stdout


@pytest.mark.parametrize(
    "args, reason",
    [
        (dict(members=["eth9"]), "NIC eth9 does not exist on this host"),
        (dict(members=[]), "members is empty: name at least one NIC"),
        (dict(members="MIG"), "already carries the migration network (ft-mig)"),
        (dict(members="SLOW"), "links at 100 Mb/s; the ft_logging network needs at least 1000 Mb/s"),
        (dict(members="LOG", address="10.77.2.30"), "is not ADDRESS/PREFIX"),
        # passes every check, fails in the kernel half-way (after the bond and its members): undone
        (dict(members="LOG", mtu=70000), "step 'MTU of ft-log -> 70000' failed"),
    ],
    ids=[
        "unknown-nic",
        "no-members",
        "nic-of-other-role",
        "slow-nic",
        "bad-address",
        "kernel-refuses-half-way",
    ],
)
def test_bad_network_requests_fail_naming_the_problem_and_change_nothing(
    guest, nics, migration_bond, args, reason
):
    named = {"MIG": nics[0:1], "SLOW": nics[4:5], "LOG": nics[2:4]}
    args = dict(role="ft_logging", address="10.77.2.30/24") | args
    args["members"] = (
        named.get(args["members"], args["members"]) if isinstance(args["members"], str) else args["members"]
    )
    before = kernel_view(guest)
    result = module("debian", "ft_network", args, inventory=guest.inventory())["debian"]
    assert result.get("failed") and reason in result["msg"], result
    assert result["changed"] is False
    assert kernel_view(guest) == before


def test_a_host_without_a_supported_network_stack_is_refused_unless_persist_is_none(lab):
    """The lab hosts run no network manager at all (no systemd): like a host on ifupdown."""
    args = dict(role="migration", members=["mig0"], address=f"{t.host(1).ip('migration')}/24")
    refused = module("lab-h1", "ft_network", args)["lab-h1"]
    assert refused.get("failed") and "no supported network stack runs on this host" in refused["msg"]
    assert "persist: none" in refused["msg"]
    kernel_only = module("lab-h1", "ft_network", args | {"persist": "none"})["lab-h1"]
    assert kernel_only["changed"] and kernel_only["steps"] == ["tag mig0 as the migration network"], (
        kernel_only
    )
    again = module("lab-h1", "ft_network", args | {"persist": "none"})["lab-h1"]
    assert again["changed"] is False


# --- ft_storage --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datastore_id(lab) -> str:
    """The lab hosts' dir datastore (the shared directory) with a libvirt dir pool on each host."""
    args = dict(type="dir", path=str(t.DATASTORE), pool="ft-datastore")
    first = module("ft_hosts", "ft_storage", args)
    ids = {r["datastore_id"] for r in first.values()}
    assert len(ids) == 1 and None not in ids, first
    second = module("ft_hosts", "ft_storage", args)
    assert not any(r["changed"] for r in second.values()), second
    return ids.pop()


def test_every_lab_host_sees_one_dir_datastore_with_a_started_autostarted_pool(lab, datastore_id):
    for i in (1, 2, 3):
        info = subprocess.run(
            ["virsh", "-c", t.host(i).libvirt_uri, "pool-info", "ft-datastore"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "State:          running" in info and "Autostart:      yes" in info
    assert (t.DATASTORE / ".ft-lockstep-datastore").read_text().strip() == datastore_id


def test_a_host_that_sees_another_datastore_at_the_path_is_refused_and_keeps_nothing(lab, datastore_id):
    # each lab host has its own /var/lib/libvirt: the same path, a different directory
    path = "/var/lib/libvirt/ft-other"
    subprocess.run(["ssh", *ssh_args(1), f"mkdir -p {path}"], check=True)
    args = dict(type="dir", path=path, pool="ft-other", same_datastore_as=datastore_id)
    refused = module("lab-h1", "ft_storage", args)["lab-h1"]
    assert (
        refused.get("failed")
        and f"not {datastore_id}: every FT host must see the same datastore" in refused["msg"]
    )
    left = subprocess.run(
        ["ssh", *ssh_args(1), f"ls -A {path}; virsh pool-list --all --name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ".ft-lockstep-datastore" not in left and "ft-other" not in left


def ssh_args(i: int) -> list[str]:
    return [
        "-i",
        str(t.SSH_KEY),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        f"root@{t.host(i).ip('mgmt')}",
    ]


def test_nfs_datastore_mounts_persists_gets_its_pool_and_is_the_one_the_lab_hosts_see(guest, datastore_id):
    inv = guest.inventory()
    args = dict(
        type="nfs",
        server=t.STORAGE_IP,
        export="/datastore",
        path=str(t.DATASTORE),
        pool="ft-datastore",
        same_datastore_as=datastore_id,
    )
    check = module("debian", "ft_storage", args, "--check", inventory=inv)["debian"]
    assert check["changed"] and check["datastore_id"] is None
    assert guest.ssh(f"mountpoint -q {t.DATASTORE}", check=False).returncode != 0  # check mode mounts nothing
    first, second = (module("debian", "ft_storage", args, inventory=inv)["debian"] for _ in range(2))
    assert first["changed"] and first["datastore_id"] == datastore_id, first
    assert second["changed"] is False and second["steps"] == [], second
    assert (
        f"{t.STORAGE_IP}:/datastore {t.DATASTORE} nfs hard,_netdev 0 0" in guest.ssh("cat /etc/fstab").stdout
    )
    info = guest.ssh("virsh pool-info ft-datastore").stdout
    assert "State:          running" in info and "Autostart:      yes" in info
    # a file written in the guest is on the storage server's export, where the lab hosts see it
    guest.ssh(f"echo from-the-guest > {t.DATASTORE}/guest-wrote && sync")
    assert (t.DATASTORE / "guest-wrote").read_text() == "from-the-guest\n"
    (t.DATASTORE / "guest-wrote").unlink()

    _check, first, second = twice("debian", "ft_storage", args | {"state": "absent"}, inv)
    assert first["changed"] and second["changed"] is False
    assert guest.ssh(f"mountpoint -q {t.DATASTORE}", check=False).returncode != 0
    assert str(t.DATASTORE) not in guest.ssh("cat /etc/fstab").stdout


def test_iscsi_datastore_logs_in_keeps_the_node_for_boot_and_gets_its_pool(guest):
    inv = guest.inventory()
    args = dict(type="iscsi", portal=t.STORAGE_IP, target=t.ISCSI_IQN, pool="ft-iscsi")
    check, first, second = twice("debian", "ft_storage", args, inv)
    assert check["changed"] and first["changed"] and second["changed"] is False, (first, second)
    assert first["device"] == f"/dev/disk/by-path/ip-{t.STORAGE_IP}:3260-iscsi-{t.ISCSI_IQN}-lun-1"
    assert first["datastore_id"] and first["datastore_id"] == second["datastore_id"]
    assert t.ISCSI_IQN in guest.ssh("iscsiadm -m session").stdout
    assert "node.startup = automatic" in guest.ssh(f"iscsiadm -m node -T {t.ISCSI_IQN}").stdout
    info = guest.ssh("virsh pool-info ft-iscsi").stdout
    assert "State:          running" in info and "Autostart:      yes" in info

    _check, first, second = twice("debian", "ft_storage", args | {"state": "absent"}, inv)
    assert first["changed"] and second["changed"] is False
    assert guest.ssh("iscsiadm -m session", check=False).returncode != 0  # no session left
    assert guest.ssh(f"iscsiadm -m node -T {t.ISCSI_IQN}", check=False).returncode != 0


@pytest.mark.parametrize(
    "args, reason",
    [
        (
            dict(type="nfs", server="10.77.0.99", export="/datastore", path="/mnt/ft", timeout=2),
            "NFS server 10.77.0.99 does not answer on port 2049 within 2 s",
        ),
        (
            dict(type="iscsi", portal=t.STORAGE_IP, target="iqn.2026-11.lab.ft:wrong"),
            f"does not offer target iqn.2026-11.lab.ft:wrong (it offers: {t.ISCSI_IQN})",
        ),
    ],
    ids=["unreachable-nfs-server", "wrong-iqn"],
)
def test_bad_storage_requests_fail_naming_the_problem_and_leave_nothing(guest, args, reason):
    look = "cat /etc/fstab; ls /mnt; iscsiadm -m node 2>&1; iscsiadm -m session 2>&1; virsh pool-list --all"
    before = guest.ssh(look, check=False).stdout
    result = module("debian", "ft_storage", args, inventory=guest.inventory())["debian"]
    assert result.get("failed") and reason in result["msg"], result
    assert guest.ssh(look, check=False).stdout == before
