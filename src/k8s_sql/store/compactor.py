"""Physical compaction: deleting the log below the compaction point, in the background.

A Compact request only moves ``compact_revision`` (in its own revision, as etcd's
does); the rows below it are deleted here, a batch of revisions per transaction, so
that a compaction of millions of changes never holds a lock for long. A request
with ``physical`` set waits until its rows are gone (etcd's ``physical`` flag).
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter

from k8s_sql import metrics
from k8s_sql.backend.base import Maintenance
from k8s_sql.store.revisions import Revisions

log = logging.getLogger(__name__)

BATCH_REVISIONS = 1000  # revisions deleted per transaction
RETRY_SECONDS = 1.0


class Compactor:
    def __init__(self, backend: Maintenance, revisions: Revisions) -> None:
        self.backend = backend
        self.revisions = revisions
        self._wanted = asyncio.Event()
        self._compacted_to = 0  # the log holds no row below this revision
        self._done = asyncio.Condition()

    @property
    def done(self) -> int:
        """The log holds no row below this revision (as far as this frontend compacted)."""
        return self._compacted_to

    def request(self) -> None:
        """Compact up to the current compaction point (soon)."""
        self._wanted.set()

    async def wait_for(self, revision: int) -> None:
        """Until the log holds no row below ``revision``."""
        async with self._done:
            await self._done.wait_for(lambda: self._compacted_to >= revision)

    async def run(self) -> None:
        self._compacted_to = 0
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            target = self.revisions.compacted
            started = perf_counter()
            try:
                deleted = await self.backend.compact_log(target, batch_revs=BATCH_REVISIONS)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("compaction to %d failed, will retry: %s", target, e)
                await asyncio.sleep(RETRY_SECONDS)
                self._wanted.set()
                continue
            metrics.COMPACTION_SECONDS.observe(perf_counter() - started)
            metrics.COMPACTION_DELETED.inc(deleted)
            async with self._done:
                self._compacted_to = max(self._compacted_to, target)
                self._done.notify_all()
