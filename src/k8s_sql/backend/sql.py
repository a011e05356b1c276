"""What differs between the SQL dialects, and the statement text every dialect shares.

Statements are written once, with ``?`` placeholders; a driver whose database wants
``$1, $2, …`` (PostgreSQL) or ``%s`` (MySQL) converts them (see :func:`numbered`).
A :class:`Dialect` holds only what really differs: quoting, the upsert syntax, an
index hint and row locking -- the way kine's ``pkg/drivers/generic`` lets each
driver override a handful of statements and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from k8s_sql.backend.base import DELETE, KeyRange, LogRow, Row

KV_COLUMNS = "key, create_rev, mod_rev, version, lease, value"
LOG_COLUMNS = (
    "rev, sub, key, kind, create_rev, version, lease, value, "
    "prev_create_rev, prev_mod_rev, prev_version, prev_lease, prev_value"
)
# The tables a snapshot copies, with their columns (see backend/snapshot.py).
TABLES: tuple[tuple[str, str], ...] = (
    ("meta", "name, value"),
    ("kv", KV_COLUMNS),
    ("log", LOG_COLUMNS),
    ("lease", "id, ttl, expires_at"),
)

Params = Sequence[Any]

# SQLite (3.24+) and PostgreSQL share the standard upsert; MySQL writes its own.
_UPSERT_KV = (
    "INSERT INTO kv ({kv}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
    "create_rev = excluded.create_rev, mod_rev = excluded.mod_rev, version = excluded.version, "
    "lease = excluded.lease, value = excluded.value"
)
_UPSERT_LEASE = (
    "INSERT INTO lease (id, ttl, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET ttl = excluded.ttl, expires_at = excluded.expires_at"
)
_INSERT_META_ABSENT = "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"


@dataclass(frozen=True)
class Dialect:
    name: str  # as migrations.py names it
    empty_blob: str  # an empty byte string literal
    key: str = "key"  # the key column, quoted if the dialect needs it
    count_from: str = "kv"  # the table expression counts read (an index hint, where needed)
    # Appended to a SELECT that must lock the rows it reads until commit. SQLite has one
    # writer at a time (BEGIN IMMEDIATE), so it locks nothing row by row.
    for_update: str = " FOR UPDATE"
    upsert_kv_sql: str = _UPSERT_KV
    upsert_lease: str = _UPSERT_LEASE
    insert_meta_absent: str = _INSERT_META_ABSENT  # (name, value) unless name exists
    # One statement writing a batch's buffered rows and its revision, where the
    # dialect has one (PostgreSQL); otherwise a statement each (plans.finish_batch).
    finish_batch: str | None = None
    # One statement reading what a write batch starts from, without the revision lock,
    # for a finish_batch that checks it (plans.begin_unlocked; PostgreSQL).
    read_for_write: str | None = None
    # The driver sends a plans.Pipeline in one round trip (MySQL's multi-statements):
    # a write batch's COMMIT then goes with its last writes (plans.finish_batch).
    pipelines: bool = False
    _in_lists: dict[int, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_columns(self) -> str:
        return KV_COLUMNS.replace("key", self.key, 1)

    @property
    def log_columns(self) -> str:
        return LOG_COLUMNS.replace("key", self.key, 1)

    @property
    def upsert_kv(self) -> str:
        return self.upsert_kv_sql.format(kv=self.kv_columns)

    @property
    def get_kv(self) -> str:
        return f"SELECT {self.kv_columns} FROM kv WHERE {self.key} = ?"

    def get_kv_many(self, n: int) -> str:
        q = self._in_lists.get(n)
        if q is None:
            q = self._in_lists[n] = f"SELECT {self.kv_columns} FROM kv WHERE {self.key} IN ({marks(n)})"
        return q

    @property
    def lease_keys(self) -> str:
        # "lease <> 0" repeats the partial index's condition: with only "lease = ?" the
        # planner cannot tell that the parameter is not 0, and scans the whole table
        # (every value) per lease.
        return f"SELECT {self.key} FROM kv WHERE lease = ? AND lease <> 0 ORDER BY {self.key}"

    @property
    def insert_log(self) -> str:
        return f"INSERT INTO log ({self.log_columns}) VALUES ({marks(13)})"


# PostgreSQL: a write batch's rows and its new revision in one call of the function
# migration 5 creates (see plans.finish_batch): the meta values and live leases its read
# saw (NULL when the batch holds the revision lock), the keys it assumed absent, the key deletes, the kv upserts and
# the log rows as arrays, one parameter per column, then the revision. The keys deleted
# and the keys put are disjoint (the batch keeps one final state per key), so no row is
# touched twice.
_PG_FINISH_BATCH = (
    "SELECT k8s_sql_finish_batch(?::bigint[], ?::bigint[], ?::bytea[], ?::bytea[], "
    "?::bytea[], ?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[], ?::bytea[], "
    "?::bigint[], ?::integer[], ?::bytea[], ?::smallint[], ?::bigint[], ?::bigint[], ?::bigint[], ?::bytea[], "
    "?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[], ?::bytea[], ?::bigint)"
)
# What an unlocked PostgreSQL batch reads, in one statement and so one snapshot: the
# meta rows begin_write locks (as arrays, in one row), the live leases named, and a row
# per key found (none: the one row with NULL kv columns).
META_LOCKED = ("revision", "compact_revision", "alarm_nospace", "alarm_corrupt")
_PG_READ_FOR_WRITE = (
    "SELECT m.names, m.vals, l.ids, l.ttls, l.expiries, k.key, k.create_rev, k.mod_rev, k.version, k.lease, k.value "
    "FROM (SELECT array_agg(name) AS names, array_agg(value) AS vals FROM meta WHERE name IN ("
    + ", ".join(f"'{n}'" for n in META_LOCKED)
    + ")) m CROSS JOIN (SELECT array_agg(id) AS ids, array_agg(ttl) AS ttls, array_agg(expires_at) AS expiries "
    "FROM lease WHERE id = ANY(?::bigint[])) l LEFT JOIN kv k ON k.key = ANY(?::bytea[])"
)


def lock_meta(d: Dialect) -> str:
    """The revision lock: the rows of sql.META_LOCKED, locked until commit."""
    return f"SELECT name, value FROM meta WHERE name IN ({', '.join(map(repr, META_LOCKED))}){d.for_update}"


def stale_guard(d: Dialect, absent: int) -> str:
    """A statement that fails when a write batch that did not read (backend/known.py)
    started from a stale state -- the sql.META_LOCKED values are not the ``?``s given,
    or one of the ``absent`` keys given after them exists -- and otherwise returns NULL.
    For a dialect without a function to do it (PostgreSQL's k8s_sql_finish_batch):
    MySQL has no way to raise an error from plain SQL, so the guard makes one, a scalar
    subquery that yields two rows when the state is stale ("Subquery returns more than
    1 row", 1242; ER_SUBQUERY_NO_1_ROW), which stops the rest of a multi-statement
    pipeline -- the writes and the COMMIT after it -- on MySQL and MariaDB alike. Run
    after the revision lock, so it reads the newest commit."""
    meta = " OR ".join(f"COALESCE(MAX(CASE WHEN name = '{n}' THEN value END), 0) <> ?" for n in META_LOCKED)
    stale = f"(SELECT {meta} FROM meta WHERE name IN ({', '.join(map(repr, META_LOCKED))}))"
    if absent:
        stale += f" OR EXISTS (SELECT 1 FROM kv WHERE {d.key} IN ({marks(absent)}))"
    return f"SELECT (SELECT n FROM (SELECT 1 AS n UNION ALL SELECT 2) AS twice WHERE {stale}) AS stale"


SQLITE = Dialect(name="sqlite", empty_blob="x''", for_update="")
POSTGRES = Dialect(
    name="postgres", empty_blob="''::bytea", finish_batch=_PG_FINISH_BATCH, read_for_write=_PG_READ_FOR_WRITE
)
# InnoDB would count through the clustered primary key, reading every value; the
# keys-only index (schema version 3) is a twentieth of the size.
MYSQL = Dialect(
    name="mysql",
    empty_blob="x''",
    key="`key`",  # MySQL reserves KEY as a word
    count_from="kv FORCE INDEX (kv_keys)",
    upsert_kv_sql="INSERT INTO kv ({kv}) VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE "
    "create_rev = VALUES(create_rev), mod_rev = VALUES(mod_rev), version = VALUES(version), "
    "lease = VALUES(lease), value = VALUES(value)",
    upsert_lease="INSERT INTO lease (id, ttl, expires_at) VALUES (?, ?, ?) "
    "ON DUPLICATE KEY UPDATE ttl = VALUES(ttl), expires_at = VALUES(expires_at)",
    # (not INSERT IGNORE, which would also hide other errors, as warnings)
    insert_meta_absent="INSERT INTO meta (name, value) VALUES (?, ?) ON DUPLICATE KEY UPDATE name = name",
    pipelines=True,
)


def marks(n: int) -> str:
    return ", ".join("?" * n)


def numbered(sql: str) -> str:
    """``?`` placeholders to PostgreSQL's ``$1, $2, …``."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def range_where(kr: KeyRange, column: str = "key") -> tuple[str, list[Any]]:
    """Condition and parameters selecting the keys of ``kr``."""
    if kr.end is None:
        return f"{column} = ?", [kr.key]
    if kr.end == b"":
        return f"{column} >= ?", [kr.key]
    return f"{column} >= ? AND {column} < ?", [kr.key, kr.end]


def head_queries(d: Dialect, kr: KeyRange, limit: int, keys_only: bool) -> tuple[str, str, list[Any]]:
    """(count SQL, rows SQL, params) for the current state of a range."""
    k = d.key
    where, params = range_where(kr, k)
    value = d.empty_blob if keys_only else "value"
    rows = f"SELECT {k}, create_rev, mod_rev, version, lease, {value} FROM kv WHERE {where} ORDER BY {k}"
    if limit > 0:
        rows += f" LIMIT {int(limit)}"
    return f"SELECT COUNT(*) FROM {d.count_from} WHERE {where}", rows, params


def point_query(d: Dialect, keys_only: bool) -> str:
    """One key's current row (NULLs when absent) and the store's revision and compaction
    point, in one statement -- so in one snapshot with no transaction around it: the
    subquery yields exactly one row, which the key's row is joined to. One round trip
    where BEGIN, two SELECTs and COMMIT took four."""
    k = d.key
    value = d.empty_blob if keys_only else "kv.value"
    return (
        f"SELECT m.rev, m.compact, kv.{k}, kv.create_rev, kv.mod_rev, kv.version, kv.lease, {value} "
        "FROM (SELECT MAX(CASE WHEN name = 'revision' THEN value END) AS rev, "
        "MAX(CASE WHEN name = 'compact_revision' THEN value END) AS compact "
        "FROM meta WHERE name IN ('revision', 'compact_revision')) AS m "
        f"LEFT JOIN kv ON kv.{k} = ?"
    )


def historical_queries(d: Dialect, kr: KeyRange, rev: int, limit: int, keys_only: bool) -> tuple[str, str, list[Any]]:
    """(count SQL, rows SQL, params) for a range as of an older revision ``rev``.

    The state at ``rev`` is the ``kv`` rows unchanged since ``rev`` plus, for every key
    changed after it, the ``prev_*`` state recorded in its first log row after ``rev``
    (when the key existed then).
    """
    k = d.key
    where, params = range_where(kr, k)
    value = d.empty_blob if keys_only else "value"
    prev_value = d.empty_blob if keys_only else "prev_value"
    union = f"""
        SELECT {k}, create_rev, mod_rev, version, lease, {value} AS value FROM kv
         WHERE {where} AND mod_rev <= ?
        UNION ALL
        SELECT {k}, prev_create_rev, prev_mod_rev, prev_version, prev_lease, {prev_value} FROM (
            SELECT {k}, prev_create_rev, prev_mod_rev, prev_version, prev_lease, prev_value,
                   ROW_NUMBER() OVER (PARTITION BY {k} ORDER BY rev) AS n
              FROM log WHERE {where} AND rev > ?) AS first_change
         WHERE n = 1 AND prev_mod_rev IS NOT NULL
    """
    rows = f"SELECT * FROM ({union}) AS state ORDER BY {k}"
    if limit > 0:
        rows += f" LIMIT {int(limit)}"
    return f"SELECT COUNT(*) FROM ({union}) AS state", rows, [*params, rev, *params, rev]


def changes_where(
    start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, key: str
) -> tuple[str, list[Any]] | None:
    """(WHERE clause, params) for log rows in ``[start_rev, end_rev]`` touching ``ranges``;
    None when the ranges select nothing."""
    where = "rev >= ? AND rev <= ?"
    params: list[Any] = [start_rev, end_rev]
    if ranges is not None:
        parts = [range_where(kr, key) for kr in ranges if not kr.is_empty]
        if not parts:
            return None
        where += " AND (" + " OR ".join(f"({p[0]})" for p in parts) + ")"
        params += [x for p in parts for x in p[1]]
    return where, params


def to_row(r: Sequence[Any]) -> Row:
    """A ``kv`` row (in KV_COLUMNS order); drivers may hand back bytes-like values."""
    return Row(bytes(r[0]), r[1], r[2], r[3], r[4], bytes(r[5]))


def log_row(r: Sequence[Any]) -> LogRow:
    """A ``log`` row (in LOG_COLUMNS order) as a LogRow."""
    rev, sub, key, kind = r[0], r[1], bytes(r[2]), r[3]
    row = Row(key, 0, rev, 0, 0, b"") if kind == DELETE else Row(key, r[4], rev, r[5], r[6], bytes(r[7]))
    prev = None if r[9] is None else Row(key, r[8], r[9], r[10], r[11], bytes(r[12]))
    return LogRow(rev, sub, kind, row, prev)


def log_params(change: LogRow) -> tuple[Any, ...]:
    """The LOG_COLUMNS values of a change."""
    row, prev = change.row, change.prev
    new: tuple[Any, ...] = (
        (None, None, None, None) if change.kind == DELETE else (row.create_rev, row.version, row.lease, row.value)
    )
    old: tuple[Any, ...] = (
        (None, None, None, None, None)
        if prev is None
        else (prev.create_rev, prev.mod_rev, prev.version, prev.lease, prev.value)
    )
    return (change.rev, change.sub, row.key, change.kind, *new, *old)
