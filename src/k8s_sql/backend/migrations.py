"""Forward migrations of the database schema.

Every database starts from the version-1 layout (the ``CREATE TABLE IF NOT EXISTS``
statements each dialect keeps next to its driver) and is then brought to
:data:`SCHEMA_VERSION` by the migrations below, in order, each recorded in the
``schema_version`` row of ``meta``. A fresh database takes the same path as an old
one, so every migration runs in every test against every backend.

Rules for a migration, because frontends of different versions may share one
database during a rolling upgrade:

- only add (columns with defaults, indexes, table options): an older frontend that
  is still running must keep working on the newer layout;
- each statement must be safe to run again: MySQL commits DDL implicitly, so a
  frontend that dies half way through a migration leaves it partly applied, and the
  next start repeats it (MySQL has no ``CREATE INDEX IF NOT EXISTS``: its backend
  treats "duplicate key name" as done).

A frontend refuses to start on a database whose version is newer than it knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Migration:
    version: int
    why: str
    statements: dict[str, tuple[str, ...]] = field(default_factory=dict)  # by dialect name


BASELINE_VERSION = 1

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        # Most Kubernetes updates change only mod_rev, version and value, none of them
        # indexed, so PostgreSQL can update the row in place (a HOT update, no index
        # entries) when its page has room; the default fill of 100% leaves none.
        "leave free space in kv pages for in-place (HOT) updates on PostgreSQL",
        {"postgres": ("ALTER TABLE kv SET (fillfactor = 80)",)},
    ),
    Migration(
        3,
        # kv rows carry their values, so counting a range through the primary key reads
        # every value: 100k keys of 1 KiB took 233 ms on SQLite and 350 ms on MariaDB, and
        # 4.7 ms and 19 ms through an index of the keys alone. Kubernetes asks for a count
        # with every page of a LIST. PostgreSQL's primary key is already such an index.
        "an index of the keys alone, for counting ranges",
        {
            "sqlite": ("CREATE INDEX IF NOT EXISTS kv_keys ON kv (key)",),
            "mysql": ("CREATE INDEX kv_keys ON kv (`key`)",),  # "already exists" is ignored
        },
    ),
    Migration(
        4,
        # Other frontends learn of a commit by polling (every 25 ms); on PostgreSQL the
        # commit itself tells them. The trigger runs inside the writer's transaction and
        # PostgreSQL delivers the notification only if it commits, with the revision as
        # payload, so a listener never hears of a revision it cannot read yet.
        "notify listening frontends of each commit's revision on PostgreSQL",
        {
            "postgres": (
                "CREATE OR REPLACE FUNCTION k8s_sql_notify_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$BEGIN PERFORM pg_notify('k8s_sql_commit', NEW.value::text); RETURN NULL; END$$",
                "DROP TRIGGER IF EXISTS k8s_sql_commit ON meta",
                "CREATE TRIGGER k8s_sql_commit AFTER UPDATE ON meta FOR EACH ROW "
                "WHEN (NEW.name = 'revision' AND NEW.value <> OLD.value) EXECUTE FUNCTION k8s_sql_notify_commit()",
            ),
        },
    ),
    Migration(
        5,
        # A write batch read its keys in one statement without a transaction and writes
        # them here, in one more: two round trips where BEGIN, the revision lock, the
        # read, the write and COMMIT took five (see network.py). The function takes the
        # revision lock first; each statement after it sees every commit made before it
        # got the lock, so what the batch read is checked against the newest state.
        # ``expect`` NULL: the caller already holds the lock (the locked path). A batch
        # that did not read (backend/known.py) names the keys it assumed absent. Fails
        # with SQLSTATE K8S01 when the read is stale (base.NeedsLock).
        "write a batch in one call, checked against what it read, on PostgreSQL",
        {
            "postgres": (
                "CREATE OR REPLACE FUNCTION k8s_sql_finish_batch("
                "expect BIGINT[], live_leases BIGINT[], absent BYTEA[], gone BYTEA[], "
                "k BYTEA[], k_create BIGINT[], k_mod BIGINT[], k_version BIGINT[], k_lease BIGINT[], k_value BYTEA[], "
                "l_rev BIGINT[], l_sub INTEGER[], l_key BYTEA[], l_kind SMALLINT[], l_create BIGINT[], "
                "l_version BIGINT[], l_lease BIGINT[], l_value BYTEA[], l_prev_create BIGINT[], l_prev_mod BIGINT[], "
                "l_prev_version BIGINT[], l_prev_lease BIGINT[], l_prev_value BYTEA[], new_revision BIGINT"
                ") RETURNS void LANGUAGE plpgsql AS $$\n"
                "BEGIN\n"
                "IF expect IS NOT NULL THEN\n"
                "  PERFORM 1 FROM meta WHERE name IN "
                "('revision', 'compact_revision', 'alarm_nospace', 'alarm_corrupt') FOR UPDATE;\n"
                "  IF ARRAY(SELECT coalesce((SELECT value FROM meta WHERE name = n), 0) FROM unnest("
                "ARRAY['revision', 'compact_revision', 'alarm_nospace', 'alarm_corrupt']) WITH ORDINALITY AS t(n, i) "
                "ORDER BY i) IS DISTINCT FROM expect\n"
                "     OR (SELECT count(*) FROM lease WHERE id = ANY(live_leases)) <> cardinality(live_leases)\n"
                "     OR EXISTS (SELECT 1 FROM kv WHERE key = ANY(absent)) THEN\n"
                "    RAISE EXCEPTION 'k8s-sql: another write committed after this batch read its keys' "
                "USING ERRCODE = 'K8S01';\n"
                "  END IF;\n"
                "END IF;\n"
                "DELETE FROM kv WHERE key = ANY(gone);\n"
                "INSERT INTO kv (key, create_rev, mod_rev, version, lease, value) "
                "SELECT * FROM unnest(k, k_create, k_mod, k_version, k_lease, k_value) "
                "ON CONFLICT (key) DO UPDATE SET create_rev = excluded.create_rev, mod_rev = excluded.mod_rev, "
                "version = excluded.version, lease = excluded.lease, value = excluded.value;\n"
                "INSERT INTO log (rev, sub, key, kind, create_rev, version, lease, value, "
                "prev_create_rev, prev_mod_rev, prev_version, prev_lease, prev_value) "
                "SELECT * FROM unnest(l_rev, l_sub, l_key, l_kind, l_create, l_version, l_lease, l_value, "
                "l_prev_create, l_prev_mod, l_prev_version, l_prev_lease, l_prev_value);\n"
                "UPDATE meta SET value = new_revision WHERE name = 'revision';\n"
                "END$$",
            ),
        },
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version if MIGRATIONS else BASELINE_VERSION


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer k8s-sql than this one."""


def pending(current: int, dialect: str) -> list[tuple[int, tuple[str, ...]]]:
    """The ``(version, statements)`` still to apply to a database at ``current``,
    in order (statements may be empty: the version is still recorded)."""
    migrations = MIGRATIONS  # read at call time, so a test can start from an older layout
    latest = migrations[-1].version if migrations else BASELINE_VERSION
    if current > latest:
        raise SchemaTooNew(
            f"database schema version {current} is newer than this k8s-sql knows ({latest}): "
            "upgrade k8s-sql, or restore a snapshot taken before the upgrade"
        )
    return [(m.version, m.statements.get(dialect, ())) for m in migrations if m.version > current]


def all_statements(dialect: str) -> list[str]:
    """Every migration statement of a dialect, for building a fresh schema in one go."""
    return [s for m in MIGRATIONS for s in m.statements.get(dialect, ())]
