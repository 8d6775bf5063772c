"""The VM model (vmspec) and the COLO wiring derived from it, without QEMU: the schema and its
errors, the command lines and the QMP command sets per disk and NIC, the checks against a host."""

import asyncio
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from lockstep import colo, daemon, pairs, records, vmspec
from lockstep.api import ApiError

DATA = Path(__file__).parent / "data"
MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
PRIMARY = colo.Host(name="h1", ft_ip="10.1.0.1", run_dir=Path("/run/ft"), prefix=("nsenter", "-n"))
SECONDARY = colo.Host(
    name="h2", ft_ip="10.1.0.2", run_dir=Path("/run/ft"), accel="kvm", diagnostic_monitor=True
)
PORTS = colo.Ports(9020)


def two_by_two(q35: bool = True, **extra) -> vmspec.VmSpec:
    """A disk-booted VM with a raw virtio-blk disk, a qcow2 virtio-scsi disk and two NICs, on q35
    (the wiring is derived for it; parse refuses q35 for QEMU 7.2's COLO)."""
    spec = vmspec.parse(
        {
            "spec_version": 1,
            "name": "db1",
            "memory_mib": 1024,
            "vcpus": 2,
            "sockets": 1,
            "cores": 2,
            "machine": "pc",
            "cpu_model": "Skylake-Server",
            "disks": [
                {"path": "/ds/db1-root.raw"},
                {"path": "/ds/db1-data.qcow2", "format": "qcow2", "bus": "virtio-scsi"},
            ],
            "nics": [{"mac": MAC1}, {"mac": MAC2, "bridge": "vmbr1"}],
        }
        | extra
    )
    return dataclasses.replace(spec, machine="q35") if q35 else spec


def test_q35_is_refused_with_the_reason():
    with pytest.raises(vmspec.SpecError, match=r"machine q35 is refused: QEMU 7\.2.s COLO secondary aborts"):
        two_by_two(machine="pc-q35-7.2")


def lab_guest(disk_mib: int | None = 16) -> vmspec.VmSpec:
    """The lab's test guest, in the flat shape its harness and earlier records use."""
    body = {
        "name": "demo",
        "mac": "52:54:00:12:34:56",
        "memory_mib": 256,
        "vcpus": 1,
        "kernel": "/ds/img/vmlinuz",
        "initrd": "/ds/img/initrd.img",
        "cmdline": "console=ttyS0 ft.ip=10.0.0.5/24",
    }
    return vmspec.parse(body | ({"disk_mib": disk_mib} if disk_mib else {}))


# --- the schema ------------------------------------------------------------------------------------


def test_the_earlier_flat_shape_parses_to_one_nic_and_a_declared_scratch_disk():
    spec = lab_guest()
    assert spec.nics == (vmspec.Nic(mac="52:54:00:12:34:56"),)
    assert spec.disks == (vmspec.Disk(create=True, size_mib=16),)
    assert spec.spec_version == vmspec.SPEC_VERSION


def test_a_spec_survives_the_record_and_an_old_record_still_loads(tmp_path):
    spec = two_by_two()
    assert vmspec.from_record(json.loads(json.dumps(vmspec.to_dict(spec)))) == spec
    old = {
        "name": "demo",
        "mac": "52:54:00:12:34:56",
        "memory_mib": 256,
        "vcpus": 1,
        "kernel": "/k",
        "initrd": None,
        "cmdline": "",
        "disk_mib": 16,
    }  # a record's guest before spec_version
    assert vmspec.from_record(old) == vmspec.VmSpec(
        name="demo",
        nics=(vmspec.Nic("52:54:00:12:34:56"),),
        disks=(vmspec.Disk(create=True, size_mib=16),),
        kernel="/k",
    )
    record = records.Record(name="db1", guest=vmspec.to_dict(spec), primary=records.Side("h1", "primary"))
    records.create(tmp_path, record)
    assert vmspec.from_record(records.load(tmp_path, "db1").guest) == spec


def test_every_problem_of_a_description_is_reported_at_once():
    with pytest.raises(vmspec.SpecError) as e:
        vmspec.parse(
            {
                "spec_version": 1,
                "name": "Bad_Name",
                "vcpus": 3,
                "sockets": 2,
                "cores": 2,
                "firmware": "ovmf",
                "machine": "virt",
                "colour": "red",
                "disks": [
                    {"path": "relative.img", "format": "vmdk", "bus": "ide"},
                    {"create": True, "path": "/ds/x.raw"},
                ],
                "nics": [{"mac": MAC1}, {"mac": MAC1}, {"mac": "nope", "model": "e1000"}],
            }
        )
    problems = e.value.problems
    for expected in (
        "the VM: unknown fields: colour",
        "name must be",
        "disks[0].format must be one of raw, qcow2",
        "disks[0].bus must be one of virtio-blk, virtio-scsi",
        "disks[0].path must be the absolute path",
        "disks[1]: a scratch disk (create) has no path",
        "disks[1].size_mib must be",
        "nics[2].mac must be a MAC address",
        "nics[2].model must be one of virtio-net-pci",
        f"MAC {MAC1} is given to more than one NIC",
        "sockets x cores (2 x 2) must equal vcpus (3)",
        "machine must be pc, q35",
        "firmware ovmf is refused: its NVRAM",
    ):
        assert any(p.startswith(expected) for p in problems), (expected, problems)


def test_limits_of_the_wiring_are_schema_errors():
    nics = [{"mac": f"52:54:00:00:00:0{i}"} for i in range(vmspec.MAX_NICS + 1)]
    with pytest.raises(vmspec.SpecError, match="nics must be a list of 1 to 3"):
        vmspec.parse({"spec_version": 1, "name": "a", "kernel": "/k", "nics": nics})
    with pytest.raises(vmspec.SpecError, match="boot from disk needs an image as the first disk"):
        vmspec.parse({"spec_version": 1, "name": "a", "nics": [{"mac": MAC1}]})
    with pytest.raises(vmspec.SpecError, match="spec_version 2 is not known"):
        vmspec.parse({"spec_version": 2, "name": "a"})


def test_the_api_answers_400_with_every_reason():
    with pytest.raises(ApiError) as e:
        daemon.spec_from({"name": "a", "mac": "x", "vcpus": 0, "disk_mib": 0})
    assert e.value.status == 400
    reasons = e.value.extra["reasons"]
    assert {r.split(" ")[0] for r in reasons} >= {"disk_mib", "vcpus", "nics[0].mac"}, reasons


# --- the command lines -----------------------------------------------------------------------------


def test_one_disk_one_nic_gives_the_command_lines_of_before():
    """The argv of the earlier Guest-based code, recorded before the model changed."""
    before = json.loads((DATA / "colo_argv_v0.json").read_text())
    kvm = SECONDARY
    assert colo.primary_argv(lab_guest(), PRIMARY, PORTS) == before["primary_disk"]
    no_initrd = vmspec.parse({"name": "demo", "mac": "52:54:00:12:34:56", "kernel": "/ds/img/vmlinuz"})
    assert colo.primary_argv(no_initrd, PRIMARY, PORTS) == before["primary_nodisk"]
    assert (
        colo.secondary_argv(lab_guest(), kvm, PRIMARY, PORTS, colo.Mode.LOCKSTEP)
        == before["secondary_lockstep"]
    )
    assert (
        colo.secondary_argv(no_initrd, kvm, PRIMARY, PORTS, colo.Mode.CHECKPOINT)
        == before["secondary_checkpoint"]
    )
    assert colo.primary_filters(lab_guest(), colo.Mode.LOCKSTEP) == before["filters_lockstep"]
    assert colo.primary_filters(lab_guest(), colo.Mode.CHECKPOINT) == before["filters_checkpoint"]


def options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_two_disks_two_nics_q35_primary():
    argv = colo.primary_argv(two_by_two(), PRIMARY, PORTS)
    assert options(argv, "-machine") == ["q35"]
    assert options(argv, "-cpu") == ["Skylake-Server"]
    assert options(argv, "-smp") == ["2,sockets=1,cores=2"]
    assert "-kernel" not in argv
    assert options(argv, "-drive") == [
        "driver=quorum,read-pattern=fifo,vote-threshold=1,id=colo-disk0,if=none,"
        "children.0.file.filename=/ds/db1-root.raw,children.0.driver=raw",
        "driver=quorum,read-pattern=fifo,vote-threshold=1,id=colo-disk1,if=none,"
        "children.0.file.filename=/ds/db1-data.qcow2,children.0.driver=qcow2",
    ]
    assert options(argv, "-device") == [
        "virtio-net-pci,netdev=hn0,mac=52:54:00:00:00:01,romfile=",
        "virtio-net-pci,netdev=hn1,mac=52:54:00:00:00:02,romfile=",
        "virtio-scsi-pci,id=scsi0",
        "virtio-blk-pci,drive=colo-disk0,bootindex=1",
        "scsi-hd,bus=scsi0.0,drive=colo-disk1",
    ]
    taps = [re.search(r"ifname=([^,]+)", n)[1] for n in options(argv, "-netdev")]
    assert taps == [colo.tap_name("db1", "primary", 0), colo.tap_name("db1", "primary", 1)]
    assert len(set(taps)) == 2 and all(len(t) <= 15 for t in taps)
    chardevs = options(argv, "-chardev")
    assert len(chardevs) == 12 and len({c.split(",")[1] for c in chardevs}) == 12


def test_two_disks_two_nics_secondary_lockstep():
    argv = colo.secondary_argv(two_by_two(), SECONDARY, PRIMARY, PORTS, colo.Mode.LOCKSTEP, generation=3)
    drives = options(argv, "-drive")
    assert drives[0] == "if=none,id=parent0,file.filename=/ds/.db1-root.raw.db1.ft-h2-g3,driver=raw"
    assert drives[3] == "if=none,id=parent1,file.filename=/ds/.db1-data.qcow2.db1.ft-h2-g3,driver=qcow2"
    assert "top-id=colo-disk1" in drives[4] and "/run/ft/db1.active1.qcow2" in drives[4]
    # the secondary never opens the primary's image, only its own copy
    assert not any("/ds/db1-" in d for d in drives)
    objects = options(argv, "-object")
    n1 = PORTS.nic(1)
    assert f"socket,id=red0-n1,host=10.1.0.1,port={n1.mirror},reconnect=1" in options(argv, "-chardev")
    assert "filter-redirector,id=f1-n1,netdev=hn1,queue=tx,indev=red0-n1,vnet_hdr_support=on" in objects
    assert "filter-rewriter,id=rew0-n1,netdev=hn1,queue=all,vnet_hdr_support=on" in objects
    assert len(objects) == 6


def test_each_nic_has_ports_of_its_own_inside_the_pairs_block():
    ports = [PORTS.migrate, PORTS.nbd, PORTS.heartbeat]
    for i in range(vmspec.MAX_NICS):
        n = PORTS.nic(i)
        ports += [n.mirror, n.compare, n.local_in, n.local_out]
    assert len(set(ports)) == len(ports)
    assert all(PORTS.base < p < PORTS.base + pairs.PORTS_STEP for p in ports)  # reserve_ports' block


def test_image_disks_are_never_created_only_the_secondarys_copies_and_scratch_disks():
    """A VM powered off and started again keeps its disks: the primary makes nothing of them."""
    assert colo.disk_commands(two_by_two(), PRIMARY, "primary", {}) == []
    made = colo.disk_commands(two_by_two(), SECONDARY, "secondary", {0: 1 << 30, 1: 2 << 30}, generation=7)
    # each image's copy beside it on the datastore, in its format (it becomes the image if this
    # side goes live: images.adopt); the replication overlays in the run directory
    assert [(c[-3], c[-2], c[-1]) for c in made] == [
        ("raw", "/ds/.db1-root.raw.db1.ft-h2-g7", str(1 << 30)),
        ("qcow2", "/run/ft/db1.active.qcow2", str(1 << 30)),
        ("qcow2", "/run/ft/db1.hidden.qcow2", str(1 << 30)),
        ("qcow2", "/ds/.db1-data.qcow2.db1.ft-h2-g7", str(2 << 30)),
        ("qcow2", "/run/ft/db1.active1.qcow2", str(2 << 30)),
        ("qcow2", "/run/ft/db1.hidden1.qcow2", str(2 << 30)),
    ]
    assert colo.image_copies(two_by_two(), "h2", 7) == {
        "/ds/.db1-root.raw.db1.ft-h2-g7": "/ds/db1-root.raw",
        "/ds/.db1-data.qcow2.db1.ft-h2-g7": "/ds/db1-data.qcow2",
    }
    argv = " ".join(colo.disk_argv(two_by_two(), SECONDARY, "secondary", 7))
    assert "id=parent0,file.filename=/ds/.db1-root.raw.db1.ft-h2-g7,driver=raw" in argv
    assert "id=parent1,file.filename=/ds/.db1-data.qcow2.db1.ft-h2-g7,driver=qcow2" in argv
    assert colo.disk_commands(lab_guest(), SECONDARY, "secondary", {}) == [  # a scratch disk's copy: local
        ["qemu-img", "create", "-q", "-f", fmt, f"/run/ft/demo.{layer}.{fmt}", "16M"]
        for layer, fmt in (("disk", "raw"), ("active", "qcow2"), ("hidden", "qcow2"))
    ]
    assert colo.disk_commands(lab_guest(), PRIMARY, "primary", {}) == [
        ["qemu-img", "create", "-q", "-f", "raw", "/run/ft/demo.disk.raw", "16M"]
    ]


# --- the QMP command sets, recorded at the QMP boundary -------------------------------------------


class RecordingVm:
    """A fake of one QEMU at its QMP boundary: records the commands, answers as a QEMU would."""

    def __init__(self, guest, role, objects=(), nodes=(), copied=None):
        self.guest, self.role = guest, role
        self.host = colo.Host(name="h", ft_ip="10.1.0.9", run_dir=Path("/nonexistent"), prefix=("true",))
        self.sent: list[tuple[str, dict | None]] = []
        self.objects, self.nodes = list(objects), list(nodes)
        self.copied = copied or {}  # job -> how its mirror ended: {"offset": ..., "error": ...}

    def block_jobs(self) -> list[dict]:
        """drive-mirror jobs as QEMU lists them: ready until cancelled, then concluded (auto-dismiss
        off) until dismissed."""
        cancelled = {a["device"] for c, a in self.sent if c == "block-job-cancel"}
        dismissed = {a["id"] for c, a in self.sent if c == "block-job-dismiss"}
        jobs = []
        for w in colo.disks(self.guest):
            if w.job in dismissed or not any(c == "drive-mirror" for c, _ in self.sent):
                continue
            job = {"device": w.job, "ready": True, "status": "ready", "offset": 4096, "len": 4096}
            if w.job in cancelled:
                job |= {"status": "concluded"} | self.copied.get(w.job, {})
            jobs.append(job)
        return jobs

    async def execute(self, cmd, args=None, timeout=10.0):
        self.sent.append((cmd, args))
        answers = {
            "query-block-jobs": self.block_jobs() if cmd == "query-block-jobs" else [],
            "query-migrate": {"status": "colo"},
            "qom-list": [{"name": o} for o in self.objects],
            "query-named-block-nodes": [{"node-name": n} for n in self.nodes],
            "query-colo-status": {"mode": "primary"},
            "query-status": {"running": False, "status": "paused"},
            "query-block-exports": [{"id": "parent0"}],
            "query-yank": [],
            "query-chardev": [],
            "human-monitor-command": "",
        }
        return answers.get(cmd, {})


def sent(vm, cmd):
    return [args for c, args in vm.sent if c == cmd]


def test_replication_commands_per_disk_and_nic():
    primary = RecordingVm(two_by_two(), "primary")
    asyncio.run(colo.start_replication(primary, "10.1.0.2", PORTS, 100, colo.Mode.LOCKSTEP))
    assert [a["job-id"] for a in sent(primary, "drive-mirror")] == ["resync", "resync1"]
    assert [a["target"] for a in sent(primary, "drive-mirror")] == [
        "nbd://10.1.0.2:9029/parent0",
        "nbd://10.1.0.2:9029/parent1",
    ]
    assert sent(primary, "x-blockdev-change") == [
        {"parent": "colo-disk0", "node": "replication0"},
        {"parent": "colo-disk1", "node": "replication1"},
    ]
    assert [a["id"] for a in sent(primary, "chardev-add")] == [
        "mirror0",
        "compare1",
        "compare0",
        "compare0-0",
        "compare_out",
        "compare_out0",
        "mirror0-n1",
        "compare1-n1",
        "compare0-n1",
        "compare0-0-n1",
        "compare_out-n1",
        "compare_out0-n1",
    ]
    assert [a["id"] for a in sent(primary, "object-add")] == [
        "m0",
        "redire0",
        "redire1",
        "iothread1",
        "comp0",
        "m0-n1",
        "redire0-n1",
        "redire1-n1",
        "comp0-n1",
    ]
    secondary = RecordingVm(two_by_two(), "secondary")
    asyncio.run(colo.prepare_secondary(secondary, PORTS))
    assert [a["device"] for a in sent(secondary, "nbd-server-add")] == ["parent0", "parent1"]


@pytest.mark.parametrize(
    "ended, why",
    [
        ({"error": "Input/output error"}, "resync1: Input/output error"),
        ({"offset": 1024}, "resync1 copied 1024 of 4096 bytes"),
    ],
)
def test_a_copy_that_ended_badly_never_counts(ended, why):
    """The secondary's copy counts only if its mirror ended without an error and copied all."""
    primary = RecordingVm(two_by_two(), "primary", copied={"resync1": ended})
    with pytest.raises(colo.DataPlaneError, match=f"the disk copy failed: {why}"):
        asyncio.run(colo.start_replication(primary, "10.1.0.2", PORTS, 100, colo.Mode.LOCKSTEP))
    assert [a["id"] for a in sent(primary, "block-job-dismiss")] == ["resync", "resync1"]  # none kept
    assert sent(primary, "migrate") == []  # replication never started


def test_takeover_and_undo_cover_every_nic_and_disk():
    secondary = RecordingVm(colo.Guest("db1", nics=2), "secondary")  # as the watcher knows it
    asyncio.run(colo.secondary_takeover(secondary, colo.Mode.LOCKSTEP))
    assert [a["id"] for a in sent(secondary, "object-del")] == ["f2", "f1", "f2-n1", "f1-n1"]
    assert [a["name"] for a in sent(secondary, "set_link")] == ["hn0", "hn0", "hn1", "hn1"]
    primary = RecordingVm(
        colo.Guest("db1"),
        "primary",
        objects=["m0", "comp0", "iothread1", "comp0-n1", "m0-n1"],
        nodes=["colo-disk0", "replication0", "colo-disk1", "replication1"],
    )
    asyncio.run(colo.primary_continue_alone(primary, colo.Mode.LOCKSTEP))
    assert [a["id"] for a in sent(primary, "object-del")] == ["comp0-n1", "m0-n1", "comp0", "iothread1", "m0"]
    assert sent(primary, "x-blockdev-change") == [
        {"parent": "colo-disk0", "child": "children.1"},
        {"parent": "colo-disk1", "child": "children.1"},
    ]


# --- the checks against a host ---------------------------------------------------------------------


def test_every_reason_a_host_cannot_run_the_vm_at_once(tmp_path):
    datastore = tmp_path / "ds"
    datastore.mkdir()
    (datastore / "root.raw").write_bytes(b"\0" * 512)
    (datastore / "data.img").write_bytes(b"\0" * 512)
    spec = vmspec.parse(
        {
            "spec_version": 1,
            "name": "db1",
            "machine": "pc-i440fx-9.9",
            "disks": [
                {"path": str(datastore / "root.raw")},
                {"path": str(datastore / "missing.qcow2"), "format": "qcow2"},
                {"path": str(tmp_path / "elsewhere.raw")},
                {"path": str(datastore / "data.img"), "format": "qcow2"},
            ],
            "nics": [{"mac": MAC1}, {"mac": MAC2, "bridge": "nosuchbr"}],
        }
    )
    other = vmspec.parse(
        {
            "spec_version": 1,
            "name": "web1",
            "nics": [{"mac": MAC1}],
            "disks": [{"path": str(datastore / "root.raw")}],
        }
    )
    facts = vmspec.HostFacts(
        datastore,
        {"vmbr0"},
        "vmbr0",
        {"pc", "q35", "pc-i440fx-7.2"},
        {str(datastore / "root.raw"): "raw", str(datastore / "data.img"): "raw"},
    )
    problems = vmspec.check_host(spec, facts, {"web1": other, "db1": spec})
    assert problems == [
        f"disks[1]: image {datastore}/missing.qcow2 does not exist (an image is never created)",
        f"disks[2]: {tmp_path}/elsewhere.raw is not on the shared datastore {datastore}",
        f"disks[3]: {datastore}/data.img is a raw image, not qcow2",
        "nics[1]: bridge nosuchbr does not exist on this host",
        f"MAC {MAC1} is used by VM web1",
        f"image {datastore}/root.raw is used by VM web1",
        "machine pc-i440fx-9.9 is not one this QEMU build runs (it has pc, pc-i440fx-7.2, q35)",
    ]
    good = vmspec.parse(
        {
            "spec_version": 1,
            "name": "db2",
            "machine": "pc",
            "nics": [{"mac": MAC2}],
            "disks": [{"path": str(datastore / "data.img")}],
        }
    )
    assert vmspec.check_host(good, facts, {"web1": other}) == []


# --- one schema for the API, ftctl and ft_vm ---------------------------------------------------------


def test_ft_vm_definition_offers_the_schemas_fields():
    path = Path(__file__).parents[2] / "collections/ansible_collections/ft/lockstep/plugins/modules/ft_vm.py"
    source = path.read_text()
    doc = yaml.safe_load(source.split('DOCUMENTATION = r"""', 1)[1].split('"""', 1)[0])
    definition = doc["options"]["definition"]["suboptions"]
    spec_fields = {f for f in vmspec.VmSpec.__dataclass_fields__} - {"name", "spec_version"}
    assert set(definition) == spec_fields | {"mac", "disk_mib"}
    assert set(definition["disks"]["suboptions"]) == set(vmspec.Disk.__dataclass_fields__)
    assert set(definition["nics"]["suboptions"]) == set(vmspec.Nic.__dataclass_fields__)
