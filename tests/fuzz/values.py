"""The values every field is tried with: the extremes of its type, the values etcd
gives a meaning (0, -1, the current revision), and byte strings that have broken
SQL backends before (NULs, 0xff runs, LIKE wildcards, keys past an index limit).

Key layout, which the safety rules rely on: the sentinel keys live in
``[SENTINEL_PREFIX, SENTINEL_END)``; the fuzzer reads anywhere but never writes or
deletes in that interval (``safety``). Most generated keys fall under
``FUZZ_PREFIX`` so that writes, deletes and compares meet each other's keys.
"""

from __future__ import annotations

import random

from testing.keys import prefix_end

MiB = 1024 * 1024
REQUEST_LIMIT = 1536 * 1024  # etcd's --max-request-bytes default
GRPC_LIMIT = 2 * MiB  # etcd's gRPC receive limit (request limit + 512 KiB)

SENTINEL_PREFIX = b"\x01k8s-sql-fuzz-sentinel/"
SENTINEL_END = b"\x01k8s-sql-fuzz-sentinel0"
FUZZ_PREFIX = b"fz/"

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
UINT64_MAX = (1 << 64) - 1
INT32_MAX = (1 << 31) - 1
INT32_MIN = -(1 << 31)
UINT32_MAX = (1 << 32) - 1

INT64_EXTREMES = [
    0, 1, -1, 2, -2, 3, 10, 127, 128, 255, 256, 1000,
    INT32_MAX, INT32_MAX + 1, INT32_MIN, INT32_MIN - 1, UINT32_MAX, UINT32_MAX + 1,
    1 << 53, (1 << 53) + 1, 1 << 62, INT64_MAX - 1, INT64_MAX, INT64_MIN, INT64_MIN + 1,
    9_000_000_000, 9_000_000_001,  # etcd's maximum lease TTL and one past it
]  # fmt: skip
UINT64_EXTREMES = [0, 1, 2, 1000, INT32_MAX, UINT32_MAX, UINT32_MAX + 1, INT64_MAX, INT64_MAX + 1, UINT64_MAX - 1,
                   UINT64_MAX]  # fmt: skip
INT32_EXTREMES = [0, 1, -1, 2, 3, 4, 5, 6, 100, INT32_MAX, INT32_MIN, INT32_MIN + 1]
UINT32_EXTREMES = [0, 1, 2, 100, INT32_MAX, INT32_MAX + 1, UINT32_MAX]


ODD_KEY_BYTES = [
    b"\0", b"\0\0", b"\x01", b"\x7f", b"\x80", b"\xff", b"\xff\xff", b"\xff" * 64, b"'", b'"', b"%", b"_",
    b"\\", b"a%b", b"a_b", b"';DROP TABLE kv;--", b"\xc3\x28", b"\xed\xa0\x80", "é".encode(), b" ", b"a ",
    b"\x00\xff\x00", bytes(range(256)), bytes(range(255, -1, -1)),
]  # fmt: skip


class Budget:
    """Counts of expensive inputs a run may still send (huge payloads are slow on
    every backend, Defragment and Snapshot take the write lock or copy the store).
    ``take`` answers False once a kind is used up, and the generator falls back to
    something cheap, so the run's cost is bounded whatever the RNG draws."""

    def __init__(self, total_requests: int) -> None:
        scale = max(1, total_requests // 10_000)
        self.left = {
            "huge-write": 4 * scale,  # a value or key of 1 MiB or more that may be stored
            "huge-refused": 20 * scale,  # over the request or gRPC limit: refused, but still sent
            "big": 200 * scale,  # 64 KiB values
            "defragment": 2 * scale,
            "snapshot": 2 * scale,
            "deep": 60 * scale,  # txns nested 100+ deep or 128+ ops
        }
        self.used = dict.fromkeys(self.left, 0)

    def take(self, kind: str) -> bool:
        if self.left[kind] <= 0:
            return False
        self.left[kind] -= 1
        self.used[kind] += 1
        return True


def fuzz_key(rng: random.Random) -> bytes:
    """A key under FUZZ_PREFIX from a small set, so requests collide on keys."""
    r = rng.random()
    if r < 0.7:
        return FUZZ_PREFIX + b"%d" % rng.randrange(32)
    if r < 0.9:
        return FUZZ_PREFIX + rng.choice(ODD_KEY_BYTES)
    return FUZZ_PREFIX + rng.randbytes(rng.randrange(1, 24))


def any_key(rng: random.Random, budget: Budget, *, write: bool) -> bytes:
    """A key: mostly under FUZZ_PREFIX, often an extreme. Reads may name the sentinels."""
    r = rng.random()
    if r < 0.6:
        return fuzz_key(rng)
    if r < 0.7:
        return b""
    if r < 0.85:
        return rng.choice(ODD_KEY_BYTES)
    if r < 0.9 and not write:
        return SENTINEL_PREFIX + rng.choice([b"", b"0", b"1", b"\xff"])
    if r < 0.97:
        # past MySQL's (3072) and PostgreSQL's btree (~2700) index limits, under the request limit
        n = rng.choice([1024, 2700, 2705, 3072, 3073, 8192, 65536])
        if n > 8192 and not budget.take("big"):
            n = 3073
        return FUZZ_PREFIX + rng.choice([b"k", b"\xff", b"\0"]) * n
    if budget.take("huge-write" if write else "big"):
        return FUZZ_PREFIX + b"K" * rng.choice([1_000_000, REQUEST_LIMIT - 64])
    return FUZZ_PREFIX + b"k" * 300


def range_end_for(rng: random.Random, key: bytes) -> bytes:
    """A range end chosen relative to ``key``: none, "\\0" (from key on), the prefix
    end, equal to the key (empty range), below the key, "\\xff" runs, random."""
    r = rng.random()
    if r < 0.3:
        return b""
    if r < 0.45:
        return b"\0"
    if r < 0.6:
        return prefix_end(key) if key else b"\0"
    if r < 0.65:
        return key
    if r < 0.72:
        return key[:-1] if len(key) > 1 else b"\0\0"  # below (or around) the key
    if r < 0.78:
        return key + b"\0"
    if r < 0.85:
        return b"\xff" * rng.choice([1, 2, 100])
    if r < 0.92:
        return prefix_end(FUZZ_PREFIX)
    return rng.choice(ODD_KEY_BYTES)


def value(rng: random.Random, budget: Budget) -> bytes:
    r = rng.random()
    if r < 0.35:
        return b"v%d" % rng.randrange(1000)
    if r < 0.45:
        return b""
    if r < 0.6:
        return rng.choice(ODD_KEY_BYTES)
    if r < 0.8:
        return rng.randbytes(rng.randrange(1, 2048))
    if r < 0.9 and budget.take("big"):
        return rng.randbytes(65536)
    if r < 0.97 and budget.take("huge-refused"):
        # just over the request limit, or over the gRPC limit: refused either way
        return b"x" * rng.choice([REQUEST_LIMIT + 1, REQUEST_LIMIT + 4096, GRPC_LIMIT + 1])
    if budget.take("huge-write"):
        return rng.randbytes(rng.choice([MiB, REQUEST_LIMIT - 4096]))
    return b"v"


def int64(rng: random.Random, near: int = 0) -> int:
    """An extreme, or a value around ``near`` (the current revision, a lease ID)."""
    r = rng.random()
    if r < 0.6:
        return rng.choice(INT64_EXTREMES)
    if r < 0.85 and near:
        return max(INT64_MIN, min(INT64_MAX, near + rng.randrange(-3, 4)))
    return rng.randrange(INT64_MIN, INT64_MAX + 1)


def uint64(rng: random.Random) -> int:
    return rng.choice(UINT64_EXTREMES) if rng.random() < 0.8 else rng.randrange(UINT64_MAX + 1)


STRINGS = [
    "", "\0", "a", "root-not", "user", "role", "é", "😀", "x" * 300, "http://127.0.0.1:1", "http://127.0.0.1:2380",
    "https://[::1]:2380", "unix:///tmp/x", "http://", "://", "http://127.0.0.1:99999", "3.5.0", "3.6.0", "3.4",
    "4.0.0", "v3.5", "-1", "\u202e", "a\nb",
]  # fmt: skip


def string(rng: random.Random) -> str:
    if rng.random() < 0.85:
        return rng.choice(STRINGS)
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD800)])) for _ in range(8))
