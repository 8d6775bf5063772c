"""What makes a VM unprotectable, read from its libvirt domain XML and the engine's view."""

import os

from ansible_collections.ft.lockstep.plugins.module_utils import vm_checks

DATASTORE = "/var/lib/ft/datastore"


def domain(devices: str) -> str:
    return f"<domain type='kvm'><name>db1</name><devices>{devices}</devices></domain>"


def disk(kind: str, device: str, source: str, target: str) -> str:
    attr = "file" if kind == "file" else "dev"
    return f"<disk type='{kind}' device='{device}'><source {attr}='{source}'/><target dev='{target}'/></disk>"


def test_a_plain_vm_on_the_datastore_has_no_problem():
    xml = domain(
        disk("file", "disk", f"{DATASTORE}/db1.raw", "vda")
        + disk("file", "cdrom", f"{DATASTORE}/iso/debian.iso", "sda")
        + "<controller type='usb' model='none'/><interface type='bridge'/><console type='pty'/>"
    )
    assert vm_checks.domain_problems(xml, DATASTORE) == []


def test_each_non_replayable_device_snapshot_and_local_disk_is_one_reason():
    xml = domain(
        """<controller type='usb' index='0'/><redirdev bus='usb' type='spicevmc'/>
        <input type='tablet' bus='usb'/><sound model='ich9'/>
        <hostdev mode='subsystem' type='usb'/><hostdev mode='subsystem' type='pci'/>"""
        + disk("block", "lun", "/dev/sdb", "sdb")
        + disk("block", "cdrom", "/dev/sr0", "sdc")
        + disk("block", "floppy", "/dev/fd0", "fda")
        + disk("file", "disk", "/var/lib/libvirt/images/db1.qcow2", "vda")
        + disk("file", "disk", "/var/lib/ft/datastore-old/x.raw", "vdb")  # a prefix is not "under"
        + disk("block", "disk", "/dev/vg0/db1", "vdc")
    )
    problems = vm_checks.domain_problems(xml, DATASTORE, snapshots=2)
    expected = [
        "a USB controller (model default)",
        "USB devices (redirdev, input)",
        "a sound card (model ich9)",
        "hostdev type usb",
        "hostdev type pci",
        "disk sdb is a SCSI LUN passed through",
        "cdrom sdc is the host's drive passed through",
        "floppy fda is the host's drive passed through",
        "disk vda (/var/lib/libvirt/images/db1.qcow2) is not on the shared datastore",
        "disk vdb (/var/lib/ft/datastore-old/x.raw) is not on the shared datastore",
        "disk vdc is a host block device (/dev/vg0/db1)",
        "2 snapshot(s)",
    ]
    assert len(problems) == len(expected), problems
    for words, problem in zip(expected, problems, strict=True):
        assert words in problem


def test_boot_files_of_an_engine_vm_must_be_on_the_datastore():
    guest = {"kernel": f"{DATASTORE}/images/vmlinuz", "initrd": "/boot/initrd.img"}
    assert vm_checks.boot_file_problems(guest, DATASTORE) == [
        f"initrd /boot/initrd.img is not on the shared datastore {DATASTORE}"
    ]


def test_a_sparse_image_is_thin_until_made_thick_and_keeps_its_bytes(tmp_path):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"data")
    assert vm_checks.is_thin(image)
    vm_checks.thicken(str(image))
    assert not vm_checks.is_thin(image)
    assert os.path.getsize(image) == 8 << 20
    with open(image, "rb") as f:
        f.seek(4 << 20)
        assert f.read(4) == b"data"
