"""deploy/: the Prometheus alerting rules and their promtool unit tests, the example
Prometheus configuration and the Grafana dashboard.

promtool checks what it can (rule and config syntax, the rules' unit tests, the
dashboard's queries as recording rules); the rest is checked here: every alert has a
case that fires it and one that must not, and every metric an alert or a panel
queries is one k8s-sql exposes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, missing

PROMETHEUS = ROOT / "deploy/prometheus"
RULES = PROMETHEUS / "k8s-sql-alerts.yaml"
RULE_TESTS = PROMETHEUS / "k8s-sql-alerts.test.yaml"
CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = ROOT / "deploy/grafana/k8s-sql-dashboard.json"

# The metrics k8s-sql's /metrics exposes, as the alerts and the dashboard may name
# them. They are kept here rather than read from the server so that this module
# needs promtool only; a separate test, next to the server's metrics, compares these
# two lists with what a running k8s-sql serves, so neither can drift.
SERVER_METRICS = frozenset(
    {
        "etcd_server_has_leader",
        "etcd_server_is_leader",
        "etcd_server_leader_changes_seen_total",
        "etcd_server_id",
        "etcd_server_version",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "etcd_server_quota_backend_bytes",
        "etcd_debugging_mvcc_keys_total",
        "etcd_mvcc_put_total",
        "etcd_mvcc_delete_total",
        "etcd_mvcc_txn_total",
        "etcd_mvcc_range_total",
        "etcd_debugging_mvcc_current_revision",
        "etcd_debugging_mvcc_compact_revision",
        "etcd_debugging_mvcc_watch_stream_total",
        "etcd_debugging_mvcc_watcher_total",
        "etcd_debugging_mvcc_slow_watcher_total",
        "etcd_debugging_lease_granted_total",
        "etcd_debugging_lease_revoked_total",
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total",
        "k8s_sql_db_pool_connections",
        "k8s_sql_database_up",
        "k8s_sql_follower_lag_revisions",
        "k8s_sql_follower_lag_seconds",
        "k8s_sql_compaction_deleted_rows_total",
        "k8s_sql_alarm_active",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    }
)
# Histograms: each is exposed as NAME_bucket, NAME_sum and NAME_count.
SERVER_HISTOGRAMS = frozenset(
    {
        "etcd_debugging_lease_ttl_total",
        "etcd_disk_backend_commit_duration_seconds",
        "grpc_server_handling_seconds",
        "k8s_sql_write_batch_requests",
        "k8s_sql_write_queue_wait_seconds",
        "k8s_sql_sql_statement_duration_seconds",
        "k8s_sql_watch_delivery_lag_seconds",
        "k8s_sql_lease_expiry_lag_seconds",
        "k8s_sql_compaction_duration_seconds",
    }
)
# Series Prometheus itself records for every target (K8sSqlFrontendDown uses it).
PROMETHEUS_SERIES = frozenset({"up"})

KNOWN = (
    SERVER_METRICS
    | {h + suffix for h in SERVER_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | PROMETHEUS_SERIES
)

# PromQL's keywords and binary operators that read like names.
PROMQL_WORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "group_left", "group_right", "inf", "nan"})

# What Grafana substitutes before a query reaches Prometheus, for checking the
# dashboard's queries with promtool.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".+", "$instance": ".+"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool is not installed (Debian and Ubuntu: the prometheus package)")
    assert path is not None
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, f"promtool {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: the words left once strings,
    label matchers, ranges, label lists (by, on, ...) and Grafana's variables are
    removed, other than functions, aggregations and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", expr):
        if m.group() in PROMQL_WORDS or expr[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def test_metric_names_reads_promql() -> None:
    """The extraction itself, on the shapes the rules and the dashboard use."""
    assert metric_names(
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{grpc_code=~"A|B"}[5m]))) > 0.15 '
        "and on (job, instance) b"
    ) == {"a_bucket", "b"}
    assert metric_names("predict_linear(c[4h], 4 * 60 * 60) > (d > 0) or e offset 5m") == {"c", "d", "e"}
    assert metric_names('sum(rate(f{job=~"$job"}[$__rate_interval])) by (instance) / 1e3') == {"f"}


# -- the rules file, read without PyYAML (not a dependency), from its own layout:
# `- alert:` starts a rule, `expr:` is one line or a `|` block of deeper lines.


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def alert_rules() -> list[dict[str, str]]:
    """Each rule's alert, severity and expr."""
    rules: list[dict[str, str]] = []
    lines = RULES.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if line.strip().startswith("- alert:"):
            rules.append({"alert": value})
        elif key == "expr" and value.startswith("|"):
            block = []
            while i + 1 < len(lines) and (not lines[i + 1].strip() or indent(lines[i + 1]) > indent(line)):
                i += 1
                block.append(lines[i].strip())
            rules[-1]["expr"] = "\n".join(block).strip()
        elif key in ("expr", "severity"):
            rules[-1][key] = value
        i += 1
    return rules


def rule_test_cases() -> tuple[set[tuple[str, str]], set[str]]:
    """From the promtool tests: the (alertname, severity) pairs some case expects to
    fire, and the alerts some case expects to stay quiet (``exp_alerts: []``)."""
    fired: set[tuple[str, str]] = set()
    quiet: set[str] = set()
    alertname = ""
    for line in RULE_TESTS.read_text().splitlines():
        key, _, value = line.strip().removeprefix("- ").partition(":")
        value = value.strip()
        if key == "eval_time":
            alertname = ""
        elif key == "alertname":
            alertname = value
        elif key == "exp_alerts":
            assert alertname, f"exp_alerts before alertname: {line!r}"
            if value == "[]":
                quiet.add(alertname)
        elif key == "severity":
            assert alertname, f"an expected alert outside a case: {line!r}"
            fired.add((alertname, value))
    return fired, quiet


def test_rules_pass_promtool_check(promtool: str) -> None:
    res = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert "FAILED" not in res.stdout + res.stderr and not res.stderr.strip(), res.stdout + res.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", res.stdout)
    assert found, res.stdout
    # Also checks this module's reading of the file.
    assert int(found[1]) == len(alert_rules())


def test_rules_pass_their_unit_tests(promtool: str) -> None:
    res = run(promtool, "test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_example_config_is_valid(promtool: str) -> None:
    res = run(promtool, "check", "config", "--lint=all", "--lint-fatal", str(CONFIG))
    assert not res.stderr.strip(), res.stderr
    # rule_files is relative to the configuration and reaches the alerts.
    assert f"Checking {RULES}" in res.stdout, res.stdout


def test_every_alert_fires_and_stays_quiet_in_a_test() -> None:
    rules = alert_rules()
    assert rules and all({"alert", "severity", "expr"} <= r.keys() for r in rules), rules
    assert all(r["severity"] in ("warning", "critical") for r in rules), rules
    fired, quiet = rule_test_cases()
    every = {(r["alert"], r["severity"]) for r in rules}
    assert every - fired == set(), "alerts (and severities) no test fires"
    assert {r["alert"] for r in rules} - quiet == set(), "alerts no test expects to stay quiet"
    assert fired - every == set() and quiet - {a for a, _ in every} == set(), "tests of alerts that do not exist"


def test_alerts_name_known_metrics_and_no_job() -> None:
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule
        assert names <= KNOWN, f"{rule['alert']}: unknown metrics {sorted(names - KNOWN)}"
        # Any job name must work (the frontends may be scraped under any).
        assert not re.search(r"\bjob\s*(=|!=|=~|!~)", rule["expr"]), rule


# -- the dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    return [q for p in d["panels"] for q in (p, *p.get("panels", []))]


def dashboard_queries(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"panel {p['id']} ({p['title']}) {t['refId']}", t["expr"]) for p in all_panels(d) for t in p.get("targets", [])
    ]


def test_dashboard_layout_and_variables() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= g.keys() and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], p["title"]))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"panels {a[4]!r} and {b[4]!r} overlap"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(etcd_server_has_leader"), name
        assert variables[name]["definition"].endswith(f", {name})"), name
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p.get("targets"), p["title"]


def test_dashboard_names_known_metrics_for_the_chosen_job_and_instance() -> None:
    d = dashboard()
    for where, expr in dashboard_queries(d):
        names = metric_names(expr)
        assert names, where
        assert names <= KNOWN, f"{where}: unknown metrics {sorted(names - KNOWN)}"
        for name in names:
            for matchers in re.findall(rf"\b{name}\b(\{{[^}}]*\}})?", expr):
                assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, f"{where}: {name}"
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            names = metric_names(re.sub(r"^label_values\((.*), \w+\)$", r"\1", v["definition"]))
            assert names and names <= KNOWN, v["name"]


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables substituted, as a recording rule
    for promtool to parse (JSON is YAML)."""
    rules = []
    for n, (_, expr) in enumerate(dashboard_queries(dashboard())):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout, res.stdout + res.stderr
