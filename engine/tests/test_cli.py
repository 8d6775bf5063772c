import yaml

from lockstep import __version__
from lockstep.cli import main


def test_ftctl_reports_its_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"ftctl {__version__}"


def test_ftctl_without_a_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: ftctl" in capsys.readouterr().err


def test_ftctl_probe_reports_qemu_and_accelerator(capsys):
    assert main(["probe", "--accel", "tcg"]) == 0
    out = capsys.readouterr().out
    assert "has everything an FT pair needs" in out
    assert "accelerator: tcg (set to tcg)" in out
    assert "default mode: lockstep" in out  # stock Debian QEMU: no passive secondary


def test_ftctl_probe_refuses_a_bad_accelerator_setting(capsys):
    assert main(["probe", "--accel", "hvf"]) == 1
    assert "accelerator must be auto, kvm or tcg, not 'hvf'" in capsys.readouterr().err


def test_ftctl_daemon_check_refuses_a_vm_uplink_this_host_lacks(tmp_path, capsys):
    """A missing uplink has no carrier: every VM this host ran as primary would be handed over."""
    cfg = {"host": "h1", "hosts": {"h1": "10.0.2.1", "h2": "10.0.2.2"}, "datastore": str(tmp_path),
           "run_dir": str(tmp_path), "socket": str(tmp_path / "s"), "secret": "0123456789abcdef"}  # fmt: skip
    path = tmp_path / "lockstepd.yml"
    path.write_text(yaml.safe_dump(cfg | {"vm_uplink": "nosuchif0"}))
    assert main(["daemon", "--config", str(path), "--check"]) == 2
    assert "vm_uplink nosuchif0: no such network interface on this host" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(cfg | {"vm_uplink": "lo"}))
    assert main(["daemon", "--config", str(path), "--check"]) == 0
