"""The server-database backends serve etcd clients like the SQLite one."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("database", ["postgres_server", "mariadb_server"])
def test_server_database_store_with_etcdctl(request, database, k8s_sql_factory, etcdctl) -> None:
    dsn = request.getfixturevalue(database).new_dsn()
    server = k8s_sql_factory("--endpoint", dsn)
    etcdctl(server.url, "put", "a", "1")
    etcdctl(server.url, "put", "a", "2")
    out = json.loads(etcdctl(server.url, "get", "a", "-w", "json").stdout)
    assert out["kvs"][0]["version"] == 2 and out["kvs"][0]["mod_revision"] == 3
    old = json.loads(etcdctl(server.url, "get", "a", "--rev=2", "-w", "json").stdout)
    assert old["kvs"][0]["mod_revision"] == 2
    txn = etcdctl(server.url, "txn", input='mod("a") = "3"\n\nput b 1\nput c 1\n\n\n').stdout
    assert txn.startswith("SUCCESS")
    # The same database served by a restarted frontend keeps everything.
    server.restart()
    out = json.loads(etcdctl(server.url, "get", "", "--prefix", "-w", "json").stdout)
    assert [kv["mod_revision"] for kv in out["kvs"]] == [3, 4, 4]
