"""The real etcdctl (3.6) drives k8s-sql: every command an operator uses.

Each test starts a fresh k8s-sql (revision 1), so the revisions asserted below are
exact. Long-running commands (``watch``, ``lease keep-alive``) run as child
processes whose stdout lines are read with deadlines; nothing here sleeps to wait
for an event.
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Etcdctl = Callable[..., subprocess.CompletedProcess[str]]


# -- helpers ---------------------------------------------------------------------------


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def jget(etcdctl: Etcdctl, url: str, *args: str) -> dict[str, Any]:
    """``etcdctl get ... -w json``, parsed."""
    return json.loads(etcdctl(url, "get", *args, "-w", "json").stdout)


def keys_of(resp: dict[str, Any]) -> list[str]:
    return [unb64(kv["key"]) for kv in resp.get("kvs", [])]


def values_of(resp: dict[str, Any]) -> list[str]:
    return [unb64(kv.get("value", "")) for kv in resp.get("kvs", [])]


def revision(etcdctl: Etcdctl, url: str) -> int:
    return int(jget(etcdctl, url, "revision-probe")["header"]["revision"])


def lease_id(grant_output: str) -> str:
    m = re.fullmatch(r"lease ([0-9a-f]+) granted with TTL\((\d+)s\)", grant_output.strip())
    assert m, grant_output
    return m.group(1)


class Child:
    """A long-running etcdctl whose stdout lines are read with a deadline."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True, start_new_session=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def next_line(self, timeout: float) -> str | None:
        """The next stdout line; None once the process has closed stdout."""
        try:
            return self.lines.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            raise AssertionError(f"no output within {timeout:.1f}s; stderr:\n{self.stderr()}") from None

    def next_json(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(deadline - time.monotonic())
            if line is None:
                self.proc.wait(5)
                raise AssertionError(f"etcdctl exited ({self.proc.returncode}); stderr:\n{self.stderr()}")
            if line.startswith("{"):
                return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@pytest.fixture
def spawn(peers_bin: Path, tmp_path: Path):
    """Start etcdctl as a child process: ``spawn(endpoint_url, *args) -> Child``."""
    children: list[Child] = []

    def start(url: str, *args: str) -> Child:
        argv = [str(peers_bin / "etcdctl"), f"--endpoints={url}", "--dial-timeout=5s", *args]
        c = Child(argv, tmp_path / f"etcdctl-child-{len(children)}.stderr")
        children.append(c)
        return c

    yield start
    for c in children:
        c.stop()


def watch_events(w: Child, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Read watch responses until ``n`` events have arrived; return the responses."""
    deadline = time.monotonic() + timeout
    responses: list[dict[str, Any]] = []
    got = 0
    while got < n:
        resp = w.next_json(deadline - time.monotonic())
        assert not resp.get("Canceled"), resp
        responses.append(resp)
        got += len(resp.get("Events") or [])
    assert got == n, responses
    return responses


def ev_summary(ev: dict[str, Any]) -> tuple[str, str, str, int]:
    kind = "DELETE" if ev.get("type") == 1 else "PUT"
    kv = ev["kv"]
    return kind, unb64(kv["key"]), unb64(kv.get("value", "")), int(kv["mod_revision"])


# -- put / get -------------------------------------------------------------------------


@pytest.fixture
def loaded(k8s_sql, etcdctl):
    """k/a=1 (rev 2), k/b=2 (3), k/c=3 (4), k/a=11 (5), other=o (6)."""
    url = k8s_sql.url
    for k, v in [("k/a", "1"), ("k/b", "2"), ("k/c", "3"), ("k/a", "11"), ("other", "o")]:
        assert etcdctl(url, "put", k, v).stdout.strip() == "OK"
    return url


def test_get_single_key_metadata(loaded, etcdctl) -> None:
    r = jget(etcdctl, loaded, "k/a")
    assert r["header"]["revision"] == 6
    assert r["count"] == 1
    (kv,) = r["kvs"]
    assert unb64(kv["key"]) == "k/a"
    assert unb64(kv["value"]) == "11"
    assert (kv["create_revision"], kv["mod_revision"], kv["version"]) == (2, 5, 2)
    assert "lease" not in kv
    assert etcdctl(loaded, "get", "k/a").stdout == "k/a\n11\n"
    assert etcdctl(loaded, "get", "k/a", "--print-value-only").stdout == "11\n"
    missing = jget(etcdctl, loaded, "k/none")
    assert "kvs" not in missing and missing.get("count", 0) == 0
    assert missing["header"]["revision"] == 6


def test_get_prefix_range_and_from_key(loaded, etcdctl) -> None:
    assert keys_of(jget(etcdctl, loaded, "k/", "--prefix")) == ["k/a", "k/b", "k/c"]
    assert values_of(jget(etcdctl, loaded, "k/", "--prefix")) == ["11", "2", "3"]
    # "get KEY END" is the half-open range [KEY, END)
    assert keys_of(jget(etcdctl, loaded, "k/a", "k/c")) == ["k/a", "k/b"]
    assert keys_of(jget(etcdctl, loaded, "k/b", "--from-key")) == ["k/b", "k/c", "other"]
    assert keys_of(jget(etcdctl, loaded, "", "--prefix")) == ["k/a", "k/b", "k/c", "other"]


def test_get_at_revision(loaded, etcdctl) -> None:
    old = jget(etcdctl, loaded, "k/a", "--rev=4")
    assert values_of(old) == ["1"]
    assert (old["kvs"][0]["version"], old["kvs"][0]["mod_revision"]) == (1, 2)
    assert old["header"]["revision"] == 6  # the header is the current revision
    assert keys_of(jget(etcdctl, loaded, "k/", "--prefix", "--rev=3")) == ["k/a", "k/b"]
    assert keys_of(jget(etcdctl, loaded, "", "--prefix", "--rev=1")) == []
    paged = jget(etcdctl, loaded, "k/", "--prefix", "--rev=3", "--limit=1")
    assert (keys_of(paged), paged["count"], paged.get("more")) == (["k/a"], 2, True)
    res = etcdctl(loaded, "get", "k/a", "--rev=7", check=False)
    assert res.returncode != 0
    assert "etcdserver: mvcc: required revision is a future revision" in res.stderr


def test_get_limit_count_keys_only(loaded, etcdctl) -> None:
    r = jget(etcdctl, loaded, "k/", "--prefix", "--limit=2")
    assert keys_of(r) == ["k/a", "k/b"]
    assert r["more"] is True
    assert r["count"] == 3
    r = jget(etcdctl, loaded, "k/", "--prefix", "--limit=3")
    assert keys_of(r) == ["k/a", "k/b", "k/c"] and not r.get("more")

    fields = etcdctl(loaded, "get", "k/", "--prefix", "--count-only", "-w", "fields").stdout
    assert '"Count" : 3' in fields.splitlines()
    assert '"Revision" : 6' in fields.splitlines()
    assert '"Key"' not in fields

    r = jget(etcdctl, loaded, "k/", "--prefix", "--keys-only")
    assert keys_of(r) == ["k/a", "k/b", "k/c"]
    assert all("value" not in kv for kv in r["kvs"])
    assert all(kv["version"] >= 1 for kv in r["kvs"])
    simple = etcdctl(loaded, "get", "k/", "--prefix", "--keys-only").stdout
    assert [line for line in simple.splitlines() if line] == ["k/a", "k/b", "k/c"]

    out = etcdctl(loaded, "get", "k/", "--prefix", "--print-value-only").stdout
    assert out.splitlines() == ["11", "2", "3"]


SORTED_CASES = [
    (["--order=DESCEND"], ["k/c", "k/b", "k/a"]),
    (["--order=ASCEND", "--sort-by=MODIFY"], ["k/b", "k/c", "k/a"]),
    (["--order=DESCEND", "--sort-by=MODIFY"], ["k/a", "k/c", "k/b"]),
    (["--order=DESCEND", "--sort-by=CREATE"], ["k/c", "k/b", "k/a"]),
    (["--order=DESCEND", "--sort-by=VERSION"], ["k/a", "k/b", "k/c"]),
    (["--order=DESCEND", "--sort-by=VALUE"], ["k/c", "k/b", "k/a"]),  # "3" > "2" > "11"
    (["--order=DESCEND", "--sort-by=MODIFY", "--limit=1"], ["k/a"]),
]


def test_get_sorted(loaded, etcdctl) -> None:
    for flags, expected in SORTED_CASES:
        r = jget(etcdctl, loaded, "k/", "--prefix", *flags)
        assert (flags, keys_of(r)) == (flags, expected)
        assert r["count"] == 3


def test_put_prev_kv_ignore_value_ignore_lease(loaded, etcdctl) -> None:
    assert etcdctl(loaded, "put", "k/b", "22", "--prev-kv").stdout.splitlines() == ["OK", "k/b", "2"]  # 7
    lid = lease_id(etcdctl(loaded, "lease", "grant", "600").stdout)
    etcdctl(loaded, "put", "k/b", "--ignore-value", f"--lease={lid}")  # 8: new lease, same value
    (kv,) = jget(etcdctl, loaded, "k/b")["kvs"]
    assert (unb64(kv["value"]), kv["lease"], kv["version"], kv["mod_revision"]) == ("22", int(lid, 16), 3, 8)
    etcdctl(loaded, "put", "k/b", "23", "--ignore-lease")  # 9: new value, same lease
    (kv,) = jget(etcdctl, loaded, "k/b")["kvs"]
    assert (unb64(kv["value"]), kv["lease"], kv["version"], kv["mod_revision"]) == ("23", int(lid, 16), 4, 9)
    res = etcdctl(loaded, "put", "k/none", "--ignore-value", check=False)
    assert res.returncode != 0 and "etcdserver: key not found" in res.stderr
    assert revision(etcdctl, loaded) == 9


# -- del -------------------------------------------------------------------------------


def test_del_single_prefix_prev_kv(loaded, etcdctl) -> None:
    assert etcdctl(loaded, "del", "k/a").stdout.strip() == "1"
    assert keys_of(jget(etcdctl, loaded, "k/", "--prefix")) == ["k/b", "k/c"]
    assert revision(etcdctl, loaded) == 7

    # deleting nothing answers 0 and does not bump the revision
    assert etcdctl(loaded, "del", "k/a").stdout.strip() == "0"
    assert revision(etcdctl, loaded) == 7

    r = json.loads(etcdctl(loaded, "del", "k/", "--prefix", "--prev-kv", "-w", "json").stdout)
    assert r["deleted"] == 2
    assert r["header"]["revision"] == 8
    assert [(unb64(kv["key"]), unb64(kv["value"]), kv["mod_revision"]) for kv in r["prev_kvs"]] == [
        ("k/b", "2", 3),
        ("k/c", "3", 4),
    ]
    assert etcdctl(loaded, "del", "other", "--prev-kv").stdout.splitlines() == ["1", "other", "o"]
    assert jget(etcdctl, loaded, "", "--prefix").get("kvs") is None
    assert revision(etcdctl, loaded) == 9

    # a re-created key starts again at version 1
    etcdctl(loaded, "put", "k/a", "again")
    (kv,) = jget(etcdctl, loaded, "k/a")["kvs"]
    assert (kv["create_revision"], kv["mod_revision"], kv["version"]) == (10, 10, 1)
    # history still answers for the deleted generation
    assert values_of(jget(etcdctl, loaded, "k/a", "--rev=6")) == ["11"]


def test_del_range_and_from_key(loaded, etcdctl) -> None:
    assert etcdctl(loaded, "del", "k/a", "k/c").stdout.strip() == "2"
    assert keys_of(jget(etcdctl, loaded, "", "--prefix")) == ["k/c", "other"]
    assert etcdctl(loaded, "del", "k/c", "--from-key").stdout.strip() == "2"
    assert keys_of(jget(etcdctl, loaded, "", "--prefix")) == []
    assert revision(etcdctl, loaded) == 8


# -- txn -------------------------------------------------------------------------------


def test_txn_success_branch(loaded, etcdctl) -> None:
    script = "\n".join(
        [
            'value("k/a") = "11"',
            'version("k/a") > "1"',
            'mod("k/b") < "4"',
            'create("k/none") = "0"',
            "",
            "put k/a 12",
            "put k/new fresh",
            "del k/c",
            "get k/ --prefix",
            "",
            "put k/failed yes",
            "",
            "",
        ]
    )
    r = json.loads(etcdctl(loaded, "txn", "-w", "json", input=script).stdout)
    assert r["succeeded"] is True
    assert r["header"]["revision"] == 7  # one revision for the whole txn
    kinds = [next(iter(x["Response"])) for x in r["responses"]]
    assert kinds == ["response_put", "response_put", "response_delete_range", "response_range"]
    assert r["responses"][2]["Response"]["response_delete_range"]["deleted"] == 1
    rng = r["responses"][3]["Response"]["response_range"]
    assert keys_of(rng) == ["k/a", "k/b", "k/new"]  # the txn's reads see its own writes
    assert values_of(rng) == ["12", "2", "fresh"]

    now = jget(etcdctl, loaded, "k/", "--prefix")
    assert keys_of(now) == ["k/a", "k/b", "k/new"]
    a, _, new = now["kvs"]
    assert a["mod_revision"] == new["mod_revision"] == new["create_revision"] == 7
    assert a["version"] == 3
    assert jget(etcdctl, loaded, "k/failed").get("count", 0) == 0

    simple = etcdctl(loaded, "txn", input='value("k/a") = "12"\n\nput k/a 13\n\n\n').stdout
    assert simple.splitlines()[0] == "SUCCESS"
    assert values_of(jget(etcdctl, loaded, "k/a")) == ["13"]


def test_txn_failure_branch(loaded, etcdctl) -> None:
    script = 'value("k/a") = "1"\nmod("k/b") = "3"\n\nput k/a wrong\n\nget k/a\nput k/else taken\n\n'
    r = json.loads(etcdctl(loaded, "txn", "-w", "json", input=script).stdout)
    assert r.get("succeeded", False) is False  # omitted when false
    assert r["header"]["revision"] == 7
    rng = r["responses"][0]["Response"]["response_range"]
    assert values_of(rng) == ["11"]
    assert rng["kvs"][0]["mod_revision"] == 5
    assert values_of(jget(etcdctl, loaded, "k/a")) == ["11"]
    assert values_of(jget(etcdctl, loaded, "k/else")) == ["taken"]

    # a failed compare with a read-only else branch does not bump the revision
    r = json.loads(
        etcdctl(loaded, "txn", "-w", "json", input='version("k/none") > "0"\n\nput k/x 1\n\nget k/b\n\n').stdout
    )
    assert r.get("succeeded", False) is False  # omitted when false
    assert r["header"]["revision"] == 7
    assert revision(etcdctl, loaded) == 7
    assert etcdctl(loaded, "txn", input='value("k/b") = "9"\n\n\n\n').stdout.splitlines()[0] == "FAILURE"


def test_txn_interactive_mode(loaded, etcdctl) -> None:
    script = 'mod("k/b") = "3"\n\nput k/b 22\n\nput k/b nope\n\n'
    out = etcdctl(loaded, "txn", "-i", input=script).stdout
    assert "SUCCESS" in out
    (kv,) = jget(etcdctl, loaded, "k/b")["kvs"]
    assert (unb64(kv["value"]), kv["version"], kv["mod_revision"]) == ("22", 2, 7)


# -- watch -----------------------------------------------------------------------------


def test_watch_prefix_prev_kv_replay_then_live(k8s_sql, etcdctl, spawn) -> None:
    url = k8s_sql.url
    etcdctl(url, "put", "w/a", "1")  # 2
    etcdctl(url, "put", "w/a", "2")  # 3
    etcdctl(url, "put", "zzz", "not watched")  # 4
    etcdctl(url, "txn", input="\nput w/b B\nput w/c C\n\n\n")  # 5: two events, one revision
    etcdctl(url, "del", "w/", "--prefix")  # 6: three deletes, one revision

    w = spawn(url, "watch", "--prefix", "w/", "--prev-kv", "--rev=2", "-w", "json")
    replay = watch_events(w, 7)
    events = [ev for r in replay for ev in r["Events"]]
    assert [ev_summary(e) for e in events] == [
        ("PUT", "w/a", "1", 2),
        ("PUT", "w/a", "2", 3),
        ("PUT", "w/b", "B", 5),
        ("PUT", "w/c", "C", 5),
        ("DELETE", "w/a", "", 6),
        ("DELETE", "w/b", "", 6),
        ("DELETE", "w/c", "", 6),
    ]
    # a revision's events come in one response
    by_rev: dict[int, set[int]] = {}
    for i, r in enumerate(replay):
        for ev in r["Events"]:
            by_rev.setdefault(ev["kv"]["mod_revision"], set()).add(i)
    assert all(len(idx) == 1 for idx in by_rev.values()), replay
    # creates carry no prev_kv; updates and deletes carry the previous value
    assert "prev_kv" not in events[0]
    assert events[0]["kv"]["create_revision"] == events[0]["kv"]["mod_revision"] == 2
    assert unb64(events[1]["prev_kv"]["value"]) == "1"
    assert events[1]["kv"]["version"] == 2
    assert [unb64(e["prev_kv"]["value"]) for e in events[4:]] == ["2", "B", "C"]
    assert [e["prev_kv"]["mod_revision"] for e in events[4:]] == [3, 5, 5]

    # the watch is now streaming: live events follow, in order
    etcdctl(url, "put", "w/live", "x")  # 7
    etcdctl(url, "put", "nope", "x")  # 8
    etcdctl(url, "put", "w/live", "y")  # 9
    live = [ev for r in watch_events(w, 2) for ev in r["Events"]]
    assert [ev_summary(e) for e in live] == [("PUT", "w/live", "x", 7), ("PUT", "w/live", "y", 9)]
    assert unb64(live[1]["prev_kv"]["value"]) == "x"
    assert w.proc.poll() is None


def test_watch_single_key_and_range(k8s_sql, etcdctl, spawn) -> None:
    url = k8s_sql.url
    start = revision(etcdctl, url) + 1
    one = spawn(url, "watch", "r/b", f"--rev={start}", "-w", "json")
    rng = spawn(url, "watch", "r/a", "r/c", f"--rev={start}", "-w", "json")  # [r/a, r/c)
    for k in ("r/a", "r/b", "r/bb", "r/c", "r/b"):
        etcdctl(url, "put", k, k.upper())
    assert [ev_summary(e) for r in watch_events(one, 2) for e in r["Events"]] == [
        ("PUT", "r/b", "R/B", start + 1),
        ("PUT", "r/b", "R/B", start + 4),
    ]
    assert [ev_summary(e)[1:] for r in watch_events(rng, 4) for e in r["Events"]] == [
        ("r/a", "R/A", start),
        ("r/b", "R/B", start + 1),
        ("r/bb", "R/BB", start + 2),
        ("r/b", "R/B", start + 4),
    ]


def test_watch_from_compacted_revision_is_canceled(k8s_sql, etcdctl, spawn) -> None:
    check_watch_from_compacted_revision(k8s_sql.url, etcdctl, spawn)


def test_watch_from_compacted_revision_is_canceled_on_real_etcd(etcd, etcdctl, spawn) -> None:
    """The same check against etcd: the expected cancellation is etcd's."""
    check_watch_from_compacted_revision(etcd.url, etcdctl, spawn)


def check_watch_from_compacted_revision(url: str, etcdctl: Etcdctl, spawn) -> None:
    for i in range(5):
        etcdctl(url, "put", "c/key", f"v{i}")  # revisions 2..6
    assert etcdctl(url, "compact", "5").stdout.strip() == "compacted revision 5"
    w = spawn(url, "watch", "c/key", "--rev=3", "-w", "json")
    resp = w.next_json(15)
    assert resp["Canceled"] is True, resp
    assert resp["CompactRevision"] == 5
    assert not resp.get("Events")
    assert w.proc.wait(15) != 0
    assert "required revision has been compacted" in w.stderr()

    # at the compaction point itself history is still there
    ok = spawn(url, "watch", "c/key", "--rev=5", "-w", "json")
    assert [ev_summary(e) for r in watch_events(ok, 2) for e in r["Events"]] == [
        ("PUT", "c/key", "v3", 5),
        ("PUT", "c/key", "v4", 6),
    ]


def check_watch_progress_notify(url: str, etcdctl: Etcdctl, spawn) -> None:
    etcdctl(url, "put", "p/x", "1")  # 2
    w = spawn(url, "watch", "p/idle", "--progress-notify")
    line = w.next_line(timeout=15)  # the servers under test notify every second
    assert line == "progress notify: 2", line
    etcdctl(url, "put", "p/y", "2")  # 3: another key, so still no event for the watch
    deadline = time.monotonic() + 15
    while (line := w.next_line(deadline - time.monotonic())) == "progress notify: 2":
        pass
    assert line == "progress notify: 3", line


def test_watch_progress_notify(k8s_sql, etcdctl, spawn) -> None:
    check_watch_progress_notify(k8s_sql.url, etcdctl, spawn)


def test_watch_progress_notify_on_real_etcd(etcd, etcdctl, spawn) -> None:
    check_watch_progress_notify(etcd.url, etcdctl, spawn)


def test_lock_and_elect(k8s_sql, etcdctl, spawn) -> None:
    """etcdctl's concurrency recipes: sessions (lease + keep-alive), txns on create
    revisions, and watches for the predecessor's DELETE."""
    url = k8s_sql.url
    assert etcdctl(url, "lock", "mylock", "--", "echo", "held").stdout.strip() == "held"

    holder = spawn(url, "lock", "mylock")
    held_key = holder.next_line(timeout=15)
    assert held_key and held_key.startswith("mylock/"), held_key
    waiter = spawn(url, "lock", "mylock", "--", "echo", "second")
    holder.stop()  # SIGTERM: etcdctl closes its session, revoking the lock's lease
    assert waiter.next_line(timeout=15) == "second"
    assert waiter.proc.wait(15) == 0
    assert keys_of(jget(etcdctl, url, "mylock/", "--prefix")) == []

    leader = spawn(url, "elect", "myelection", "p1")
    key = leader.next_line(timeout=15)
    assert key and key.startswith("myelection/")
    assert leader.next_line(timeout=15) == "p1"
    observer = spawn(url, "elect", "-l", "myelection")
    assert (observer.next_line(timeout=15), observer.next_line(timeout=15)) == (key, "p1")
    follower = spawn(url, "elect", "myelection", "p2")
    leader.stop()  # resign: the follower becomes leader, the observer sees it
    follower_key = follower.next_line(timeout=15)
    assert follower_key and follower_key.startswith("myelection/") and follower_key != key
    assert follower.next_line(timeout=15) == "p2"
    assert (observer.next_line(timeout=15), observer.next_line(timeout=15)) == (follower_key, "p2")


# -- leases ----------------------------------------------------------------------------


def test_lease_grant_keepalive_once_timetolive_list_revoke(k8s_sql, etcdctl, spawn) -> None:
    url = k8s_sql.url
    lid = lease_id(etcdctl(url, "lease", "grant", "60").stdout)
    other = lease_id(etcdctl(url, "lease", "grant", "600").stdout)
    assert lid != other
    etcdctl(url, "put", "l/one", "1", f"--lease={lid}")  # 2
    etcdctl(url, "put", "l/two", "2", f"--lease={lid}")  # 3
    etcdctl(url, "put", "l/free", "3")  # 4
    (kv,) = jget(etcdctl, url, "l/one")["kvs"]
    assert kv["lease"] == int(lid, 16)

    assert etcdctl(url, "lease", "keep-alive", "--once", lid).stdout.strip() == f"lease {lid} keepalived with TTL(60)"

    ttl = json.loads(etcdctl(url, "lease", "timetolive", lid, "--keys", "-w", "json").stdout)
    assert ttl["id"] == int(lid, 16)
    assert ttl["granted-ttl"] == 60
    assert 55 <= ttl["ttl"] <= 60
    assert sorted(unb64(k) for k in ttl["keys"]) == ["l/one", "l/two"]
    simple = etcdctl(url, "lease", "timetolive", lid, "--keys").stdout.strip()
    assert re.fullmatch(
        rf"lease {lid} granted with TTL\(60s\), remaining\(\d+s\), attached keys\(\[l/one l/two\]\)", simple
    )

    listed = etcdctl(url, "lease", "list").stdout.splitlines()
    assert listed[0] == "found 2 leases"
    assert sorted(listed[1:]) == sorted([lid, other])

    # revoke: the keys go in one revision, and a watcher sees the DELETEs
    w = spawn(url, "watch", "l/", "--prefix", "--prev-kv", "--rev=5", "-w", "json")
    assert etcdctl(url, "lease", "revoke", lid).stdout.strip() == f"lease {lid} revoked"
    (resp,) = watch_events(w, 2)
    assert [ev_summary(e) for e in resp["Events"]] == [("DELETE", "l/one", "", 5), ("DELETE", "l/two", "", 5)]
    assert all(e["prev_kv"]["lease"] == int(lid, 16) for e in resp["Events"])
    assert keys_of(jget(etcdctl, url, "l/", "--prefix")) == ["l/free"]
    assert revision(etcdctl, url) == 5

    assert etcdctl(url, "lease", "timetolive", lid).stdout.strip() == f"lease {lid} already expired"
    assert etcdctl(url, "lease", "list").stdout.splitlines() == ["found 1 leases", other]
    again = etcdctl(url, "lease", "revoke", lid, check=False)
    assert again.returncode != 0
    assert "etcdserver: requested lease not found" in again.stderr
    bad_put = etcdctl(url, "put", "l/x", "1", f"--lease={lid}", check=False)
    assert bad_put.returncode != 0
    assert "etcdserver: requested lease not found" in bad_put.stderr
    assert revision(etcdctl, url) == 5


def test_lease_keep_alive_process_outlives_ttl_then_expires(k8s_sql, etcdctl, spawn) -> None:
    url = k8s_sql.url
    ttl = 4  # etcdctl renews every ttl/3 s
    t0 = time.monotonic()
    lid = lease_id(etcdctl(url, "lease", "grant", str(ttl)).stdout)
    etcdctl(url, "put", "ka/key", "alive", f"--lease={lid}")  # 2

    ka = spawn(url, "lease", "keep-alive", lid)
    beats = 0
    while time.monotonic() - t0 < ttl + 2.5:  # well past the TTL
        line = ka.next_line(timeout=ttl + 2)
        assert line == f"lease {lid} keepalived with TTL({ttl})", line
        beats += 1
    assert beats >= 3
    assert values_of(jget(etcdctl, url, "ka/key")) == ["alive"]
    left = json.loads(etcdctl(url, "lease", "timetolive", lid, "-w", "json").stdout)
    assert 0 < left["ttl"] <= ttl

    # stop renewing: the lease expires within about its TTL and the key is deleted
    w = spawn(url, "watch", "ka/key", "--prev-kv", "--rev=3", "-w", "json")
    ka.stop()
    t1 = time.monotonic()
    (resp,) = watch_events(w, 1, timeout=ttl + 10)
    (ev,) = resp["Events"]
    assert ev_summary(ev) == ("DELETE", "ka/key", "", 3)
    assert unb64(ev["prev_kv"]["value"]) == "alive"
    assert time.monotonic() - t1 < ttl + 10
    assert jget(etcdctl, url, "ka/key").get("count", 0) == 0
    assert etcdctl(url, "lease", "timetolive", lid).stdout.strip() == f"lease {lid} already expired"


def test_lease_expiry_deletes_keys(k8s_sql, etcdctl, spawn) -> None:
    url = k8s_sql.url
    t0 = time.monotonic()
    lid = lease_id(etcdctl(url, "lease", "grant", "2").stdout)
    etcdctl(url, "put", "exp/a", "1", f"--lease={lid}")  # 2
    etcdctl(url, "put", "exp/b", "2", f"--lease={lid}")  # 3
    etcdctl(url, "put", "exp/keep", "3")  # 4
    w = spawn(url, "watch", "exp/", "--prefix", "--prev-kv", "--rev=5", "-w", "json")
    (resp,) = watch_events(w, 2, timeout=15)
    elapsed = time.monotonic() - t0
    assert [ev_summary(e) for e in resp["Events"]] == [("DELETE", "exp/a", "", 5), ("DELETE", "exp/b", "", 5)]
    assert [unb64(e["prev_kv"]["value"]) for e in resp["Events"]] == ["1", "2"]
    assert elapsed >= 1.5, f"lease with TTL 2s expired after {elapsed:.2f}s"
    assert keys_of(jget(etcdctl, url, "exp/", "--prefix")) == ["exp/keep"]
    assert lid not in etcdctl(url, "lease", "list").stdout
    assert revision(etcdctl, url) == 5


# -- compaction ------------------------------------------------------------------------


def test_compaction(k8s_sql, etcdctl) -> None:
    url = k8s_sql.url
    for i in range(1, 6):
        etcdctl(url, "put", "cmp", f"v{i}")  # revisions 2..6
    assert etcdctl(url, "compact", "4").stdout.strip() == "compacted revision 4"

    for rev in (2, 3):
        res = etcdctl(url, "get", "cmp", f"--rev={rev}", check=False)
        assert res.returncode != 0
        assert "etcdserver: mvcc: required revision has been compacted" in res.stderr
    assert values_of(jget(etcdctl, url, "cmp", "--rev=4")) == ["v3"]
    assert values_of(jget(etcdctl, url, "cmp", "--rev=5")) == ["v4"]
    (kv,) = jget(etcdctl, url, "cmp")["kvs"]
    assert (kv["version"], kv["create_revision"], kv["mod_revision"]) == (5, 2, 6)

    again = etcdctl(url, "compact", "3", check=False)
    assert again.returncode != 0
    assert "etcdserver: mvcc: required revision has been compacted" in again.stderr
    future = etcdctl(url, "compact", "100", check=False)
    assert future.returncode != 0
    assert "etcdserver: mvcc: required revision is a future revision" in future.stderr

    assert etcdctl(url, "compact", "6", "--physical").stdout.strip() == "compacted revision 6"
    res = etcdctl(url, "get", "cmp", "--rev=5", check=False)
    assert "required revision has been compacted" in res.stderr
    assert values_of(jget(etcdctl, url, "cmp", "--rev=6")) == ["v5"]
    assert revision(etcdctl, url) == 6  # compaction does not create a revision
    etcdctl(url, "put", "cmp", "v6")
    assert jget(etcdctl, url, "cmp")["kvs"][0]["mod_revision"] == 7


# -- maintenance and cluster -----------------------------------------------------------


def test_endpoint_status_health_member_list(k8s_sql, etcdctl) -> None:
    url = k8s_sql.url
    for i in range(3):
        etcdctl(url, "put", f"s/{i}", "x" * 100)  # revision 4
    (st,) = json.loads(etcdctl(url, "endpoint", "status", "-w", "json").stdout)
    assert st["Endpoint"] == url
    s = st["Status"]
    assert re.fullmatch(r"3\.6\.\d+", s["version"]), s["version"]
    assert s["header"]["revision"] == 4
    assert s["raftIndex"] == 4
    assert s["dbSize"] > 0
    assert 0 < s.get("dbSizeInUse", 1) <= s["dbSize"]
    assert s["leader"] == s["header"]["member_id"] != 0
    assert s["raftTerm"] >= 1
    assert s["header"]["cluster_id"] != 0
    table = etcdctl(url, "endpoint", "status", "-w", "table").stdout
    assert url in table and s["version"] in table

    (h,) = json.loads(etcdctl(url, "endpoint", "health", "-w", "json").stdout)
    assert h["endpoint"] == url and h["health"] is True and not h.get("error")
    assert f"{url} is healthy" in etcdctl(url, "endpoint", "health").stdout

    ml = json.loads(etcdctl(url, "member", "list", "-w", "json").stdout)
    (m,) = ml["members"]
    assert m["clientURLs"] == [url]
    assert m["ID"] == s["leader"] == ml["header"]["member_id"]
    assert m["name"] == "default"
    assert ml["header"]["cluster_id"] == s["header"]["cluster_id"]
    assert url in etcdctl(url, "member", "list").stdout

    (hk,) = json.loads(etcdctl(url, "endpoint", "hashkv", "-w", "json").stdout)
    assert hk["HashKV"]["hash_revision"] == 4 and hk["HashKV"]["hash"] != 0
    (hk2,) = json.loads(etcdctl(url, "endpoint", "hashkv", "-w", "json").stdout)
    assert hk2["HashKV"]["hash"] == hk["HashKV"]["hash"]
    etcdctl(url, "put", "s/0", "changed")
    (hk3,) = json.loads(etcdctl(url, "endpoint", "hashkv", "-w", "json").stdout)
    assert hk3["HashKV"]["hash_revision"] == 5 and hk3["HashKV"]["hash"] != hk["HashKV"]["hash"]

    # the identity is stable across calls
    (st2,) = json.loads(etcdctl(url, "endpoint", "status", "-w", "json").stdout)
    assert st2["Status"]["leader"] == s["leader"]
    assert st2["Status"]["header"]["cluster_id"] == s["header"]["cluster_id"]


def test_defrag_keeps_data(k8s_sql, etcdctl) -> None:
    url = k8s_sql.url
    for i in range(0, 50, 10):
        etcdctl(url, "put", f"d/{i:02}", "y" * 2000)
    etcdctl(url, "put", "d/big", "z" * 100_000)
    etcdctl(url, "del", "d/big")
    rev = revision(etcdctl, url)
    etcdctl(url, "compact", str(rev), "--physical")
    out = etcdctl(url, "defrag").stdout
    assert f"Finished defragmenting etcd member[{url}]" in out
    assert keys_of(jget(etcdctl, url, "d/", "--prefix")) == ["d/00", "d/10", "d/20", "d/30", "d/40"]
    assert revision(etcdctl, url) == rev
    (st,) = json.loads(etcdctl(url, "endpoint", "status", "-w", "json").stdout)
    assert st["Status"]["dbSize"] > 0
    etcdctl(url, "put", "d/after", "1")
    assert revision(etcdctl, url) == rev + 1


# -- snapshot and restore --------------------------------------------------------------


def test_snapshot_save_and_restore(k8s_sql, k8s_sql_factory, etcdctl, peers_bin: Path, tmp_path: Path) -> None:
    etcdctl_bin = peers_bin / "etcdctl"
    url = k8s_sql.url
    etcdctl(url, "put", "snap/a", "1")  # 2
    etcdctl(url, "put", "snap/b", "2")  # 3
    etcdctl(url, "put", "snap/a", "11")  # 4
    lid = lease_id(etcdctl(url, "lease", "grant", "3600").stdout)
    etcdctl(url, "put", "snap/leased", "L", f"--lease={lid}")  # 5
    etcdctl(url, "del", "snap/b")  # 6
    etcdctl(url, "compact", "3")
    etcdctl(url, "put", "snap/c", "3")  # 7

    path = tmp_path / "backup.db"
    res = etcdctl(url, "snapshot", "save", str(path))
    assert f"Snapshot saved at {path}" in res.stdout + res.stderr
    blob = path.read_bytes()
    assert len(blob) > 32
    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest(), "snapshot does not end with its SHA-256"
    # etcd's own format: etcd's tools read it (etcdutl restore: tests/test_migrate.py)
    status = subprocess.run(
        [str(etcdctl_bin.parent / "etcdutl"), "snapshot", "status", str(path), "-w", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["revision"] == 7

    # the source keeps serving after the snapshot
    etcdctl(url, "put", "snap/after", "x")  # 8

    new_dir = tmp_path / "restored"
    out = subprocess.run(
        [sys.executable, "-m", "k8s_sql", "restore", str(path), "--data-dir", str(new_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "revision 7" in out.stdout

    # restoring over an existing data dir is refused
    again = subprocess.run(
        [sys.executable, "-m", "k8s_sql", "restore", str(path), "--data-dir", str(new_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0

    restored = k8s_sql_factory(data_dir=new_dir)
    r = restored.url
    got = jget(etcdctl, r, "snap/", "--prefix")
    assert got["header"]["revision"] == 7
    assert keys_of(got) == ["snap/a", "snap/c", "snap/leased"]
    assert values_of(got) == ["11", "3", "L"]
    a = got["kvs"][0]
    assert (a["create_revision"], a["mod_revision"], a["version"]) == (2, 4, 2)
    assert values_of(jget(etcdctl, r, "snap/a", "--rev=3")) == ["1"]
    assert "required revision has been compacted" in etcdctl(r, "get", "snap/a", "--rev=2", check=False).stderr
    ttl = json.loads(etcdctl(r, "lease", "timetolive", lid, "--keys", "-w", "json").stdout)
    assert ttl["granted-ttl"] == 3600 and [unb64(k) for k in ttl["keys"]] == ["snap/leased"]
    etcdctl(r, "put", "snap/new", "n")
    assert jget(etcdctl, r, "snap/new")["kvs"][0]["mod_revision"] == 8


def test_restore_rejects_corrupt_snapshot(k8s_sql, etcdctl, tmp_path: Path) -> None:
    etcdctl(k8s_sql.url, "put", "x", "y")
    path = tmp_path / "snap.db"
    etcdctl(k8s_sql.url, "snapshot", "save", str(path))
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "bad.db"
    bad.write_bytes(bytes(blob))
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(bytes(path.read_bytes()[:-1]))
    for snap in (bad, truncated):
        target = tmp_path / f"restore-{snap.stem}"
        out = subprocess.run(
            [sys.executable, "-m", "k8s_sql", "restore", str(snap), "--data-dir", str(target)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0, out.stdout
        assert not (target / "state.db").exists()
