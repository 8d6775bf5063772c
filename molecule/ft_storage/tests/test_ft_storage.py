"""What role ft_storage must leave on the Debian guest, read over SSH by testinfra."""

from pathlib import Path

import testinfra

INVENTORY = Path(__file__).resolve().parents[3] / "inventories" / "lab"


def test_the_nfs_datastore_is_mounted_persistently_with_its_id():
    host = testinfra.get_host(f"ansible://debian?ansible_inventory={INVENTORY}")
    mount = host.mount_point("/var/lib/ftlab/datastore")
    assert mount.exists and mount.filesystem.startswith("nfs") and mount.device == "10.77.0.2:/datastore"
    assert host.file("/etc/fstab").contains("10.77.0.2:/datastore /var/lib/ftlab/datastore nfs")
    assert host.file("/var/lib/ftlab/datastore/.ft-lockstep-datastore").exists
