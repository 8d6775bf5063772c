"""The operator's path through Ansible on the lab: site.yml installs and starts everything (a second
run changes nothing), ft_vm turns FT on, suspends it, turns it on again and off on a running VM
(each twice, check mode first), and a VM with devices a secondary cannot replay is refused with
every reason. The client checks every byte of one TCP connection to the VM throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ftlab import engine
from ftlab import topology as t
from ftlab.ansible import BIN, REPO, module, playbook
from ftlab.guest import StreamFollower
from lockstep import api

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.slow]
MiB = 1 << 20


@pytest.fixture(scope="module")
def site(lab):
    code, out, recap = playbook("ft.lockstep.site")
    assert code == 0, out[-4000:]
    return recap


def vm_view(name: str) -> dict:
    status, view = api.local(engine.installed_socket(1), "GET", f"/vms/{name}")
    assert status == 200, view
    return view


def test_site_yml_sets_up_every_host_and_a_second_run_changes_nothing(site):
    assert set(site) == {"lab-h1", "lab-h2", "lab-h3"} and all(r["failed"] == 0 for r in site.values())
    code, out, again = playbook("ft.lockstep.site")
    assert code == 0, out[-4000:]
    assert {h: r["changed"] for h, r in again.items()} == {"lab-h1": 0, "lab-h2": 0, "lab-h3": 0}, out[-4000:]
    for i in (1, 2, 3):
        status, answer = api.local(engine.installed_socket(i), "GET", "/status")
        assert status == 200 and answer["host"] == f"lab-h{i}", answer
        assert answer["hosts"] == {f"lab-h{k}": f"10.77.2.1{k}" for k in (1, 2, 3)}
        rendered = (t.host(i).dir / "etc-lockstep" / "lockstepd.yml").read_text()
        assert f"host: lab-h{i}\n" in rendered and "reprotect_retry_s: 2.0" in rendered
        assert oct((t.host(i).dir / "etc-lockstep" / "peer.secret").stat().st_mode & 0o777) == "0o600"


def ft_vm(state: str, *extra: str, **args) -> dict:
    return module("lab-h1", "ft_vm", {"name": "cycle", "state": state, **args}, *extra)["lab-h1"]


def secondary_qemus(name: str) -> list[int]:
    return [pid for i in (1, 2, 3) for pid in engine.processes(i, f"-name {name} (secondary)")]


def test_ft_vm_on_suspend_on_off_each_twice_while_the_vm_runs_byte_exact(site):
    body = engine.guest_body("cycle", 1) | {"disk_mib": 16}
    status, started = api.local(engine.installed_socket(1), "POST", "/vms", body)
    assert status == 200, started
    disk = t.host(1).dir / "var-lib-lockstep" / "cycle.disk.raw"
    assert disk.stat().st_blocks * 512 < disk.stat().st_size  # qemu-img made it thin
    primary = engine.processes(1, "-name cycle (primary)")
    client = StreamFollower(t.guest_ip(1))
    client.wait_for_bytes(1, 120)
    expected = {"enabled": "running", "disabled": "disabled", "absent": "not_configured"}
    before = "not_configured"
    for state in ("enabled", "disabled", "enabled", "absent"):
        checked = ft_vm(state, "--check", "--diff")
        assert not checked["failed"] and checked["changed"], checked
        assert vm_view("cycle")["state"] == before, f"check mode changed {state}"
        first, second = ft_vm(state), ft_vm(state)
        assert not first["failed"] and first["changed"], first
        assert not second["failed"] and not second["changed"], second
        view = vm_view("cycle")
        assert view["state"] == expected[state], view
        assert bool(secondary_qemus("cycle")) == (state == "enabled"), (state, view)
        if state == "enabled" and before == "not_configured":
            assert any("made thick" in n for n in first["notes"]), first
            assert disk.stat().st_blocks * 512 >= disk.stat().st_size
        client.wait_for_bytes(client.bytes + MiB // 2, 60)
        before = expected[state]
    assert engine.processes(1, "-name cycle (primary)") == primary  # the same QEMU all along
    result = client.stop()
    assert result["ok"], result


def test_a_new_checkpoint_interval_reaches_a_running_pair_and_a_repeat_changes_nothing(site):
    assert ft_vm("enabled")["changed"]
    first, second = ft_vm("enabled", checkpoint_ms=250), ft_vm("enabled", checkpoint_ms=250)
    assert first["changed"] and not second["changed"], (first, second)
    assert vm_view("cycle")["checkpoint_ms"] == 250 and vm_view("cycle")["state"] == "running"


def test_the_ft_vms_inventory_lists_the_running_pair_with_both_hosts_over_ssh(site, tmp_path: Path):
    """The inventory plugin as an operator configures it: the FT hosts' management addresses over
    SSH, lab-h1's sshd stopped (a host down is a warning; the next one answers)."""
    config = tmp_path / "lab.ft_vms.yml"
    addresses = [t.host(i).ip("mgmt") for i in (1, 2, 3)]
    config.write_text(
        json.dumps({"plugin": "ft.lockstep.ft_vms", "hosts": addresses, "user": "root",
                    "private_key_file": str(t.SSH_KEY), "connect_timeout": 5,
                    "ssh_args": ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]})
    )  # fmt: skip
    env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"}
    sshd = min(engine.processes(1, "sshd -D"))  # the listener (sessions retitle themselves)
    os.kill(sshd, signal.SIGSTOP)  # lab-h1 stops answering SSH
    try:
        argv = [BIN / "ansible-inventory", "-i", config, "--list"]
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    finally:
        os.kill(sshd, signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert (
        "cycle" in listing["ft_state_running"]["hosts"] and "cycle" in listing["ft_primary_lab_h1"]["hosts"]
    )
    view = vm_view("cycle")
    assert "cycle" in listing[f"ft_secondary_{view['secondary_host'].replace('-', '_')}"]["hosts"], listing
    cycle = listing["_meta"]["hostvars"]["cycle"]
    assert cycle["ft_answered_by"] == addresses[1], cycle
    assert f"FT host {addresses[0]} did not answer" in " ".join(done.stderr.split()), done.stderr


DOMAIN = """<domain type='qemu'>
  <name>gadgets</name>
  <memory unit='MiB'>128</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/gadgets.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='qemu-xhci'/>
    <input type='tablet' bus='usb'/>
    <sound model='ich6'/>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x3'/></source>
    </hostdev>
  </devices>
</domain>
"""


def test_a_vm_with_usb_sound_and_hostdev_is_refused_with_every_reason(site, tmp_path: Path):
    xml = tmp_path / "gadgets.xml"
    xml.write_text(DOMAIN)
    virsh = ["virsh", "-c", t.host(1).libvirt_uri]
    subprocess.run([*virsh, "define", str(xml)], check=True, capture_output=True)
    try:
        for extra in (["--check"], []):
            result = module("lab-h1", "ft_vm", {"name": "gadgets", "state": "enabled"}, *extra)["lab-h1"]
            assert result["failed"] and not result.get("changed"), result
            reasons = " | ".join(result["reasons"])
            for words in (
                "USB controller (model qemu-xhci)",
                "USB devices (input)",
                "sound card (model ich6)",
                "host device passed through (hostdev type pci)",
                "gadgets.qcow2) is not on the shared datastore",
            ):
                assert words in reasons, reasons
            assert result["msg"].startswith("gadgets refused: "), result["msg"]
        assert api.local(engine.installed_socket(1), "GET", "/vms/gadgets")[0] == 404  # nothing started
        state = subprocess.run([*virsh, "domstate", "gadgets"], capture_output=True, text=True).stdout
        assert state.strip() == "shut off"
    finally:
        subprocess.run([*virsh, "undefine", "gadgets"], capture_output=True)


def test_protect_yml_takes_one_vm_from_survey_variables_and_status_yml_reports_it(site):
    survey = ("-e", "ft_vm_name=cycle", "-e", "ft_vm_state=disabled")
    runs = [playbook("ft.lockstep.protect", *survey) for _ in range(2)]
    assert [code for code, _out, _recap in runs] == [0, 0], runs[0][1][-3000:]
    assert [recap["lab-h1"]["changed"] for _code, _out, recap in runs] == [1, 0]
    assert vm_view("cycle")["state"] == "disabled" and not secondary_qemus("cycle")
    code, out, _recap = playbook("ft.lockstep.status")
    assert code == 0 and "cycle: disabled (user_action), primary lab-h1" in out, out[-3000:]
