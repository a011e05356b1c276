"""The command-line reference cannot drift from the code: docs/cli.md (the output of
``k8s-sql --help`` and ``k8s-sql restore --help``) and README's synopsis are generated
by cog blocks, and this test fails when regenerating them would change a line.

To regenerate after changing an option: ``.venv/bin/cog -r docs/cli.md README.md``.
"""

from __future__ import annotations

import io
from pathlib import Path

import click
import pytest
from conftest import missing

from k8s_sql.cli import main

try:
    from cogapp import Cog
except ImportError:  # an interpreter other than scripts/test's .venv
    Cog = None  # type: ignore[assignment, misc]

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["README.md", "docs/cli.md", "docs/monitoring.md"]


@pytest.mark.parametrize("doc", GENERATED)
def test_doc_matches_help(doc: str) -> None:
    if Cog is None:
        missing("cogapp is not installed in this Python (scripts/test installs it into .venv)")
    out = io.StringIO()
    cog = Cog()
    cog.set_output(stdout=out, stderr=out)
    status = cog.main(["cog", "--check", "--diff", "--verbosity=1", str(ROOT / doc)])
    assert status == 0, (
        f"{doc} is stale: the command's --help changed. Regenerate it with\n"
        f"    .venv/bin/cog -r docs/cli.md README.md\n{out.getvalue()}"
    )


def _commands() -> list[tuple[str, click.Command]]:
    assert isinstance(main, click.Group)
    return [("k8s-sql", main), *((f"k8s-sql {name}", cmd) for name, cmd in main.commands.items())]


@pytest.mark.parametrize(("prog", "command"), _commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_has_help(prog: str, command: click.Command) -> None:
    bare = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not bare, f"{prog}: options without help text: {bare}"


def test_endpoint_help_names_every_backend() -> None:
    (endpoint,) = [p for p in main.params if p.name == "endpoint"]
    assert isinstance(endpoint, click.Option)
    text = endpoint.help or ""
    for scheme in ("sqlite:///", "postgres://", "mysql://"):
        assert scheme in text, f"--endpoint's help does not show a {scheme} DSN"
