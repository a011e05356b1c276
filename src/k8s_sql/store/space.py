"""etcd's space quota and NOSPACE alarm, over a SQL database.

etcd refuses a write that would take its backend past ``--quota-backend-bytes`` and
raises the NOSPACE alarm; while the alarm is raised it refuses every request that
adds data (Put, a Txn with puts, LeaseGrant: its ``applierV3Capped``) with
``etcdserver: mvcc: database space exceeded`` and keeps serving reads, deletes,
lease revocation and compaction. An operator frees space (compact, defragment,
delete) and disarms the alarm (``etcdctl alarm disarm``).

Here the same alarm is also raised when the database itself reports that it is
full (a full disk), whatever the quota. Its state is one ``meta`` row,
``alarm_nospace`` (the member id that raised it, 0 when none), so every frontend on
the database sees it: the write batch reads it under the revision lock (so a batch
never adds data past a raised alarm), and each frontend refreshes its copy every
second to refuse such requests before they are queued. On a full disk the row may
not be writable: the alarm then holds in this frontend's memory and is written as
soon as the database accepts it.

Sizes: etcd counts the bolt file's total size. Here the quota counts the bytes the
database reports *in use* (SQLite's pages less its free list, PostgreSQL's relation
sizes, InnoDB's data and index length), so that compaction frees quota without a
defragmentation; it is measured every second and, in between, grows by each
accepted request's cost (etcd's ``costPut``: key, value and 256 bytes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from k8s_sql import errors
from k8s_sql.backend.base import Backend
from k8s_sql.background import BackgroundLoop
from k8s_sql.pb import rpc_pb2 as pb

log = logging.getLogger(__name__)

ALARM_ROW = "alarm_nospace"
NOSPACE = 1  # etcdserverpb.AlarmType.NOSPACE


# -- etcd's quota costs (storage/quota.go) ---------------------------------------------

KV_OVERHEAD = 256  # etcd's quota: what a key costs on top of its key and value bytes
LEASE_OVERHEAD = 64  # etcd's quota: what a lease costs


def put_cost(r: pb.PutRequest) -> int:
    """etcd's costPut: the bytes a put may add, as the quota counts them."""
    return KV_OVERHEAD + len(r.key) + len(r.value)


def txn_cost(r: pb.TxnRequest) -> int:
    """etcd's costTxn: the costlier branch's puts (nested txns cost nothing there, as in etcd)."""

    def branch(ops: Any) -> int:
        return sum(put_cost(op.request_put) for op in ops if op.WhichOneof("request") == "request_put")

    return max(branch(r.success), branch(r.failure))


class Space(BackgroundLoop):
    task_name = "space"

    def __init__(self, backend: Backend, member_id: int, quota_bytes: int = 0, interval: float = 1.0) -> None:
        self.backend = backend
        self.member_id = member_id
        self.quota_bytes = quota_bytes
        self.interval = interval
        self.raised_by = 0  # the member that raised NOSPACE (0: not raised), as last known
        self.in_use = 0  # bytes in use: the last measurement plus what was accepted since
        self._unwritten = False  # raised here, not yet in the database (a full disk)
        self._lock = asyncio.Lock()

    @property
    def nospace(self) -> bool:
        return self.raised_by != 0

    async def open(self) -> None:
        """Read the alarm and the size once before serving."""
        await self.refresh()

    async def refresh(self) -> None:
        async with self._lock:
            if self._unwritten:
                await self._write(self.raised_by)
            else:
                self.raised_by = await self.backend.meta_get(ALARM_ROW) or 0
            if self.quota_bytes:
                self.in_use = (await self.backend.size())[1]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("space check failed: %s", e)

    # -- etcd's quota check ----------------------------------------------------------

    async def check(self, cost: int) -> None:
        """etcd's quotaKVServer / quotaLeaseServer check: refuse a request that adds
        ``cost`` bytes while NOSPACE is raised, or that would pass the quota (raising
        NOSPACE)."""
        if self.nospace:
            raise errors.NoSpace()
        if self.quota_bytes and self.in_use + cost > self.quota_bytes:
            await self.raise_alarm(f"the quota of {self.quota_bytes} bytes is reached ({self.in_use} in use)")
            raise errors.NoSpace()
        self.in_use += cost

    def database_full(self) -> None:
        """The database refused a write as full: raise NOSPACE at once -- before the
        write path answers NOSPACE, so a client that then lists alarms sees it -- and
        record it in the database in the background (the write path cannot wait)."""
        if not self.nospace:
            self._raise("the database is full")
            task = asyncio.get_running_loop().create_task(self._record())
            task.add_done_callback(_log_failure)

    async def raise_alarm(self, why: str) -> None:
        if self.nospace:
            return
        self._raise(why)
        await self._record()

    def _raise(self, why: str) -> None:
        log.warning("raising the NOSPACE alarm: %s", why)
        self.raised_by = self.member_id
        self._unwritten = True  # until _record() wrote it: alarms() must not read it back yet

    async def _record(self) -> None:
        async with self._lock:
            if self._unwritten:
                await self._write(self.raised_by)

    async def _write(self, value: int) -> None:
        try:
            await self.backend.meta_set(ALARM_ROW, value)
        except Exception as e:
            self._unwritten = value != 0
            log.warning("could not record the NOSPACE alarm in the database yet: %s", e)
        else:
            self._unwritten = False

    # -- the Alarm RPC -----------------------------------------------------------------

    async def alarms(self) -> list[tuple[int, int]]:
        """``(member id, alarm type)`` of every raised alarm, read from the database."""
        async with self._lock:  # not between an alarm's raising and its recording
            if not self._unwritten:
                self.raised_by = await self.backend.meta_get(ALARM_ROW) or 0
        return [(self.raised_by, NOSPACE)] if self.raised_by else []

    async def activate(self, member_id: int) -> None:
        """AlarmRequest ACTIVATE NOSPACE (etcd lets a client raise an alarm)."""
        self.raised_by = member_id or self.member_id
        self._unwritten = True
        async with self._lock:
            await self._write(self.raised_by)

    async def disarm(self, member_id: int) -> bool:
        """AlarmRequest DEACTIVATE NOSPACE: lower the alarm if ``member_id`` raised it
        (0: whoever did). If space is still short, the next write raises it again."""
        async with self._lock:
            current = self.raised_by if self._unwritten else (await self.backend.meta_get(ALARM_ROW) or 0)
            if not current or (member_id and member_id != current):
                return False
            await self.backend.meta_set(ALARM_ROW, 0)
            self.raised_by = 0
            self._unwritten = False
            if self.quota_bytes:
                self.in_use = (await self.backend.size())[1]
            log.info("the NOSPACE alarm was disarmed")
            return True


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("raising the NOSPACE alarm failed: %s", task.exception())
