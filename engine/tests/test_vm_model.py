"""lockstepd with a VM of the VM model (ADR 0006) beyond the lab's one-NIC guest: two disk images
on the shared datastore (raw and qcow2) and two NICs. A bad description is refused with every
reason and nothing started; a VM powered off and started again keeps its disks; protected and
failed over twice, what was written to both disks before and after FT was on reads back byte-exact
on the survivor, and both NICs carry traffic after it; powered off then, and started again from
its spec, it has what it wrote last, and no copy of its images is left on the datastore."""

from __future__ import annotations

import json
import subprocess

import pytest

from ftlab import audit, engine, lab
from ftlab import topology as t
from ftlab.guest import StreamFollower, client_run
from ftlab.proc import in_node

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]
MiB = 1 << 20
NAME, K = "ftmulti", 9
SECOND_NET = "10.77.13"  # the second NIC's subnet, on the same VM network bridge
IP2 = f"{SECOND_NET}.{100 + K}"


@pytest.fixture(scope="module")
def cluster(lab):
    for i in (1, 2, 3):
        engine.start(i)
    yield


@pytest.fixture
def images():
    d = t.DATASTORE / "vm-model"
    d.mkdir(exist_ok=True)
    paths = [d / f"{NAME}-a.raw", d / f"{NAME}-b.qcow2"]
    for path in paths:
        path.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", path.suffix[1:], str(path), "16M"], check=True)
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


@pytest.fixture
def second_net():
    """The client gets an address on the second NIC's subnet (and loses it after)."""
    client = lab.load_state()["holders"]["client"]
    links = json.loads(subprocess.run(in_node(client, ["ip", "-j", "-4", "addr"]), capture_output=True,
                                      text=True, check=True).stdout)  # fmt: skip
    (dev,) = [a["ifname"] for a in links if any(i["local"] == t.CLIENT_IP for i in a["addr_info"])]
    subprocess.run(in_node(client, ["ip", "addr", "add", f"{SECOND_NET}.2/24", "dev", dev]), check=True)
    yield
    subprocess.run(in_node(client, ["ip", "addr", "del", f"{SECOND_NET}.2/24", "dev", dev]), check=False)


def spec(images, **extra) -> dict:
    body = engine.guest_body(NAME, K)
    return {
        "spec_version": 1, "name": NAME, "memory_mib": 256,
        "kernel": body["kernel"], "initrd": body["initrd"], "cmdline": f"{body['cmdline']} ft.ip2={IP2}/24",
        "disks": [{"path": str(images[0])}, {"path": str(images[1]), "format": "qcow2"}],
        "nics": [{"mac": t.guest_mac(K)}, {"mac": f"52:54:00:77:13:{100 + K:02x}"}],
    } | extra  # fmt: skip


def disk(ip: str, op: str, n: int, seed: int) -> None:
    result = client_run(ip, op, str(4 * MiB), "--seed", str(seed), "--disk", str(n))
    assert result["ok"], result


def started() -> None:
    StreamFollower(t.guest_ip(K)).wait_for_bytes(1, 120)


def test_a_bad_description_is_refused_with_every_reason_and_nothing_starts(cluster, images):
    bad = spec(images, machine="pc-i440fx-0.9")
    bad["disks"] += [{"path": "/tmp/elsewhere.raw"}, {"path": str(t.DATASTORE / "vm-model" / "missing.raw")}]
    bad["nics"][1] |= {"mac": t.guest_mac(K), "bridge": "nosuchbr"}
    status, answer = engine.call(1, "POST", "/vms", bad)
    assert status == 400, answer
    assert any("is given to more than one NIC" in r for r in answer["reasons"]), answer
    bad["nics"][1]["mac"] = "52:54:00:77:13:01"
    status, answer = engine.call(1, "POST", "/vms", bad)
    assert status == 400, answer
    reasons = " | ".join(answer["reasons"])
    for expected in (
        "/tmp/elsewhere.raw is not on the shared datastore",
        "missing.raw does not exist",
        "bridge nosuchbr does not exist on this host",
        "machine pc-i440fx-0.9 is not one",
    ):
        assert expected in reasons, answer
    assert not [p for i in (1, 2, 3) for p in engine.processes(i, NAME)]
    assert engine.call(1, "GET", f"/vms/{NAME}")[0] == 404


def test_two_disks_two_nics_keep_their_data_across_a_restart_and_two_failovers(cluster, images, second_net):
    ip = t.guest_ip(K)
    assert engine.ok(1, "POST", "/vms", spec(images))["changed"]
    try:
        started()
        disk(ip, "--disk-write", 1, seed=11)
        disk(ip, "--disk-write", 2, seed=12)
        # A VM powered off and started again keeps its disks: the images are never made anew.
        engine.power_off(NAME)
        assert engine.ok(1, "POST", "/vms", spec(images))["changed"]
        started()
        disk(ip, "--disk-read", 1, seed=11)
        disk(ip, "--disk-read", 2, seed=12)
        view = engine.ok(1, "POST", f"/vms/{NAME}/enable", {})["vm"]
        engine.ok(1, "POST", f"/vms/{NAME}/test-failover", {})
        view = engine.await_running(NAME, view["generation"] + 1)
        disk(ip, "--disk-read", 1, seed=11)  # before FT was on: carried by the copy of each disk
        disk(ip, "--disk-read", 2, seed=12)
        disk(ip, "--disk-write", 1, seed=13)  # while FT is on: replicated to the new secondary
        disk(ip, "--disk-write", 2, seed=14)
        # A checkpoint slower than the primary's progress timeout (1.5 s, seen under TCG on two
        # busy cores) drops the secondary and makes a new one: the writes are then in its copy.
        view = engine.await_running(NAME, view["generation"])
        engine.ok(engine.index(view["primary"]), "POST", f"/vms/{NAME}/test-failover", {})
        engine.await_running(NAME, view["generation"] + 1)
        disk(ip, "--disk-read", 1, seed=13)
        disk(ip, "--disk-read", 2, seed=14)
        for address in (ip, IP2):  # each NIC answers its own address (arp_ignore in the guest)
            result = client_run(address, "--stream-bytes", str(MiB), "--echo-bytes", str(64 << 10))
            assert result["ok"], (address, result)
        audit.clean(NAME)  # among others: the only copies on the datastore are the secondary's
        # After two failovers the VM runs on what was a secondary's copy; that copy became the
        # image, so the VM powered off and started from its spec has what it wrote last. Before,
        # it ran on a copy in the survivor's run directory and came back from the image as it was
        # at the first failover.
        disk(ip, "--disk-write", 1, seed=15)
        engine.power_off(NAME)
        audit.clean(NAME, gone=True)  # no copy of either image left
        assert sorted(p.name for p in images[0].parent.iterdir()) == sorted(p.name for p in images)
        assert engine.ok(1, "POST", "/vms", spec(images))["changed"]
        started()
        disk(ip, "--disk-read", 1, seed=15)
        disk(ip, "--disk-read", 2, seed=14)
    finally:
        engine.power_off(NAME)
