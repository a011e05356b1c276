"""A write transaction that talks to the database once per batch, not once per request.

A batch of Kubernetes-shaped txns (compare one key's mod revision, put it) would
cost a network database about five round trips per request: a savepoint, two
reads, a write and a release, all while the batch holds the revision lock. This
class cuts that to a handful per *batch*:

- the keys and leases the queued requests name are read up front in one query
  each (:meth:`prefetch`), and every single-key read is then answered from memory;
- ``kv`` changes are buffered and written at commit (or before a read that the
  cache cannot answer) in one statement per kind;
- there are no savepoints on the common path: the store marks each request's start
  with :meth:`begin_request`, and a request that fails *after* it changed something
  makes the store roll the whole transaction back and replay the batch in the
  savepoint mode (:attr:`savepoints`), where each request gets a real savepoint.
  Requests fail before changing anything in every case etcd itself does not panic
  on, so the replay is a rare path.

Subclasses provide the statements (the ``_db_*`` methods); a subclass for a
database where a statement costs microseconds (SQLite) runs them inline.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any

from k8s_sql.backend import sql
from k8s_sql.backend.base import KeyRange, LeaseRow, LogRow, Row, WriteTx

_MISSING = object()


class BufferedWriteTx(WriteTx):
    def __init__(self, revision: int, compact_revision: int) -> None:
        self.revision = revision
        self._stored_revision = revision  # the revision in meta when the transaction began
        self.compact_revision = compact_revision
        self.savepoints = False  # set by the store when replaying a batch
        self.dirty = False  # changed something since begin_request()
        self.nospace = False  # set by the backend from meta's alarm row
        self._rows: dict[bytes, Row | None] = {}  # known state of keys (None: absent)
        self._leases: dict[int, LeaseRow | None] = {}
        self._pending_kv: dict[bytes, Row | None] = {}  # to write (None: delete)
        self._pending_log: list[tuple[Any, ...]] = []

    # -- what a dialect provides --------------------------------------------------

    @abc.abstractmethod
    async def _db_rows(self, keys: Sequence[bytes]) -> list[Row]: ...

    @abc.abstractmethod
    async def _db_leases(self, ids: Sequence[int]) -> list[LeaseRow]: ...

    @abc.abstractmethod
    async def _db_range(self, kr: KeyRange, limit: int) -> list[Row]: ...

    @abc.abstractmethod
    async def _db_count(self, kr: KeyRange) -> int: ...

    @abc.abstractmethod
    async def _db_range_at(self, kr: KeyRange, rev: int, limit: int) -> tuple[list[Row], int]: ...

    @abc.abstractmethod
    async def _db_upsert_rows(self, rows: Sequence[Row]) -> None: ...

    @abc.abstractmethod
    async def _db_delete_rows(self, keys: Sequence[bytes]) -> None: ...

    @abc.abstractmethod
    async def _db_insert_log(self, rows: Sequence[tuple[Any, ...]]) -> None: ...

    @abc.abstractmethod
    async def _db_lease_put(self, lease: LeaseRow) -> None: ...

    @abc.abstractmethod
    async def _db_lease_delete(self, lease_id: int) -> None: ...

    @abc.abstractmethod
    async def _db_lease_keys(self, lease_id: int) -> list[bytes]: ...

    @abc.abstractmethod
    async def _db_set_meta(self, name: str, value: int) -> None: ...

    @abc.abstractmethod
    async def _db_execute(self, statement: str) -> None:
        """Run a parameterless statement (savepoints)."""

    # -- batch and request boundaries ------------------------------------------------

    async def prefetch(self, keys: Iterable[bytes], lease_ids: Iterable[int]) -> None:
        """Read these keys and leases in one query each, so the requests of the batch
        find them in memory."""
        want = [k for k in dict.fromkeys(keys) if k not in self._rows]
        if want:
            found = {r.key: r for r in await self._db_rows(want)}
            for k in want:
                self._rows[k] = found.get(k)
        ids = [i for i in dict.fromkeys(lease_ids) if i not in self._leases]
        if ids:
            found_leases = {lease.id: lease for lease in await self._db_leases(ids)}
            for i in ids:
                self._leases[i] = found_leases.get(i)

    def begin_request(self) -> None:
        self.dirty = False

    async def savepoint(self) -> None:
        await self.flush()  # so that a rollback only has to forget this request's buffer
        await self._db_execute("SAVEPOINT request")
        self.dirty = False

    async def release_savepoint(self) -> None:
        await self._db_execute("RELEASE SAVEPOINT request")

    async def rollback_to_savepoint(self) -> None:
        self._pending_kv.clear()
        self._pending_log.clear()
        self._rows.clear()  # may hold this request's changes: read again from the database
        self._leases.clear()
        await self._db_execute("ROLLBACK TO SAVEPOINT request")
        await self._db_execute("RELEASE SAVEPOINT request")

    async def flush(self) -> None:
        """Write the buffered changes (before a read the cache cannot answer, and at commit)."""
        if self._pending_kv:
            puts = [r for r in self._pending_kv.values() if r is not None]
            deletes = [k for k, r in self._pending_kv.items() if r is None]
            self._pending_kv.clear()
            if deletes:
                await self._db_delete_rows(deletes)
            if puts:
                await self._db_upsert_rows(puts)
        if self._pending_log:
            rows, self._pending_log = self._pending_log, []
            await self._db_insert_log(rows)

    async def finish(self) -> None:
        """Everything the commit needs: the buffered changes and the new revision."""
        await self.flush()
        if self.revision != self._stored_revision:  # a batch of failed compares changes nothing
            await self._db_set_meta("revision", self.revision)

    # -- WriteTx -------------------------------------------------------------------------

    async def get(self, key: bytes) -> Row | None:
        row = self._rows.get(key, _MISSING)
        if row is _MISSING:
            found = await self._db_rows([key])
            row = self._rows[key] = found[0] if found else None
        return row  # type: ignore[return-value]

    async def range(self, kr: KeyRange, limit: int = 0) -> list[Row]:
        if kr.end is None:
            row = await self.get(kr.key)
            return [] if row is None else [row]
        await self.flush()
        return await self._db_range(kr, limit)

    async def count(self, kr: KeyRange) -> int:
        if kr.end is None:
            return 0 if await self.get(kr.key) is None else 1
        await self.flush()
        return await self._db_count(kr)

    async def range_at(self, kr: KeyRange, rev: int, limit: int = 0) -> tuple[list[Row], int]:
        await self.flush()  # the historical query reads this transaction's log rows too
        return await self._db_range_at(kr, rev, limit)

    async def put(self, row: Row) -> None:
        self.dirty = True
        self._rows[row.key] = self._pending_kv[row.key] = row

    async def delete(self, key: bytes) -> None:
        self.dirty = True
        self._rows[key] = self._pending_kv[key] = None

    def log(self, change: LogRow) -> None:
        self.dirty = True
        self._pending_log.append(sql.log_params(change))

    async def lease_get(self, lease_id: int) -> LeaseRow | None:
        lease = self._leases.get(lease_id, _MISSING)
        if lease is _MISSING:
            found = await self._db_leases([lease_id])
            lease = self._leases[lease_id] = found[0] if found else None
        return lease  # type: ignore[return-value]

    async def lease_put(self, lease: LeaseRow) -> None:
        self.dirty = True
        await self._db_lease_put(lease)
        self._leases[lease.id] = lease

    async def lease_delete(self, lease_id: int) -> None:
        self.dirty = True
        await self._db_lease_delete(lease_id)
        self._leases[lease_id] = None

    async def lease_keys(self, lease_id: int) -> list[bytes]:
        await self.flush()
        return await self._db_lease_keys(lease_id)

    async def set_compact_revision(self, rev: int) -> None:
        self.dirty = True
        await self._db_set_meta("compact_revision", rev)
        self.compact_revision = rev
