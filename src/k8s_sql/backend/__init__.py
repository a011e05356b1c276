"""Database backends behind one interface, chosen by the ``--endpoint`` DSN."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from k8s_sql.backend.base import Backend


def open_backend(endpoint: str, *, sqlite_synchronous: str = "FULL") -> Backend:
    """The backend for a DSN such as ``sqlite:///var/lib/k8s-sql/state.db``."""
    u = urlparse(endpoint)
    if u.scheme == "sqlite":
        from k8s_sql.backend.sqlite import SQLiteBackend

        path = u.path if not u.netloc else f"{u.netloc}{u.path}"
        params = parse_qs(u.query)
        sync = params.get("synchronous", [sqlite_synchronous])[0].upper()
        if not path:
            raise ValueError(f"no database file in {endpoint!r}")
        return SQLiteBackend(path, synchronous=sync)
    if u.scheme in ("postgres", "postgresql"):
        from k8s_sql.backend.postgres import PostgresBackend

        return PostgresBackend(endpoint)
    if u.scheme == "mysql":
        from k8s_sql.backend.mysql import MySQLBackend

        return MySQLBackend(endpoint)
    raise ValueError(
        f"unsupported --endpoint {endpoint!r}: use sqlite:///PATH, postgres://USER:PASS@HOST:PORT/DB "
        "or mysql://USER:PASS@tcp(HOST:PORT)/DB"
    )
