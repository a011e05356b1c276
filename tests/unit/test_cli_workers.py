"""--workers: a count, or auto (one per core this process may run on)."""

from __future__ import annotations

import os

import click
import pytest

from k8s_sql.cli import _workers


def test_workers_auto_is_the_usable_cores() -> None:
    assert _workers("auto") == len(os.sched_getaffinity(0)) >= 1
    assert _workers("AUTO") == _workers("auto")
    assert _workers("3") == 3


def test_workers_other_words_are_refused() -> None:
    with pytest.raises(click.BadParameter, match="'many' is not a number or auto"):
        _workers("many")
