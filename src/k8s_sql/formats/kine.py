"""Reading kine's table (k3s, k0s, Kamaji) straight from its database, history included.

kine (github.com/k3s-io/kine, v0.17) keeps one table, ``kine``: a row per revision,
``id`` being the revision, with ``name`` (the key), ``created`` and ``deleted``
flags, ``create_revision`` (0 on the row that creates the key: kine reports the row's
own id then), ``prev_revision`` (the key's previous row), ``lease``, ``value`` and
``old_value`` (the previous value). Two kinds of rows are kine's bookkeeping, not
keys: ``compact_rev_key``, whose ``prev_revision`` is the compaction revision, and
``gap-<id>`` rows that fill revisions a failed insert left unused. Compaction deletes
superseded rows at or below the compaction revision.

:func:`changes` replays the rows in revision order into k8s-sql's terms: each key's
state after each revision and, after the compaction point, the change with the state
before it. kine keeps no version: a key's version is counted here from its creation
(1 for the row that creates it, plus one per update), and where compaction removed the
rows before an update it continues from what is left -- kube-apiserver never reads
versions. kine's lease id is the TTL in seconds (its LeaseGrant answers so); each lease
in use becomes a lease with that TTL, starting at the migration. kube-apiserver's own
``compact_rev_key`` (which kine keeps as ``compact_rev_key_apiserver``, its version
written into the value) becomes the ``compact_rev_key`` etcd would hold, version
included: the apiservers' compactor compares that version.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from k8s_sql.backend.base import DELETE, PUT, LogRow, Row

COLUMNS = "id, name, created, deleted, create_revision, prev_revision, lease, value, old_value"
PAGE = 5000
COMPACT_KEY = "compact_rev_key"
# kube-apiserver's own compact_rev_key (its compactor's lock), which kine stores under
# this name with the key's version written before the value ("<version>|<value>").
APISERVER_COMPACT_KEY = "compact_rev_key_apiserver"
SCHEMES = ("kine+sqlite", "kine+postgres", "kine+postgresql", "kine+mysql")


class KineError(Exception):
    """Not kine's table, or not one this reader understands (one line)."""


@dataclass
class KineRow:
    id: int
    name: str
    created: bool
    deleted: bool
    create_revision: int
    prev_revision: int
    lease: int
    value: bytes
    old_value: bytes

    @classmethod
    def of(cls, r: Sequence[Any]) -> KineRow:
        name = r[1] if isinstance(r[1], str) else bytes(r[1]).decode()
        return cls(
            int(r[0]),
            name,
            bool(r[2]),
            bool(r[3]),
            int(r[4] or 0),
            int(r[5] or 0),
            int(r[6] or 0),
            bytes(r[7] or b""),
            bytes(r[8] or b""),
        )


def is_kine(source: str) -> bool:
    return urlparse(source).scheme in SCHEMES


class Replay:
    """kine's rows, fed in id order a page at a time, as k8s-sql's changes: each row's
    change (with the state before it) and each key's final state; the compaction
    revision (``compact_rev_key``) and the newest revision as seen."""

    def __init__(self) -> None:
        self.state: dict[bytes, Row | None] = {}
        self.compact = 0
        self.revision = 0

    def feed(self, rows: list[KineRow]) -> Iterator[LogRow]:
        for r in rows:
            self.revision = max(self.revision, r.id)
            if r.name == COMPACT_KEY:
                self.compact = max(self.compact, r.prev_revision)
                continue
            if r.name.startswith("gap-"):
                continue
            yield from changes_of(r, self.state)


def decode_version(value: bytes) -> tuple[int, bytes]:
    """kine's DecodeVersion: ``b"3|v"`` -> (3, b"v"); a bare number (older kine) -> (n, b"0")."""
    version, sep, rest = value.partition(b"|")
    try:
        n = int(version)
    except ValueError:
        n = 0
    return (n, rest) if sep else (n, b"0")


def changes_of(r: KineRow, state: dict[bytes, Row | None]) -> Iterator[LogRow]:
    """One kine row's change, updating ``state``."""
    if r.name == APISERVER_COMPACT_KEY:  # the apiserver's key, as etcd would hold it
        version, value = decode_version(r.value)
        key = COMPACT_KEY.encode()
        prev = state.get(key)
        if r.deleted:
            state[key] = None
            yield LogRow(r.id, 0, DELETE, Row(key, 0, r.id, 0, 0, b""), prev)
            return
        create = prev.create_rev if prev is not None else r.id
        row = state[key] = Row(key, create, r.id, version, r.lease, value)
        yield LogRow(r.id, 0, PUT, row, prev)
        return
    key = r.name.encode()
    prev = state.get(key)
    if prev is None and not r.created and r.prev_revision:
        # Its earlier rows were compacted away: the row itself says what was before.
        prev = Row(key, r.create_revision or r.prev_revision, r.prev_revision, 1, r.lease, r.old_value)
    if r.deleted:
        state[key] = None
        yield LogRow(r.id, 0, DELETE, Row(key, 0, r.id, 0, 0, b""), prev)
        return
    create = r.id if r.created or not r.create_revision else r.create_revision
    version = 1 if r.created or prev is None else prev.version + 1
    row = state[key] = Row(key, create, r.id, version, r.lease, r.value)
    yield LogRow(r.id, 0, PUT, row, prev)


async def convert(source: str, path: str, now: float) -> tuple[int, int]:
    """A k8s-sql store at ``path`` from kine's table: ``(revision, compaction revision)``.
    Every row becomes a change; those at or below the compaction point are then
    dropped, as k8s-sql's own compaction would."""
    from k8s_sql.backend import migrations, sql
    from k8s_sql.backend.snapshot import _create

    out = _create(path)
    try:
        replay = Replay()
        insert = f"INSERT INTO log ({sql.LOG_COLUMNS}) VALUES ({sql.marks(13)})"
        async for page in read_rows(source):
            out.executemany(insert, [sql.log_params(ch) for ch in replay.feed(page)])
        if not replay.revision:
            raise KineError("the kine table is empty or missing")
        out.execute("DELETE FROM log WHERE rev <= ?", (replay.compact,))
        final = [tuple(r) for r in replay.state.values() if r is not None]
        out.executemany(f"INSERT INTO kv ({sql.KV_COLUMNS}) VALUES ({sql.marks(6)})", final)
        for lease in sorted({r.lease for r in replay.state.values() if r is not None and r.lease}):
            out.execute("INSERT INTO lease (id, ttl, expires_at) VALUES (?, ?, ?)", (lease, lease, now + lease))
        for name, value in (
            ("revision", replay.revision),
            ("compact_revision", replay.compact),
            ("schema_version", migrations.SCHEMA_VERSION),
        ):
            out.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
        out.commit()
        return replay.revision, replay.compact
    finally:
        out.close()


async def read_rows(source: str) -> AsyncIterator[list[KineRow]]:
    """kine's rows in id order, a page at a time, from ``kine+sqlite:///path``,
    ``kine+postgres://…`` or ``kine+mysql://…``."""
    rest = source.split("+", 1)[1]
    query = f"SELECT {COLUMNS} FROM kine WHERE id > {{mark}} ORDER BY id LIMIT {PAGE}"
    if rest.startswith("sqlite:"):
        import sqlite3

        path = urlparse(rest).path
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise KineError(f"cannot open {path}: {e}") from None
        try:
            after = 0
            while True:
                try:
                    page = [KineRow.of(r) for r in conn.execute(query.format(mark="?"), (after,))]
                except sqlite3.Error as e:
                    raise KineError(f"{path} has no kine table this reader understands: {e}") from None
                if not page:
                    return
                yield page
                after = page[-1].id
        finally:
            conn.close()
    elif rest.startswith(("postgres:", "postgresql:")):
        import asyncpg

        try:
            pg = await asyncpg.connect(rest)
        except (OSError, asyncpg.PostgresError) as e:
            raise KineError(f"cannot connect: {' '.join(str(e).split())}") from None
        try:
            after = 0
            while True:
                try:
                    records = await pg.fetch(query.format(mark="$1"), after)
                except asyncpg.PostgresError as e:
                    raise KineError(f"no kine table this reader understands: {e}") from None
                page = [KineRow.of(tuple(r)) for r in records]
                if not page:
                    return
                yield page
                after = page[-1].id
        finally:
            await pg.close()
    else:
        import asyncmy

        from k8s_sql.backend.mysql import parse_dsn

        try:
            my = await asyncmy.connect(**parse_dsn(rest))
        except Exception as e:
            raise KineError(f"cannot connect: {' '.join(str(e).split())}") from None
        try:
            after = 0
            while True:
                async with my.cursor() as cur:
                    try:
                        await cur.execute(query.format(mark="%s"), (after,))
                    except Exception as e:
                        raise KineError(f"no kine table this reader understands: {e}") from None
                    page = [KineRow.of(r) for r in await cur.fetchall()]
                if not page:
                    return
                yield page
                after = page[-1].id
        finally:
            my.close()
