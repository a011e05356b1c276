"""Key helpers every etcd client has, for the tests' clients."""

from __future__ import annotations


def prefix_end(prefix: bytes) -> bytes:
    """clientv3's GetPrefixRangeEnd: the first key after every key starting with
    ``prefix`` (``\\0``, the end of the keyspace, when the prefix is all ``\\xff``)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"
    p[-1] += 1
    return bytes(p)
