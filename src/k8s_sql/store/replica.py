"""Serializable reads from a replica (``--read-endpoint``): read scaling where it is free.

etcd answers a ``serializable`` Range from its local state, which may lag the leader;
a client that asks for one accepts a slightly old answer. Here such a Range may be
served by a PostgreSQL hot standby or a MySQL/MariaDB replica instead of the primary,
with one rule: **never older than what this frontend has already shown**. The
replica's answer is used only if its revision is at least the newest revision this
frontend had seen when the read began; otherwise -- or if the replica is unreachable
or has not reached a requested revision yet -- the primary answers, as without a
replica. Linearizable Ranges, Txns and watches always use the primary.

The replica is opened without creating anything (a standby is read-only); if it
cannot be reached it is tried again at most every ``RETRY_SECONDS``.
"""

from __future__ import annotations

import logging
import time

from k8s_sql import errors, metrics
from k8s_sql.backend.base import Backend, BackendUnavailable, FutureRevisionError, KeyRange, RangeResult

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0

SERVED = metrics.REPLICA_RANGES.labels("served")
BEHIND = metrics.REPLICA_RANGES.labels("behind")
UNAVAILABLE = metrics.REPLICA_RANGES.labels("unavailable")


class ReadReplica:
    def __init__(self, backend: Backend, name: str) -> None:
        self.backend = backend
        self.name = name  # the DSN without its password, for log lines
        self._open = False
        self._next_try = 0.0

    async def open(self) -> bool:
        """Open it if it is not open and a try is due; whether it is open."""
        if self._open:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + RETRY_SECONDS
        try:
            await self.backend.open_for_reads()
        except Exception as e:
            log.warning("read replica %s unavailable: %s", self.name, errors.one_line(e))
            return False
        self._open = True
        log.info("serving serializable reads from the replica %s", self.name)
        return True

    async def range(
        self, kr: KeyRange, rev: int, limit: int, count_only: bool, keys_only: bool, seen: int
    ) -> RangeResult | None:
        """The replica's answer, if it is at least as new as ``seen``; None: ask the primary."""
        if not await self.open():
            UNAVAILABLE.inc()
            return None
        try:
            res = await self.backend.range(kr, rev, limit, count_only, keys_only)
        except FutureRevisionError:  # the replica has not reached the requested revision yet
            BEHIND.inc()
            return None
        except BackendUnavailable as e:
            UNAVAILABLE.inc()
            log.debug("read replica %s: %s", self.name, errors.one_line(e))
            return None
        if res.revision < seen:
            BEHIND.inc()
            return None
        SERVED.inc()
        return res

    async def close(self) -> None:
        if self._open:
            await self.backend.close()
            self._open = False
