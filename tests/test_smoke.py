"""The server starts, answers etcdctl, and a real etcd starts for comparison."""

from __future__ import annotations

import json


def test_put_get_with_etcdctl(k8s_sql, etcdctl) -> None:
    etcdctl(k8s_sql.url, "put", "greeting", "hello")
    out = etcdctl(k8s_sql.url, "get", "greeting", "-w", "json").stdout
    kv = json.loads(out)["kvs"][0]
    assert kv["version"] == 1
    assert kv["create_revision"] == kv["mod_revision"] == 2


def test_oracle_etcd_starts(etcd, etcdctl) -> None:
    etcdctl(etcd.url, "put", "greeting", "hello")
    out = json.loads(etcdctl(etcd.url, "get", "greeting", "-w", "json").stdout)
    assert out["kvs"][0]["mod_revision"] == 2
