"""Process measurement from /proc: CPU seconds and resident memory of process trees,
sampled every 100 ms while a workload runs, and CPU pinning."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of each process plus the cutime+cstime of children it has reaped."""
    ticks = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is not None:  # fields 14-17 (1-based) are at 11-14 here
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def vmhwm_bytes(pid: int) -> int:
    """The kernel's peak RSS of one process over its whole life (cannot be reset)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pin(pid: int, cores: set[int]) -> None:
    """Pin every thread of ``pid`` and of its descendants (new threads and forks inherit)."""
    for p in descendants(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
            except OSError:
                pass


@dataclass
class Group:
    """Processes measured together: the frontends of one server under test (each a tree),
    or a database server's tree."""

    roots: list[int]
    trees: list[list[int]] = field(default_factory=list)

    def refresh(self) -> None:
        self.trees = [descendants(r) for r in self.roots]

    def cpu(self) -> float:
        return sum(cpu_seconds(t) for t in self.trees)

    def rss(self) -> list[int]:
        return [rss_bytes(t) for t in self.trees]


@dataclass
class Window:
    """What a group used between two instants."""

    cpu_s: float
    peak_rss_mb: float  # the largest single tree (one frontend, or the database server)
    peak_rss_total_mb: float  # all trees of the group together
    vmhwm_mb: float  # kernel peak RSS of the root processes since they started (max over roots)


class Sampler:
    """Samples CPU and RSS of named groups every ``interval`` seconds in a thread."""

    def __init__(self, groups: dict[str, Group], interval: float = 0.1) -> None:
        self.groups = groups
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[float, list[int]]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = time.time()
        self.samples.append((now, {name: (g.cpu(), g.rss()) for name, g in self.groups.items()}))

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            if n % 10 == 0:  # pick up new processes (PostgreSQL backends, workers) once a second
                for g in self.groups.values():
                    g.refresh()
            self._sample()

    def __enter__(self) -> Sampler:
        for g in self.groups.values():
            g.refresh()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for g in self.groups.values():
            g.refresh()
        self._sample()

    @property
    def start(self) -> float:
        return self.samples[0][0]

    @property
    def end(self) -> float:
        return self.samples[-1][0]

    def window(self, name: str, t0: float | None = None, t1: float | None = None) -> Window:
        """CPU used and peak RSS of group ``name`` between t0 and t1 (default: everything)."""
        t0 = self.start if t0 is None else t0
        t1 = self.end if t1 is None else t1
        inside = [s for s in self.samples if t0 - self.interval / 2 <= s[0] <= t1 + self.interval / 2]
        if len(inside) < 2:  # a window shorter than one sample: the nearest samples around it
            before = [s for s in self.samples if s[0] <= t0] or self.samples[:1]
            after = [s for s in self.samples if s[0] >= t1] or self.samples[-1:]
            inside = [before[-1], after[0]]
        cpu = inside[-1][1][name][0] - inside[0][1][name][0]
        peak_one = max((max(s[1][name][1], default=0) for s in inside), default=0)
        peak_all = max((sum(s[1][name][1]) for s in inside), default=0)
        hwm = max((vmhwm_bytes(r) for r in self.groups[name].roots), default=0)
        return Window(max(cpu, 0.0), peak_one / MIB, peak_all / MIB, hwm / MIB)
