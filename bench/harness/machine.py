"""What the benchmarks ran on: CPU, memory, kernel, tool versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def _first(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _out(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr).strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def describe(extra: dict[str, str]) -> dict[str, object]:
    mem_kb = _first("/proc/meminfo", "MemTotal").split()[0]
    info: dict[str, object] = {
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count() or 0,
        "ram_gib": round(int(mem_kb) / 1024 / 1024, 1) if mem_kb.isdigit() else "?",
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "go": _out(["go", "version"]),
        "load_avg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    info.update(extra)
    return info


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "?"


def binary_version(path: Path, *args: str) -> str:
    return _out([str(path), *args])


def go_mod_version(go_mod: Path, module: str) -> str:
    """The version of ``module`` that a go.mod pins."""
    try:
        for line in go_mod.read_text().splitlines():
            parts = line.split()
            if module in parts:
                return f"{module} {parts[parts.index(module) + 1]}"
    except (OSError, IndexError):
        pass
    return "?"


def git_commit(root: Path) -> str:
    """The commit the benchmarked k8s-sql comes from, marked when src/ has local changes."""
    head = _out(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    try:
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return head + (" with local changes in src/" if dirty else "")
