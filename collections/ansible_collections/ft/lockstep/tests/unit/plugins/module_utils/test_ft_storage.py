"""ft_storage's fstab edits, mount table and iscsiadm parsing, and pool definitions."""

from ansible_collections.ft.lockstep.plugins.module_utils import ft_storage as ds

FSTAB = """# /etc/fstab
UUID=1234 / ext4 errors=remount-ro 0 1
old:/srv/ft /var/lib/ft nfs defaults 0 0
"""


def test_an_fstab_entry_replaces_the_one_for_the_same_mount_point_and_keeps_the_rest():
    line = ds.fstab_line("nfs1:/srv/ft", "/var/lib/ft", "nfs", "hard,_netdev")
    new = ds.fstab_with(FSTAB, "/var/lib/ft", line)
    assert (
        new == "# /etc/fstab\nUUID=1234 / ext4 errors=remount-ro 0 1\n"
        "nfs1:/srv/ft /var/lib/ft nfs hard,_netdev 0 0\n"
    )
    assert ds.fstab_with(new, "/var/lib/ft", line) == new
    assert ds.fstab_with(new, "/var/lib/ft", None) == "# /etc/fstab\nUUID=1234 / ext4 errors=remount-ro 0 1\n"
    assert ds.fstab_with("", "/d", line.replace("/var/lib/ft", "/d")).endswith("/d nfs hard,_netdev 0 0\n")


def test_paths_with_spaces_are_escaped_in_fstab_and_read_back_from_the_mount_table():
    line = ds.fstab_line("nfs1:/srv/ft data", "/var/lib/ft data", "nfs", "hard")
    assert line == "nfs1:/srv/ft\\040data /var/lib/ft\\040data nfs hard 0 0"
    assert ds.fstab_with(line + "\n", "/var/lib/ft data", None) == ""
    table = ds.mounts("proc /proc proc rw 0 0\nnfs1:/srv/ft\\040data /var/lib/ft\\040data nfs4 rw,hard 0 0\n")
    assert table["/var/lib/ft data"] == ("nfs1:/srv/ft data", "nfs4")


def test_the_nfs_source_matches_with_or_without_a_trailing_slash():
    assert ds.same_nfs_source("10.0.0.2:/srv/ft/", "10.0.0.2:/srv/ft")
    assert not ds.same_nfs_source("10.0.0.2:/srv/ft2", "10.0.0.2:/srv/ft")


def test_iscsiadm_output_is_read_for_targets_sessions_and_startup():
    assert ds.discovered_targets("10.0.0.2:3260,1 iqn.2026-11.a:x\n10.0.0.2:3260,1 iqn.2026-11.a:y\n") == [
        "iqn.2026-11.a:x",
        "iqn.2026-11.a:y",
    ]
    assert ds.session_targets("tcp: [3] 10.0.0.2:3260,1 iqn.2026-11.a:x (non-flash)\n") == ["iqn.2026-11.a:x"]
    assert ds.node_startup("node.name = iqn.2026-11.a:x\nnode.startup = automatic\n") == "automatic"
    assert ds.node_startup("") is None


def test_portals_default_to_port_3260_and_luns_have_their_by_path_name():
    assert ds.portal_address("10.0.0.2") == ("10.0.0.2", 3260)
    assert ds.portal_address("10.0.0.2:3261") == ("10.0.0.2", 3261)
    assert (
        ds.lun_path("10.0.0.2", "iqn.2026-11.a:x", 1)
        == "/dev/disk/by-path/ip-10.0.0.2:3260-iscsi-iqn.2026-11.a:x-lun-1"
    )


def test_pool_definitions_compare_by_type_target_and_source_not_by_formatting():
    netfs = ds.pool_xml("ft", "netfs", "/var/lib/ft", server="nfs1", export="/srv/ft")
    assert ds.pool_key(netfs) == ("netfs", "/var/lib/ft", "host=nfs1", "dir=/srv/ft")
    libvirt_view = (
        "<pool type='netfs'>\n  <name>ft</name>\n  <uuid>0f</uuid>\n  <source>\n    <host name='nfs1'/>\n"
        "    <dir path='/srv/ft/'/>\n    <format type='nfs'/>\n  </source>\n  <target>\n"
        "    <path>/var/lib/ft</path>\n  </target>\n</pool>\n"
    )
    assert ds.pool_key(libvirt_view) == ds.pool_key(netfs)
    iscsi = ds.pool_xml("ft", "iscsi", "/dev/disk/by-path", portal="10.0.0.2", target="iqn.2026-11.a:x")
    assert ds.pool_key(iscsi) == ("iscsi", "/dev/disk/by-path", "host=10.0.0.2", "device=iqn.2026-11.a:x")
    assert ds.pool_key(ds.pool_xml("ft", "dir", "/var/lib/ft/")) == ("dir", "/var/lib/ft")
