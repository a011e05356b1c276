"""Bringing other frontends' commits into this frontend's hub.

Several k8s-sql processes may serve one database. Each publishes its own commits to
its hub at once; this follower tails the ``log`` table for revisions written by the
others. Because every writer holds the revision lock until it commits, committed
revisions form a contiguous prefix: reading ``rev > last`` can never skip one.

It polls every ``interval`` (the backend's ``follow_interval``), and sooner when the database announces a commit it has
not seen (PostgreSQL's NOTIFY, see :meth:`Backend.follow_commits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from k8s_sql.backend.base import CompactedError
from k8s_sql.background import BackgroundLoop
from k8s_sql.store.store import Store
from k8s_sql.watch.hub import PARK_SECONDS, Hub

log = logging.getLogger(__name__)


class Follower(BackgroundLoop):
    task_name = "watch-follower"

    def __init__(self, hub: Hub, store: Store, interval: float = 0.025, batch: int = 5000) -> None:
        self.hub = hub
        self.store = store
        self.interval = interval
        self.batch = batch
        self._news = asyncio.Event()

    def _heard(self, revision: int) -> None:
        # This frontend's own commits are published by the store itself: reading them
        # back cost a PostgreSQL frontend a third of its write throughput.
        if revision > max(self.hub.revision, self.store.revisions.committing):
            self._news.set()

    def _gap(self) -> None:
        # An own commit is parked above revisions the others wrote (Hub.parked): read them now.
        self._news.set()

    async def poll_once(self) -> None:
        revision, _ = await self.store.current()
        stop = self.hub.gap_end()
        if stop is not None:  # the parked revisions above are this frontend's own: not read back
            revision = min(revision, stop)
        while self.hub.revision < revision:
            start = self.hub.revision + 1
            try:
                rows, covered = await self.store.changes(start, revision, None, self.batch)
            except CompactedError:
                # History this frontend never saw is gone; watchers still behind it
                # get etcd's compacted cancel when they try to read it.
                self.hub.advance(revision)
                self.hub.flush_parked(0)
                break
            if rows:
                self.hub.publish(covered, rows)
            else:
                self.hub.advance(covered)

    async def run(self) -> None:
        listener = asyncio.create_task(self.store.follow_commits(self._heard), name="commit-listener")
        self.hub.on_gap = self._gap
        try:
            while True:
                self._news.clear()
                try:
                    await self.poll_once()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the database is away: keep trying
                    log.debug("following the log failed: %s", e)
                self.hub.flush_parked()
                wait = self.interval if not self.hub.parked else min(self.interval, PARK_SECONDS / 4)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._news.wait(), wait)
        finally:
            self.hub.on_gap = None
            self.hub.flush_parked(0)
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
