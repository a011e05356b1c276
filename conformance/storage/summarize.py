"""Count a `go test -json` stream of the storage conformance suite.

    python summarize.py TEST_JSON KNOWN_FAILURES RESULTS_DIR [ELAPSED_SECONDS]

A test is counted when it is a leaf (no subtests), or when it failed on its own
(it failed but none of its subtests did: an error in the parent's body or
cleanup). A test that started but never finished (the binary panicked or timed
out) counts as failed. Names are "<package>/<Test>/<subtest>...", with the
package's last path element (etcd3, cacher).

Writes RESULTS_DIR/results.txt (STATUS<TAB>name<TAB>seconds<TAB>notes), prints
the failures, and ends with
    storage conformance: N passed, M failed, K skipped (of T)
Exit status: 0 when every failure is in KNOWN_FAILURES, 1 when one is not,
2 when nothing ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARKER = "k8s-sql testserver: serving on"


def load_known(path: Path) -> dict[str, str]:
    """`name  reason` lines; blank lines and lines starting with # are ignored."""
    known: dict[str, str] = {}
    if not path.exists():
        return known
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        known[name] = reason.strip()
    return known


def markdown_table(counted: list[str], final, reached_server, known: dict[str, str]) -> str:  # type: ignore[no-untyped-def]
    """One row per top-level test: its counted (sub)tests by outcome."""
    groups: dict[str, list[str]] = {}
    for n in counted:
        groups.setdefault("/".join(n.split("/")[:2]), []).append(n)
    rows = [
        "| test | cases | passed | failed | skipped | on k8s-sql | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for top in sorted(groups):
        mine = groups[top]
        notes = [f"skip: `{n[len(top) + 1 :]}`" for n in mine if final(n) == "skip"]
        notes += [
            f"FAIL: `{n[len(top) + 1 :] or top}`: {known.get(n, 'not in known_failures.txt')}"
            for n in mine
            if final(n) == "fail"
        ]
        rows.append(
            f"| {top} | {len(mine)} | {sum(final(n) == 'pass' for n in mine)} | "
            f"{sum(final(n) == 'fail' for n in mine)} | {sum(final(n) == 'skip' for n in mine)} | "
            f"{sum(reached_server(n) for n in mine)} | {'<br>'.join(notes)} |"
        )
    return "\n".join(rows) + "\n"


def main() -> int:
    stream, known_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    elapsed = sys.argv[4] if len(sys.argv) > 4 else "?"
    known = load_known(known_path)

    status: dict[str, str] = {}
    seconds: dict[str, float] = {}
    used_server: set[str] = set()
    output: dict[str, list[str]] = {}  # the first lines each test printed
    pkg_status: dict[str, str] = {}
    pkg_output: dict[str, list[str]] = {}
    order: list[str] = []
    for raw in stream.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(raw)
        except json.JSONDecodeError:
            continue
        pkg = ev.get("Package", "").rsplit("/", 1)[-1]
        action = ev.get("Action")
        test = ev.get("Test")
        if not test:
            if action in ("pass", "fail", "skip"):
                pkg_status[pkg] = action
            elif action == "output":
                pkg_output.setdefault(pkg, []).append(ev.get("Output", ""))
            continue
        name = f"{pkg}/{test}"
        if action == "run":
            if name not in status:
                order.append(name)
            status[name] = "run"
        elif action in ("pass", "fail", "skip"):
            if name not in status:
                order.append(name)
            status[name] = action
            seconds[name] = float(ev.get("Elapsed") or 0)
        elif action == "output":
            text = ev.get("Output", "")
            if MARKER in text:
                used_server.add(name)
            lines = output.setdefault(name, [])
            if len(lines) < 20 and not text.startswith(("=== ", "--- ")):
                lines.append(text)

    names = set(status)
    children: dict[str, list[str]] = {}
    for n in names:
        parent = n.rsplit("/", 1)[0]
        if parent in names and parent.count("/") >= 1:
            children.setdefault(parent, []).append(n)

    def final(n: str) -> str:
        s = status[n]
        return "fail" if s == "run" else s

    def descendants(n: str) -> list[str]:
        out: list[str] = []
        for c in children.get(n, []):
            out.append(c)
            out.extend(descendants(c))
        return out

    def reached_server(n: str) -> bool:
        parts = n.split("/")
        return any("/".join(parts[:i]) in used_server for i in range(2, len(parts) + 1))

    def failed_on_its_own(n: str) -> bool:
        return final(n) == "fail" and not any(final(d) == "fail" for d in descendants(n))

    counted = [n for n in order if n not in children or failed_on_its_own(n)]

    # A package that failed without a failing test (build error, panic outside
    # a test, TestMain failure) is a failure of its own.
    for pkg, s in pkg_status.items():
        if s == "fail" and not any(final(n) == "fail" for n in counted if n.startswith(pkg + "/")):
            name = f"{pkg}/(package)"
            status[name] = "fail"
            counted.append(name)

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for n in sorted(counted):
        notes = []
        if status[n] == "run":
            notes.append("did not finish")
        if reached_server(n):
            notes.append("k8s-sql")
        if final(n) == "fail":
            notes.append("known failure" if n in known else "UNEXPECTED")
        lines.append(f"{final(n).upper()}\t{n}\t{seconds.get(n, 0):.2f}\t{','.join(notes)}")
    (out_dir / "results.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "results.md").write_text(markdown_table(counted, final, reached_server, known))

    passed = sum(final(n) == "pass" for n in counted)
    failed = [n for n in counted if final(n) == "fail"]
    skipped = sum(final(n) == "skip" for n in counted)
    unexpected = [n for n in failed if n not in known]

    for pkg in sorted({n.split("/", 1)[0] for n in counted}):
        mine = [n for n in counted if n.startswith(pkg + "/")]
        print(
            f"  {pkg}: {sum(final(n) == 'pass' for n in mine)} passed, "
            f"{sum(final(n) == 'fail' for n in mine)} failed, "
            f"{sum(final(n) == 'skip' for n in mine)} skipped (of {len(mine)}; "
            f"{sum(reached_server(n) for n in mine)} ran against k8s-sql)"
        )
    for n in failed:
        tag = "known" if n in known else "UNEXPECTED"
        extra = " (did not finish)" if status[n] == "run" else ""
        print(f"  FAIL [{tag}] {n}{extra}")
        if n not in known:
            for o in output.get(n, ()):
                print("      " + o.rstrip())
    for pkg, out in pkg_output.items():
        if f"{pkg}/(package)" in failed:
            print(f"  {pkg}: the package failed outside any test; its last output:")
            for o in out[-15:]:
                print("      " + o.rstrip())
    stale = [n for n in known if n in status and final(n) == "pass"]
    for n in stale:
        print(f"  now passing, remove from known_failures.txt: {n}")
    print(f"  results: {out_dir / 'results.txt'}; go test ran {elapsed}s")
    print(f"storage conformance: {passed} passed, {len(failed)} failed, {skipped} skipped (of {len(counted)})")
    if not counted:
        return 2
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
