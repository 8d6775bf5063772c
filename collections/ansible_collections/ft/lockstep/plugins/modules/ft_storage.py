#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


DOCUMENTATION = r"""
---
module: ft_storage
short_description: The shared datastore of an FT host (NFS, iSCSI or a directory) and its libvirt pool
version_added: "0.1.0"
description:
  - C(nfs) mounts O(server):O(export) at O(path) and keeps an C(/etc/fstab) entry for it.
  - C(iscsi) discovers O(target) on O(portal), creates its node record with C(node.startup=automatic)
    (logged in again at boot) and logs in.
  - C(dir) uses O(path) as it is (a datastore mounted by other means).
  - Then a libvirt storage pool (C(netfs), C(iscsi) or C(dir)) is defined, started and autostarted.
  - An iSCSI LUN may carry VM disks, but it is no datastore for lockstepd - the engine's datastore must
    be one filesystem shared by every FT host (C(nfs), or C(dir) for a shared filesystem mounted
    there). Role C(ft_storage) refuses C(iscsi) for it.
  - Every host that sees a datastore sees the same C(datastore_id) (for NFS and dir a file the first
    host creates in it, for iSCSI the LUN's WWID). Give one host's id to the others in
    O(same_datastore_as) and a host that sees a different datastore at the path is refused.
  - A refused or failed run leaves nothing behind that it made (mount, fstab entry, login, node).
author:
  - ft developers (@ft-lockstep)
requirements:
  - libvirt-python on the managed host when O(pool) is set (Debian C(python3-libvirt))
  - C(mount.nfs) (Debian C(nfs-common)) for NFS, C(iscsiadm) (Debian C(open-iscsi)) for iSCSI
options:
  type:
    description: The kind of datastore.
    type: str
    required: true
    choices: [nfs, iscsi, dir]
  path:
    description:
      - Where the datastore is on the host; the same path on every FT host. Required for C(nfs) and
        C(dir). For C(iscsi) it is the pool's target path and defaults to C(/dev/disk/by-path).
    type: path
  server:
    description: NFS server (C(nfs)).
    type: str
  export:
    description: Exported directory on the NFS server (C(nfs)).
    type: str
  mount_options:
    description: NFS mount options (C(nfs)).
    type: str
    default: hard,_netdev
  portal:
    description: iSCSI portal, C(HOST) or C(HOST:PORT) (C(iscsi)).
    type: str
  target:
    description: IQN of the iSCSI target (C(iscsi)).
    type: str
  lun:
    description: LUN whose WWID identifies the datastore (C(iscsi)).
    type: int
    default: 1
  pool:
    description: Name of the libvirt storage pool; no pool is managed when not set.
    type: str
  pool_type:
    description: Type of the pool; by default C(netfs) for NFS, C(iscsi) for iSCSI, C(dir) for dir.
    type: str
    choices: [netfs, iscsi, dir]
  libvirt_uri:
    description: libvirt connection for the pool.
    type: str
    default: qemu:///system
  same_datastore_as:
    description: The C(datastore_id) another FT host reported; refuse the datastore if this host sees another.
    type: str
  timeout:
    description: Seconds to wait for the NFS server or iSCSI portal to answer.
    type: int
    default: 10
  state:
    description: C(present) sets the datastore up, C(absent) removes the pool, unmounts and removes the
      fstab entry, or logs out and deletes the node record.
    type: str
    default: present
    choices: [present, absent]
attributes:
  check_mode:
    description: Reports what would change and changes nothing.
    support: full
  diff_mode:
    description: Shows the fstab entry, the mount, the iSCSI session and the pool before and after.
    support: full
  idempotent:
    description: When run twice with the same arguments, the second run reports no change.
    support: full
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: linux
"""

EXAMPLES = r"""
- name: NFS datastore on the first host
  ft.lockstep.ft_storage:
    type: nfs
    server: nfs1.example.com
    export: /srv/ft
    path: /var/lib/ft/datastore
    pool: ft-datastore
  register: first
  run_once: true

- name: The same datastore on every FT host
  ft.lockstep.ft_storage:
    type: nfs
    server: nfs1.example.com
    export: /srv/ft
    path: /var/lib/ft/datastore
    pool: ft-datastore
    same_datastore_as: "{{ first.datastore_id }}"

- name: iSCSI LUN
  ft.lockstep.ft_storage:
    type: iscsi
    portal: 10.0.0.2
    target: iqn.2026-11.com.example:ft
    pool: ft-iscsi
"""

RETURN = r"""
datastore_id:
  description: Identity of the datastore this host sees; null in check mode before it is set up.
  returned: success
  type: str
  sample: 6f1c2d0e-1a7b-4d4e-9f57-5b9f3c1f0a11
steps:
  description: What was changed (or would be, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["mount 10.0.0.2:/srv/ft on /var/lib/ft/datastore", "update /etc/fstab"]
device:
  description: The LUN's device path (C(iscsi)).
  returned: when type is iscsi and state is present
  type: str
"""

import os
import socket
import time
import traceback
import uuid

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.ft.lockstep.plugins.module_utils import ft_storage as ds
from ansible_collections.ft.lockstep.plugins.module_utils.files import read_text

LIBVIRT_ERROR = None
try:
    import libvirt
except ImportError:
    libvirt = None
    LIBVIRT_ERROR = traceback.format_exc()

FSTAB = "/etc/fstab"


class Refused(Exception):
    pass


def answers(host, port, timeout):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return str(e)


class Storage:
    """One run: the steps taken (and how to undo them), the diff, the answer."""

    def __init__(self, module):
        self.module, self.p = module, module.params
        self.steps, self.undo, self.diff = [], [], []
        self.check = module.check_mode

    def run(self, argv, what):
        rc, out, err = self.module.run_command(argv)
        if rc != 0:
            raise Refused("{} failed ({}): {}".format(what, " ".join(argv), (err or out).strip()))
        return out

    def change(self, description, do, undo=None):
        self.steps.append(description)
        if not self.check:
            do()
            if undo is not None:
                self.undo.append(undo)

    def roll_back(self):
        for undo in reversed(self.undo):
            try:  # noqa: SIM105 - contextlib would be one more import for one place
                undo()
            except Exception:  # report the first failure, not the clean-up's
                pass

    # --- NFS -----------------------------------------------------------------------------------

    def nfs(self):
        p = self.p
        source, path = ds.nfs_source(p["server"], p["export"]), p["path"]
        mounted = ds.mounts(read_text("/proc/self/mounts", "")).get(path)
        fstab = read_text(FSTAB, "")
        line = ds.fstab_line(source, path, "nfs", p["mount_options"])
        if p["state"] == "absent":
            if mounted:
                self.change(f"unmount {path}", lambda: self.run(["umount", path], "umount"))
            self.set_fstab(fstab, ds.fstab_with(fstab, path, None))
            return None
        if mounted and not (mounted[1].startswith("nfs") and ds.same_nfs_source(mounted[0], source)):
            raise Refused(
                f"{path} is already a mount point of {mounted[0]} ({mounted[1]}): "
                "unmount it or choose another path"
            )
        if not mounted:
            problem = answers(p["server"], 2049, p["timeout"])
            if problem:
                raise Refused(
                    "NFS server {} does not answer on port 2049 within {} s ({}): check server and that "
                    "its NFS service runs".format(p["server"], p["timeout"], problem)
                )
            if not os.path.isdir(path):
                self.change(f"create directory {path}", lambda: os.makedirs(path), lambda: os.rmdir(path))
            self.change(
                f"mount {source} on {path}",
                lambda: self.run(["mount", "-t", "nfs", "-o", p["mount_options"], source, path], "mount"),
                lambda: self.run(["umount", "-l", path], "umount"),
            )
        self.diff.append(
            dict(
                before_header="mount",
                after_header="mount",
                before="{} on {}\n".format(*mounted) if mounted else "",
                after=f"{source} on {path}\n",
            )
        )
        identity = self.file_identity(path)
        self.set_fstab(fstab, ds.fstab_with(fstab, path, line))
        return identity

    def set_fstab(self, old, new):
        if old == new:
            return
        self.diff.append(dict(before_header=FSTAB, after_header=FSTAB, before=old, after=new))

        def write():
            tmp = FSTAB + ".ft-tmp"
            with open(tmp, "w") as f:
                f.write(new)
            os.chmod(tmp, 0o644)
            os.rename(tmp, FSTAB)

        def restore():
            with open(FSTAB, "w") as f:
                f.write(old)

        self.change(f"update {FSTAB}", write, restore)

    def file_identity(self, path):
        """The id file in the datastore; the first host to see the datastore creates it."""
        id_path = os.path.join(path, ds.ID_FILE)
        existing = read_text(id_path, "").strip() if not self.check or os.path.exists(id_path) else ""
        if existing:
            return existing
        if self.check:
            return None
        try:
            fd = os.open(id_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(str(uuid.uuid4()) + "\n")
            self.steps.append(f"create datastore id {id_path}")
            self.undo.append(lambda: os.unlink(id_path))
        except FileExistsError:  # another host was first: its id is the datastore's
            pass
        return read_text(id_path, "").strip()

    # --- iSCSI ---------------------------------------------------------------------------------

    def iscsi(self):
        p = self.p
        portal, target = p["portal"], p["target"]
        host, port = ds.portal_address(portal)
        portal_arg = f"{host}:{port}"
        node = ["iscsiadm", "-m", "node", "-T", target, "-p", portal_arg]
        rc, _out, _err = self.module.run_command(["iscsiadm", "-m", "session"])
        logged_in = target in ds.session_targets(_out) if rc == 0 else False
        rc, node_out, _err = self.module.run_command(node)
        startup = ds.node_startup(node_out) if rc == 0 else None
        self.diff.append(
            dict(
                before_header="iscsi",
                after_header="iscsi",
                before="node: {}\nlogged in: {}\n".format(startup or "none", logged_in),
                after="" if p["state"] == "absent" else "node: automatic\nlogged in: True\n",
            )
        )
        if p["state"] == "absent":
            if logged_in:
                self.change(f"log out of {target}", lambda: self.run(node + ["--logout"], "iscsiadm logout"))
            if startup:
                self.change(
                    f"delete node record {target}", lambda: self.run(node + ["-o", "delete"], "iscsiadm")
                )
            return None
        if not logged_in:
            problem = answers(host, port, p["timeout"])
            if problem:
                raise Refused(
                    "iSCSI portal {} does not answer within {} s ({}): check portal".format(
                        portal_arg, p["timeout"], problem
                    )
                )
            offered = ds.discovered_targets(
                self.run(
                    [
                        "iscsiadm",
                        "-m",
                        "discovery",
                        "-t",
                        "sendtargets",
                        "-p",
                        portal_arg,
                        "-o",
                        "nonpersistent",
                    ],
                    "iSCSI discovery",
                )
            )
            if target not in offered:
                raise Refused(
                    "iSCSI portal {} does not offer target {} (it offers: {}): check target".format(
                        portal_arg, target, ", ".join(offered) or "none"
                    )
                )
        if startup is None:
            self.change(
                f"create node record {target} on {portal_arg}",
                lambda: self.run(node + ["-o", "new"], "iscsiadm"),
                lambda: self.run(node + ["-o", "delete"], "iscsiadm"),
            )
        if startup != "automatic":
            self.change(
                f"log in to {target} at boot (node.startup automatic)",
                lambda: self.run(
                    node + ["-o", "update", "-n", "node.startup", "-v", "automatic"], "iscsiadm"
                ),
            )
        if not logged_in:
            self.change(
                f"log in to {target}",
                lambda: self.run(node + ["--login"], "iscsiadm login"),
                lambda: self.run(node + ["--logout"], "iscsiadm logout"),
            )
        if self.check and not logged_in:
            return None
        device = ds.lun_path(portal, target, p["lun"])
        deadline = time.monotonic() + p["timeout"]
        while not os.path.exists(device):  # udev makes the by-path link a moment after login
            if time.monotonic() > deadline:
                raise Refused(
                    "logged in to {} but LUN {} did not appear as {}".format(target, p["lun"], device)
                )
            time.sleep(0.1)
        self.device = device
        block = os.path.basename(os.path.realpath(device))
        wwid = read_text(f"/sys/block/{block}/device/wwid", "").strip()
        return wwid or None

    # --- libvirt pool --------------------------------------------------------------------------

    def pool(self):
        p = self.p
        if libvirt is None:
            raise Refused(missing_required_lib("libvirt-python"))
        pool_type = p["pool_type"] or ds.POOL_TYPES[p["type"]]
        path = p["path"] or ds.BY_PATH
        xml = ds.pool_xml(p["pool"], pool_type, path, p["server"], p["export"], p["portal"], p["target"])
        try:
            conn = libvirt.open(p["libvirt_uri"])
        except libvirt.libvirtError as e:
            raise Refused("cannot reach libvirt at {}: {}".format(p["libvirt_uri"], e)) from e
        try:
            try:
                pool = conn.storagePoolLookupByName(p["pool"])
            except libvirt.libvirtError:
                pool = None
            before = pool.XMLDesc(0) if pool is not None else None
            if p["state"] == "absent":
                if pool is not None:
                    if pool.isActive():
                        self.change("stop pool {}".format(p["pool"]), pool.destroy)
                    self.change("undefine pool {}".format(p["pool"]), pool.undefine)
                self.diff.append(
                    dict(before_header="pool", after_header="pool", before=before or "", after="")
                )
                return
            if pool is not None and ds.pool_key(before) != ds.pool_key(xml):
                raise Refused(
                    "libvirt pool {} exists for another datastore ({}): remove it or choose another".format(
                        p["pool"], " ".join(ds.pool_key(before))
                    )
                )
            self.diff.append(dict(before_header="pool", after_header="pool", before=before or "", after=xml))
            if pool is None:
                self.change(
                    "define pool {} ({}, {})".format(p["pool"], pool_type, path),
                    lambda: conn.storagePoolDefineXML(xml, 0),
                    lambda: conn.storagePoolLookupByName(p["pool"]).undefine(),
                )
                if self.check:
                    self.steps += ["start pool {}".format(p["pool"]), "autostart pool {}".format(p["pool"])]
                    return
                pool = conn.storagePoolLookupByName(p["pool"])
            if not pool.isActive():
                self.change("start pool {}".format(p["pool"]), lambda: pool.create(0), pool.destroy)
            if not pool.autostart():
                self.change("autostart pool {}".format(p["pool"]), lambda: pool.setAutostart(1))
        except libvirt.libvirtError as e:
            raise Refused("libvirt pool {}: {}".format(p["pool"], e)) from e
        finally:
            conn.close()


def main():
    module = AnsibleModule(
        argument_spec=dict(
            type=dict(type="str", required=True, choices=["nfs", "iscsi", "dir"]),
            path=dict(type="path"),
            server=dict(type="str"),
            export=dict(type="str"),
            mount_options=dict(type="str", default="hard,_netdev"),
            portal=dict(type="str"),
            target=dict(type="str"),
            lun=dict(type="int", default=1),
            pool=dict(type="str"),
            pool_type=dict(type="str", choices=["netfs", "iscsi", "dir"]),
            libvirt_uri=dict(type="str", default="qemu:///system"),
            same_datastore_as=dict(type="str"),
            timeout=dict(type="int", default=10),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        required_if=[
            ("type", "nfs", ("server", "export", "path")),
            ("type", "iscsi", ("portal", "target")),
            ("type", "dir", ("path",)),
        ],
        supports_check_mode=True,
    )
    p = module.params
    storage = Storage(module)
    identity = None
    try:
        if p["state"] == "absent":
            if p["pool"]:
                storage.pool()
            if p["type"] == "nfs":
                storage.nfs()
            elif p["type"] == "iscsi":
                storage.iscsi()
        else:
            if p["type"] == "nfs":
                identity = storage.nfs()
            elif p["type"] == "iscsi":
                identity = storage.iscsi()
            else:
                if not os.path.isdir(p["path"]):
                    raise Refused(
                        "{} is not a directory: a dir datastore must exist on every FT host".format(p["path"])
                    )
                identity = storage.file_identity(p["path"])
            want = p["same_datastore_as"]
            if want and identity and identity != want:
                raise Refused(
                    "this host sees datastore {} at {}, not {}: every FT host must see the same datastore "
                    "at the same path".format(identity, p["path"] or p["target"], want)
                )
            if p["pool"]:
                storage.pool()
    except Refused as e:
        storage.roll_back()
        module.fail_json(msg=str(e), changed=False, steps_undone=storage.steps)
    except Exception as e:
        storage.roll_back()
        module.fail_json(
            msg=f"{e}; the steps before it were undone",
            changed=False,
            steps_undone=storage.steps,
            exception=traceback.format_exc(),
        )
    result = dict(changed=bool(storage.steps), steps=storage.steps, diff=storage.diff)
    if p["state"] == "present":
        result["datastore_id"] = identity
        if p["type"] == "iscsi":
            result["device"] = getattr(storage, "device", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
