"""logs.py: the JSON format's keys, fields, and the password kept out in both formats."""

from __future__ import annotations

import json
import logging

from k8s_sql import dsn, logs

DSN = "postgres://k8s:s3cret-pw@db.example:5432/k8s"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("k8s_sql.test").makeRecord(
        "k8s_sql.test", logging.WARNING, "server.py", 42, msg, args, None, extra=extra
    )
    return record


def test_json_has_etcds_keys_then_the_fields() -> None:
    f = logs.JsonFormatter(dsn.secrets(DSN))
    line = f.format(_record("apply request took too long: %s", "x", fields={"method": "Put", "took": "1.5s"}))
    entry = json.loads(line)
    assert list(entry)[:4] == ["level", "ts", "caller", "msg"]
    assert entry["level"] == "warn" and entry["caller"] == "server.py:42"
    assert entry["msg"] == "apply request took too long: x"
    assert entry["method"] == "Put" and entry["took"] == "1.5s"


def test_password_never_in_a_line() -> None:
    hidden = dsn.secrets(DSN)
    for formatter in (logs.JsonFormatter(hidden), dsn.RedactingFormatter(logs.TEXT_FORMAT, hidden)):
        line = formatter.format(_record("cannot open %s", DSN, fields={"dsn": DSN}))
        assert "s3cret-pw" not in line, line
        assert "db.example" in line  # the rest of the DSN stays readable


def test_outputs_are_refused_one_line(tmp_path) -> None:
    import pytest

    with pytest.raises(ValueError, match="--log-outputs: cannot open"):
        logs.output_stream(str(tmp_path / "no" / "such" / "dir" / "x.log"))
    with pytest.raises(ValueError):
        logs.check_outputs([])
