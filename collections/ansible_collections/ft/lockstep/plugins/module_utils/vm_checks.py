# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a VM must be before FT is turned on for it, each unmet requirement one reason: devices
the secondary cannot replay, snapshots, files a secondary on another host cannot open, thin disks."""

import os
import xml.etree.ElementTree as ET


def under(path, directory):
    path, directory = os.path.normpath(path), os.path.normpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def domain_problems(domain_xml, datastore, snapshots=0):
    """Reasons a libvirt domain cannot be protected: non-replayable devices (USB, sound, host
    CD-ROM/floppy, hostdev, LUN passthrough), snapshots, disks off the shared datastore."""
    devices = ET.fromstring(domain_xml).find("devices")
    devices = devices if devices is not None else ET.Element("devices")
    problems = []
    for c in devices.findall("controller[@type='usb']"):
        if c.get("model") != "none":
            problems.append(
                "a USB controller (model {}): USB devices cannot be replayed on the secondary; "
                "give the domain <controller type='usb' model='none'/>".format(c.get("model", "default"))
            )
    usb = [d.tag for d in devices if d.tag in ("redirdev", "hub") or d.get("bus") == "usb"]
    if usb:
        problems.append("USB devices ({}): not replayable on the secondary".format(", ".join(usb)))
    for s in devices.findall("sound"):
        problems.append("a sound card (model {}): not replayable on the secondary".format(s.get("model")))
    for h in devices.findall("hostdev"):
        problems.append(
            "a host device passed through (hostdev type {}): it exists on one host only".format(h.get("type"))
        )
    for d in devices.findall("disk"):
        target = d.find("target")
        name = target.get("dev") if target is not None else "?"
        source = d.find("source")
        kind, device = d.get("type"), d.get("device", "disk")
        if device == "lun":
            problems.append(f"disk {name} is a SCSI LUN passed through (device='lun'): not replayable")
        elif device in ("cdrom", "floppy") and kind == "block":
            problems.append(
                f"{device} {name} is the host's drive passed through: use an ISO image on the datastore"
            )
        elif kind == "file" and source is not None and source.get("file"):
            if not under(source.get("file"), datastore):
                problems.append(
                    "disk {} ({}) is not on the shared datastore {}".format(
                        name, source.get("file"), datastore
                    )
                )
        elif kind == "block" and device == "disk":
            problems.append(
                "disk {} is a host block device ({}), not a file on the shared datastore {}".format(
                    name, source.get("dev") if source is not None else "?", datastore
                )
            )
    if snapshots:
        problems.append(f"{snapshots} snapshot(s): an FT VM has none (delete them first)")
    return problems


def boot_file_problems(guest, datastore):
    """The files an engine-run VM boots from must be on the shared datastore: its secondary may be
    started on any host."""
    problems = [
        f"{key} {guest[key]} is not on the shared datastore {datastore}"
        for key in ("kernel", "initrd")
        if guest.get(key) and not under(guest[key], datastore)
    ]
    return problems + [
        f"disk image {d['path']} is not on the shared datastore {datastore}"
        for d in guest.get("disks") or []
        if d.get("path") and not under(d["path"], datastore)
    ]


def is_thin(path):
    """A disk image with fewer bytes allocated than its size (sparse, thin-provisioned)."""
    st = os.stat(path)
    return st.st_blocks * 512 < st.st_size


def thicken(path):
    """Allocate every block of a raw image (what the guest reads is unchanged): a checkpoint must
    never fail for lack of space on the host."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
