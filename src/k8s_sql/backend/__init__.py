"""Database backends behind one interface, chosen by the ``--endpoint`` DSN."""

from __future__ import annotations

import os
import ssl
from urllib.parse import parse_qs, unquote, urlparse

from k8s_sql.backend.base import Backend
from k8s_sql.dsn import redact

USAGE = "use sqlite:///PATH, postgres://USER:PASS@HOST:PORT/DB or mysql://USER:PASS@tcp(HOST:PORT)/DB"

# The query parameters of a PostgreSQL DSN that name files (libpq's, as asyncpg reads them).
_PG_FILE_PARAMS = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile")


def transient(e: OSError) -> bool:
    """Whether an OSError met while connecting may pass by trying again: a refused or
    reset connection, a timeout, a name that does not resolve yet (DNS comes up with
    the cluster) may; a missing or unreadable file (a TLS file named by the DSN) or a
    server certificate that fails verification will not."""
    return not isinstance(
        e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ssl.SSLCertVerificationError)
    )


def _sqlite_path(endpoint: str) -> str:
    u = urlparse(endpoint)
    return u.path if not u.netloc else f"{u.netloc}{u.path}"


def check_endpoint(endpoint: str) -> None:
    """Raise ValueError, with one line and the password redacted, if the DSN cannot
    name a database: an unknown scheme, no SQLite path, a MySQL DSN without a
    database, a port that is not a number, a TLS file that does not exist. Nothing
    is connected to; what only the database can tell (the password) is checked at
    start."""
    try:
        u = urlparse(endpoint)
    except ValueError as e:
        raise ValueError(f"invalid --endpoint {redact(endpoint)!r}: {e}") from None
    if u.scheme == "sqlite":
        if not _sqlite_path(endpoint):
            raise ValueError(f"no database file in --endpoint {redact(endpoint)!r}: want sqlite:///PATH")
        for sync in parse_qs(u.query).get("synchronous", []):
            if sync.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
                raise ValueError(f"--endpoint {endpoint!r}: synchronous must be OFF, NORMAL, FULL or EXTRA")
        return
    if u.scheme in ("postgres", "postgresql"):
        _check_postgres(endpoint)
        return
    if u.scheme == "mysql":
        from k8s_sql.backend.mysql import parse_dsn

        parse_dsn(endpoint)
        return
    raise ValueError(f"unsupported --endpoint {redact(endpoint)!r}: {USAGE}")


def _check_postgres(endpoint: str) -> None:
    shown = redact(endpoint)
    rest = endpoint.split("://", 1)[1]
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    hosts = authority.rpartition("@")[2]
    for host in hosts.split(","):
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"invalid port {port!r} in --endpoint {shown!r}")
    query = parse_qs(endpoint.partition("?")[2])
    for name in _PG_FILE_PARAMS:
        for path in query.get(name, []):
            path = unquote(path)
            if not os.path.isfile(path):
                raise ValueError(f"--endpoint {shown!r}: {name} {path}: no such file")


def open_backend(endpoint: str, *, sqlite_synchronous: str = "FULL") -> Backend:
    """The backend for a DSN such as ``sqlite:///var/lib/k8s-sql/state.db``; nothing is
    connected yet (see :meth:`Backend.open`). ValueError (password redacted) for a
    DSN that names no database."""
    check_endpoint(endpoint)
    u = urlparse(endpoint)
    if u.scheme == "sqlite":
        from k8s_sql.backend.sqlite import SQLiteBackend

        sync = parse_qs(u.query).get("synchronous", [sqlite_synchronous])[0].upper()
        return SQLiteBackend(_sqlite_path(endpoint), synchronous=sync)
    if u.scheme in ("postgres", "postgresql"):
        from k8s_sql.backend.postgres import PostgresBackend

        return PostgresBackend(endpoint)
    from k8s_sql.backend.mysql import MySQLBackend

    return MySQLBackend(endpoint)
