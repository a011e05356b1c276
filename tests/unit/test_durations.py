"""Durations in flags read as etcd reads them: Go's time.ParseDuration, plus plain seconds."""

from __future__ import annotations

import pytest

from k8s_sql.config import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        # Go's own examples (time.ParseDuration's documentation and tests) and etcd's usage
        ("300ms", 0.3),
        ("-1.5h", -5400.0),
        ("2h45m", 9900.0),
        ("1m30s", 90.0),
        ("10m", 600.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("300us", 300e-6),
        ("300\u00b5s", 300e-6),  # µs (MICRO SIGN)
        ("300\u03bcs", 300e-6),  # μs (GREEK SMALL LETTER MU)
        ("1ns", 1e-9),
        ("1.000000001s", 1.000000001),
        ("0", 0.0),
        ("+5s", 5.0),
        ("-0", 0.0),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("1h2m3s4ms5us6ns", 3723.004005006),
        ("39h9m14.425s", 140_954.425),
        # k8s-sql's earlier plain seconds stay accepted
        ("10", 10.0),
        ("0.25", 0.25),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'time: invalid duration ""'),
        ("3", None),  # plain seconds: no error
        ("-", 'time: invalid duration "-"'),
        ("s", 'time: invalid duration "s"'),
        (".", 'time: invalid duration "."'),
        ("-.", 'time: invalid duration "-."'),
        (".s", 'time: invalid duration ".s"'),
        ("+.s", 'time: invalid duration "+.s"'),
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        ("1m30x", 'time: unknown unit "x" in duration "1m30x"'),
        ("1h-2m", 'time: unknown unit "h-" in duration "1h-2m"'),
        ("1.5", None),
        ("1m30", 'time: missing unit in duration "1m30"'),
        ("3000000h", 'time: invalid duration "3000000h"'),  # past Go's 292 years
        ("inf", 'time: invalid duration "inf"'),
        ("nan", 'time: invalid duration "nan"'),
        ("1e3", 'time: unknown unit "e" in duration "1e3"'),
        (" 1s", 'time: invalid duration " 1s"'),
        ("1_000s", 'time: unknown unit "_" in duration "1_000s"'),
    ],
)
def test_bad_durations_fail_with_gos_message(text: str, message: str | None) -> None:
    if message is None:
        parse_duration(text)
        return
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert str(e.value) == message
