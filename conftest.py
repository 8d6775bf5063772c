"""Repository-wide pytest set-up: the lab fixture (ftlab.testing)."""

pytest_plugins = ["ftlab.testing"]
