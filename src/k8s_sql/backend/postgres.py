"""The PostgreSQL dialect (asyncpg).

Write transactions lock the ``meta`` revision row (``SELECT … FOR UPDATE``) until
commit, so committed revisions are a contiguous prefix however many frontends
write. Reads run in ``REPEATABLE READ`` read-only transactions: one snapshot each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncpg

from k8s_sql import errors
from k8s_sql.backend import migrations, plans, sql, transient
from k8s_sql.backend.base import BackendUnavailable, DatabaseFull, NeedsLock
from k8s_sql.backend.network import NetworkBackend
from k8s_sql.backend.plans import Conn, Record
from k8s_sql.dsn import scrub, secrets

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS kv (
        key BYTEA PRIMARY KEY,
        create_rev BIGINT NOT NULL,
        mod_rev BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value BYTEA NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease <> 0",
    """CREATE TABLE IF NOT EXISTS log (
        rev BIGINT NOT NULL,
        sub INTEGER NOT NULL,
        key BYTEA NOT NULL,
        kind SMALLINT NOT NULL,
        create_rev BIGINT,
        version BIGINT,
        lease BIGINT,
        value BYTEA,
        prev_create_rev BIGINT,
        prev_mod_rev BIGINT,
        prev_version BIGINT,
        prev_lease BIGINT,
        prev_value BYTEA,
        PRIMARY KEY (rev, sub))""",
    "CREATE INDEX IF NOT EXISTS log_key ON log (key, rev)",
    """CREATE TABLE IF NOT EXISTS lease (
        id BIGINT PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS lease_expiry ON lease (expires_at)",
    """CREATE TABLE IF NOT EXISTS member (
        id BIGINT PRIMARY KEY,
        name TEXT NOT NULL,
        urls TEXT NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL)""",
]

COMMIT_CHANNEL = "k8s_sql_commit"  # see migration 4
STALE_READ = "K8S01"  # k8s_sql_finish_batch's: an unlocked batch's read is stale (migration 5)
RELISTEN_SECONDS = 1.0
PROBE = "probe"  # the payload of the announcement that checks announcements arrive
PROBE_SECONDS = 2.0

log = logging.getLogger(__name__)

# Errors that mean "the database is away", not "the request is wrong".
# InternalClientError: a connection left mid-operation by a lost server ("cannot
# switch to state 15; another operation is in progress", seen after a database
# kill -9 in the linearizability suite).
UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.InternalClientError,
)


# What asyncpg meets when its named prepared statements are gone or clash between two
# statements of one connection: a transaction-pooling proxy handed it another server.
PREPARED_STATEMENT_LOST = (
    asyncpg.InvalidSQLStatementNameError,
    asyncpg.DuplicatePreparedStatementError,
    asyncpg.ProtocolViolationError,  # "bind message supplies 2 parameters, but prepared statement … requires 4"
)


async def _session_kept(conn: asyncpg.Connection) -> None:
    """The pool's reset of a connection given back, in place of asyncpg's default: that
    sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release -- one more round trip per read and per write batch -- to undo session
    state that k8s-sql never leaves on a pooled connection (its advisory lock is
    transaction-scoped, it sets nothing, it listens on a connection of its own). A
    transaction left open is still rolled back (asyncpg does that before calling this).
    Measured (one pinned core, etcd's benchmark): one-key Range at 1 client 645 -> 561
    µs of server CPU and 1,158 -> 1,440 requests/s; at 16 clients 474 -> 441 µs."""


class PreparedStatementsLost(BackendUnavailable):
    """A transaction met a prepared statement gone (a transaction-pooling proxy): it
    applied nothing, and runs again on a pool without the statement cache."""


def _unavailable_at_start(e: BaseException) -> bool:
    """Whether an error opening the database may pass by trying again (see open())."""
    if isinstance(e, asyncpg.ClientConfigurationError):  # an InterfaceError, but a bad DSN
        return False
    if isinstance(e, OSError):
        return transient(e)
    return isinstance(
        e,
        (
            *UNAVAILABLE,
            asyncpg.OperatorInterventionError,  # 57: starting up, shutting down, admin shutdown
            asyncpg.InsufficientResourcesError,  # 53: too many connections, out of memory/disk
        ),
    )


class PgConn(Conn):
    """asyncpg with ``?`` placeholders (numbered once per statement text, then cached)."""

    _numbered: dict[str, str] = {}

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    def _q(self, query: str) -> str:
        q = self._numbered.get(query)
        if q is None:
            q = self._numbered[query] = sql.numbered(query)
        return q

    async def fetch(self, query: str, params: Sequence[Any]) -> list[Record]:
        try:
            return list(await self.conn.fetch(self._q(query), *params))
        except asyncpg.DiskFullError as e:
            raise DatabaseFull(str(e)) from e

    async def execute(self, query: str, params: Sequence[Any]) -> int:
        try:
            status = await self.conn.execute(self._q(query), *params)
        except asyncpg.DiskFullError as e:
            raise DatabaseFull(str(e)) from e
        except asyncpg.PostgresError as e:
            if e.sqlstate == STALE_READ:
                raise NeedsLock(str(e)) from e
            raise
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def load(self, st: plans.Load) -> None:
        """COPY: k8s-sql migrate loads 94,500 rows/s this way against 66,800 with
        executemany (100,000 keys of 1 KiB, bench/micro/migrate_speed.py)."""
        try:
            await self.conn.copy_records_to_table(st.table, records=[tuple(r) for r in st.rows], columns=st.columns)
        except asyncpg.DiskFullError as e:
            raise DatabaseFull(str(e)) from e

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            await self.conn.executemany(self._q(query), rows)
        except asyncpg.DiskFullError as e:
            raise DatabaseFull(str(e)) from e


def _without_pgbouncer(dsn: str) -> tuple[str, bool]:
    """The DSN without k8s-sql's own ``pgbouncer=true`` parameter (asyncpg would send it
    to the server as a setting), and whether it was given."""
    u = urlparse(dsn)
    if not u.query:
        return dsn, False
    params = [p for p in u.query.split("&") if p]
    kept = [p for p in params if p.split("=", 1)[0] != "pgbouncer"]
    flag = next((p.split("=", 1)[1] if "=" in p else "true" for p in params if p.split("=", 1)[0] == "pgbouncer"), "")
    if len(kept) == len(params):
        return dsn, False
    return urlunparse(u._replace(query="&".join(kept))), flag.lower() in ("true", "1", "yes", "on")


class PostgresBackend(NetworkBackend):
    """A store in a PostgreSQL database, created (with its schema) if absent."""

    dialect = sql.POSTGRES
    # A btree entry holds at most 2704 bytes (a third of a page). Measured on PostgreSQL
    # with incompressible keys: 2680 bytes fit both kv's primary key and log's (key, rev)
    # index, 2690 do not ("index row size 2712 exceeds btree version 4 maximum 2704").
    # Longer keys are refused before they reach SQL (errors.KeyTooLong).
    max_key_bytes = 2680

    def __init__(self, dsn: str, pool_size: int = 8) -> None:
        self.dsn, self.pgbouncer = _without_pgbouncer(dsn)
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        # Through a transaction-pooling proxy (``?pgbouncer=true``) consecutive
        # statements of a connection may reach different server connections, where
        # asyncpg's named prepared statements do not exist: it then prepares each
        # statement unnamed, in the statement's own round trip.
        self.connect_args: dict[str, Any] = {"statement_cache_size": 0} if self.pgbouncer else {}
        self._closing: set[asyncio.Task[None]] = set()  # pools replaced, closing as their connections return

    async def _connect(self, dsn: str | None = None) -> asyncpg.Connection:
        return await asyncpg.connect(dsn or self.dsn, **self.connect_args)

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "backend is not open"
        return self._pool

    def pool_stats(self) -> dict[str, int]:
        if self._pool is None:
            return {"in_use": 0, "idle": 0, "max": self.pool_size}
        size, idle = self._pool.get_size(), self._pool.get_idle_size()
        return {"in_use": size - idle, "idle": idle, "max": self._pool.get_max_size()}

    def _create_pool(self) -> Awaitable[asyncpg.Pool]:
        return asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.pool_size, reset=_session_kept, **self.connect_args
        )

    async def _create_database(self) -> None:
        u = urlparse(self.dsn)
        name = u.path.lstrip("/")
        conn = await self._connect(urlunparse(u._replace(path="/postgres")))
        try:
            await conn.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            pass  # created meanwhile (frontends or --workers starting together race here)
        finally:
            await conn.close()

    async def open(self) -> None:
        """Create the database and its schema if absent, then the pool.

        BackendUnavailable (the caller retries) for what may pass: the server down,
        starting up or shutting down, out of connections, unreachable. Any other
        error will not pass by asking again and is raised as it is: a bad password
        or a pg_hba.conf refusal (class 28), no right to create the database, a DSN
        asyncpg cannot use, a missing TLS file, a certificate that fails
        verification, a schema from a newer k8s-sql. Either way the message holds
        no password."""
        try:
            try:
                await self._open()
            except PREPARED_STATEMENT_LOST as e:
                if self.pgbouncer or "prepared statement" not in str(e):
                    raise
                self._statement_cache_off(e)
                await self._open()
        except Exception as e:
            if _unavailable_at_start(e):
                raise BackendUnavailable(scrub(str(e), secrets(self.dsn)) or type(e).__name__) from e
            raise

    async def _open(self) -> None:
        try:
            conn = await self._connect()
        except (asyncpg.InvalidCatalogNameError, asyncpg.PostgresConnectionError) as e:
            # PgBouncer reports a database it cannot reach as a connection failure
            if not isinstance(e, asyncpg.InvalidCatalogNameError) and "does not exist" not in str(e):
                raise
            await self._create_database()
            conn = await self._connect()
        try:
            async with conn.transaction():
                # Several frontends may start at once: one creates the schema.
                await conn.execute("SELECT pg_advisory_xact_lock(7238945)")
                for stmt in SCHEMA:
                    await conn.execute(stmt)
                await conn.execute(
                    "INSERT INTO meta VALUES ('revision', 1), ('compact_revision', 0), ('schema_version', $1) "
                    "ON CONFLICT (name) DO NOTHING",
                    migrations.BASELINE_VERSION,
                )
                version = await conn.fetchval("SELECT value FROM meta WHERE name = 'schema_version'")
                # DDL is transactional here: each migration and its version row commit together.
                for to, statements in migrations.pending(int(version), "postgres"):
                    for stmt in statements:
                        await conn.execute(stmt)
                    await conn.execute("UPDATE meta SET value = $1 WHERE name = 'schema_version'", to)
        finally:
            await conn.close()
        self._pool = await self._create_pool()

    async def _without_statement_cache(self, e: BaseException) -> None:
        """A prepared statement vanished between two statements of one connection: a
        transaction-pooling proxy (PgBouncer) is in the way. From now on statements are
        prepared unnamed, each in its own round trip, as with ``?pgbouncer=true``. The
        transaction that met it applied nothing and is run again on the new pool (see
        :meth:`conflicted`); the old pool closes as its connections come back."""
        if self.pgbouncer:
            return
        self._statement_cache_off(e)
        old, self._pool = (
            self._pool,
            await self._create_pool(),
        )
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _statement_cache_off(self, e: BaseException) -> None:
        self.pgbouncer = True
        self.connect_args = {"statement_cache_size": 0}
        log.warning(
            "prepared statements do not survive between statements (%s): a transaction-pooling proxy such as "
            "PgBouncer? Preparing every statement anew from now on; add ?pgbouncer=true to the DSN to start so",
            errors.one_line(e, 200),
        )

    async def open_for_reads(self) -> None:
        try:
            self._pool = await self._create_pool()
            await self.current()  # holds a store
        except Exception as e:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
            if _unavailable_at_start(e):
                raise BackendUnavailable(scrub(str(e), secrets(self.dsn)) or type(e).__name__) from e
            raise

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def _conn(self, **transaction: Any) -> AsyncIterator[Conn]:
        """A pooled connection, inside a transaction with these options unless None;
        a lost database surfaces as BackendUnavailable."""
        try:
            async with self.pool.acquire() as conn:
                if transaction.get("autocommit"):
                    yield PgConn(conn)
                    return
                async with conn.transaction(**transaction):
                    yield PgConn(conn)
        except (*UNAVAILABLE, *PREPARED_STATEMENT_LOST) as e:
            # Checked first: "bind message supplies 0 parameters, but prepared statement
            # … requires 2" is a ProtocolViolationError, of the connection-error class
            # (08P01), and was answered UNAVAILABLE to a read before (CI, PgBouncer).
            if isinstance(e, PREPARED_STATEMENT_LOST) and "prepared statement" in str(e):
                await self._without_statement_cache(e)
                raise PreparedStatementsLost(str(e)) from e
            if isinstance(e, UNAVAILABLE):
                raise BackendUnavailable(str(e)) from e
            raise

    def snapshot_conn(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self._conn(isolation="repeatable_read", readonly=True)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self._conn()

    def autocommit_conn(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self._conn(autocommit=True)

    def reported_by_database(self, error: BaseException) -> bool:
        return isinstance(error, asyncpg.PostgresError)

    def conflicted(self, error: BaseException) -> bool:
        return isinstance(error, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError, PreparedStatementsLost))

    async def follow_commits(self, on_commit: Callable[[int], None]) -> None:
        """LISTEN on a connection of its own; reconnect after losing it. Through a
        transaction-pooling proxy (PgBouncer) a LISTEN holds on to no server
        connection and announcements never arrive: said so (``?pgbouncer=true``), or
        found so by an announcement of its own that does not come back, the follower
        relies on polling alone (its ``follow_interval``)."""

        def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if payload != PROBE:
                on_commit(int(payload))

        if self.pgbouncer:
            log.info("commit announcements are off (?pgbouncer=true): other frontends' commits are polled")
            return
        while True:
            try:
                conn = await self._connect()
            except (*UNAVAILABLE, asyncpg.PostgresError) as e:
                log.debug("listening for commits: %s", e)
            else:
                try:
                    if not await self._announcements_arrive(conn):
                        log.warning(
                            "commit announcements (LISTEN/NOTIFY) do not arrive through %s -- a transaction-pooling "
                            "proxy such as PgBouncer? Other frontends' commits are polled; add ?pgbouncer=true to "
                            "the DSN to skip this check",
                            scrub(self.dsn, secrets(self.dsn)),
                        )
                        return
                    await self._listen_until_lost(conn, heard)
                except (*UNAVAILABLE, asyncpg.PostgresError) as e:
                    log.debug("listening for commits: %s", e)
                finally:
                    if not conn.is_closed():
                        await conn.close()
            await asyncio.sleep(RELISTEN_SECONDS)

    async def _announcements_arrive(self, conn: asyncpg.Connection) -> bool:
        """LISTEN, then NOTIFY from another connection: whether it is heard within
        PROBE_SECONDS."""
        arrived = asyncio.Event()

        def probe(_conn: object, _pid: int, _channel: str, _payload: str) -> None:
            arrived.set()

        await conn.add_listener(COMMIT_CHANNEL, probe)
        try:
            async with self.autocommit_conn() as other:
                await other.execute("SELECT pg_notify(?, ?)", (COMMIT_CHANNEL, PROBE))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), PROBE_SECONDS)
        finally:
            await conn.remove_listener(COMMIT_CHANNEL, probe)
        return arrived.is_set()

    @staticmethod
    async def _listen_until_lost(conn: asyncpg.Connection, heard: Callable[..., None]) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(COMMIT_CHANNEL, heard)
        await lost.wait()

    async def size(self) -> tuple[int, int]:
        async with self.autocommit_conn() as conn:
            rows = await conn.fetch(
                "SELECT SUM(pg_total_relation_size(c)) FROM unnest(ARRAY['meta', 'kv', 'log', 'lease']::regclass[]) c",
                (),
            )
            return int(rows[0][0]), int(rows[0][0])

    async def defragment(self) -> None:
        """etcd's defrag rewrites the database compactly and blocks the member meanwhile;
        PostgreSQL's equivalent is VACUUM FULL (a plain VACUUM makes dead rows reusable
        but returns no space, so a quota reached would stay reached). It holds an
        exclusive lock on each table while it rewrites it: every frontend waits."""
        async with self.autocommit_conn() as conn:
            await conn.execute("VACUUM (FULL, ANALYZE) meta, kv, log, lease", ())
