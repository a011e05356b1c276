"""Reading and writing bbolt database files -- what etcd's snapshots are -- with no etcd.

bbolt (go.etcd.io/bbolt) keeps a B+tree of pages in one file. The facts this reader
relies on, from bbolt's on-disk format (version 2, little-endian):

- every page starts with a 16-byte header: ``id u64, flags u16, count u16,
  overflow u32``; a page and its ``overflow`` following pages are contiguous, at
  ``id * page_size``;
- pages 0 and 1 are meta pages (flag 0x04): ``magic u32 = 0xED0CDAED, version u32 = 2,
  page_size u32, flags u32, root bucket (root pgid u64, sequence u64), freelist pgid
  u64, high-water pgid u64, txid u64, checksum u64`` (FNV-1a 64 of the fields before
  it). The valid one with the higher txid is current;
- a branch page (0x01) holds ``count`` 16-byte elements ``pos u32, ksize u32, pgid u64``;
  a leaf page (0x02) holds ``flags u32, pos u32, ksize u32, vsize u32``; ``pos`` is
  counted from the element itself, and the value follows the key;
- a leaf element with flag 0x01 is a nested bucket: its value is a bucket header
  ``root pgid u64, sequence u64``, and when ``root`` is 0 the bucket's one leaf page
  follows the header inline.

Keys come out in bbolt's order (bytewise). Anything that contradicts the format is a
:class:`BoltError` with one line naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Self

MAGIC = 0xED0CDAED
VERSION = 2
BRANCH, LEAF, META = 0x01, 0x02, 0x04
BUCKET = 0x01  # a leaf element that is a nested bucket
PAGE_HEADER = struct.Struct("<QHHI")
META_FIELDS = struct.Struct("<IIII QQ QQQ")  # magic .. txid (what the checksum covers)
ELEMENT = struct.Struct("<IIII")  # leaf: flags, pos, ksize, vsize
BRANCH_ELEMENT = struct.Struct("<IIQ")  # pos, ksize, pgid
BUCKET_HEADER = struct.Struct("<QQ")


class BoltError(Exception):
    """Not a (complete, intact) bbolt file."""


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def is_bolt(path: str) -> bool:
    """Whether the file starts as a bbolt database does (a meta page's magic)."""
    try:
        with open(path, "rb") as f:
            head = f.read(PAGE_HEADER.size + 8)
    except OSError:
        return False
    return len(head) == PAGE_HEADER.size + 8 and struct.unpack_from("<II", head, PAGE_HEADER.size) == (MAGIC, VERSION)


class Bolt:
    """A bbolt file opened read-only (memory-mapped): ``with Bolt(path) as db``."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise BoltError(f"{path}: cannot read: {e}") from None
        self.page_size, self.root = self._meta()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._map.close()

    def _meta(self) -> tuple[int, int]:
        """``(page size, root bucket's page)`` from the newest valid meta page. Page 1
        sits one page size in: taken from page 0, or tried at the usual sizes when page 0
        is damaged (as bbolt does)."""
        first = self._meta_at(0)
        sizes = [first[1]] if first else [4096, 8192, 16384, 65536]
        candidates = [first] + [self._meta_at(size) for size in sizes]
        valid = [c for c in candidates if c is not None]
        if not valid:
            raise BoltError(f"{self.path} is not a bbolt database (no valid meta page)")
        _txid, page_size, root = max(valid)
        return page_size, root

    def _meta_at(self, offset: int) -> tuple[int, int, int] | None:
        """``(txid, page size, root)`` of the meta page at ``offset``, if it is valid."""
        if offset + PAGE_HEADER.size + META_FIELDS.size + 8 > len(self._map):
            return None
        fields = self._read(offset + PAGE_HEADER.size, META_FIELDS.size + 8)
        magic, version, size, _flags, root, _seq, _freelist, _hwm, txid = META_FIELDS.unpack_from(fields)
        (checksum,) = struct.unpack_from("<Q", fields, META_FIELDS.size)
        if magic != MAGIC or version != VERSION or fnv1a64(fields[: META_FIELDS.size]) != checksum:
            return None
        return txid, size, root

    def _read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > len(self._map):
            raise BoltError(f"{self.path} is truncated or corrupt (a page beyond its end)")
        return self._map[offset : offset + size]

    def _page(self, pgid: int) -> tuple[int, int, memoryview]:
        """``(flags, count, page bytes)`` of a page and its overflow pages."""
        head = self._read(pgid * self.page_size, PAGE_HEADER.size)
        _id, flags, count, overflow = PAGE_HEADER.unpack(head)
        data = self._read(pgid * self.page_size, (overflow + 1) * self.page_size)
        return flags, count, memoryview(data)

    def _entries(self, flags: int, count: int, page: memoryview) -> Iterator[tuple[bytes, bytes, int]]:
        """A page's ``(key, value, element flags)`` in order, descending into branches."""
        if flags & BRANCH:
            for i in range(count):
                at = PAGE_HEADER.size + i * BRANCH_ELEMENT.size
                _pos, _ksize, child = BRANCH_ELEMENT.unpack_from(page, at)
                yield from self._entries(*self._page(child))
        elif flags & LEAF:
            for i in range(count):
                at = PAGE_HEADER.size + i * ELEMENT.size
                eflags, pos, ksize, vsize = ELEMENT.unpack_from(page, at)
                start = at + pos
                if start + ksize + vsize > len(page):
                    raise BoltError(f"{self.path} is corrupt (an element beyond its page)")
                yield bytes(page[start : start + ksize]), bytes(page[start + ksize : start + ksize + vsize]), eflags
        else:
            raise BoltError(f"{self.path} is corrupt (page flags {flags:#x} where a tree page belongs)")

    def _bucket_items(self, header: bytes) -> Iterator[tuple[bytes, bytes, int]]:
        root, _seq = BUCKET_HEADER.unpack_from(header)
        if root == 0:  # inline: its one leaf page follows the header
            page = memoryview(header)[BUCKET_HEADER.size :]
            _id, flags, count, _overflow = PAGE_HEADER.unpack_from(page)
            yield from self._entries(flags, count, page)
        else:
            yield from self._entries(*self._page(root))

    def buckets(self) -> list[bytes]:
        """The names of the top-level buckets."""
        return [k for k, _, f in self._entries(*self._page(self.root)) if f & BUCKET]

    def items(self, bucket: bytes) -> Iterator[tuple[bytes, bytes]]:
        """A top-level bucket's ``(key, value)`` pairs in key order (nested buckets left out)."""
        for k, v, f in self._entries(*self._page(self.root)):
            if k == bucket and f & BUCKET:
                for key, value, flags in self._bucket_items(v):
                    if not flags & BUCKET:
                        yield key, value
                return
        raise BoltError(f"{self.path} has no {bucket.decode(errors='replace')!r} bucket")


# -- writing ---------------------------------------------------------------------------------

FREELIST = 0x10
PAGE_SIZE = 4096


class _Writer:
    """Pages appended to a file in order: page ids are handed out as nodes are written
    (children before their parents), so every page is written once."""

    def __init__(self, out: BinaryIO, page_size: int, first_pgid: int) -> None:
        self.out = out
        self.page_size = page_size
        self.next = first_pgid

    def page(self, flags: int, count: int, body: bytes) -> int:
        """Write a node (header + body) over as many pages as it needs; its page id."""
        size = PAGE_HEADER.size + len(body)
        pages = max(1, -(-size // self.page_size))
        pgid = self.next
        self.next += pages
        data = PAGE_HEADER.pack(pgid, flags, count, pages - 1) + body
        self.out.write(data + b"\0" * (pages * self.page_size - len(data)))
        return pgid


def _leaf(items: list[tuple[bytes, bytes, int]]) -> bytes:
    """A leaf node's body: elements, then each key and value."""
    elements, data = [], []
    offset = len(items) * ELEMENT.size
    for i, (key, value, flags) in enumerate(items):
        pos = offset - i * ELEMENT.size  # from the element's own address
        elements.append(ELEMENT.pack(flags, pos, len(key), len(value)))
        data.append(key + value)
        offset += len(key) + len(value)
    return b"".join(elements) + b"".join(data)


def _branch(children: list[tuple[bytes, int]]) -> bytes:
    elements, data = [], []
    offset = len(children) * BRANCH_ELEMENT.size
    for i, (key, pgid) in enumerate(children):
        elements.append(BRANCH_ELEMENT.pack(offset - i * BRANCH_ELEMENT.size, len(key), pgid))
        data.append(key)
        offset += len(key)
    return b"".join(elements) + b"".join(data)


def _tree(w: _Writer, items: Iterable[tuple[bytes, bytes, int]]) -> int:
    """Write a B+tree of sorted ``(key, value, flags)`` items; its root page id. Nodes
    are filled up to a page (a node with one large item spans overflow pages)."""
    level: list[tuple[bytes, int]] = []  # (first key, page id) of the nodes written
    node: list[tuple[bytes, bytes, int]] = []
    size = 0
    room = w.page_size - PAGE_HEADER.size
    for item in items:
        grows = ELEMENT.size + len(item[0]) + len(item[1])
        if node and size + grows > room:
            level.append((node[0][0], w.page(LEAF, len(node), _leaf(node))))
            node, size = [], 0
        node.append(item)
        size += grows
    if node or not level:
        level.append((node[0][0] if node else b"", w.page(LEAF, len(node), _leaf(node))))
    while len(level) > 1:
        upper: list[tuple[bytes, int]] = []
        group: list[tuple[bytes, int]] = []
        size = 0
        for child in level:
            grows = BRANCH_ELEMENT.size + len(child[0])
            if group and size + grows > room:
                upper.append((group[0][0], w.page(BRANCH, len(group), _branch(group))))
                group, size = [], 0
            group.append(child)
            size += grows
        upper.append((group[0][0], w.page(BRANCH, len(group), _branch(group))))
        level = upper
    return level[0][1]


def write(path: str, buckets: dict[bytes, Iterable[tuple[bytes, bytes]]], page_size: int = PAGE_SIZE) -> None:
    """Write a bbolt database holding ``buckets`` (each a sorted iterable of ``(key,
    value)``) at ``path``: two meta pages, an empty freelist, the trees."""
    with open(path, "wb") as out:
        out.write(b"\0" * (3 * page_size))  # meta 0, meta 1, freelist: written last
        w = _Writer(out, page_size, 3)
        roots = []
        for name in sorted(buckets):
            root = _tree(w, ((k, v, 0) for k, v in buckets[name]))
            roots.append((name, BUCKET_HEADER.pack(root, 0), BUCKET))
        root = _tree(w, roots)
        out.seek(0)
        for txid in (0, 1):
            fields = META_FIELDS.pack(MAGIC, VERSION, page_size, 0, root, 0, 2, w.next, txid)
            meta = PAGE_HEADER.pack(txid, META, 0, 0) + fields + struct.pack("<Q", fnv1a64(fields))
            out.write(meta + b"\0" * (page_size - len(meta)))
        out.write(PAGE_HEADER.pack(2, FREELIST, 0, 0) + b"\0" * (page_size - PAGE_HEADER.size))
        out.flush()
        os.fsync(out.fileno())
