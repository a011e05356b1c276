"""The protobuf wire format by hand: enough to take a valid encoding apart into its
top-level fields and put it back together changed in ways an encoder never would.

A parse is lenient on purpose (it stops at the first thing it cannot read and keeps
the rest as an opaque tail), so a mutation can be applied to any byte string,
including one that an earlier mutation already broke.
"""

from __future__ import annotations

from dataclasses import dataclass

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
MAX_FIELD = (1 << 29) - 1


def varint(n: int) -> bytes:
    """Encode ``n`` as a varint; negative numbers as protobuf does (two's complement,
    10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def overlong_varint(n: int, length: int) -> bytes:
    """``n`` padded with continuation bytes to ``length`` bytes: a decoder must refuse
    more than 10, and a 10-byte varint whose last byte carries more than 1 bit
    overflows 64 bits."""
    raw = bytearray(varint(n))
    while len(raw) < length:
        raw[-1] |= 0x80
        raw.append(0)
    return bytes(raw)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); raises ValueError past the end or beyond 10 bytes."""
    result = shift = 0
    for i in range(10):
        if pos + i >= len(data):
            raise ValueError("truncated varint")
        b = data[pos + i]
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos + i + 1
    raise ValueError("varint over 10 bytes")


@dataclass
class Field:
    """One top-level field as it appeared on the wire: ``payload`` is the raw bytes
    after the tag (a varint's bytes, a length-delimited field's content without its
    length, a fixed field's bytes)."""

    number: int
    wire_type: int
    payload: bytes

    def encode(self) -> bytes:
        head = tag(self.number, self.wire_type)
        if self.wire_type == LEN:
            return head + varint(len(self.payload)) + self.payload
        return head + self.payload


def parse(data: bytes) -> tuple[list[Field], bytes]:
    """The top-level fields of ``data`` and whatever trailing bytes could not be read
    as a field (empty for a valid message)."""
    fields: list[Field] = []
    pos = 0
    while pos < len(data):
        start = pos
        try:
            key, pos = read_varint(data, pos)
            number, wt = key >> 3, key & 7
            if wt == VARINT:
                _, end = read_varint(data, pos)
            elif wt == I64:
                end = pos + 8
            elif wt == I32:
                end = pos + 4
            elif wt == LEN:
                n, pos = read_varint(data, pos)
                end = pos + n
            else:
                raise ValueError("group or invalid wire type")
            if end > len(data):
                raise ValueError("truncated field")
        except ValueError:
            return fields, data[start:]
        fields.append(Field(number, wt, data[pos:end]))
        pos = end
    return fields, b""


def join(fields: list[Field], tail: bytes = b"") -> bytes:
    return b"".join(f.encode() for f in fields) + tail


def nested_groups(depth: int, field: int = 15) -> bytes:
    """An unknown field holding ``depth`` nested groups: decoders that recurse per
    group need a depth limit (gRPC-Go's protobuf has one at 10,000, upb at 100)."""
    return tag(field, SGROUP) * depth + tag(field, EGROUP) * depth


def nested_lengths(depth: int, field: int = 15) -> bytes:
    """An unknown length-delimited field nested ``depth`` times: skipped, not parsed,
    by a decoder that does not know the field."""
    inner = b""
    for _ in range(depth):
        inner = tag(field, LEN) + varint(len(inner)) + inner
    return inner
