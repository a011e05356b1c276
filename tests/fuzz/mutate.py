"""Byte-level damage to valid encodings: what a buggy or hostile client can send.

Each mutator takes valid bytes and returns other bytes; some results are still valid
protobuf (a duplicated field, a known field sent with another wire type, which both
gRPC-Go's and upb's decoders keep as an unknown field; an extreme varint), most are
not. Whether a result decodes is decided afterwards by actually decoding it, not
assumed here.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from . import values as v, wire

Mutator = Callable[[bytes, random.Random], bytes]

EXTREME_VARINTS = [
    wire.varint(v.INT64_MAX),
    wire.varint(v.UINT64_MAX),
    wire.varint(1 << 63),
    wire.varint(-1),  # 10 bytes
    wire.varint(v.INT32_MAX + 1),
    wire.varint(v.UINT32_MAX),
    wire.overlong_varint(1, 10),  # 1 padded to 10 bytes: valid, non-canonical
    wire.overlong_varint(1, 11),  # 11 bytes: invalid
    b"\xff" * 9 + b"\x7f",  # 10 bytes overflowing 64 bits
    b"\x80" * 10,  # never terminates within 10 bytes
    b"\x80",  # truncated
]

LIES = [0, 1, 2, 127, 128, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, v.INT64_MAX, v.UINT64_MAX]


def bit_flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return b"\x80"
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def byte_set(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    b = bytearray(data)
    b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0x80, 0x7F, rng.randrange(256)])
    return bytes(b)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))] if data else b""


def append_junk(data: bytes, rng: random.Random) -> bytes:
    return data + rng.randbytes(rng.choice([1, 2, 3, 8, 64]))


def insert_junk(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.randbytes(rng.choice([1, 2, 5])) + data[i:]


def duplicate_field(data: bytes, rng: random.Random) -> bytes:
    """A field sent again (last scalar wins, messages merge, repeated fields grow),
    or the whole message twice, or one field many times."""
    fields, tail = wire.parse(data)
    if not fields or rng.random() < 0.2:
        return data + data
    f = rng.choice(fields)
    copies = rng.choice([1, 1, 2, 200])
    return wire.join([*fields, *([f] * copies)], tail)


def wrong_wire_type(data: bytes, rng: random.Random) -> bytes:
    """A field re-sent with another wire type: either only the tag changed (the payload
    then misparses) or a valid payload of the new type (a decoder keeps it as an
    unknown field)."""
    fields, tail = wire.parse(data)
    if not fields:
        return wire.tag(rng.randrange(1, 20), rng.randrange(8)) + data
    i = rng.randrange(len(fields))
    f = fields[i]
    new_type = rng.choice([t for t in (0, 1, 2, 3, 4, 5, 6, 7) if t != f.wire_type])
    if rng.random() < 0.5:
        payload = {
            wire.VARINT: wire.varint(rng.randrange(1 << 64)),
            wire.I64: rng.randbytes(8),
            wire.I32: rng.randbytes(4),
            wire.LEN: wire.varint(3) + b"abc",
        }.get(new_type, b"")
        raw = wire.tag(f.number, new_type) + payload
        if new_type == wire.SGROUP:
            raw += wire.tag(f.number, wire.EGROUP)
    else:
        raw = wire.tag(f.number, new_type) + f.encode()[len(wire.tag(f.number, f.wire_type)) :]
    return wire.join(fields[:i]) + raw + wire.join(fields[i + 1 :], tail)


def extreme_varint(data: bytes, rng: random.Random) -> bytes:
    """A varint field set to 2^63-1, 2^64-1, a 10-byte negative, an 11-byte or
    overflowing encoding."""
    fields, tail = wire.parse(data)
    ints = [f for f in fields if f.wire_type == wire.VARINT]
    number = rng.choice(ints).number if ints and rng.random() < 0.8 else rng.randrange(1, 16)
    raw = wire.tag(number, wire.VARINT) + rng.choice(EXTREME_VARINTS)
    return wire.join([f for f in fields if f.number != number]) + raw + tail


def lying_length(data: bytes, rng: random.Random) -> bytes:
    """A length-delimited field whose length prefix is not its length."""
    fields, tail = wire.parse(data)
    lens = [i for i, f in enumerate(fields) if f.wire_type == wire.LEN]
    if not lens:
        return wire.join(fields, tail) + wire.tag(1, wire.LEN) + wire.varint(rng.choice(LIES)) + b"xyz"
    i = rng.choice(lens)
    f = fields[i]
    r = rng.random()
    if r < 0.4:
        n = len(f.payload) + rng.choice([1, 2, 100, -1, -2])
        n = max(0, n)
    else:
        n = rng.choice(LIES)
    raw = wire.tag(f.number, wire.LEN) + wire.varint(n) + f.payload
    return wire.join(fields[:i]) + raw + wire.join(fields[i + 1 :], tail)


def bad_tag(data: bytes, rng: random.Random) -> bytes:
    """Field number 0, the largest field number and beyond, the reserved range,
    wire types 6 and 7, an end-group with no start, a start-group with no end."""
    choices = [
        wire.varint(0) + b"\x01",  # field 0
        wire.tag(wire.MAX_FIELD, wire.VARINT) + b"\x01",  # the largest legal number: an unknown field
        wire.varint(((wire.MAX_FIELD + 1) << 3) | 0) + b"\x01",  # beyond it
        wire.tag(19000, wire.VARINT) + b"\x01",  # the reserved range
        wire.tag(1, 6),
        wire.tag(2, 7) + b"\x00",
        wire.tag(9, wire.EGROUP),
        wire.tag(9, wire.SGROUP) + b"\x08\x01",
        wire.tag(9, wire.SGROUP) + wire.tag(10, wire.EGROUP),
        wire.varint(v.UINT64_MAX),  # a tag of 64 bits
    ]
    raw = rng.choice(choices)
    i = rng.choice([0, len(data)])
    return data[:i] + raw + data[i:]


def invalid_utf8(data: bytes, rng: random.Random) -> bytes:
    """A length-delimited field's content replaced by bytes that are not UTF-8: in a
    proto3 ``string`` field both gRPC-Go and upb must refuse the message."""
    fields, tail = wire.parse(data)
    lens = [i for i, f in enumerate(fields) if f.wire_type == wire.LEN]
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\xf8\x88\x80\x80\x80", b"\xc0\x80"])
    if not lens:
        return data + wire.tag(rng.randrange(1, 5), wire.LEN) + wire.varint(len(bad)) + bad
    i = rng.choice(lens)
    fields[i] = wire.Field(fields[i].number, wire.LEN, bad)
    return wire.join(fields, tail)


def deep_unknown(data: bytes, rng: random.Random) -> bytes:
    """An unknown field nested deep: groups (which decoders recurse into to skip) or
    length-delimited fields (skipped without parsing)."""
    depth = rng.choice([10, 50, 99, 100, 101, 1000, 10_000, 10_001])
    if rng.random() < 0.6:
        return data + wire.nested_groups(depth, field=rng.choice([15, 1000, wire.MAX_FIELD]))
    return data + wire.nested_lengths(min(depth, 2000))


def splice(data: bytes, rng: random.Random) -> bytes:
    """A length-delimited field's content swapped for random bytes of the same length
    (a submessage of the wrong shape) or emptied."""
    fields, tail = wire.parse(data)
    lens = [i for i, f in enumerate(fields) if f.wire_type == wire.LEN and f.payload]
    if not lens:
        return rng.randbytes(len(data) or 4)
    i = rng.choice(lens)
    payload = b"" if rng.random() < 0.2 else rng.randbytes(len(fields[i].payload))
    fields[i] = wire.Field(fields[i].number, wire.LEN, payload)
    return wire.join(fields, tail)


TOP_LEVEL: list[tuple[str, Mutator]] = [
    ("bitflip", bit_flip),
    ("byteset", byte_set),
    ("truncate", truncate),
    ("append", append_junk),
    ("insert", insert_junk),
    ("dupfield", duplicate_field),
    ("wiretype", wrong_wire_type),
    ("varint", extreme_varint),
    ("lenlie", lying_length),
    ("badtag", bad_tag),
    ("utf8", invalid_utf8),
    ("deep", deep_unknown),
    ("splice", splice),
]


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation, at the top level or (half the time, when there is one) inside a
    length-delimited field, whose length is then re-encoded to fit, so the damage
    reaches submessages past a valid outer framing.

    It takes exactly one draw from ``rng``, whatever ``data`` is: the bytes may carry
    IDs a server chose, and two servers given one seed must still get the same
    sequence of requests (``test_fuzz_answers_match_etcd``)."""
    return _mutate(data, random.Random(rng.getrandbits(64)), 0)


def _mutate(data: bytes, rng: random.Random, depth: int) -> tuple[bytes, str]:
    fields, tail = wire.parse(data)
    nested = [i for i, f in enumerate(fields) if f.wire_type == wire.LEN and f.payload]
    if nested and depth < 4 and rng.random() < 0.5:
        i = rng.choice(nested)
        inner, name = _mutate(fields[i].payload, rng, depth + 1)
        fields[i] = wire.Field(fields[i].number, wire.LEN, inner)
        return wire.join(fields, tail), f"{fields[i].number}>{name}"
    name, fn = rng.choice(TOP_LEVEL)
    return fn(data, rng), name


def garbage(rng: random.Random) -> tuple[bytes, str]:
    """Bytes that were never a message (one draw from ``rng``, as ``mutate``)."""
    rng = random.Random(rng.getrandbits(64))
    r = rng.random()
    if r < 0.3:
        return rng.randbytes(rng.choice([1, 2, 3, 7, 16, 100, 1000])), "random"
    if r < 0.5:
        return b"", "empty"
    if r < 0.7:
        return rng.choice(EXTREME_VARINTS) * rng.choice([1, 2, 50]), "varints"
    if r < 0.85:
        return wire.nested_groups(rng.choice([100, 101, 10_000])), "groups"
    return bad_tag(b"", rng), "badtag"
