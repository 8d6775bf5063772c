"""What role ft_engine must leave on the Debian guest (systemd), read over SSH by testinfra."""

from pathlib import Path

import pytest
import testinfra

INVENTORY = Path(__file__).resolve().parents[3] / "inventories" / "lab"
DATASTORE = "/var/lib/ftlab/datastore"


@pytest.fixture(scope="module")
def host():
    return testinfra.get_host(f"ansible://debian?ansible_inventory={INVENTORY}")


def show(host, *properties: str) -> dict[str, str]:
    out = host.check_output(f"systemctl show --property={','.join(properties)} lockstepd")
    return dict(line.split("=", 1) for line in out.splitlines())


def test_the_unit_is_installed_enabled_and_active(host):
    assert host.file("/etc/systemd/system/lockstepd.service").contains("^KillMode=process$")
    assert host.run("systemctl is-enabled lockstepd").stdout.strip() == "enabled"
    assert host.run("systemctl is-active lockstepd").stdout.strip() == "active"
    pid = show(host, "MainPID")["MainPID"]
    cmdline = host.file(f"/proc/{pid}/cmdline").content_string.replace("\0", " ")
    assert "/opt/lockstep/venv/bin/ftctl daemon --config /etc/lockstep/lockstepd.yml" in cmdline


def test_lockstepd_answers_its_api_on_the_shared_datastore(host):
    status = host.run("ftctl status --socket /run/lockstepd.sock")
    assert status.rc == 0, status.stderr
    datastore_id = host.file(f"{DATASTORE}/.ft-lockstep-datastore").content_string.strip()
    assert host.file("/etc/lockstep/lockstepd.yml").contains(f"^datastore_id: {datastore_id}$")
    events = host.file("/var/lib/lockstep/events.log").content_string
    assert '"started"' in events and "datastore_unavailable" not in events, events[-2000:]
    assert '"event": "started"' in host.check_output("journalctl --unit lockstepd --output cat")


def test_the_unit_requires_the_nfs_datastore_mount(host):
    mount = host.mount_point(DATASTORE)
    assert mount.exists and mount.filesystem.startswith("nfs")
    unit = show(host, "RequiresMountsFor", "Requires", "After")
    assert unit["RequiresMountsFor"] == DATASTORE
    assert "var-lib-ftlab-datastore.mount" in unit["Requires"].split()
    assert "var-lib-ftlab-datastore.mount" in unit["After"].split()


def test_the_dependencies_came_from_the_wheelhouse(host):
    wheels = host.file("/opt/lockstep/wheels").listdir()
    assert any(w.startswith("qemu_qmp-") for w in wheels) and any(w.startswith("pyyaml-") for w in wheels)
    frozen = host.check_output("/opt/lockstep/venv/bin/pip freeze --all")
    assert "qemu.qmp==" in frozen and "PyYAML==" in frozen
