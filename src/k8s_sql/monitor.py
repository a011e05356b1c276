"""What an operator asks of a running frontend: is it healthy, and what is it doing.

:class:`Monitor` probes the database once a second (one read, under a timeout) and
measures its size and key count now and then, so that a scrape or a health probe
costs the database nothing more. :class:`Health` answers etcd's ``/health``,
``/livez`` and ``/readyz`` (etcd 3.6's check registry: ``?verbose``, ``?exclude=``,
``/readyz/<check>``), and the gRPC health service's status follows it.
:class:`ServerCollector` turns the state into Prometheus gauges at scrape time.

What the checks mean for a SQL store (docs/monitoring.md):

- ``serializable_read`` (livez and readyz): this process serves -- its event loop
  answers and its store is started. A frontend whose *database* is down stays live:
  restarting it cannot bring the database back (it retries by itself), so livez does
  not depend on the database, unlike etcd's, whose data is local.
- ``linearizable_read`` (readyz): a read of the database's newest revision succeeds
  within the timeout -- the database is reachable.
- ``database_writable`` (readyz): the database took this frontend's heartbeat write
  within a leadership term (5 s).
- ``leader`` (readyz): some frontend holds the leadership (lease expiry and
  compaction run), as read within a term.
- ``caught_up`` (readyz): this frontend's watchers are at most ``MAX_LAG_SECONDS``
  behind the database's newest commit.
- ``data_corruption`` (readyz): no CORRUPT alarm (raised when the database lost
  commits already served: store/corruption.py); ``non_learner``: always ok (no learners).
- ``/health``: etcd's -- no alarm (``?exclude=NOSPACE`` to ignore one), a leader
  (unless ``?serializable=true``), and a read within the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k8s_sql import errors
from k8s_sql.background import BackgroundLoop

if TYPE_CHECKING:
    from k8s_sql.server import Frontend

log = logging.getLogger(__name__)

PROBE_SECONDS = 1.0  # a read of the database's revision, once a second
PROBE_TIMEOUT = 2.0  # a probe (and a health read) slower than this fails
SIZE_SECONDS = 5.0  # the database's size: pg_total_relation_size, information_schema, page counts
KEYS_SECONDS = 30.0  # etcd_debugging_mvcc_keys_total: a COUNT(*) of kv, so not often
MAX_LAG_SECONDS = 5.0  # readyz's caught_up: watchers at most this far behind the database


@dataclass
class Probe:
    """The monitor's latest findings."""

    database_up: bool = False
    error: str = "the database has not been probed yet"
    db_size: int = 0
    db_in_use: int = 0
    keys: int = 0
    database_revision: int = 0
    lag_revisions: int = 0
    behind_since: float = 0.0  # monotonic time the hub was first seen behind (0: caught up)
    failures: int = 0

    @property
    def lag_seconds(self) -> float:
        return time.monotonic() - self.behind_since if self.behind_since else 0.0


class Monitor(BackgroundLoop):
    task_name = "monitor"

    def __init__(self, server: Frontend, on_change: Callable[[bool], None] | None = None) -> None:
        self.server = server
        self.probe = Probe()
        self.on_change = on_change  # told whether /health passes, when that changes
        self._healthy: bool | None = None
        self._sized = 0.0
        self._counted = 0.0

    async def probe_once(self) -> None:
        s, p = self.server, self.probe
        try:
            revision, _ = await asyncio.wait_for(s.store.current(), PROBE_TIMEOUT)
        except (Exception, TimeoutError) as e:
            if p.database_up:
                log.warning("database probe failed: %s", errors.one_line(e) or "timed out")
            p.database_up = False
            p.error = errors.one_line(e) or f"no answer within {PROBE_TIMEOUT:g} s"
            p.failures += 1
        else:
            p.database_up = True
            p.error = ""
            p.database_revision = revision
            p.lag_revisions = max(0, revision - s.hub.revision)
            if p.lag_revisions == 0:
                p.behind_since = 0.0
            elif not p.behind_since:
                p.behind_since = time.monotonic()
            now = time.monotonic()
            try:
                if now - self._sized >= SIZE_SECONDS:
                    self._sized = now
                    p.db_size, p.db_in_use = await asyncio.wait_for(s.store.size(), PROBE_TIMEOUT)
                if now - self._counted >= KEYS_SECONDS:
                    self._counted = now
                    p.keys = await asyncio.wait_for(s.store.count_keys(), PROBE_TIMEOUT * 5)
            except (Exception, TimeoutError) as e:
                log.debug("measuring the database failed: %s", errors.one_line(e))
        healthy = p.database_up and s.membership.leader_known and not s.space.nospace and not s.store.corruption.raised
        if healthy != self._healthy:
            self._healthy = healthy
            if self.on_change is not None:
                self.on_change(healthy)

    async def run(self) -> None:
        while True:
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must not end the monitoring
                log.warning("monitor probe failed: %s", errors.one_line(e))
            await asyncio.sleep(PROBE_SECONDS)


# -- health (etcd's etcdhttp/health.go) ---------------------------------------------------

Check = Callable[[], Awaitable[None]]  # raises with the reason when the check fails


class CheckFailed(Exception):
    pass


@dataclass
class Outcome:
    ok: bool
    text: str  # etcd's "[+]name ok" lines (or the /health JSON)


class Health:
    """etcd 3.6's health endpoints over one frontend."""

    def __init__(self, server: Frontend, monitor: Monitor) -> None:
        self.server = server
        self.monitor = monitor
        self.livez: dict[str, Check] = {"serializable_read": self._serving}
        self.readyz: dict[str, Check] = {
            "data_corruption": self._no_corruption,
            "serializable_read": self._serving,
            "linearizable_read": self._database_read,
            "non_learner": self._non_learner,
            "database_writable": self._writable,
            "leader": self._leader,
            "caught_up": self._caught_up,
        }

    async def _serving(self) -> None:
        if not self.server.store.started:
            raise CheckFailed("the store is not started")

    async def _no_corruption(self) -> None:
        if self.server.store.corruption.raised:
            raise CheckFailed("ALARM CORRUPT")

    async def _non_learner(self) -> None:
        return  # every frontend is a full member

    async def _database_read(self) -> None:
        try:
            await asyncio.wait_for(self.server.store.current(), PROBE_TIMEOUT)
        except (Exception, TimeoutError) as e:
            raise CheckFailed(errors.one_line(e) or f"no answer within {PROBE_TIMEOUT:g} s") from None

    async def _writable(self) -> None:
        if not self.server.membership.writable:
            raise CheckFailed("the database has not taken this frontend's heartbeat within a term")

    async def _leader(self) -> None:
        if not self.server.membership.leader_known:
            raise CheckFailed("no leader known")

    async def _caught_up(self) -> None:
        lag = self.monitor.probe.lag_seconds
        if lag > MAX_LAG_SECONDS:
            raise CheckFailed(f"{self.monitor.probe.lag_revisions} revisions behind the database for {lag:.1f} s")

    @staticmethod
    async def run_checks(checks: dict[str, Check], names: Iterable[str]) -> Outcome:
        """etcd's runHealthChecks: every named check, in order, each one line."""
        lines, ok = [], True
        for name in names:
            try:
                await checks[name]()
            except Exception as e:
                ok = False
                lines.append(f"[-]{name} failed: {e}\n")
            else:
                lines.append(f"[+]{name} ok\n")
        return Outcome(ok, "".join(lines))

    async def check_all(self, kind: str, excluded: set[str]) -> tuple[Outcome, list[str]]:
        """``/livez`` or ``/readyz`` without the excluded checks; also the exclusions
        that name no check (etcd logs them and ignores them)."""
        checks = self.livez if kind == "livez" else self.readyz
        names = [n for n in checks if n not in excluded]
        return await self.run_checks(checks, names), sorted(excluded - set(checks))

    async def check_one(self, kind: str, name: str) -> Outcome | None:
        checks = self.livez if kind == "livez" else self.readyz
        if name not in checks:
            return None
        return await self.run_checks(checks, [name])

    async def health(self, excluded_alarms: set[str], serializable: bool) -> tuple[bool, str]:
        """etcd's /health: ``(healthy, reason)``: alarms, then the leader (unless
        serializable), then a read."""
        if self.server.store.corruption.raised and "CORRUPT" not in excluded_alarms:
            return False, "ALARM CORRUPT"
        if self.server.space.nospace and "NOSPACE" not in excluded_alarms:
            return False, "ALARM NOSPACE"
        if not serializable and not self.server.membership.leader_known:
            return False, "RAFT NO LEADER"
        try:
            await self._database_read()
        except CheckFailed as e:
            return False, f"RANGE ERROR:{e}"
        return True, ""


# -- Prometheus gauges, read at scrape time ---------------------------------------------------

# Every gauge the collector serves: name -> (help, label names). docs/monitoring.md is
# generated from this table and metrics.FAMILIES.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "etcd_server_has_leader": (
        "Whether or not a leader exists. 1 is existence, 0 is not. Here: this frontend read, within a "
        "term (5 s), which frontend holds the leadership (lease expiry and compaction).",
        (),
    ),
    "etcd_server_is_leader": ("Whether or not this member is a leader. 1 if is, 0 otherwise.", ()),
    "etcd_server_id": (
        "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
        ("server_id",),
    ),
    "etcd_server_version": (
        "Which version is running. 1 for 'server_version' label with current version.",
        ("server_version",),
    ),
    "etcd_server_quota_backend_bytes": ("Current backend storage quota size in bytes (0: no quota).", ()),
    "etcd_mvcc_db_total_size_in_bytes": (
        "Total size of the underlying database physically allocated in bytes (measured every 5 s).",
        (),
    ),
    "etcd_mvcc_db_total_size_in_use_in_bytes": (
        "Total size of the underlying database logically in use in bytes (what the quota counts).",
        (),
    ),
    "etcd_debugging_mvcc_keys_total": ("Total number of keys (counted every 30 s).", ()),
    "etcd_debugging_mvcc_current_revision": ("The current revision of store.", ()),
    "etcd_debugging_mvcc_compact_revision": ("The revision of the last compaction in store.", ()),
    "etcd_debugging_mvcc_watch_stream_total": ("Total number of watch streams.", ()),
    "etcd_debugging_mvcc_watcher_total": ("Total number of watchers.", ()),
    "etcd_debugging_mvcc_slow_watcher_total": (
        "Total number of unsynced slow watchers (reading the database's log, behind the in-memory ring).",
        (),
    ),
    "k8s_sql_database_up": (
        "1 if this frontend's last database probe (a read, each second, within 2 s) succeeded.",
        (),
    ),
    "k8s_sql_follower_lag_revisions": (
        "Revisions committed in the database that this frontend had not yet published to its watchers "
        "at its last probe.",
        (),
    ),
    "k8s_sql_follower_lag_seconds": (
        "How long this frontend has been behind the database's newest commit (0 when caught up).",
        (),
    ),
    "k8s_sql_alarm_active": ("1 while the alarm is raised on the cluster.", ("alarm",)),
    "k8s_sql_db_pool_connections": (
        "Database connections of this frontend: in_use, idle and max of a pool (PostgreSQL, MySQL); "
        "open and max for SQLite's writer and reader threads.",
        ("state",),
    ),
    "k8s_sql_compaction_pending_revisions": (
        "Revisions compacted logically whose history this frontend's physical compaction has not yet deleted.",
        (),
    ),
}


COUNTERS = {"k8s_sql_database_probe_failures_total": "Database probes (a read each second) that failed or timed out."}


def _gauge(name: str, samples: dict[tuple[str, ...], float]) -> GaugeMetricFamily:
    doc, labels = GAUGES[name]
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, v in samples.items():
        g.add_metric(list(values), v)
    return g


class ServerCollector(Collector):
    """The gauges of one running frontend (:data:`GAUGES`), read from the objects that
    own the state when Prometheus scrapes (registered while the server runs)."""

    def __init__(self, server: Frontend, monitor: Monitor) -> None:
        self.server = server
        self.monitor = monitor

    def values(self) -> dict[str, dict[tuple[str, ...], float]]:
        s, p = self.server, self.monitor.probe
        membership, hub, store = s.membership, s.hub, s.store
        done = store.compactor.done
        return {
            "etcd_server_has_leader": {(): 1 if membership.leader_known else 0},
            "etcd_server_is_leader": {(): 1 if membership.is_leader else 0},
            "etcd_server_id": {(f"{membership.member_id:x}",): 1},
            "etcd_server_version": {(s.version,): 1},
            "etcd_server_quota_backend_bytes": {(): s.space.quota_bytes},
            "etcd_mvcc_db_total_size_in_bytes": {(): p.db_size},
            "etcd_mvcc_db_total_size_in_use_in_bytes": {(): p.db_in_use},
            "etcd_debugging_mvcc_keys_total": {(): p.keys},
            "etcd_debugging_mvcc_current_revision": {(): store.revision},
            "etcd_debugging_mvcc_compact_revision": {(): store.compact_revision},
            "etcd_debugging_mvcc_watch_stream_total": {(): len(hub.streams)},
            "etcd_debugging_mvcc_watcher_total": {(): len(hub.synced) + len(hub.unsynced)},
            "etcd_debugging_mvcc_slow_watcher_total": {(): len(hub.unsynced)},
            "k8s_sql_database_up": {(): 1 if p.database_up else 0},
            "k8s_sql_follower_lag_revisions": {(): p.lag_revisions},
            "k8s_sql_follower_lag_seconds": {(): p.lag_seconds},
            "k8s_sql_alarm_active": {
                ("NOSPACE",): 1 if s.space.nospace else 0,
                ("CORRUPT",): 1 if s.store.corruption.raised else 0,
            },
            "k8s_sql_db_pool_connections": {(state,): n for state, n in s.backend.pool_stats().items()},
            "k8s_sql_compaction_pending_revisions": {(): max(0, store.compact_revision - done) if done else 0},
        }

    def collect(self) -> Iterator[Metric]:
        for name, samples in self.values().items():
            yield _gauge(name, samples)
        name = "k8s_sql_database_probe_failures_total"
        yield CounterMetricFamily(name, COUNTERS[name], value=self.monitor.probe.failures)
