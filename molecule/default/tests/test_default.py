"""What converge must leave on the hosts, read on each host over SSH by testinfra (the hosts and
how to reach them come from the lab's inventory, inventories/lab)."""

from pathlib import Path

import pytest
import testinfra

INVENTORY = Path(__file__).resolve().parents[3] / "inventories" / "lab"
FT_HOSTS = ["lab-h1", "lab-h2", "lab-h3"]


def on(name: str):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")


@pytest.mark.parametrize("name", FT_HOSTS)
def test_lockstepd_runs_with_its_rendered_config_and_secret(name):
    host = on(name)
    assert host.run("start-stop-daemon --status --pidfile /run/lockstepd.pid").rc == 0
    pid = host.file("/run/lockstepd.pid").content_string.strip()
    cmdline = host.file(f"/proc/{pid}/cmdline").content_string.replace("\0", " ")
    assert "ftctl daemon --config /etc/lockstep/lockstepd.yml" in cmdline
    config = host.file("/etc/lockstep/lockstepd.yml")
    assert config.mode == 0o600 and config.contains(f"^host: {name}$")
    assert host.file("/etc/lockstep/peer.secret").mode == 0o600
    assert host.run("ftctl daemon --config /etc/lockstep/lockstepd.yml --check").rc == 0


@pytest.mark.parametrize("name", FT_HOSTS)
def test_the_datastore_pool_is_active_and_the_ft_networks_are_tagged(name):
    host = on(name)
    pool = host.run("virsh pool-info ft-datastore")
    assert pool.rc == 0 and "Autostart:      yes" in pool.stdout and "running" in pool.stdout
    assert host.run("ip -o link show mig0").stdout.count("alias ft.lockstep:migration") == 1
    assert host.run("ip -o link show ftlog0").stdout.count("alias ft.lockstep:ft_logging") == 1


def test_the_lab_vm_is_protected_and_running():
    status = on("lab-h1").run("ftctl status --socket /run/lockstepd.sock")
    assert status.rc == 0, status.stderr
    demo = [line.split() for line in status.stdout.splitlines() if line.startswith("demo ")]
    assert demo and demo[0][1] == "running", status.stdout
