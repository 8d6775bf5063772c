"""The datastore as lockstepd sees it: pair records (records.py) and the datastore's identity,
through a small pool of worker threads with a deadline on every call, so that an NFS server that
hangs or answers ESTALE/EIO stalls or fails that call only - never the daemon's event loop.

The datastore is only the shared one if its id file (written by ft_storage, one UUID) is there
and, when the configuration names it, is that id: a missing mount shows an empty directory at
the same path, and records or tokens written there would be private to this host."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import records
from .arbiter import check_datastore
from .records import Record


class StoreUnavailable(Exception):
    """The datastore did not answer in time, failed, or is not the shared one."""


def identity(datastore: Path, expected: str | None) -> None:
    """StoreUnavailable unless this is the shared datastore (arbiter.check_datastore: one rule)."""
    if problem := check_datastore(datastore, expected):
        raise StoreUnavailable(problem)


class RecordStore:
    def __init__(self, datastore: Path, expected_id: str | None = None, timeout: float = 10.0) -> None:
        self.datastore = Path(datastore)
        self.expected_id = expected_id
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="datastore")

    async def _run(self, fn, *args):
        def checked():
            identity(self.datastore, self.expected_id)
            return fn(self.datastore, *args)

        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.pool, checked),
                                          self.timeout)  # fmt: skip
        except TimeoutError:
            raise StoreUnavailable(f"the datastore did not answer within {self.timeout:.0f} s") from None
        except OSError as e:
            raise StoreUnavailable(f"the datastore failed: {e}") from None

    async def load(self, name: str) -> Record | None:
        return await self._run(records.load, name)

    async def scan(self) -> tuple[dict[str, Record], dict[str, str]]:
        return await self._run(records.scan)

    async def load_all(self) -> dict[str, Record]:
        return (await self.scan())[0]

    async def save(self, record: Record) -> None:
        """Compare-and-swap: records.Stale when someone else saved the record since it was read."""
        await self._run(records.save, record)

    async def create(self, record: Record) -> None:
        await self._run(records.create, record)

    async def delete(self, record: Record) -> None:
        await self._run(records.delete, record)

    async def call(self, fn, *args):
        """Any other blocking datastore work (the token, port reservations), under the same rules."""
        return await self._run(fn, *args)
