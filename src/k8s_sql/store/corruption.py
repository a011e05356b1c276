"""Lost commits: a database that went back in time, and etcd's CORRUPT alarm for it.

A failover to a replica that had not received the last commits (PostgreSQL's
asynchronous standby promoted, a MySQL replica, a backup restored under running
frontends) leaves the database at a revision *below* revisions that frontends have
already acknowledged and served. Writing on would hand those revision numbers out
again to different changes: every kube-apiserver watch cache would hold objects at
resourceVersions that now mean something else, and watchers at a revision the
database no longer has would never be told (measured before this module: ~900
acknowledged writes lost by the database, the same ~900 revisions reused, two
watchers silently missing the new writes, nothing logged).

So each frontend compares every revision the database reports (the revision row a
write batch locks, a read's revision, the watch follower's look at the head) with the
newest one it has seen (:class:`~k8s_sql.store.revisions.Revisions`). Lower means
lost commits, and then, as etcd does for a corrupt member, the frontend

- refuses every KV and Lease request with etcd's ``etcdserver: corrupt cluster``
  (DATA_LOSS), and the write batch rolls back instead of reusing a revision;
- raises the CORRUPT alarm in the database (``meta`` rows ``alarm_corrupt``: the
  member that raised it; ``alarm_corrupt_revision``: the newest revision any
  frontend had seen -- one that learns of the alarm from the rows raises it to its
  own newest if that is higher), so every frontend on the database refuses too,
  including one restarted since (it forgot what it had seen) -- each re-reads the
  rows every second and the write batch reads them under the revision lock;
- cancels every watch (``cancel_reason``: corrupt cluster) and refuses new ones, so
  kube-apiservers stop trusting their caches and relist;
- logs one error line and exports ``k8s_sql_alarm_active{alarm="CORRUPT"}``; readyz's
  ``data_corruption`` check and ``/health`` fail.

An operator then decides (docs/high-availability.md): bring the lost commits back
(re-promote the old primary), or accept the loss with ``etcdctl alarm disarm``. The
disarm moves the revision counter to the newest revision anyone had seen and compacts
there, in one transaction: the next write gets a revision never handed out before, and
every resourceVersion from before is answered as compacted (410 Gone: clients relist
and see the database's state as it is).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from k8s_sql import errors
from k8s_sql.backend.base import Backend
from k8s_sql.background import BackgroundLoop
from k8s_sql.store.revisions import Revisions

log = logging.getLogger(__name__)

ALARM_ROW = "alarm_corrupt"  # the member that raised it; 0 when none
REVISION_ROW = "alarm_corrupt_revision"  # the newest revision a frontend had seen
CORRUPT = 2  # etcdserverpb.AlarmType.CORRUPT
CONFIRM_SECONDS = 3.0  # see CorruptAlarm.suspect
# A server found behind is asked again after these pauses (0.31 s in all) before the
# request fails: a node that is merely behind catches up within them, and one that lost
# commits stays behind. CI met a Galera node answering one read in 2,734 from behind,
# and a second read taken at once was behind too.
CATCH_UP_DELAYS = (0.01, 0.02, 0.04, 0.08, 0.16)


class LostCommits(Exception):
    """The database reports ``database`` while ``seen`` was already committed and served."""

    def __init__(self, database: int, seen: int) -> None:
        super().__init__(f"the database is at revision {database}, behind revision {seen} already served")
        self.database = database
        self.seen = seen


class CorruptAlarm(BackgroundLoop):
    """The CORRUPT alarm as this frontend knows it: raised here, or read from the database."""

    task_name = "corrupt-alarm"

    def __init__(self, backend: Backend, revisions: Revisions, member_id: int = 0, interval: float = 1.0) -> None:
        self.backend = backend
        self.revisions = revisions
        self.member_id = member_id
        self.interval = interval
        self.raised_by = 0  # the member that raised it (0: not raised), as last known
        self.revision = 0  # the newest revision seen before the loss, as last known
        # Called with True when the alarm is raised, False when it is disarmed (the
        # watch hub: cancel and refuse watches meanwhile).
        self.on_change: Callable[[bool], None] | None = None
        self._unwritten = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.confirm_seconds = CONFIRM_SECONDS
        self._behind_since: float | None = None  # when write batches began to find the database behind

    @property
    def raised(self) -> bool:
        return self.raised_by != 0

    def check(self) -> None:
        """etcd's applierV3Corrupt: every KV and Lease request fails while the alarm holds."""
        if self.raised_by:
            raise errors.Corrupt()

    def verify(self, database: int, seen: int) -> None:
        """``database``, a revision the database reported from a snapshot taken after
        this frontend had seen revision ``seen``, must not be behind it: LostCommits if
        it is. ``seen`` is read *before* the database is asked: a read whose snapshot
        predates a commit this frontend makes meanwhile rightly reports the older
        revision (measured: 554 read while 560 committed)."""
        if database < seen:
            raise LostCommits(database, seen)

    def suspect(self, lost: LostCommits) -> bool:
        """The write path found the revision row behind what was served; whether that
        now raises the alarm. A server can be behind for a while without having lost
        anything -- a Galera node rejoining behind a proxy that sends it clients before
        it is synced -- so the alarm is raised only when write batches keep finding
        the database behind for ``confirm_seconds`` with none committing in between
        (a failover that lost commits stays behind); until then the batch fails as
        UNAVAILABLE, and clients retry (measured: HAProxy's TCP checks sent new
        connections to a node still recovering, and its stale answers raised the alarm)."""
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
            log.warning(
                "the database is at revision %d, behind revision %d already served: a server behind (a replica, "
                "a node rejoining) or lost commits; refusing writes, and raising the CORRUPT alarm if it lasts "
                "%.0f s",
                lost.database,
                lost.seen,
                self.confirm_seconds,
            )
        if now - self._behind_since >= self.confirm_seconds:
            self.detected(lost)
        return self.raised

    def committed(self) -> None:
        """A write batch committed: whatever was behind is not any more."""
        self._behind_since = None

    def detected(self, lost: LostCommits) -> None:
        """Lost commits found here: raise the alarm at once (in memory), and record it in
        the database in the background (a write path cannot wait for it)."""
        seen = max(lost.seen, self.revision)
        if self.raised and self.revision >= seen:
            return
        if not self.raised:
            log.error(
                "the database lost committed revisions: it is at revision %d, behind revision %d that this "
                "frontend already served (a failover to a replica that had not received them?). Raising the "
                "CORRUPT alarm: every request is refused until an operator disarms it; see "
                "docs/high-availability.md",
                lost.database,
                lost.seen,
            )
        was = self.raised
        self.raised_by = self.raised_by or self.member_id or 1
        self.revision = seen
        self._unwritten = True
        if not was:
            self._changed(True)
        self._record_soon()

    def _record_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._record())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self, raised: bool) -> None:
        if self.on_change is not None:
            self.on_change(raised)

    async def _record(self) -> None:
        async with self._lock:
            if not self._unwritten:
                return
            try:
                for _ in range(10):
                    held = await self.backend.meta([ALARM_ROW, REVISION_ROW])
                    seen = max(self.revision, held.get(REVISION_ROW, 0))
                    expect = {ALARM_ROW: held.get(ALARM_ROW, 0), REVISION_ROW: held.get(REVISION_ROW, 0)}
                    new = {ALARM_ROW: held.get(ALARM_ROW) or self.raised_by, REVISION_ROW: seen}
                    if await self.backend.meta_compare_and_set(expect, new):
                        self.revision = seen
                        self._unwritten = False
                        return
            except Exception as e:
                log.warning("could not record the CORRUPT alarm in the database yet: %s", errors.one_line(e))

    async def refresh(self) -> None:
        """Read the alarm's rows (every second): another frontend raised or disarmed it."""
        async with self._lock:
            if self._unwritten:
                return
            held = await self.backend.meta([ALARM_ROW, REVISION_ROW])
        raised_by, revision = held.get(ALARM_ROW, 0), held.get(REVISION_ROW, 0)
        was = self.raised
        self.raised_by, self.revision = raised_by, revision
        if raised_by and self.revisions.current > revision:
            # Raised by a frontend that saw less than this one served: add ours, or a
            # disarm (wherever it is asked) would hand our newest revisions out again.
            # CI met it: the frontend that served the last of 50 lost writes learned of
            # the alarm from the other one, whose disarm then reused that revision.
            self.revision = self.revisions.current
            self._unwritten = True
            self._record_soon()
        if raised_by and not was:
            log.error(
                "the CORRUPT alarm is raised (member %x: the database lost revisions up to %d): every request "
                "is refused until an operator disarms it; see docs/high-availability.md",
                raised_by,
                revision,
            )
            self._changed(True)
        elif was and not raised_by:
            self._changed(False)

    async def open(self) -> None:
        await self.refresh()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                if self._unwritten:
                    await self._record()
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("corrupt alarm check failed: %s", e)

    async def alarms(self) -> list[tuple[int, int]]:
        """``(member id, CORRUPT)`` if raised."""
        if not self._unwritten:
            await self.refresh()
        return [(self.raised_by, CORRUPT)] if self.raised else []

    async def disarm(self, member_id: int) -> bool:
        """``etcdctl alarm disarm``: accept the loss. In one transaction: the revision
        counter moves to the newest revision anyone had seen (never below the
        database's own), the history is compacted there, and the alarm is cleared."""
        async with self._lock:
            for _ in range(10):
                held = await self.backend.meta(["revision", ALARM_ROW, REVISION_ROW])
                raised_by = held.get(ALARM_ROW, 0)
                if not raised_by and not self._unwritten:
                    return False
                if member_id and raised_by and member_id != raised_by:
                    return False
                seen = max(held.get(REVISION_ROW, 0), self.revision, self.revisions.current)
                to = max(held["revision"], seen)
                expect = {"revision": held["revision"], ALARM_ROW: raised_by, REVISION_ROW: held.get(REVISION_ROW, 0)}
                new = {"revision": to, "compact_revision": to, ALARM_ROW: 0, REVISION_ROW: 0}
                if await self.backend.meta_compare_and_set(expect, new):
                    break
            else:
                return False
            self._unwritten = False
            self.raised_by, self.revision = 0, 0
            self.revisions.observe(to, to)
        log.warning(
            "the CORRUPT alarm was disarmed: the revision counter moves to %d and history is compacted there; "
            "clients with older resourceVersions relist",
            to,
        )
        self._changed(False)
        return True
