"""A real Prometheus (Debian's package) scraping two k8s-sql frontends on one PostgreSQL
database while clients write and watch: what an operator's dashboards and alerts
would read, through Prometheus' own HTTP API.

- the series the alerts and the dashboard use exist, and move with the workload;
- writes are counted exactly (every acknowledged Put, summed over the frontends) and
  answers by their gRPC code;
- ``etcd_server_has_leader`` is 1 on both, ``etcd_server_is_leader`` 1 on exactly one,
  and when that frontend is killed, the survivor becomes the leader;
- the shipped alerting rules load and evaluate against real series without errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/k8s-sql-alerts.yaml"
WRITES = 400  # acknowledged Puts, split over the two frontends
FUTURE_READS = 25  # Ranges at a future revision: OutOfRange
DEADLINE = 60.0  # seconds for Prometheus to show a change (scrapes are 1 s apart)


class Prometheus:
    def __init__(self, binary: str, port: int, workdir: Path, targets: list[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            "scrape_configs:\n  - job_name: k8s-sql\n    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n"
        )
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=20) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query: ``{instance (or "") : value}``."""
        result = self.api("query", query=expr)["result"]
        return {s["metric"].get("instance", ""): float(s["value"][1]) for s in result}

    def wait_for(self, expr: str, predicate: Any, what: str) -> dict[str, float]:
        """Query until ``predicate(result)`` holds: Prometheus shows a change only after its
        next scrape (1 s), so this waits for that scrape, within DEADLINE."""
        deadline = time.monotonic() + DEADLINE
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            assert time.monotonic() < deadline, f"{what}: {expr} = {result}"
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def test_prometheus_sees_two_frontends(k8s_sql_factory, postgres_server, tmp_path: Path) -> None:
    from conftest import free_port, missing
    from test_alert_rules import SERVER_METRICS

    binary = shutil.which("prometheus")
    if binary is None:
        missing("prometheus is not installed (Debian and Ubuntu: the prometheus package)")
    dsn = postgres_server.new_dsn()
    metrics_ports = [free_port(), free_port()]
    frontends = [
        k8s_sql_factory("--endpoint", dsn, "--listen-metrics-urls", f"http://127.0.0.1:{p}") for p in metrics_ports
    ]
    targets = [f"127.0.0.1:{p}" for p in metrics_ports]
    prom = Prometheus(binary, free_port(), tmp_path, targets)
    try:
        prom.wait_for('up{job="k8s-sql"} == 1', lambda r: set(r) == set(targets), "both targets scraped")
        prom.wait_for(
            'etcd_server_has_leader{job="k8s-sql"} == 1', lambda r: set(r) == set(targets), "both know a leader"
        )
        assert prom.query('etcd_mvcc_put_total{job="k8s-sql"}') == dict.fromkeys(targets, 0.0)  # fresh

        # A watcher on the second frontend sees every write, its own and the first's.
        seen: list[int] = []
        with grpc.insecure_channel(frontends[1].endpoint) as wch:
            create = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"/p/", range_end=b"/p0"))
            responses = rpc_pb2_grpc.WatchStub(wch).Watch(iter([create]))
            assert next(responses).created

            def watch() -> None:
                for r in responses:
                    seen.extend(e.kv.mod_revision for e in r.events)
                    if len(seen) >= WRITES:
                        return

            watcher = threading.Thread(target=watch)
            watcher.start()
            channels = [grpc.insecure_channel(f.endpoint) for f in frontends]
            try:
                stubs = [rpc_pb2_grpc.KVStub(ch) for ch in channels]
                for i in range(WRITES):
                    stubs[i % 2].Put(pb.PutRequest(key=b"/p/%d" % i, value=b"v"), timeout=30)
                for i in range(FUTURE_READS):
                    with pytest.raises(grpc.RpcError) as e:
                        stubs[i % 2].Range(pb.RangeRequest(key=b"/p/1", revision=1_000_000), timeout=30)
                    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
            finally:
                for ch in channels:
                    ch.close()
            watcher.join(60)
            responses.cancel()
        assert len(seen) == WRITES

        # Counted exactly, summed over the frontends.
        prom.wait_for(
            'sum(etcd_mvcc_put_total{job="k8s-sql"})', lambda r: r.get("") == WRITES, "every Put counted once"
        )
        prom.wait_for(
            'sum(grpc_server_handled_total{grpc_method="Put",grpc_code="OK"})',
            lambda r: r.get("") == WRITES,
            "every Put handled OK",
        )
        prom.wait_for(
            'sum(grpc_server_handled_total{grpc_method="Range",grpc_code="OutOfRange"})',
            lambda r: r.get("") == FUTURE_READS,
            "future reads answered OutOfRange",
        )
        per_frontend = prom.query('etcd_mvcc_put_total{job="k8s-sql"}')
        assert set(per_frontend.values()) == {WRITES / 2}
        # The series move: revisions, commits, SQL statements, watch delivery, batches.
        prom.wait_for(
            'min(etcd_debugging_mvcc_current_revision{job="k8s-sql"})',
            lambda r: r.get("", 0) >= WRITES,
            "both frontends at the newest revision",
        )
        for expr in (
            'sum(etcd_disk_backend_commit_duration_seconds_count{job="k8s-sql"})',
            'sum(k8s_sql_write_batch_requests_sum{job="k8s-sql"})',
            'sum(k8s_sql_sql_statement_duration_seconds_count{statement=~"begin_write|begin_unlocked",error=""})',
            'sum(grpc_server_handling_seconds_count{grpc_method="Put"})',
        ):
            assert prom.query(expr)[""] >= WRITES / 256, expr  # at least a batch's worth each
        delivered = prom.wait_for(
            f'k8s_sql_watch_delivery_lag_seconds_count{{instance="{targets[1]}"}}',
            lambda r: r.get(targets[1], 0) > 0,
            "watch delivery timed on the watching frontend",
        )
        assert delivered[targets[1]] <= WRITES
        names = set(prom.api("label/__name__/values", **{"match[]": '{job="k8s-sql"}'}))
        assert set(SERVER_METRICS) - names == set(), "series Prometheus has for the alerts and dashboard"

        # Leadership: one leader; kill it and the survivor takes over.
        leaders = prom.query('etcd_server_is_leader{job="k8s-sql"} == 1')
        assert len(leaders) == 1, leaders
        (leader,) = leaders
        assert prom.query('etcd_server_has_leader{job="k8s-sql"}') == dict.fromkeys(targets, 1.0)
        survivor = next(t for t in targets if t != leader)
        frontends[targets.index(leader)].kill9()
        prom.wait_for(
            f'etcd_server_is_leader{{instance="{survivor}"}}',
            lambda r: r.get(survivor) == 1,
            "the surviving frontend leads",
        )
        prom.wait_for(f'up{{instance="{leader}"}}', lambda r: r.get(leader) == 0, "the killed frontend is down")
        assert prom.query(f'etcd_server_has_leader{{instance="{survivor}"}}') == {survivor: 1.0}
        assert prom.query(f'etcd_server_leader_changes_seen_total{{instance="{survivor}"}}')[survivor] >= 2

        # The shipped rules loaded and evaluate without errors against these series.
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert rules and all(r["health"] == "ok" for r in rules), [
            (r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"
        ]
    finally:
        prom.stop()
