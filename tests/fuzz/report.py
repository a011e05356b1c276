"""The status-code table (RPC x code -> count) and the lines CI shows.

A test attaches its table as the user property ``fuzz`` (``record``), which the root
conftest's ``pytest_terminal_summary`` prints at the end of the session.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from .driver import Results, Violation
from .generate import METHODS

CODE_ORDER = [
    "OK", "INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
    "UNIMPLEMENTED", "INTERNAL", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN",
]  # fmt: skip


def table_text(table: dict[tuple[str, str], int] | Counter[tuple[str, str]]) -> str:
    """Rows: every RPC of etcdserverpb (none may be missing); columns: the codes seen."""
    codes = sorted({c for _, c in table}, key=lambda c: (CODE_ORDER.index(c) if c in CODE_ORDER else 99, c))
    rows = [m.label for m in METHODS.values()]
    width = max(len(r) for r in rows)
    head = f"{'RPC':<{width}} " + " ".join(f"{c[:12]:>12}" for c in codes) + f" {'total':>8}"
    lines = [head]
    totals: Counter[str] = Counter()
    for r in rows:
        counts = [table.get((r, c), 0) for c in codes]
        totals.update(dict(zip(codes, counts, strict=True)))
        lines.append(f"{r:<{width}} " + " ".join(f"{n:>12}" for n in counts) + f" {sum(counts):>8}")
    lines.append(f"{'total':<{width}} " + " ".join(f"{totals[c]:>12}" for c in codes) + f" {sum(totals.values()):>8}")
    return "\n".join(lines)


def summary(name: str, seed: int, res: Results) -> str:
    rate = res.frames / res.seconds if res.seconds else 0.0
    lines = [
        f"fuzz {name}: seed {seed} (K8S_SQL_FUZZ_SEED={seed} replays the inputs), {res.calls} calls, "
        f"{res.frames} requests in {res.seconds:.1f}s ({rate:.0f}/s); "
        f"RSS after warm-up {res.rss_warm_kib // 1024} MiB, at the end {res.rss_end_kib // 1024} MiB "
        f"(at checkpoints {res.rss_samples_mib}); "
        f"expensive inputs sent {res.budget_used}",
        table_text(res.table),
        "by origin: "
        + ", ".join(f"{o}/{c}={n}" for (o, c), n in sorted(res.origins.items(), key=lambda x: (x[0][0], -x[1]))),
    ]
    return "\n".join(lines)


def grouped(violations: list[Violation], examples: int = 2) -> list[str]:
    """One line per (RPC, code, reason), with the first examples of each."""
    groups: dict[tuple[str, str, str], list[Violation]] = defaultdict(list)
    for x in violations:
        groups[(x.method, x.code, x.reason)].append(x)
    out = []
    for (method, code, reason), xs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        out.append(f"{len(xs)}x {method} -> {code}: {reason}")
        out.extend(f"    e.g. {x.line()}" for x in xs[:examples])
    return out


def record(record_property: Any, name: str, res: Results) -> None:
    """Attach the run's table as the user property ``fuzz``: the root conftest's
    ``pytest_terminal_summary`` prints each such property (as text) at the end of
    the session, under pytest-xdist too, where only the controller sees every report."""
    record_property(
        "fuzz",
        f"{name}: {res.frames} requests ({res.calls} calls) in {res.seconds:.1f}s\n{table_text(res.table)}",
    )
