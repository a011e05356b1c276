"""The rows a frontend knows without reading them: the state its own commits left.

With one frontend writing -- the usual deployment -- every write batch starts from the
state the previous one committed. A PostgreSQL batch of single-key requests whose keys
are all known here, or never seen (assumed absent), skips its read and is one round
trip: the checked write of migration 5, told the ``meta`` values it assumes and the keys
it assumes absent. The function takes the revision lock and refuses (NeedsLock) unless
the revision is still the one these rows are as of -- every change to ``kv`` moves it,
so nothing else changed them -- and the assumed-absent keys are absent. A refused batch
runs again with a read.

Several frontends writing at once (the many-control-planes layout) start most batches
from a revision another frontend has since moved: each such batch is refused and runs
again, so it costs a round trip more than reading would have. After a refusal the next
batches therefore do not start from known rows -- 1, then 2, 4, ... up to
:data:`MAX_SKIP` batches after each refusal in a row -- and the first that does and
commits ends the backoff. One frontend alone is never refused, and never skips.

Invariant: ``rows`` hold the state of their keys at ``revision`` (an absent key: None;
a key that exists but was too big to keep: :data:`UNKEPT`). It holds while each batch
starts from ``revision``; a batch that started anywhere else (another frontend wrote
in between) replaces everything with what that batch itself read and wrote, and any
failure forgets everything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Final

from k8s_sql.backend.base import Row
from k8s_sql.backend.plans import WriteStart

# Bounds the memory a frontend keeps for this: Kubernetes objects are up to 1.5 MB, and
# a Kubernetes write set mostly touches keys written a moment before (W1: the create,
# then its updates). 8 MiB hold about 5,500 1 KiB objects, overhead included.
MAX_BYTES: Final = 8 << 20
MAX_ROW_BYTES: Final = 256 << 10  # a bigger row is remembered as UNKEPT: read, not assumed
# Batches that read instead after refusals in a row: with two frontends interleaving
# every commit, at most one batch in 64 pays for a refused attempt.
MAX_SKIP: Final = 64
# Bytes per entry besides the key's and the value's payload: the Row tuple, its ints,
# the two bytes objects' headers, the OrderedDict's slot and links. Measured with
# tracemalloc: 300 on 20,000 entries inserted at once, 429 on a full table churned by
# eviction (tests/unit/test_known_rows.py holds the bound to what Python allocates).
ROW_OVERHEAD: Final = 440


class _Unkept:
    def __repr__(self) -> str:
        return "UNKEPT"


UNKEPT: Final = _Unkept()


class KnownRows:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.revision = -1  # the revision ``rows`` are as of; -1: nothing known
        self.meta: tuple[int, ...] = ()  # sql.META_LOCKED's values at ``revision``
        self._rows: OrderedDict[bytes, Row | _Unkept | None] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._skip = 0  # batches still to start without known rows (the backoff above)
        self._backoff = 0  # the skip after the last refusal; 0: the last attempt committed

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def size(self) -> int:
        """Bytes kept, as counted against ``max_bytes``."""
        return self._bytes

    def start(self, keys: Sequence[bytes], newest: int) -> tuple[WriteStart, list[bytes]] | None:
        """The state a batch naming ``keys`` starts from, and the keys it assumes absent,
        if the rows known are as of ``newest`` (the newest revision the frontend has seen),
        no alarm was raised then, and no key is UNKEPT; else None."""
        if self._skip:
            self._skip -= 1
            return None
        if newest != self.revision or len(self.meta) < 4 or self.meta[2] or self.meta[3]:
            return None
        rows: dict[bytes, Row] = {}
        absent: list[bytes] = []
        for k in keys:
            if k not in self._rows:
                absent.append(k)
                continue
            row = self._rows[k]
            if isinstance(row, _Unkept):
                return None
            self._rows.move_to_end(k)
            if row is not None:
                rows[k] = row
        return WriteStart(self.revision, self.meta[1], False, False, rows, {}, self.meta), absent

    def committed(self, started: int, meta: tuple[int, ...], rows: Mapping[bytes, Row | None]) -> None:
        """A batch that started at revision ``started`` committed (or wrote nothing):
        ``rows`` is the state it leaves of the keys it read or wrote, ``meta`` the
        META_LOCKED values after it."""
        if started != self.revision:
            self.forget()
        for k, row in rows.items():
            self._keep(k, row)
        self.revision, self.meta = meta[0], meta

    def refused(self) -> None:
        """A batch begun from these rows was refused: the database had moved on (another
        frontend wrote). Skip the next batches' attempts, twice as many as last time."""
        self._backoff = min(max(1, 2 * self._backoff), MAX_SKIP)
        self._skip = self._backoff
        self.forget()

    def accepted(self) -> None:
        """A batch begun from these rows committed: no more skipping."""
        self._backoff = 0

    def forget(self) -> None:
        self._rows.clear()
        self._bytes = 0
        self.revision, self.meta = -1, ()

    def _keep(self, key: bytes, row: Row | None) -> None:
        if key in self._rows:
            self._bytes -= _size(key, self._rows.pop(key))
        kept: Row | _Unkept | None = row
        if row is not None and len(row.value) > MAX_ROW_BYTES:
            kept = UNKEPT
        self._rows[key] = kept
        self._bytes += _size(key, kept)
        while self._bytes > self.max_bytes and self._rows:
            k, r = self._rows.popitem(last=False)
            self._bytes -= _size(k, r)


def _size(key: bytes, row: Row | _Unkept | None) -> int:
    return len(key) + ROW_OVERHEAD + (len(row.value) if isinstance(row, Row) else 0)
