"""Log lines: text (the default) or JSON as etcd writes them, to stderr, stdout or files.

etcd logs with zap's JSON encoder: one object per line with ``level``, ``ts``,
``caller`` and ``msg`` first, then the entry's fields. ``--log-format json`` writes
the same keys (``ts`` as RFC 3339 with microseconds and the UTC offset, as etcd's
``--log-rfc3339``-style default does), plus ``logger`` and the fields a call passed
as ``extra={"fields": {...}}``; ``--log-format text`` keeps the one-line format.

Every line, in either format, has passed through :func:`k8s_sql.dsn.scrub`: the
endpoint's password never reaches a log (see :mod:`k8s_sql.dsn`).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from k8s_sql import dsn

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}


class JsonFormatter(dsn.RedactingFormatter):
    """zap's production encoder's keys, one JSON object per line."""

    def __init__(self, hidden: list[str], tracebacks: bool = False) -> None:
        super().__init__("%(message)s", hidden, tracebacks)

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="microseconds")
        entry: dict[str, Any] = {
            "level": LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "ts": ts,
            "caller": f"{record.module}.py:{record.lineno}",
            "msg": record.getMessage(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(str(key), value)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).strip()
        if record.stack_info and self.tracebacks:
            entry["stacktrace"] = record.stack_info
        return dsn.scrub(json.dumps(entry, default=str, ensure_ascii=False), self.hidden)


def output_stream(name: str) -> TextIO:
    """etcd's --log-outputs values: ``stderr``, ``stdout``, or a file path (appended)."""
    if name == "stderr":
        return sys.stderr
    if name == "stdout":
        return sys.stdout
    try:
        return open(name, "a", encoding="utf-8", buffering=1)
    except OSError as e:
        raise ValueError(f"--log-outputs: cannot open {name}: {e.strerror or e}") from None


def check_outputs(outputs: list[str]) -> None:
    """Refuse what etcd refuses: ``default`` is stderr; an empty list is an error."""
    if not outputs:
        raise ValueError("--log-outputs: give stderr, stdout or a file path")


def configure(level: int, log_format: str, outputs: list[str], endpoint: str, *more: str) -> None:
    """Set up the root logger: level, format, outputs, the endpoint's password (and
    those of ``more`` DSNs) kept out."""
    hidden = sorted({s for d in (endpoint, *more) if d for s in dsn.secrets(d)}, key=len, reverse=True)
    tracebacks = level <= logging.DEBUG
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(hidden, tracebacks)
    else:
        formatter = dsn.RedactingFormatter(TEXT_FORMAT, hidden, tracebacks)
    handlers: list[logging.Handler] = []
    for name in dict.fromkeys("stderr" if o == "default" else o for o in outputs):
        handler = logging.StreamHandler(output_stream(name))
        handler.setFormatter(formatter)
        handlers.append(handler)
    logging.basicConfig(level=level, handlers=handlers, force=True)
