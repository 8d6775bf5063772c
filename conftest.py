"""Repository-wide pytest set-up: the lab fixture (ftlab.testing), and this checkout's engine
for every process the tests start (the virtualenv's editable install points at one
checkout; a worktree or a clone must run its own code in its daemons and watchers)."""

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(_HERE / "engine"), *filter(None, [os.environ.get("PYTHONPATH")])]
)

pytest_plugins = ["ftlab.testing"]
