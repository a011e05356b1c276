"""The committed generated modules match the .proto files."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts/gen-proto"), str(tmp_path)], check=True)
    for generated in sorted((tmp_path / "k8s_sql/pb").iterdir()):
        committed = ROOT / "src/k8s_sql/pb" / generated.name
        assert committed.read_text() == generated.read_text(), f"{committed} is stale: run scripts/gen-proto"
