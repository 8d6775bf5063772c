"""Argument handling of the modules: what they refuse before any work."""

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.ft.lockstep.plugins.modules import (
    ft_cluster_info,
    ft_drill,
    ft_network,
    ft_storage,
    ft_vm,
    ft_vm_info,
)


def run(main, args, capsys) -> dict:
    with patch_module_args(args), pytest.raises(SystemExit):
        main()
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"type": "nfs", "path": "/d"}, "type is nfs but all of the following are missing: server, export"),
        ({"type": "iscsi"}, "type is iscsi but all of the following are missing: portal, target"),
        ({"type": "dir"}, "type is dir but all of the following are missing: path"),
        ({"type": "ceph", "path": "/d"}, "value of type must be one of: nfs, iscsi, dir, got: ceph"),
        ({"type": "dir", "path": "/d", "pool_type": "rbd"}, "pool_type must be one of: netfs, iscsi, dir"),
    ],
)
def test_ft_storage_refuses_incomplete_or_unknown_arguments(capsys, args, message):
    result = run(ft_storage.main, args, capsys)
    assert result["failed"] and message in result["msg"]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"members": ["ens4"]}, "missing required arguments: role"),
        ({"role": "vm", "members": ["ens4"]}, "value of role must be one of: migration, ft_logging, got: vm"),
        ({"role": "migration", "bond_mode": "lacp"}, "value of bond_mode must be one of: balance-rr"),
        ({"role": "migration", "persist": "netplan"}, "persist must be one of: auto, systemd-networkd"),
        ({"role": "migration", "mtu": "big"}, "'mtu' is of type str and we were unable to convert to int"),
    ],
)
def test_ft_network_refuses_incomplete_or_unknown_arguments(capsys, args, message):
    result = run(ft_network.main, args, capsys)
    assert result["failed"] and message in result["msg"]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"state": "enabled"}, "missing required arguments: name"),
        ({"name": "db1", "state": "on"}, "value of state must be one of: enabled, disabled, absent, got: on"),
        ({"name": "db1", "definition": {"memory_mib": 512}}, "one of the following is required: mac, nics"),
        ({"name": "db1", "definition": {"nics": [{"bridge": "br1"}]}}, "missing required arguments: mac"),
    ],
)
def test_ft_vm_refuses_incomplete_or_unknown_arguments(capsys, args, message):
    result = run(ft_vm.main, args, capsys)
    assert result["failed"] and message in result["msg"]


def test_the_engine_modules_name_the_socket_when_lockstepd_does_not_answer(capsys, tmp_path):
    socket = str(tmp_path / "none.sock")
    for main, args in ((ft_vm.main, {"name": "db1"}), (ft_vm_info.main, {}), (ft_cluster_info.main, {}),
                       (ft_drill.main, {"name": "db1", "action": "test_failover"})):  # fmt: skip
        result = run(main, args | {"socket": socket}, capsys)
        assert result["failed"] and f"lockstepd does not answer on {socket}" in result["msg"], result
