"""What role ft_network must leave on the Debian guest, read over SSH by testinfra."""

from pathlib import Path

import testinfra

INVENTORY = Path(__file__).resolve().parents[3] / "inventories" / "lab"


def test_both_ft_networks_are_bonds_of_two_nics_and_persist():
    host = testinfra.get_host(f"ansible://debian?ansible_inventory={INVENTORY}")
    bonds = {"ft-mig": "fault-tolerance (active-backup)", "ft-log": "load balancing (round-robin)"}
    for bond, mode in bonds.items():
        bonding = host.file(f"/proc/net/bonding/{bond}")
        assert bonding.exists and mode in bonding.content_string
        assert bonding.content_string.count("Slave Interface:") == 2
        assert bonding.content_string.startswith("Ethernet Channel Bonding Driver")
        assert "MII Status: up" in bonding.content_string.split("Slave Interface:")[0]
    assert host.interface("ft-mig").addresses[0] == "10.77.1.30"
    assert host.file("/etc/systemd/network/40-ft-migration.netdev").exists
