"""The MySQL / MariaDB dialect (asyncmy).

asyncmy was chosen by measurement: aiomysql 0.3.2 fails with the current PyMySQL
(1.2.x) on every bytes parameter, and asyncmy's Cython protocol answered a 1 KiB
point select in about 0.2 ms on loopback. Keys are ``VARBINARY`` and values
``LONGBLOB``: binary comparison, so keys sort and round-trip byte for byte as in
etcd. InnoDB caps an index entry at 3072 bytes, so keys are limited to 3000 bytes
here (etcd allows longer keys; Kubernetes keys are a few hundred bytes at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote

import asyncmy
import asyncmy.errors

from k8s_sql.backend import migrations, plans, sql, transient
from k8s_sql.backend.base import BackendUnavailable, DatabaseFull, NeedsLock
from k8s_sql.backend.network import NetworkBackend
from k8s_sql.backend.plans import Conn, Record
from k8s_sql.dsn import redact, scrub, secrets

MAX_KEY_BYTES = 3000
# attempts of a transaction that Galera's certification aborts (see MySQLBackend)
GALERA_CONFLICT_RETRIES = 100

log = logging.getLogger(__name__)

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (name VARCHAR(64) PRIMARY KEY, value BIGINT NOT NULL) ENGINE=InnoDB",
    f"""CREATE TABLE IF NOT EXISTS kv (
        `key` VARBINARY({MAX_KEY_BYTES}) NOT NULL PRIMARY KEY,
        create_rev BIGINT NOT NULL,
        mod_rev BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value LONGBLOB NOT NULL,
        INDEX kv_lease (lease)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC""",
    f"""CREATE TABLE IF NOT EXISTS log (
        rev BIGINT NOT NULL,
        sub INT NOT NULL,
        `key` VARBINARY({MAX_KEY_BYTES}) NOT NULL,
        kind TINYINT NOT NULL,
        create_rev BIGINT,
        version BIGINT,
        lease BIGINT,
        value LONGBLOB,
        prev_create_rev BIGINT,
        prev_mod_rev BIGINT,
        prev_version BIGINT,
        prev_lease BIGINT,
        prev_value LONGBLOB,
        PRIMARY KEY (rev, sub),
        INDEX log_key (`key`, rev)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC""",
    """CREATE TABLE IF NOT EXISTS lease (
        id BIGINT NOT NULL PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expires_at DOUBLE NOT NULL,
        INDEX lease_expiry (expires_at)) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS member (
        id BIGINT NOT NULL PRIMARY KEY,
        name VARCHAR(255) NOT NULL,
        urls TEXT NOT NULL,
        heartbeat DOUBLE NOT NULL) ENGINE=InnoDB""",
]

ER_DUP_KEYNAME = 1061
ER_SUBQUERY_NO_1_ROW = 1242  # sql.stale_guard's: a batch begun from known rows is stale
ER_CON_COUNT_ERROR = 1040  # too many connections: passes as others disconnect

# Client error codes for a server that is down, restarting or unreachable; and 1047,
# which a Galera node answers while it is not part of the primary component or not
# synced ("WSREP has not yet prepared node for application use"): ask another node.
_CONNECTION_ERRORS = {1047, 1053, 1077, 1927, 2002, 2003, 2006, 2013, 2055}
# lock wait timeout, deadlock, and "Table definition has changed, please retry
# transaction": a consistent-snapshot read that meets a table rebuilt since it began
# (a defragmentation's OPTIMIZE TABLE; found by the fuzzer)
_CONFLICT_ERRORS = {1205, 1213, 1412}
_FULL_ERRORS = {1021, 1114}  # ER_DISK_FULL, ER_RECORD_FILE_FULL ("The table is full")

DSN = re.compile(
    r"^mysql://(?:(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@)?"
    r"(?:tcp\((?P<tcp>[^)]*)\)|(?P<hostport>[^/?]*))/(?P<db>[^?]*)(?:\?(?P<query>.*))?$"
)


def parse_dsn(dsn: str) -> dict[str, Any]:
    """Connection arguments from ``mysql://user:pass@tcp(host:port)/db`` (kine's form) or
    ``mysql://user:pass@host:port/db``; TLS from ``?ssl-ca=…&ssl-cert=…&ssl-key=…``; the
    password from an option file with ``?defaults-file=PATH``. A DSN may list several
    servers, ``tcp(h1:3306,h2:3306)`` or ``h1:3306,h2:3306`` (a Galera cluster's
    nodes): the arguments name the first, :func:`parse_hosts` all of them.

    ValueError, one line with the password redacted, for a DSN that names no
    database or whose TLS files do not load."""
    shown = redact(dsn)
    m = DSN.match(dsn)
    if not m or not m["db"]:
        raise ValueError(
            f"invalid MySQL DSN {shown!r}: want mysql://USER:PASS@tcp(HOST:PORT)/DB or mysql://USER:PASS@HOST:PORT/DB"
        )
    hosts = parse_hosts(dsn)
    args: dict[str, Any] = {
        "host": hosts[0][0],
        "port": hosts[0][1],
        "user": unquote(m["user"] or "root"),
        "password": unquote(m["password"] or ""),
        "database": unquote(m["db"]),
    }
    query = {k: v[-1] for k, v in parse_qs(m["query"] or "").items()}
    ca, cert, key = query.get("ssl-ca"), query.get("ssl-cert"), query.get("ssl-key")
    if ca or cert or query.get("tls") in ("true", "skip-verify", "preferred"):
        try:
            ctx = ssl.create_default_context(cafile=ca)
            if query.get("tls") == "skip-verify":
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if cert:
                ctx.load_cert_chain(cert, key)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
            raise ValueError(f"MySQL DSN {shown!r}: cannot load its TLS files ({reason})") from None
        args["ssl"] = ctx
    # The password (and user) may come from a MySQL option file instead of the DSN:
    # ``[client]`` ``password=…``, read by asyncmy as the mysql client reads --defaults-file.
    defaults = query.get("defaults-file")
    if defaults:
        if not os.path.isfile(defaults):
            raise ValueError(f"MySQL DSN {shown!r}: defaults-file {defaults}: no such file")
        args["read_default_file"] = defaults
        if not m["user"]:
            args["user"] = None  # the file's user, if it names one
    return args


def parse_hosts(dsn: str) -> list[tuple[str, int]]:
    """Every (host, port) a DSN lists, in its order (see :func:`parse_dsn`)."""
    shown = redact(dsn)
    m = DSN.match(dsn)
    if not m:
        raise ValueError(f"invalid MySQL DSN {shown!r}")
    out = []
    for part in (m["tcp"] or m["hostport"] or "127.0.0.1:3306").split(","):
        part = part.strip()
        if part.endswith("]") or (part.count(":") > 1 and not part.startswith("[")):
            host, port = part, "3306"  # an IPv6 address without a port
        else:
            host, _, port = part.rpartition(":")
            if not host:
                host, port = port, "3306"
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"invalid port {port!r} in MySQL DSN {shown!r}")
        if not host.strip("[]"):
            raise ValueError(f"an empty host in MySQL DSN {shown!r}")
        out.append((host.strip("[]"), int(port or 3306)))
    return out


def _unavailable(e: BaseException) -> bool:
    if isinstance(e, (OSError, asyncmy.errors.InterfaceError)):
        return True
    return isinstance(e, asyncmy.errors.OperationalError) and bool(e.args) and e.args[0] in _CONNECTION_ERRORS


def _full(e: BaseException) -> bool:
    return isinstance(e, asyncmy.errors.MySQLError) and bool(e.args) and e.args[0] in _FULL_ERRORS


def _unavailable_at_start(e: BaseException) -> bool:
    """Whether an error opening the database may pass by trying again (see open())."""
    if isinstance(e, BackendUnavailable):
        return True
    if isinstance(e, OSError) and not transient(e):
        return False
    if isinstance(e, asyncmy.errors.OperationalError) and e.args and e.args[0] == ER_CON_COUNT_ERROR:
        return True
    return _unavailable(e)


# A pipeline whose text would be longer than this runs a statement at a time: asyncmy's
# own multi-row INSERTs stop at about this size (its max_stmt_length), well inside the
# server's max_allowed_packet (16 MiB by default on MariaDB, 64 MiB on MySQL 8).
PIPELINE_BYTES = 1_000_000
_VALUES = re.compile(r"^(.*?\bVALUES\s*)(\([^)]*\))(.*)$", re.DOTALL)


class PipelineCut(BackendUnavailable):
    """A multi-statement pipeline's answers ended before its last statement's, with no
    error: what was not answered may or may not have run (UNAVAILABLE; the connection is
    dropped, rolling back what it still holds)."""


class MyConn(Conn):
    """A connection with the transaction's opening statement held back (``begin``) until
    the first statement, which carries it: MySQL's multi-statements (asyncmy always
    asks for them) run both in one round trip. :meth:`pipeline` sends a plan's
    independent statements the same way; ``committed`` says a pipeline's COMMIT ended
    the transaction."""

    def __init__(self, conn: Any, begin: str | None = None, multi: bool = True) -> None:
        self.conn = conn
        self.begin = begin  # not sent yet
        self.committed = False
        self.multi = multi

    async def pipeline(self, steps: Sequence[plans.Step]) -> list[Any]:
        if not self.multi:
            out = await super().pipeline(steps)
            if steps and steps[-1] is plans.COMMIT:
                self.committed = True
            return out
        begin, self.begin = self.begin, None
        if begin is not None:
            steps = (plans.Execute(begin), *steps)
        try:
            async with self.conn.cursor() as cur:
                texts = [self._text(cur, st) for st in steps]
                if sum(map(len, texts)) > PIPELINE_BYTES:
                    # (the statements run as the plan wrote them, one round trip each)
                    out = await super().pipeline(steps)
                else:
                    await cur.execute(";\n".join(texts))
                    out = []
                    for i, st in enumerate(steps):
                        # nextset raises the error of a statement that failed; a result
                        # missing without one must not pass for success (a COMMIT above all)
                        if i and not await cur.nextset():
                            self.conn.close()
                            raise PipelineCut(f"the server answered {i} of {len(steps)} statements")
                        out.append(list(await cur.fetchall()) if isinstance(st, plans.Fetch) else cur.rowcount)
        except asyncmy.errors.MySQLError as e:
            if _full(e):
                raise DatabaseFull(str(e)) from e
            if e.args and e.args[0] == ER_SUBQUERY_NO_1_ROW:
                raise NeedsLock("another write committed since the rows this batch started from") from e
            raise
        if steps and steps[-1] is plans.COMMIT:
            self.committed = True
        return out[1:] if begin is not None else out

    @staticmethod
    def _text(cur: Any, st: plans.Step) -> str:
        """The statement with its parameters escaped into it by the driver (as every
        asyncmy statement is: it has no server-side parameters); an ExecuteMany as one
        multi-row INSERT, as asyncmy's executemany sends it."""
        if isinstance(st, plans.ExecuteMany):
            m = _VALUES.match(st.sql.replace("?", "%s"))
            assert m is not None, st.sql  # every ExecuteMany is an INSERT ... VALUES (...)
            head, row, tail = m.groups()
            return head + ",".join(cur.mogrify(row, tuple(r)) for r in st.rows) + tail
        q = st.sql.replace("?", "%s")
        return str(cur.mogrify(q, tuple(st.params))) if st.params else q

    async def _begun(self) -> None:
        if self.begin is not None:
            await self.pipeline(())

    async def fetch(self, query: str, params: Sequence[Any]) -> list[Record]:
        if self.begin is not None:
            return list((await self.pipeline((plans.Fetch(query, params),)))[0])
        try:
            async with self.conn.cursor() as cur:
                await cur.execute(query.replace("?", "%s"), params or None)
                return list(await cur.fetchall())
        except asyncmy.errors.MySQLError as e:
            if _full(e):
                raise DatabaseFull(str(e)) from e
            raise

    async def execute(self, query: str, params: Sequence[Any]) -> int:
        if self.begin is not None:
            return int((await self.pipeline((plans.Execute(query, params),)))[0])
        try:
            async with self.conn.cursor() as cur:
                return int(await cur.execute(query.replace("?", "%s"), params or None))
        except asyncmy.errors.MySQLError as e:
            if _full(e):
                raise DatabaseFull(str(e)) from e
            raise

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._begun()
        try:
            async with self.conn.cursor() as cur:
                await cur.executemany(query.replace("?", "%s"), rows)
        except asyncmy.errors.MySQLError as e:
            if _full(e):
                raise DatabaseFull(str(e)) from e
            raise


class _Released:
    """``async with``: the acquired connection, released to its pool on exit."""

    def __init__(self, pool: Any, conn: Any) -> None:
        self.pool, self.conn = pool, conn

    async def __aenter__(self) -> Any:
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.release(self.conn)


class MySQLBackend(NetworkBackend):
    """A store in a MySQL or MariaDB database, created (with its schema) if absent.

    **Several servers.** A DSN may list several (a Galera cluster's nodes): the pool
    connects to one, and when that one is lost (a connection error, or a Galera node
    that left the primary component) the next request connects to the next, in turn.

    **Galera.** A Galera node applies other nodes' write-sets asynchronously: without
    asking, a read through one node can miss a write acknowledged through another
    (measured: 0.4-5.7 ms older state, in 3 of 3 one-minute runs). When the server
    says ``wsrep_on``, every session sets ``wsrep_sync_wait = 1``: each transaction's
    first read waits until the node has applied everything the cluster committed
    before it began -- etcd's linearizable read. Two frontends writing through
    different nodes conflict on the revision row at certification, which aborts the
    later one as a deadlock: retried, up to ``GALERA_CONFLICT_RETRIES`` times."""

    dialect = sql.MYSQL
    max_key_bytes = MAX_KEY_BYTES
    follow_interval = 0.010  # no commit announcements: one small query per look

    def __init__(self, dsn: str, pool_size: int = 8) -> None:
        self.args = parse_dsn(dsn)
        self.hosts = parse_hosts(dsn)
        self._host = 0  # the index in hosts of the server the pool connects to
        self._secrets = secrets(dsn)
        self.pool_size = pool_size
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        self.galera = False

    def _server(self) -> dict[str, Any]:
        host, port = self.hosts[self._host]
        return {**self.args, "host": host, "port": port}

    @property
    def server_name(self) -> str:
        host, port = self.hosts[self._host]
        return f"{host}:{port}"

    def reported_by_database(self, error: BaseException) -> bool:
        return isinstance(error, asyncmy.errors.MySQLError)

    def pool_stats(self) -> dict[str, int]:
        pool = self._pool
        if pool is None:
            return {"in_use": 0, "idle": 0, "max": self.pool_size}
        return {"in_use": pool.size - pool.freesize, "idle": pool.freesize, "max": pool.maxsize}

    def conflicted(self, error: BaseException) -> bool:
        return (
            isinstance(error, asyncmy.errors.OperationalError)
            and bool(error.args)
            and error.args[0] in _CONFLICT_ERRORS
        )

    async def open(self) -> None:
        """Create the database and its schema if absent, then the pool.

        BackendUnavailable (the caller retries) for what may pass: the server down,
        restarting or out of connections (on every server the DSN lists). Any other
        error will not pass by asking again and is raised as it is: access denied
        (1045, 1044), a missing TLS file, a certificate that fails verification, a
        schema from a newer k8s-sql. Either way the message holds no password."""
        for n in range(len(self.hosts)):
            try:
                await self.retrying(self._open_schema)
                await self._new_pool()
                return
            except Exception as e:
                if not _unavailable_at_start(e):
                    raise
                if n == len(self.hosts) - 1:
                    raise BackendUnavailable(scrub(str(e), self._secrets)) from e
                log.warning("%s: %s; trying the next server", self.server_name, scrub(str(e), self._secrets))
                self._host = (self._host + 1) % len(self.hosts)

    async def open_for_reads(self) -> None:
        try:
            await self._new_pool()
            await self.current()  # holds a store
        except Exception as e:
            await self.close()
            if _unavailable_at_start(e):
                raise BackendUnavailable(scrub(str(e), self._secrets)) from e
            raise

    async def _new_pool(self) -> None:
        """A pool to the current server; Galera's read wait set on each of its sessions."""
        server = self._server()
        conn = await asyncmy.connect(**server, autocommit=True)
        try:
            async with conn.cursor() as cur:
                await cur.execute("SHOW VARIABLES LIKE 'wsrep_on'")
                row = await cur.fetchone()
        finally:
            conn.close()
        self.galera = bool(row) and str(row[1]).upper() == "ON"
        if self.galera:
            self.conflict_retries = GALERA_CONFLICT_RETRIES
        self._pool = await asyncmy.create_pool(
            minsize=1,
            maxsize=self.pool_size,
            autocommit=True,
            pool_recycle=600,
            init_command="SET SESSION wsrep_sync_wait = 1" if self.galera else None,
            **server,
        )

    async def _pool_for(self) -> Any:
        pool = self._pool
        if pool is not None:
            return pool
        async with self._pool_lock:
            if self._pool is None:
                try:
                    await self._new_pool()
                except Exception as e:
                    if _unavailable_at_start(e):
                        self._next_server(None)
                        raise BackendUnavailable(scrub(str(e), self._secrets)) from e
                    raise
            return self._pool

    def _next_server(self, lost: Any) -> None:
        """The server of pool ``lost`` (None: the one being connected to) failed: the next
        request connects to the next server the DSN lists. Once per loss, however many
        requests saw it."""
        if len(self.hosts) == 1 or lost is not self._pool:
            return
        was = self.server_name
        self._pool = None
        self._host = (self._host + 1) % len(self.hosts)
        log.warning("lost the database server %s: connecting to %s", was, self.server_name)
        if lost is not None:
            lost.close()  # its connections close as they are released

    async def _open_schema(self) -> None:
        server = {k: v for k, v in self._server().items() if k != "database"}
        conn = await asyncmy.connect(**server, autocommit=True)
        try:
            async with conn.cursor() as cur:
                # "already exists" notes of the IF NOT EXISTS statements below are
                # expected on every start after the first: don't surface them as warnings.
                await cur.execute("SET SESSION sql_notes = 0")
                db = self.args["database"].replace("`", "``")
                await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{db}`")
                await cur.execute(f"USE `{db}`")
                # Several frontends may start at once: one creates the schema.
                await cur.execute("SELECT GET_LOCK('k8s_sql_schema', 60)")
                if (await cur.fetchone())[0] != 1:
                    raise BackendUnavailable("another frontend held the schema lock for 60 s")
                try:
                    for stmt in SCHEMA:
                        await cur.execute(stmt)
                    await cur.execute(
                        "INSERT INTO meta VALUES ('revision', 1), ('compact_revision', 0), ('schema_version', %s) "
                        "ON DUPLICATE KEY UPDATE name = name",  # keep existing rows, without warnings
                        (migrations.BASELINE_VERSION,),
                    )
                    await cur.execute("SELECT value FROM meta WHERE name = 'schema_version'")
                    version = (await cur.fetchone())[0]
                    # DDL commits implicitly here: a migration cut short is repeated on the
                    # next start, which is why every statement must be safe to run twice.
                    for to, statements in migrations.pending(int(version), "mysql"):
                        for stmt in statements:
                            try:
                                await cur.execute(stmt)
                            except asyncmy.errors.MySQLError as e:
                                if e.args[0] != ER_DUP_KEYNAME:  # the index exists: done before
                                    raise
                        await cur.execute("UPDATE meta SET value = %s WHERE name = 'schema_version'", (to,))
                finally:
                    await cur.execute("SELECT RELEASE_LOCK('k8s_sql_schema')")
        finally:
            conn.close()

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()
            self._pool = None

    async def _acquire(self) -> tuple[Any, Any]:
        """A connection from the current pool, and that pool. A pool closed between
        looking it up and acquiring from it (another request lost its server and moved
        on) is looked up again: nothing was sent yet."""
        for _ in range(3):
            pool = await self._pool_for()
            try:
                return pool, await pool.acquire()
            except RuntimeError as e:  # asyncmy: "Cannot acquire connection after closing pool"
                if pool is self._pool:
                    raise BackendUnavailable(str(e)) from e
            except Exception as e:
                # The pool had no idle connection and could not open one (CI: a killed
                # Galera node refused every new connection for 30 s): its server is lost
                # as surely as when a pooled connection breaks.
                if _unavailable(e):
                    self._next_server(pool)
                raise
        raise BackendUnavailable("the connection pool kept being replaced")

    @contextlib.asynccontextmanager
    async def _conn(self, begin: str | None) -> AsyncIterator[Conn]:
        pool = None
        try:
            pool, acquired = await self._acquire()
            async with _Released(pool, acquired) as raw:
                if begin is None:
                    yield MyConn(raw)
                    return
                if self.galera:
                    # No multi-statement pipelines on Galera, measured: with them, 3
                    # frontends writing through 3 nodes got duplicate revisions and lost
                    # acknowledged writes (tests/test_galera.py: 71 violations in 5,154
                    # ops), two transactions updating the revision row both answered OK:
                    # a certification failure of a COMMIT inside a multi-statement text
                    # did not reach the client. So each statement, and the COMMIT, is a
                    # round trip of its own there, as before pipelines.
                    conn = MyConn(raw, multi=False)
                    await conn.execute(begin, ())
                else:
                    conn = MyConn(raw, begin)  # the first statement carries the begin
                try:
                    yield conn
                except BaseException:
                    if conn.begin is None and not conn.committed:
                        with contextlib.suppress(Exception):
                            await raw.rollback()
                    raise
                if conn.begin is None and not conn.committed:  # (not begun: nothing to end)
                    await raw.commit()
        except Exception as e:
            if _unavailable(e):
                if pool is not None:
                    self._next_server(pool)
                raise BackendUnavailable(str(e)) from e
            raise

    def snapshot_conn(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self._conn("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self._conn("START TRANSACTION")

    def autocommit_conn(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self._conn(None)

    @property
    def unlocked_writes(self) -> bool:
        # Batches begun from known rows, in one pipeline (sql.stale_guard); not on Galera,
        # which runs no multi-statement pipelines (see _conn).
        return not self.galera

    def unlocked_conn(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self.transaction()  # the guard, the writes and the COMMIT carry its BEGIN

    async def size(self) -> tuple[int, int]:
        """The store's tablespace files, as the quota counts them (etcd counts its bolt
        file the same way: space is returned by a defragmentation, here OPTIMIZE TABLE).
        information_schema.tables' lengths come from InnoDB's statistics, which lag
        writes by minutes: measured, a 2 MiB quota let 3.6 MiB through."""
        async with self.autocommit_conn() as conn:
            for table in ("INNODB_SYS_TABLESPACES", "INNODB_TABLESPACES"):  # MariaDB, MySQL 8
                try:
                    (row,) = await conn.fetch(
                        f"SELECT COUNT(*), COALESCE(SUM(FILE_SIZE), 0), COALESCE(SUM(ALLOCATED_SIZE), 0) "
                        f"FROM information_schema.{table} WHERE NAME LIKE CONCAT(DATABASE(), '/%')",
                        (),
                    )
                except asyncmy.errors.MySQLError:
                    continue
                if row[0]:
                    return int(row[1]), int(row[2])
            (row,) = await conn.fetch(
                "SELECT COALESCE(SUM(data_length + index_length + data_free), 0), "
                "COALESCE(SUM(data_length + index_length), 0) "
                "FROM information_schema.tables WHERE table_schema = DATABASE()",
                (),
            )
            return int(row[0]), int(row[1])

    async def defragment(self) -> None:
        async with self.autocommit_conn() as conn:
            await conn.fetch("OPTIMIZE TABLE meta, kv, log, lease", ())
