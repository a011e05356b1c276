"""Generic SQL shared by every dialect: the queries are the same, only placeholders,
types and a few literals differ.

Statements are written with ``?`` placeholders; a dialect whose driver wants
``$1, $2, …`` passes them through :func:`numbered`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from k8s_sql.backend.base import DELETE, KeyRange, LogRow, Row

KV_COLUMNS = "key, create_rev, mod_rev, version, lease, value"
LOG_COLUMNS = (
    "rev, sub, key, kind, create_rev, version, lease, value, "
    "prev_create_rev, prev_mod_rev, prev_version, prev_lease, prev_value"
)
# MySQL reserves KEY as a word: its dialect writes the column as `key`.

Params = list[Any]


@dataclass(frozen=True)
class Dialect:
    empty_blob: str  # an empty byte string literal
    key: str = "key"  # the key column, quoted if the dialect needs it
    count_from: str = "kv"  # the table expression counts read (an index hint, where needed)

    @property
    def kv_columns(self) -> str:
        return KV_COLUMNS.replace("key", self.key, 1)

    @property
    def log_columns(self) -> str:
        return LOG_COLUMNS.replace("key", self.key, 1)


SQLITE = Dialect(empty_blob="x''")
POSTGRES = Dialect(empty_blob="''::bytea")
# InnoDB would count through the clustered primary key, reading every value; the
# keys-only index (schema version 3) is a twentieth of the size.
MYSQL = Dialect(empty_blob="x''", key="`key`", count_from="kv FORCE INDEX (kv_keys)")


def numbered(sql: str) -> str:
    """``?`` placeholders to PostgreSQL's ``$1, $2, …``."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def range_where(kr: KeyRange, column: str = "key") -> tuple[str, Params]:
    """Condition and parameters selecting the keys of ``kr``."""
    if kr.end is None:
        return f"{column} = ?", [kr.key]
    if kr.end == b"":
        return f"{column} >= ?", [kr.key]
    return f"{column} >= ? AND {column} < ?", [kr.key, kr.end]


def head_queries(d: Dialect, kr: KeyRange, limit: int, keys_only: bool) -> tuple[str, str, Params]:
    """(count SQL, rows SQL, params) for the current state of a range."""
    k = d.key
    where, params = range_where(kr, k)
    value = d.empty_blob if keys_only else "value"
    rows = f"SELECT {k}, create_rev, mod_rev, version, lease, {value} FROM kv WHERE {where} ORDER BY {k}"
    if limit > 0:
        rows += f" LIMIT {int(limit)}"
    return f"SELECT COUNT(*) FROM {d.count_from} WHERE {where}", rows, params


def historical_queries(d: Dialect, kr: KeyRange, rev: int, limit: int, keys_only: bool) -> tuple[str, str, Params]:
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


def changes_query(
    d: Dialect, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None
) -> tuple[str, Params] | None:
    """(WHERE clause, params) for log rows in ``[start_rev, end_rev]`` touching ``ranges``;
    None when the ranges select nothing."""
    where = "rev >= ? AND rev <= ?"
    params: Params = [start_rev, end_rev]
    if ranges is not None:
        parts = [range_where(kr, d.key) for kr in ranges if not kr.is_empty]
        if not parts:
            return None
        where += " AND (" + " OR ".join(f"({p[0]})" for p in parts) + ")"
        params += [x for p in parts for x in p[1]]
    return where, params


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
