"""A Python etcd client (aetcd, asyncio) against k8s-sql, and the same against real etcd.

aetcd registers the protobuf package ``etcdserverpb`` like k8s-sql's own generated
modules do, so it runs in a child process (tests/clients/aetcd_scenario.py) that
prints its observations as JSON; the assertions are here. Every scenario also runs
against the real etcd, which shows the expectations are etcd's behaviour.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, missing

SCRIPT = Path(__file__).resolve().parent / "clients" / "aetcd_scenario.py"


def run_scenario(srv: ServerProcess, name: str) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, str(SCRIPT), srv.endpoint, name],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert res.returncode == 0, f"aetcd scenario {name} failed:\n{res.stdout}\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _need_aetcd() -> None:
    if importlib.util.find_spec("aetcd") is None:
        missing("aetcd is not installed (pip install -e '.[test]')")


def check_kv(r: dict[str, Any], srv: ServerProcess, oracle: bool) -> None:
    assert r["put_revisions"] == [2, 3, 4]
    assert r["overwrite"]["revision"] == 5
    assert r["overwrite"]["prev"] == {
        "key": "a/1", "value": "one", "create_revision": 2, "mod_revision": 2, "version": 1, "lease": 0,
    }  # fmt: skip
    assert r["get"] == {
        "key": "a/1", "value": "uno", "create_revision": 2, "mod_revision": 5, "version": 2, "lease": 0,
    }  # fmt: skip
    assert r["get_missing"] is None
    assert r["prefix"] == {"keys": ["a/1", "a/2", "a/3"], "count": 3, "revision": 5}
    assert r["prefix_desc"] == ["a/3", "a/2", "a/1"]
    assert r["prefix_by_mod"] == ["a/2", "a/3", "a/1"]
    assert r["prefix_by_value_desc"] == ["uno", "two", "three"]
    assert r["keys_only"] == [["a/1", ""], ["a/2", ""], ["a/3", ""]]
    assert r["range"] == ["a/1", "a/2"]
    assert r["all"] == ["a/1", "a/2", "a/3"]
    assert r["at_revision_2"] == ["one"]
    assert r["delete"] == {
        "deleted": 1,
        "revision": 6,
        "prev": {"key": "a/2", "value": "two", "create_revision": 3, "mod_revision": 3, "version": 1, "lease": 0},
    }
    assert r["delete_missing"] is None
    assert r["delete_prefix"] == {"deleted": 2, "revision": 7, "prev": ["a/1", "a/3"]}
    assert r["after_delete"] == []
    assert r["replace_ok"] is True
    assert r["replace_stale"] is False
    assert r["replaced_value"] == "y"
    assert r["binary_roundtrip"] is True
    assert r["empty_key_error"] == {"type": "InvalidArgumentError", "message": "etcdserver: key is not provided"}
    assert r["final_revision"] == 10  # put r, replace, binary put; the failed replace wrote nothing


def check_txn(r: dict[str, Any], srv: ServerProcess, oracle: bool) -> None:
    assert r["success"] == {"succeeded": True, "put_revisions": [3, 3], "read": ["2"]}
    assert r["after_success"] == {"t/a": ["2", 3], "t/b": ["b", 3]}
    assert r["failure"] == {"succeeded": False, "read": ["2", "b"], "deleted": 1, "deleted_prev": ["b"]}
    assert r["nested"] == {"succeeded": True, "inner": True}
    assert r["nested_value"] == "yes"
    assert r["duplicate_error"] == {
        "type": "InvalidArgumentError",
        "message": "etcdserver: duplicate key given in txn request",
    }
    assert r["too_many_ops_error"] == {
        "type": "InvalidArgumentError",
        "message": "etcdserver: too many operations in txn request",
    }
    assert r["final_revision"] == 5  # failure branch's delete (4), nested put (5)


def check_watch(r: dict[str, Any], srv: ServerProcess, oracle: bool) -> None:
    # revisions: w/a=1 (2), w/a=2 (3), other (4), delete w/a (5)
    assert [(e["kind"], e["key"], e["value"], e["mod_revision"], e["prev_value"]) for e in r["live"]] == [
        ("PUT", "w/a", "1", 2, ""),  # aetcd shows an absent prev_kv as an empty one
        ("PUT", "w/a", "2", 3, "1"),
        ("DELETE", "w/a", "", 5, "2"),
    ]
    assert [(e["create_revision"], e["version"]) for e in r["live"]] == [(2, 1), (2, 2), (0, 0)]
    assert [(e["kind"], e["key"], e["mod_revision"]) for e in r["deletes_only"]] == [("DELETE", "w/a", 5)]
    assert [(e["kind"], e["value"], e["mod_revision"]) for e in r["replay"]] == [
        ("PUT", "1", 2),
        ("PUT", "2", 3),
        ("DELETE", "", 5),
    ]
    assert (r["once"]["kind"], r["once"]["key"], r["once"]["value"], r["once"]["mod_revision"]) == (
        "PUT",
        "w/once",
        "now",
        6,
    )
    assert r["compacted_at"] == 6
    assert r["compacted_watch"] == {"compacted_revision": 6}


def check_lease(r: dict[str, Any], srv: ServerProcess, oracle: bool) -> None:
    assert r["grant"] == {"ttl": 60, "id_nonzero": True}
    assert r["key_lease_matches"] is True
    assert r["info"]["id_matches"] is True
    assert r["info"]["grantedTTL"] == 60
    assert 55 <= r["info"]["TTL"] <= 60
    assert r["keys"] == ["l/a", "l/b"]
    assert r["refresh"] == {"id_matches": True, "TTL": 60}
    assert 55 <= r["remaining"] <= 60
    assert r["granted"] == 60
    assert r["listed"] is True
    assert r["explicit_id"] == 0x1234
    assert r["duplicate_id_error"] is not None and r["duplicate_id_error"]["type"] == "DuplicateLeaseError"

    # revoke: both keys deleted in one revision, watchers see it with prev_kv
    assert [(e["kind"], e["key"], e["prev_value"]) for e in r["revoke_events"]] == [
        ("DELETE", "l/a", "1"),
        ("DELETE", "l/b", "2"),
    ]
    assert len({e["mod_revision"] for e in r["revoke_events"]}) == 1
    assert r["revoke_revision_delta"] == 1
    assert r["after_revoke"] == []
    assert r["ttl_after_revoke"] == -1
    not_found = {"type": "ClientError", "message": "etcdserver: requested lease not found"}
    assert r["revoke_again_error"] == not_found
    assert r["put_unknown_lease_error"] == not_found
    assert r["keepalive_revoked"] == 0

    # expiry of a 2 s lease
    ev = r["expiry"]["event"]
    assert (ev["kind"], ev["key"], ev["prev_value"]) == ("DELETE", "exp/k", "v")
    assert 1.5 <= r["expiry"]["elapsed"] <= 15
    assert r["expired_key"] is None

    # aetcd's lock recipe (txn on create revision + lease + watch for the DELETE)
    assert r["lock_first_acquired"] is True
    assert r["lock_second_acquired"] is True
    assert r["lock_second_after_first"] is True
    assert r["lock_second_holds"] is True
    assert r["lock_release"] is True


def check_maintenance(r: dict[str, Any], srv: ServerProcess, oracle: bool) -> None:
    st = r["status"]
    assert re.fullmatch(r"3\.6\.\d+", st["version"])
    assert st["db_size"] > 0
    assert st["raft_term"] >= 1
    assert st["leader_found"] is True
    assert r["leader_is_member"] is True
    if not oracle:
        assert st["raft_index"] == 6  # k8s-sql's raft index is the revision
    assert len(r["members"]) == 1
    assert r["members"][0]["client_urls"] == [srv.url]
    assert r["alarms"] == []
    assert r["hash_stable"] is True
    compacted = "etcdserver: mvcc: required revision has been compacted"
    assert r["compacted_read_error"] == {"type": "grpc.OUT_OF_RANGE", "message": compacted}
    assert r["compact_again_error"] == {"type": "ClientError", "message": compacted}
    assert r["after_defrag"] == ["m/0", "m/1", "m/2", "m/3", "m/4"]
    assert r["snapshot"]["size"] > 4096
    assert r["snapshot"]["sha256_trailer"] is True
    assert r["final_revision"] == 6


CHECKS = {
    "kv": check_kv,
    "txn": check_txn,
    "watch": check_watch,
    "lease": check_lease,
    "maintenance": check_maintenance,
}


@pytest.mark.parametrize("scenario", list(CHECKS))
def test_aetcd_on_k8s_sql(k8s_sql: ServerProcess, scenario: str) -> None:
    CHECKS[scenario](run_scenario(k8s_sql, scenario), k8s_sql, oracle=False)


@pytest.mark.parametrize("scenario", list(CHECKS))
def test_aetcd_on_real_etcd(etcd: ServerProcess, scenario: str) -> None:
    """The same scenario and checks against etcd: the expectations are etcd's behaviour."""
    CHECKS[scenario](run_scenario(etcd, scenario), etcd, oracle=True)
