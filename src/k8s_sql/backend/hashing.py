"""HashKV's hash: a CRC-32 over the retained history and the state at a revision.

It cannot equal etcd's (which hashes bbolt's internal keys); it is the same for the
same history on every backend and changes whenever the data does.
"""

from __future__ import annotations

import zlib

from k8s_sql.backend.base import LogRow, Row


class StateHash:
    def __init__(self) -> None:
        self.value = 0

    def _add(self, *fields: object) -> None:
        for f in fields:
            data = f if isinstance(f, bytes) else str(f).encode()
            self.value = zlib.crc32(len(data).to_bytes(4, "big") + data, self.value)

    def add_change(self, ch: LogRow) -> None:
        self._add(ch.rev, ch.sub, ch.kind, *ch.row)
        if ch.prev is not None:
            self._add(*ch.prev)

    def add_row(self, row: Row) -> None:
        self._add(*row)
