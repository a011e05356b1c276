"""Forward migrations: a database left by an older k8s-sql is brought up to date on
start, keeping its data; a database from a newer k8s-sql is refused."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from k8s_sql.backend import migrations, open_backend, sql
from k8s_sql.backend.base import KeyRange, LogRow, Row
from k8s_sql.backend.postgres import PostgresBackend


def _dsn(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite://{tmp_path}/state.db"
    server = request.getfixturevalue(f"{kind}_server")
    return str(server.new_dsn())


async def _write_one(dsn: str, key: bytes) -> int:
    backend = open_backend(dsn)
    await backend.open()
    try:
        async with backend.write() as tx:
            tx.revision += 1
            row = Row(key, tx.revision, tx.revision, 1, 0, b"value")
            await tx.put(row)
            tx.log(LogRow(tx.revision, 0, 0, row, None))
            return tx.revision
    finally:
        await backend.close()


async def _state(dsn: str) -> tuple[int | None, list[Row]]:
    backend = open_backend(dsn)
    await backend.open()
    try:
        version = await backend.meta_get("schema_version")
        rows = (await backend.range(KeyRange(b"\0", b""), 0, 0, False, False)).rows
        return version, rows
    finally:
        await backend.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "mariadb"])
def test_old_database_is_migrated_forward(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = _dsn(kind, request, tmp_path)

    # A k8s-sql that knew only the baseline layout created the database and wrote to it
    # (on PostgreSQL without the batch function of migration 5).
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", ())
        m.setattr(PostgresBackend, "dialect", dataclasses.replace(sql.POSTGRES, finish_batch=None, read_for_write=None))
        rev = asyncio.run(_write_one(dsn, b"/registry/old"))
        version, _ = asyncio.run(_state(dsn))
        assert version == migrations.BASELINE_VERSION

    # This k8s-sql migrates it on start and the data is untouched.
    version, rows = asyncio.run(_state(dsn))
    assert version == migrations.SCHEMA_VERSION > migrations.BASELINE_VERSION
    assert [(r.key, r.mod_rev, r.value) for r in rows] == [(b"/registry/old", rev, b"value")]
    if kind == "postgres":
        assert "fillfactor=80" in asyncio.run(_pg_reloptions(dsn, "kv"))

    # Starting again (a second frontend, a restart) finds nothing left to do.
    assert asyncio.run(_state(dsn))[0] == migrations.SCHEMA_VERSION

    # A migration cut short (MySQL commits DDL as it goes) is repeated on the next
    # start: every statement is safe to run again.
    asyncio.run(_set_version(dsn, migrations.BASELINE_VERSION))
    version, rows = asyncio.run(_state(dsn))
    assert version == migrations.SCHEMA_VERSION
    assert [r.key for r in rows] == [b"/registry/old"]


async def _set_version(dsn: str, version: int) -> None:
    backend = open_backend(dsn)
    await backend.open()
    try:
        await backend.meta_set("schema_version", version)
    finally:
        await backend.close()


async def _pg_reloptions(dsn: str, table: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT reloptions FROM pg_class WHERE relname = $1", table))
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "mariadb"])
def test_newer_database_is_refused(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = _dsn(kind, request, tmp_path)
    newer = migrations.Migration(migrations.SCHEMA_VERSION + 1, "a change from the future")
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, newer))
        asyncio.run(_write_one(dsn, b"k"))
    with pytest.raises(migrations.SchemaTooNew, match=f"version {newer.version} is newer"):
        asyncio.run(_state(dsn))
