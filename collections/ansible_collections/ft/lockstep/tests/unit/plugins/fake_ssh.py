# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""FAKE ssh for tests: `fake_ssh.py [options] -- HOST COMMAND` runs COMMAND here, in a shell,
as ssh would run it on HOST, with FTCTL_SOCKET set to DIR/HOST.sock (DIR: this file's
FAKE_SSH_DIR, written in by write_fake_ssh), where a test serves a fake lockstepd for that host.
A host with DIR/HOST.down answers like an unreachable one (ssh's exit 255 and its message).
Every call's argv is appended to DIR/calls.jsonl. It is not ssh: no network, no login."""

import json
import os
import sys
from pathlib import Path

FAKE_SSH_DIR = None  # set by write_fake_ssh in the copy it writes


def main(argv):
    here = Path(FAKE_SSH_DIR)
    with open(here / "calls.jsonl", "a") as f:
        f.write(json.dumps(argv) + "\n")
    host, command = argv[argv.index("--") + 1], argv[argv.index("--") + 2]
    if (here / f"{host}.down").exists():
        sys.stderr.write(f"ssh: connect to host {host} port 22: Connection refused\r\n")
        return 255
    os.environ["FTCTL_SOCKET"] = str(here / f"{host}.sock")
    os.execvp("sh", ["sh", "-c", command])


def write_fake_ssh(directory):
    """An executable copy of this fake in directory, bound to it; its path."""
    directory = Path(directory)
    path = directory / "fake-ssh"
    source = (
        Path(__file__).read_text().replace("FAKE_SSH_DIR = None", f"FAKE_SSH_DIR = {str(directory)!r}", 1)
    )
    path.write_text(
        f"#!{sys.executable}\n{source}\nif __name__ == '__main__':\n    sys.exit(main(sys.argv[1:]))\n"
    )
    path.chmod(0o755)
    return path
