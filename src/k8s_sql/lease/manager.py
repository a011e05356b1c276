"""Lease expiry: revoke leases whose stored deadline has passed.

Deadlines live in the database (``lease.expires_at``), so a restart does not
reset a lease's TTL. Revocation goes through the store like any write: the lease's
keys are deleted in one revision and watchers see DELETE events with ``prev_kv``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from k8s_sql import errors
from k8s_sql.background import BackgroundLoop
from k8s_sql.store.store import Store

log = logging.getLogger(__name__)


class LeaseExpirer(BackgroundLoop):
    task_name = "lease-expirer"

    def __init__(
        self, store: Store, interval: float = 0.5, batch: int = 500, active: Callable[[], bool] = lambda: True
    ) -> None:
        self.store = store
        self.interval = interval
        self.batch = batch
        self.active = active  # only the leader frontend expires leases

    async def expire_once(self) -> int:
        """Revoke every lease expired by now; return how many were revoked."""
        ids = await self.store.expired_leases(self.batch)
        revoked = 0
        results = await asyncio.gather(
            *(self.store.lease_revoke(i, only_if_expired=True) for i in ids), return_exceptions=True
        )
        for lease_id, res in zip(ids, results, strict=True):
            if isinstance(res, errors.LeaseNotFound):
                continue  # revoked meanwhile
            if isinstance(res, BaseException):
                log.warning("revoking expired lease %x failed: %s", lease_id, res)
                continue
            revoked += 1
        return revoked

    async def run(self) -> None:
        while True:
            try:
                if self.active():
                    n = await self.expire_once()
                    if n >= self.batch:
                        continue
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("lease expiry pass failed: %s", e)
            await asyncio.sleep(self.interval)
