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
