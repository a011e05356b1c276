"""Prometheus metrics: etcd's names where the meaning carries over, ``k8s_sql_*`` for
what only a SQL store has (docs/monitoring.md lists them all with their meaning here).

Two kinds, so that the write path pays almost nothing:

- **Events** (a put applied, a call handled, a batch committed) are counters and
  histograms defined here at import and updated where they happen. They are not
  prometheus-client's: its ``inc`` takes a lock and costs 0.38 us, its ``observe``
  0.83 us, and a write txn makes about twenty updates (its call, its batch's share,
  its SQL statements): measured with bench/micro/metrics_cost.py, they cost 30 us of
  the 65 us per txn that metrics first added (8% over 770 us). :class:`Counter` and
  :class:`Histogram` here are a slot increment and a bisect (0.06 and 0.25 us), with
  no lock: they are updated on the event loop, or from SQLite's threads for statement
  latencies, where the GIL may at worst lose a rare concurrent sample of a latency
  (never of a count the API reports: those are only updated on the loop). One
  collector (:class:`EventCollector`) exposes them all at scrape time.
- **State** (the revision, the leader, watchers, the database's size) is read when
  Prometheus scrapes, by :class:`k8s_sql.monitor.ServerCollector`, from the objects
  that own it: no gauge is kept up to date on the hot path.

Metric names and label sets are a public interface (dashboards and the alerts in
deploy/prometheus/ use them): tests/test_metrics.py holds the list.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

import prometheus_client
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# etcd and go-grpc-prometheus expose no ``_created`` series: neither do we (they would
# double every counter and histogram, and promtool lints them as unknown).
prometheus_client.disable_created_metrics()


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, n: float = 1) -> None:
        self.value += n


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # Prometheus' buckets are "less or equal"
        self.sum += value


class _Family:
    """A metric and its children by label values (the family itself when unlabelled)."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.children: dict[tuple[str, ...], Any] = {}
        FAMILIES.append(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def collect(self) -> Metric:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        assert len(key) == len(self.labelnames), f"{self.name}: labels {self.labelnames}"
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self._child()
        return child


FAMILIES: list[_Family] = []


class Counter(_Family):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), doc, labelnames)
        if not self.labelnames:
            self._only = self.labels()

    def _child(self) -> _Count:
        return _Count()

    def inc(self, n: float = 1) -> None:
        self._only.value += n

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(values, child.value)
        return family


class Histogram(_Family):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]) -> None:
        super().__init__(name, doc, labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        if not self.labelnames:
            self._only = self.labels()

    def _child(self) -> _Buckets:
        return _Buckets(self.bounds)

    def observe(self, value: float) -> None:
        self._only.observe(value)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        les = [prometheus_client.utils.floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for values, child in self.children.items():
            total, cumulative = 0, []
            for le, n in zip(les, list(child.counts), strict=True):
                total += n
                cumulative.append((le, total))
            family.add_metric(list(values), cumulative, child.sum)
        return family


class EventCollector(Collector):
    """Every counter and histogram of this module, at scrape time."""

    def collect(self) -> Iterator[Metric]:
        for family in FAMILIES:
            yield family.collect()


REGISTRY.register(EventCollector())


def _exponential(start: float, factor: float, count: int) -> list[float]:
    """Prometheus' ExponentialBuckets, as etcd declares its histograms."""
    return [start * factor**i for i in range(count)]


# -- etcd's mvcc and lease counters ------------------------------------------------------

PUTS = Counter("etcd_mvcc_put_total", "Total number of puts seen by this member.")
DELETES = Counter("etcd_mvcc_delete_total", "Total number of deletes seen by this member.")
RANGES = Counter("etcd_mvcc_range_total", "Total number of ranges seen by this member.")
TXNS = Counter("etcd_mvcc_txn_total", "Total number of txns seen by this member.")
LEASES_GRANTED = Counter("etcd_debugging_lease_granted_total", "The total number of granted leases.")
LEASES_REVOKED = Counter("etcd_debugging_lease_revoked_total", "The total number of revoked leases.")
LEASE_TTL = Histogram(
    "etcd_debugging_lease_ttl_total",
    "Bucketed histogram of lease TTLs.",
    buckets=_exponential(1, 2, 14),
)
# etcd: the bolt commit of a batch of applied entries; here the database COMMIT of a
# write batch (with PostgreSQL or MySQL, the round trip and the server's fsync).
COMMIT_SECONDS = Histogram(
    "etcd_disk_backend_commit_duration_seconds",
    "The latency distributions of commit called by backend.",
    buckets=_exponential(0.001, 2, 14),
)
LEADER_CHANGES = Counter("etcd_server_leader_changes_seen_total", "The number of leader changes seen.")

# -- go-grpc-prometheus's server metrics -------------------------------------------------

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
GRPC_STARTED = Counter("grpc_server_started_total", "Total number of RPCs started on the server.", GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    (*GRPC_LABELS, "grpc_code"),
)
GRPC_RECEIVED = Counter(
    "grpc_server_msg_received_total", "Total number of RPC stream messages received on the server.", GRPC_LABELS
)
GRPC_SENT = Counter(
    "grpc_server_msg_sent_total", "Total number of gRPC stream messages sent by the server.", GRPC_LABELS
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    GRPC_LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),  # prometheus.DefBuckets
)

# -- k8s-sql's own -----------------------------------------------------------------------

BATCH_REQUESTS = Histogram(
    "k8s_sql_write_batch_requests",
    "Write requests committed together in one database transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
UNLOCKED_BATCHES_RETRIED = Counter(
    "k8s_sql_write_batch_rerun_total",
    "Write batches begun without the revision lock that ran again, by how they had begun: known (from "
    "this frontend's last commit, without reading; PostgreSQL and MySQL; run again with a read, or on "
    "MySQL with the lock) or read (PostgreSQL; run again with the lock). Another frontend wrote in "
    "between, a key assumed absent existed, or a request needed the lock after all.",
    ["started"],
)
for _started in ("known", "read"):
    UNLOCKED_BATCHES_RETRIED.labels(_started)
RANGE_COUNTS = Counter(
    "k8s_sql_range_counts_total",
    "Count-only ranges answered (and the keys gauge's counts), by where the count came from: memo (a "
    "count remembered at an earlier revision, moved through the commits since) or database (counted there).",
    ["source"],
)
for _source in ("memo", "database"):
    RANGE_COUNTS.labels(_source)
QUEUE_WAIT_SECONDS = Histogram(
    "k8s_sql_write_queue_wait_seconds",
    "Time a write request waited in the queue before its batch's transaction began.",
    buckets=_exponential(0.0001, 2, 16),
)
SQL_SECONDS = Histogram(
    "k8s_sql_sql_statement_duration_seconds",
    "Latency of SQL statements, by the query (plan) they belong to; error is the failure's kind, empty on success.",
    ("statement", "error"),
    buckets=_exponential(0.0001, 2, 16),
)
WATCH_DELIVERY_SECONDS = Histogram(
    "k8s_sql_watch_delivery_lag_seconds",
    "Time from a revision's publication on this frontend (its commit here, or its discovery in the "
    "database's log for another frontend's commits) to a watch response carrying it being sent.",
    buckets=_exponential(0.0001, 2, 18),
)
LEASE_EXPIRY_LAG_SECONDS = Histogram(
    "k8s_sql_lease_expiry_lag_seconds",
    "How long after its deadline an expired lease was revoked.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
COMPACTION_SECONDS = Histogram(
    "k8s_sql_compaction_duration_seconds",
    "Duration of a physical compaction pass (deleting history below the compaction revision).",
    buckets=_exponential(0.001, 2, 16),
)
COMPACTION_DELETED = Counter("k8s_sql_compaction_deleted_rows_total", "Log rows deleted by physical compaction.")
REPLICA_RANGES = Counter(
    "k8s_sql_read_replica_ranges_total",
    "Serializable Ranges offered to the --read-endpoint replica, by result: served there, or "
    "answered by the primary because the replica was behind this frontend or unavailable.",
    ("result",),
)


_statement_children: dict[tuple[str, str], Any] = {}


def observe_statement(statement: str, error: str, seconds: float) -> None:
    """One SQL statement's latency, under its plan's name and its error's kind ("" on
    success); label children cached (a plan name is one of a few dozen)."""
    key = (statement, error)
    child = _statement_children.get(key)
    if child is None:
        child = _statement_children[key] = SQL_SECONDS.labels(statement, error)
    child.observe(seconds)


# go-grpc's codes.Code.String() for each status, as go-grpc-prometheus labels them.
GRPC_CODES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}


def grpc_code_name(code: Any) -> str:
    """grpc.StatusCode.CANCELLED -> "Canceled": go-grpc's name, which dashboards match."""
    return GRPC_CODES.get(code.name, "Unknown") if code is not None else "OK"


class GrpcMethod:
    """One method's go-grpc-prometheus series, resolved once (label lookups are the
    expensive part of prometheus-client's API). Created for every method at start,
    with every code's handled counter at 0, as go-grpc-prometheus's Register does, so
    that the first call of a kind is a rate's increase rather than a new series."""

    __slots__ = ("_handled", "labels", "received", "seconds", "sent", "slow", "started")

    def __init__(self, full_method: str, kind: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.labels = (kind, service, method)
        self.started = GRPC_STARTED.labels(*self.labels)
        self.received = GRPC_RECEIVED.labels(*self.labels)
        self.sent = GRPC_SENT.labels(*self.labels)
        self.seconds = GRPC_SECONDS.labels(*self.labels)
        self._handled = {code: GRPC_HANDLED.labels(*self.labels, code) for code in GRPC_CODES.values()}
        self.slow = float("inf")  # seconds after which a call is logged as slow (the interceptor's)

    def handled(self, code: str, started: float) -> float:
        """Count a call that ended with ``code``; its duration in seconds."""
        took = time.perf_counter() - started
        self._handled[code].inc()
        self.seconds.observe(took)
        return took
