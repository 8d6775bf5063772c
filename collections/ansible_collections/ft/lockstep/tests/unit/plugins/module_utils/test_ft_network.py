"""ft_network's checks, plans and persisted files, on link tables written out by hand."""

from ansible_collections.ft.lockstep.plugins.module_utils import ft_network as net


def nic(name, **kw):
    kw.setdefault("speed", 10000)
    return net.Link(name, **kw)


def host(*links):
    table = {"lo": net.Link("lo", up=True, addresses=["127.0.0.1/8"])}
    table.update({link.name: link for link in links})
    return table


def bond_want(**kw):
    args = dict(role="ft_logging", members=["ens4", "ens5"], address="10.0.2.11/24")
    args.update(kw)
    return net.Want(**args)


def actions(steps):
    return [(a, args.get("name")) for a, args, _desc in steps]


def test_a_fresh_bond_is_created_members_enslaved_tagged_addressed_and_brought_up():
    links = host(nic("ens4"), nic("ens5"))
    want = bond_want(mtu=9000)
    assert net.problems(want, links) == ([], [])
    assert actions(net.plan(want, links)) == [
        ("create_bond", "ft-log"),
        ("enslave", "ens4"),
        ("enslave", "ens5"),
        ("set_mtu", "ft-log"),
        ("set_alias", "ft-log"),
        ("add_addr", "ft-log"),
        ("up", "ft-log"),
        ("up", "ens4"),
        ("up", "ens5"),
    ]


def configured():
    return host(
        net.Link(
            "ft-log",
            kind="bond",
            mtu=9000,
            alias="ft.lockstep:ft_logging",
            up=True,
            bond_mode="active-backup",
            addresses=["10.0.2.11/24", "fe80::1/64"],
        ),
        nic("ens4", master="ft-log", mtu=9000, up=True),
        nic("ens5", master="ft-log", mtu=9000, up=True),
        nic("ens6", up=True),
    )


def test_what_is_already_there_needs_no_step():
    assert net.plan(bond_want(mtu=9000), configured()) == []


def test_a_changed_member_set_releases_the_old_and_adds_the_new_member():
    steps = actions(net.plan(bond_want(members=["ens4", "ens6"], mtu=9000), configured()))
    assert steps == [
        ("nomaster", "ens5"),
        ("enslave", "ens6"),
        ("up", "ft-log"),
        ("up", "ens4"),
        ("up", "ens6"),
    ]


def test_a_new_bond_mode_recreates_the_bond_and_a_new_address_replaces_the_old():
    steps = actions(net.plan(bond_want(bond_mode="802.3ad", address="10.0.2.12/24", mtu=9000), configured()))
    assert steps[:2] == [("delete", "ft-log"), ("create_bond", "ft-log")]
    assert ("add_addr", "ft-log") in steps and ("del_addr", "ft-log") not in steps  # the new bond has none


def test_an_address_change_keeps_the_link_local_address():
    plan = net.plan(bond_want(address="10.0.2.12/24", mtu=9000), configured())
    assert [(a, args["address"]) for a, args, _desc in plan if "addr" in a] == [
        ("del_addr", "10.0.2.11/24"),
        ("add_addr", "10.0.2.12/24"),
    ]


def test_absent_deletes_the_bond_and_then_has_nothing_to_do():
    assert actions(net.plan(bond_want(state="absent"), configured())) == [("delete", "ft-log")]
    assert net.plan(bond_want(state="absent"), host(nic("ens4"))) == []


def test_a_single_nic_carries_the_network_itself_and_absent_removes_only_address_and_tag():
    want = net.Want("migration", ["ens6"], "10.0.1.11/24")
    links = host(nic("ens6"))
    assert want.interface == "ens6" and not want.bonded
    assert actions(net.plan(want, links)) == [("set_alias", "ens6"), ("add_addr", "ens6"), ("up", "ens6")]
    links["ens6"] = nic("ens6", alias="ft.lockstep:migration", up=True, addresses=["10.0.1.11/24"])
    assert net.plan(want, links) == []
    absent = net.Want("migration", [], state="absent")
    assert actions(net.plan(absent, links)) == [("del_addr", "ens6"), ("set_alias", "ens6")]


def test_every_problem_is_named_at_once_and_says_what_to_fix():
    links = configured()
    links["vmbr0"] = net.Link("vmbr0", kind="bridge")
    links["ens7"] = nic("ens7", master="vmbr0")
    links["ens8"] = nic("ens8", speed=100)
    want = net.Want("migration", ["ens4", "ens7", "ens8", "eth9", "vmbr0"], "10.0.1.11/24")
    errors, _warnings = net.problems(want, links, vm_interfaces=["vmbr0"])
    assert errors == [
        "NIC ens4 already carries the ft_logging network (ft-log): "
        "the migration and FT-logging networks need separate NICs",
        "NIC ens7 carries the VM network (vm_interfaces: vmbr0): FT traffic needs its own NICs",
        "NIC ens8 links at 100 Mb/s; the migration network needs at least 1000 Mb/s",
        "NIC eth9 does not exist on this host (NICs here: ens4, ens5, ens6, ens7, ens8); fix members",
        "vmbr0 is a bridge, not a NIC: members must be physical NICs",
    ]


def test_no_members_no_address_and_a_duplicate_are_refused():
    errors, _warnings = net.problems(net.Want("ft_logging", ["ens4", "ens4"]), host(nic("ens4")))
    assert any("members lists a NIC twice" in e for e in errors)
    assert any(e.startswith("address is required") for e in errors)
    errors, _warnings = net.problems(net.Want("ft_logging", [], "10.0.2.1/24"), host())
    assert errors == [
        "members is empty: name at least one NIC for the ft_logging network (a bond with no members "
        "carries nothing)"
    ]
    errors, _warnings = net.problems(net.Want("ft_logging", ["ens4"], "10.0.2.1"), host(nic("ens4")))
    assert errors == ["address '10.0.2.1' is not ADDRESS/PREFIX: no prefix length"]


def test_a_member_of_someone_elses_bond_is_refused_and_slow_or_silent_links_warn():
    links = host(
        net.Link("bond0", kind="bond"),
        nic("ens4", master="bond0"),
        nic("ens5", speed=1000),
        nic("ens6", speed=None),
    )
    errors, warnings = net.problems(bond_want(members=["ens4", "ens5", "ens6"]), links)
    assert errors == ["NIC ens4 is already enslaved to bond bond0: release it first or choose another NIC"]
    assert warnings == [
        "NIC ens5 links at 1000 Mb/s; 10000 Mb/s or more is recommended for ft_logging",
        "NIC ens6 does not report its link speed: cannot check it is at least 1000 Mb/s",
    ]


def test_networkd_files_make_the_bond_its_members_and_the_address():
    files = net.render(bond_want(mtu=9000), "systemd-networkd")
    assert sorted(files) == [
        "/etc/systemd/network/40-ft-ft-logging-ens4.network",
        "/etc/systemd/network/40-ft-ft-logging-ens5.network",
        "/etc/systemd/network/40-ft-ft-logging.netdev",
        "/etc/systemd/network/40-ft-ft-logging.network",
    ]
    netdev = files["/etc/systemd/network/40-ft-ft-logging.netdev"]
    assert (
        "Name=ft-log\nKind=bond\nMTUBytes=9000\n" in netdev
        and "Mode=active-backup\nMIIMonitorSec=100ms" in netdev
    )
    assert "Bond=ft-log" in files["/etc/systemd/network/40-ft-ft-logging-ens4.network"]
    assert "Address=10.0.2.11/24" in files["/etc/systemd/network/40-ft-ft-logging.network"]


def test_networkmanager_keyfiles_make_a_bond_with_its_ports():
    files = net.render(bond_want(), "NetworkManager")
    bond = files["/etc/NetworkManager/system-connections/ft-ft-logging.nmconnection"]
    assert "type=bond\ninterface-name=ft-log" in bond and "address1=10.0.2.11/24" in bond
    port = files["/etc/NetworkManager/system-connections/ft-ft-logging-ens5.nmconnection"]
    assert "interface-name=ens5\nmaster=ft-log\nslave-type=bond" in port
    assert net.render(bond_want(state="absent"), "NetworkManager") == {}
    assert "[ipv4]\nmethod=manual\naddress1=10.0.2.11/24\n\n[ipv6]\nmethod=disabled\n" in bond


def test_an_ipv6_address_goes_into_the_ipv6_section_of_the_keyfile_and_the_networkd_file():
    want = net.Want("ft_logging", ["ens4"], "fd00:2::11/64")
    assert net.problems(want, host(nic("ens4"))) == ([], [])
    keyfile = net.render(want, "NetworkManager")[net.main_file("ft_logging", "NetworkManager")]
    assert "[ipv4]\nmethod=disabled\n\n[ipv6]\nmethod=manual\naddress1=fd00:2::11/64\n" in keyfile
    assert "fd00" not in keyfile.split("[ipv6]")[0]
    networkd = net.render(want, "systemd-networkd")[net.main_file("ft_logging", "systemd-networkd")]
    assert "Address=fd00:2::11/64\nLinkLocalAddressing=ipv6\n" in networkd


def test_the_running_stack_is_found_from_the_processes(tmp_path):
    proc, etc = tmp_path / "proc", tmp_path / "etc"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "comm").write_text("init\n")
    (etc / "network").mkdir(parents=True)
    (etc / "network" / "interfaces").write_text("auto lo\n")
    assert net.detect_stack(str(proc), str(etc)) == (None, f"ifupdown ({etc}/network/interfaces)")
    (proc / "77").mkdir()
    (proc / "77" / "comm").write_text("systemd-network\n")
    assert net.detect_stack(str(proc), str(etc))[0] == "systemd-networkd"
    (proc / "78").mkdir()
    (proc / "78" / "comm").write_text("NetworkManager\n")
    assert net.detect_stack(str(proc), str(etc))[0] == "NetworkManager"


def test_after_a_reboot_the_persisted_files_name_the_roles_interface_and_nothing_is_redone():
    links = configured()
    links["ft-log"].alias = ""  # networkd recreated the bond; the kernel alias is gone
    files = net.render(bond_want(mtu=9000), "systemd-networkd")
    net.adopt_persisted(links, "ft_logging", files[net.main_file("ft_logging", "systemd-networkd")])
    assert net.role_interface("ft_logging", links).name == "ft-log"
    assert net.plan(bond_want(mtu=9000), links) == []
    single = host(nic("ens6", up=True, addresses=["10.0.1.11/24"]))
    nm = net.render(net.Want("migration", ["ens6"], "10.0.1.11/24"), "NetworkManager")
    net.adopt_persisted(single, "migration", nm[net.main_file("migration", "NetworkManager")])
    assert net.role_interface("migration", single).name == "ens6"
