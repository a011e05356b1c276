"""Drive an etcd v3 server with aetcd (an asyncio Python client) and print what it saw.

Usage: python aetcd_scenario.py HOST:PORT SCENARIO

Runs in its own process: aetcd registers the same protobuf package names
(``etcdserverpb``...) as k8s-sql's own generated modules, so the two cannot be
imported together. Prints one JSON object with the observations on stdout and
exits 0; on an unexpected error it prints the traceback and exits non-zero. The
calling test (tests/test_python_client.py) makes the assertions.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd
from aetcd import exceptions, rpc
from aetcd.rtypes import EventKind

TIMEOUT = 15.0  # every wait for an event is bounded


def s(b: bytes) -> str:
    """bytes -> str for JSON (latin-1 keeps every byte value)."""
    return b.decode("latin-1")


def kv(x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    return {
        "key": s(x.key),
        "value": s(x.value),
        "create_revision": x.create_revision,
        "mod_revision": x.mod_revision,
        "version": x.version,
        "lease": x.lease,
    }


def event(e: Any) -> dict[str, Any]:
    return {
        "kind": str(e.kind),
        "key": s(e.kv.key),
        "value": s(e.kv.value),
        "mod_revision": e.kv.mod_revision,
        "create_revision": e.kv.create_revision,
        "version": e.kv.version,
        "prev_value": s(e.prev_kv.value) if e.prev_kv is not None else None,
    }


def error(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "message": str(e)}


async def capture(coro: Awaitable[Any]) -> dict[str, str] | None:
    """The error an awaitable raised (aetcd's, or gRPC's from a raw stub), or None."""
    try:
        await coro
    except exceptions.ClientError as e:
        return error(e)
    except rpc.AioRpcError as e:
        return {"type": f"grpc.{e.code().name}", "message": e.details() or ""}
    return None


async def take(it: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` events of a watch iterator, within TIMEOUT."""
    out: list[dict[str, Any]] = []

    async def run() -> None:
        async for e in it:
            out.append(event(e))
            if len(out) == n:
                return

    await asyncio.wait_for(run(), TIMEOUT)
    return out


async def revision(c: aetcd.Client) -> int:
    return (await c.get_prefix(b"\0")).header.revision


# -- scenarios ---------------------------------------------------------------------------


async def scenario_kv(c: aetcd.Client) -> dict[str, Any]:
    r: dict[str, Any] = {}
    r["put_revisions"] = [
        (await c.put(b"a/1", b"one")).header.revision,
        (await c.put(b"a/2", b"two")).header.revision,
        (await c.put(b"a/3", b"three")).header.revision,
    ]
    p = await c.put(b"a/1", b"uno", prev_kv=True)
    r["overwrite"] = {"revision": p.header.revision, "prev": kv(p.prev_kv)}
    r["get"] = kv(await c.get(b"a/1"))
    r["get_missing"] = await c.get(b"a/none")
    pref = await c.get_prefix(b"a/")
    r["prefix"] = {"keys": [s(x.key) for x in pref], "count": pref.count, "revision": pref.header.revision}
    r["prefix_desc"] = [s(x.key) for x in await c.get_prefix(b"a/", sort_order="descend")]
    r["prefix_by_mod"] = [s(x.key) for x in await c.get_prefix(b"a/", sort_order="ascend", sort_target="mod")]
    r["prefix_by_value_desc"] = [
        s(x.value) for x in await c.get_prefix(b"a/", sort_order="descend", sort_target="value")
    ]
    r["keys_only"] = [[s(x.key), s(x.value)] for x in await c.get_prefix(b"a/", keys_only=True)]
    r["range"] = [s(x.key) for x in await c.get_range(b"a/1", b"a/3")]
    r["all"] = [s(x.key) for x in await c.get_all()]
    old = await c.kvstub.Range(rpc.RangeRequest(key=b"a/1", revision=2))
    r["at_revision_2"] = [s(x.value) for x in old.kvs]

    d = await c.delete(b"a/2", prev_kv=True)
    r["delete"] = {"deleted": d.deleted, "revision": d.header.revision, "prev": kv(d.prev_kv)}
    r["delete_missing"] = await c.delete(b"a/2")
    dp = await c.delete_prefix(b"a/", prev_kv=True)
    r["delete_prefix"] = {"deleted": dp.deleted, "revision": dp.header.revision, "prev": [s(x.key) for x in dp]}
    r["after_delete"] = [s(x.key) for x in await c.get_all()]

    await c.put(b"r", b"x")
    r["replace_ok"] = await c.replace(b"r", b"x", b"y")
    r["replace_stale"] = await c.replace(b"r", b"x", b"z")
    r["replaced_value"] = s((await c.get(b"r")).value)

    binary_key, binary_value = bytes([0, 255, 1, 254]), bytes(range(256))
    await c.put(binary_key, binary_value)
    got = await c.get(binary_key)
    r["binary_roundtrip"] = got is not None and got.key == binary_key and got.value == binary_value
    r["empty_key_error"] = await capture(c.put(b"", b"v"))
    r["final_revision"] = await revision(c)
    return r


async def scenario_txn(c: aetcd.Client) -> dict[str, Any]:
    t = c.transactions
    r: dict[str, Any] = {}
    await c.put(b"t/a", b"1")  # 2
    ok, resps = await c.transaction(
        compare=[t.value(b"t/a") == b"1", t.version(b"t/a") > 0, t.create(b"t/none") == 0, t.mod(b"t/a") < 100],
        success=[t.put(b"t/a", b"2"), t.put(b"t/b", b"b"), t.get(b"t/a")],
        failure=[t.put(b"t/failed", b"1")],
    )
    r["success"] = {
        "succeeded": ok,
        "put_revisions": [x.response_put.header.revision for x in resps[:2]],
        "read": [s(v) for v, _ in resps[2]],
    }
    r["after_success"] = {s(x.key): [s(x.value), x.mod_revision] for x in await c.get_prefix(b"t/")}

    ok, resps = await c.transaction(
        compare=[t.value(b"t/a") == b"1"],
        success=[t.put(b"t/a", b"wrong")],
        failure=[t.get(b"t/", b"t0"), t.delete(b"t/b", prev_kv=True)],
    )
    r["failure"] = {
        "succeeded": ok,
        "read": [s(v) for v, _ in resps[0]],
        "deleted": resps[1].response_delete_range.deleted,
        "deleted_prev": [s(x.value) for x in resps[1].response_delete_range.prev_kvs],
    }
    ok, resps = await c.transaction(
        compare=[t.version(b"t/a") == 2],
        success=[t.txn(compare=[t.value(b"t/a") == b"2"], success=[t.put(b"t/nested", b"yes")], failure=[])],
        failure=[],
    )
    r["nested"] = {"succeeded": ok, "inner": resps[0].response_txn.succeeded}
    r["nested_value"] = s((await c.get(b"t/nested")).value)
    r["duplicate_error"] = await capture(
        c.transaction(compare=[], success=[t.put(b"t/d", b"1"), t.put(b"t/d", b"2")], failure=[])
    )
    r["too_many_ops_error"] = await capture(
        c.transaction(compare=[], success=[t.put(f"t/{i}".encode(), b"x") for i in range(129)], failure=[])
    )
    r["final_revision"] = await revision(c)
    return r


async def scenario_watch(c: aetcd.Client) -> dict[str, Any]:
    r: dict[str, Any] = {}
    start = await revision(c) + 1
    # aetcd's watch() returns once the server has answered "created": later writes are live
    w = await c.watch_prefix(b"w/", prev_kv=True)
    deletes = await c.watch_prefix(b"w/", kind=EventKind.DELETE)
    await c.put(b"w/a", b"1")
    await c.put(b"w/a", b"2")
    await c.put(b"other", b"x")
    await c.delete(b"w/a")
    r["live"] = await take(w, 3)
    r["deletes_only"] = await take(deletes, 1)
    await w.cancel()
    await deletes.cancel()

    replay = await c.watch(b"w/a", start_revision=start)
    r["replay"] = await take(replay, 3)
    await replay.cancel()

    async def put_later() -> None:
        await c.put(b"w/once", b"now")

    # watch_once registers before returning only when its event arrives: start the
    # put from a revision the watch replays, so no ordering is needed
    base = await revision(c)
    put_task = asyncio.create_task(put_later())
    once = await c.watch_once(b"w/once", timeout=TIMEOUT, start_revision=base + 1)
    await put_task
    r["once"] = event(once)

    compacted_at = await revision(c)
    await c.compact(compacted_at)
    try:
        old = await c.watch(b"w/a", start_revision=2)
        await take(old, 1)
        r["compacted_watch"] = None
    except exceptions.RevisionCompactedError as e:
        r["compacted_watch"] = {"compacted_revision": e.compacted_revision}
    r["compacted_at"] = compacted_at
    return r


async def scenario_lease(c: aetcd.Client) -> dict[str, Any]:
    r: dict[str, Any] = {}
    lease = await c.lease(60)
    r["grant"] = {"ttl": lease.ttl, "id_nonzero": lease.id != 0}
    await c.put(b"l/a", b"1", lease=lease)
    await c.put(b"l/b", b"2", lease=lease.id)
    r["key_lease_matches"] = (await c.get(b"l/a")).lease == lease.id
    info = await c.get_lease_info(lease.id, keys=True)
    r["info"] = {"id_matches": info.ID == lease.id, "TTL": info.TTL, "grantedTTL": info.grantedTTL}
    r["keys"] = sorted(s(k) for k in await lease.keys())
    ka = await lease.refresh()
    r["refresh"] = {"id_matches": ka.ID == lease.id, "TTL": ka.TTL}
    r["remaining"] = await lease.remaining_ttl()
    r["granted"] = await lease.granted_ttl()
    listed = await c.leasestub.LeaseLeases(rpc.LeaseLeasesRequest())
    r["listed"] = lease.id in [x.ID for x in listed.leases]

    explicit = await c.lease(120, lease_id=0x1234)
    r["explicit_id"] = explicit.id
    r["duplicate_id_error"] = await capture(c.lease(120, lease_id=0x1234))

    w = await c.watch_prefix(b"l/", prev_kv=True)
    before = await revision(c)
    await lease.revoke()
    r["revoke_events"] = await take(w, 2)
    await w.cancel()
    r["revoke_revision_delta"] = await revision(c) - before
    r["after_revoke"] = [s(x.key) for x in await c.get_prefix(b"l/")]
    r["ttl_after_revoke"] = (await c.get_lease_info(lease.id)).TTL
    r["revoke_again_error"] = await capture(lease.revoke())
    r["put_unknown_lease_error"] = await capture(c.put(b"l/c", b"3", lease=lease.id))
    r["keepalive_revoked"] = (await lease.refresh()).TTL

    short = await c.lease(2)
    await c.put(b"exp/k", b"v", lease=short)
    t0 = time.monotonic()
    e = await c.watch_once(b"exp/k", timeout=TIMEOUT, kind=EventKind.DELETE, prev_kv=True)
    r["expiry"] = {"event": event(e), "elapsed": time.monotonic() - t0}
    r["expired_key"] = await c.get(b"exp/k")

    async with c.lock(b"lock/x", ttl=30) as first:
        r["lock_first_acquired"] = await first.is_acquired()
        second = c.lock(b"lock/x", ttl=30)
        waiter = asyncio.create_task(second.acquire(timeout=TIMEOUT))
        held_rev = first.revision
    r["lock_second_acquired"] = await asyncio.wait_for(waiter, TIMEOUT)
    r["lock_second_after_first"] = second.revision > held_rev
    r["lock_second_holds"] = await second.is_acquired()
    r["lock_release"] = await second.release()
    return r


async def scenario_maintenance(c: aetcd.Client) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for i in range(5):
        await c.put(f"m/{i}".encode(), b"v" * 1000)  # revisions 2..6
    st = await c.status()
    r["status"] = {
        "version": st.version,
        "db_size": st.db_size,
        "raft_index": st.raft_index,
        "raft_term": st.raft_term,
        "leader_found": st.leader is not None,
    }
    members = [m async for m in c.members()]
    r["members"] = [{"id": m.id, "name": m.name, "client_urls": list(m.client_urls)} for m in members]
    r["leader_is_member"] = st.leader is not None and st.leader.id in [m.id for m in members]
    r["alarms"] = [a.alarm_type for a in [x async for x in c.list_alarms()]]
    h1 = await c.hash()
    r["hash_stable"] = h1 == await c.hash()
    await c.compact(4)
    r["compacted_read_error"] = await capture(c.kvstub.Range(rpc.RangeRequest(key=b"m/0", revision=3)))
    r["compact_again_error"] = await capture(c.compact(4))
    await c.compact(6, physical=True)
    await c.defragment()
    r["after_defrag"] = [s(x.key) for x in await c.get_prefix(b"m/")]
    buf = io.BytesIO()
    await c.snapshot(buf)
    blob = buf.getvalue()
    r["snapshot"] = {"size": len(blob), "sha256_trailer": blob[-32:] == hashlib.sha256(blob[:-32]).digest()}
    r["final_revision"] = await revision(c)
    return r


SCENARIOS: dict[str, Callable[[aetcd.Client], Awaitable[dict[str, Any]]]] = {
    "kv": scenario_kv,
    "txn": scenario_txn,
    "watch": scenario_watch,
    "lease": scenario_lease,
    "maintenance": scenario_maintenance,
}


async def main(endpoint: str, name: str) -> dict[str, Any]:
    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=TIMEOUT) as c:
        return await SCENARIOS[name](c)


if __name__ == "__main__":
    try:
        result = asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 60))
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    print(json.dumps(result))
