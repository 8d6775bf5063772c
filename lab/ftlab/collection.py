"""The collection ft.lockstep as an operator installs it: the engine (engine/) built into a wheel in
role ft_engine's files/, which the role installs on the FT hosts, then `ansible-galaxy collection
build`. `lab/build-collection [DIR]` runs build() (the tarball in DIR, by default build/)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the project's virtualenv
COLLECTION = REPO / "collections" / "ansible_collections" / "ft" / "lockstep"
FILES = COLLECTION / "roles" / "ft_engine" / "files"
WHEEL_GLOB = "ft_lockstep_engine-*.whl"
# setuptools (the engine's build backend) from lab/install's wheelhouse: no package index needed
WHEELHOUSE = Path("/var/cache/ftlab/wheels")
EPOCH = "315532800"  # 1980-01-01, the earliest a zip records: the same bytes for the same source


def build_engine_wheel() -> Path:
    """engine/ as a wheel in FILES, replacing an older engine wheel there; left alone (its mtime
    too) when the build gives the same bytes. Built from a clean copy of the package (no stale
    build/ of an earlier one)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        shutil.copy2(REPO / "engine" / "pyproject.toml", src)
        shutil.copytree(
            REPO / "engine" / "lockstep", src / "lockstep", ignore=shutil.ignore_patterns("__pycache__")
        )
        index = ["--no-index", "--find-links", str(WHEELHOUSE)] if WHEELHOUSE.is_dir() else []
        argv = [BIN / "python", "-m", "pip", "wheel", "--no-deps", "--quiet", "--no-cache-dir", *index,
                "-w", out, src]  # fmt: skip
        r = subprocess.run(
            argv, capture_output=True, text=True, env=os.environ | {"SOURCE_DATE_EPOCH": EPOCH}
        )
        if r.returncode != 0:
            raise RuntimeError(f"building the engine's wheel failed:\n{r.stdout}{r.stderr}")
        (built,) = out.glob(WHEEL_GLOB)
        target = FILES / built.name
        if target.exists() and target.read_bytes() == built.read_bytes():
            return target
        FILES.mkdir(exist_ok=True)
        for old in FILES.glob(WHEEL_GLOB):
            old.unlink()
        shutil.move(built, target)
        return target


def version() -> str:
    return yaml.safe_load((COLLECTION / "galaxy.yml").read_text())["version"]


def build(output: Path) -> Path:
    """The engine's wheel, then the collection's tarball in output; its path."""
    build_engine_wheel()
    output.mkdir(parents=True, exist_ok=True)
    argv = [BIN / "ansible-galaxy", "collection", "build", COLLECTION, "--output-path", output, "--force"]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ansible-galaxy collection build failed:\n{r.stdout}{r.stderr}")
    return output / f"ft-lockstep-{version()}.tar.gz"


def install(tarball: Path, collections: Path) -> None:
    """ansible-galaxy collection install TARBALL -p COLLECTIONS, as on a clean controller."""
    argv = [BIN / "ansible-galaxy", "collection", "install", tarball, "-p", collections, "--force"]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=collections.parent)
    if r.returncode != 0:
        raise RuntimeError(f"ansible-galaxy collection install failed:\n{r.stdout}{r.stderr}")


CONFIG = """\
# A controller with the collection installed from its tarball, nothing of the repository
[defaults]
inventory = {inventory}
collections_path = {collections}
collections_scan_sys_path = False
host_key_checking = False
interpreter_python = auto_silent

[ssh_connection]
pipelining = True
"""


def installed(work: Path, inventory: Path) -> Path:
    """The tarball built and installed into WORK/collections, and WORK/ansible.cfg using it and
    INVENTORY: run ansible-playbook ft.lockstep.X in WORK as on a clean controller. WORK."""
    collections = work / "collections"
    collections.mkdir(parents=True)
    install(build(work / "dist"), collections)
    (work / "ansible.cfg").write_text(CONFIG.format(inventory=inventory, collections=collections))
    return work


def main() -> int:
    parser = argparse.ArgumentParser(prog="build-collection", description=__doc__)
    parser.add_argument("output", nargs="?", type=Path, default=REPO / "build", help="where the tarball goes")
    args = parser.parse_args()
    try:
        print(build(args.output.resolve()))
    except RuntimeError as e:
        print(f"build-collection: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
