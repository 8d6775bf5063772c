# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The shared datastore of an FT host: fstab and mount table entries, iscsiadm output, libvirt pool
XML, and the datastore's identity. Pure functions over text, so the unit tests need no server."""

import re
import xml.etree.ElementTree as ET

ID_FILE = ".ft-lockstep-datastore"  # in an NFS or dir datastore: the same id on every host that sees it
POOL_TYPES = {"nfs": "netfs", "iscsi": "iscsi", "dir": "dir"}
BY_PATH = "/dev/disk/by-path"


def nfs_source(server, export):
    return f"{server}:{export}"


def _unescape(field):
    """/proc/mounts and fstab write space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _escape(field):
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in field)


def mounts(text):
    """{mount point: (source, fstype)} from /proc/self/mounts; the last mount on a point wins."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out[_unescape(fields[1])] = (_unescape(fields[0]), fields[2])
    return out


def same_nfs_source(a, b):
    """server:/export, ignoring a trailing slash (the kernel shows what was asked for)."""
    return a.rstrip("/") == b.rstrip("/")


def fstab_line(source, path, fstype, options):
    return f"{_escape(source)} {_escape(path)} {fstype} {options} 0 0"


def fstab_with(text, path, line):
    """fstab text with the entry for mount point path replaced by line (None: removed)."""
    out, done = [], False
    for raw in text.splitlines():
        fields = raw.split()
        if fields and not fields[0].startswith("#") and len(fields) >= 2 and _unescape(fields[1]) == path:
            if line is not None and not done:
                out.append(line)
                done = True
            continue
        out.append(raw)
    if line is not None and not done:
        out.append(line)
    return "\n".join(out) + "\n" if out else ""


def portal_address(portal):
    """host:port of an iSCSI portal (port 3260 unless given)."""
    if portal.count(":") == 1:
        host, port = portal.split(":")
        return host, int(port)
    return portal, 3260


def discovered_targets(output):
    """IQNs in `iscsiadm -m discovery -t sendtargets` output ("10.0.0.2:3260,1 iqn...")."""
    return sorted({line.split()[1] for line in output.splitlines() if len(line.split()) >= 2})


def session_targets(output):
    """IQNs with a session in `iscsiadm -m session` output ("tcp: [1] 10.0.0.2:3260,1 iqn... (non-flash)")."""
    return sorted({line.split()[3] for line in output.splitlines() if len(line.split()) >= 4})


def node_startup(output):
    """node.startup of a node record (`iscsiadm -m node -T IQN -p PORTAL` output), or None."""
    match = re.search(r"^node\.startup\s*=\s*(\S+)", output, re.M)
    return match.group(1) if match else None


def lun_path(portal, target, lun):
    host, port = portal_address(portal)
    return f"{BY_PATH}/ip-{host}:{port}-iscsi-{target}-lun-{lun}"


def pool_xml(name, pool_type, path, server=None, export=None, portal=None, target=None):
    """The libvirt storage pool of a datastore."""
    pool = ET.Element("pool", type=pool_type)
    ET.SubElement(pool, "name").text = name
    if pool_type != "dir":
        source = ET.SubElement(pool, "source")
        if pool_type == "netfs":
            ET.SubElement(source, "host", name=server)
            ET.SubElement(source, "dir", path=export)
            ET.SubElement(source, "format", type="nfs")
        else:
            host, port = portal_address(portal)
            ET.SubElement(source, "host", name=host, port=str(port))
            ET.SubElement(source, "device", path=target)
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = path
    return ET.tostring(pool, encoding="unicode")


def pool_key(xml):
    """What makes two pool definitions the same datastore: type, target path and source."""
    root = ET.fromstring(xml)
    source = root.find("source")
    parts = [root.get("type"), (root.findtext("target/path") or "").rstrip("/")]
    if source is not None:
        for tag in ("host", "dir", "device"):
            node = source.find(tag)
            if node is not None:
                parts.append("{}={}".format(tag, (node.get("name") or node.get("path") or "").rstrip("/")))
    return tuple(parts)
