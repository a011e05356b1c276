"""DSN passwords never reach a log line or an error message."""

from __future__ import annotations

import logging

import asyncmy.errors
import pytest

from k8s_sql import dsn
from k8s_sql.backend import check_endpoint
from k8s_sql.backend.mysql import MySQLBackend, parse_dsn


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("postgres://k8s:s3cret@db:5432/k8s", "postgres://k8s:***@db:5432/k8s"),
        ("postgresql://k8s:s3cret@db/k8s?sslmode=require", "postgresql://k8s:***@db/k8s?sslmode=require"),
        # multi-host (libpq's failover list)
        (
            "postgres://k8s:s3cret@db1:5432,db2:5433,[::1]:5434/k8s",
            "postgres://k8s:***@db1:5432,db2:5433,[::1]:5434/k8s",
        ),
        # percent-encoded reserved characters in the password
        ("postgres://k8s:p%40ss%2Fw%3Ard@db/k8s", "postgres://k8s:***@db/k8s"),
        # unencoded reserved characters: hidden whole all the same
        ("postgres://k8s:p@ss@db/k8s", "postgres://k8s:***@db/k8s"),
        ("postgres://k8s:pa/ss@db/k8s", "postgres://k8s:***@db/k8s"),
        ("postgres://k8s:pa?ss@db/k8s", "postgres://k8s:***@db/k8s"),
        # the password as a query parameter (libpq and asyncpg accept it there too)
        ("postgres://k8s@db/k8s?password=s3cret&sslmode=disable", "postgres://k8s@db/k8s?password=***&sslmode=disable"),
        ("postgres://db/k8s?sslpassword=keypass", "postgres://db/k8s?sslpassword=***"),
        ("postgres://k8s:a@db/k8s?PASSWORD=b", "postgres://k8s:***@db/k8s?PASSWORD=***"),
        # nothing secret: unchanged
        ("postgres://k8s@db:5432/k8s", "postgres://k8s@db:5432/k8s"),
        ("postgres://db:5432/k8s", "postgres://db:5432/k8s"),
        ("postgres://:5432/k8s", "postgres://:5432/k8s"),
        # MySQL: kine's form and the URL form
        ("mysql://root:s3cret@tcp(127.0.0.1:3306)/k8s", "mysql://root:***@tcp(127.0.0.1:3306)/k8s"),
        ("mysql://root:s3cret@db:3306/k8s?ssl-ca=/ca.pem", "mysql://root:***@db:3306/k8s?ssl-ca=/ca.pem"),
        ("mysql://root@tcp(127.0.0.1:3306)/k8s", "mysql://root@tcp(127.0.0.1:3306)/k8s"),
        ("mysql://root:@tcp(127.0.0.1:3306)/k8s", "mysql://root:@tcp(127.0.0.1:3306)/k8s"),
        # SQLite has no secret
        ("sqlite:///var/lib/k8s-sql/state.db", "sqlite:///var/lib/k8s-sql/state.db"),
        ("sqlite:///tmp/a:b@c/state.db", "sqlite:///tmp/a:b@c/state.db"),
        ("", ""),
    ],
)
def test_redact(given: str, shown: str) -> None:
    assert dsn.redact(given) == shown


def test_secrets_are_the_password_as_written_and_decoded() -> None:
    assert set(dsn.secrets("postgres://k8s:p%40ss%2Fword@db/k8s")) == {"p%40ss%2Fword", "p@ss/word"}
    assert dsn.secrets("postgres://k8s@db/k8s?password=abc%20d") == ["abc%20d", "abc d"]
    assert dsn.secrets("postgres://k8s@db/k8s") == []
    assert dsn.secrets("sqlite:///tmp/a:b@c/state.db") == []


def test_scrub_hides_urls_and_known_secrets() -> None:
    hidden = dsn.secrets("postgres://k8s:p%40ssword@db/k8s")
    text = "connect to postgres://k8s:p%40ssword@db/k8s failed: bad password p@ssword for mysql://x:y@h/db"
    out = dsn.scrub(text, hidden)
    assert "p%40ssword" not in out and "p@ssword" not in out and ":y@" not in out
    assert "postgres://k8s:***@db/k8s" in out and "mysql://x:***@h/db" in out
    # short secrets are hidden only inside URLs (not every "pw" of every line)
    assert dsn.scrub("upward", ["pw"]) == "upward"


def test_log_lines_never_show_the_password(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = "postgres://k8s:hunter2%21@db1,db2/k8s"
    formatter = dsn.RedactingFormatter("%(levelname)s %(message)s", dsn.secrets(endpoint))
    logger = logging.getLogger("test_dsn")
    try:
        raise ConnectionError(f"cannot reach {endpoint} with hunter2!")
    except ConnectionError:
        record = logger.makeRecord("test_dsn", logging.ERROR, __file__, 1, "lost %s", (endpoint,), exc_info=None)
        import sys

        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "hunter2" not in line
    assert "postgres://k8s:***@db1,db2/k8s" in line
    assert "cannot reach postgres://k8s:***@db1,db2/k8s with ***" in line  # the exception's text, cleaned


@pytest.mark.parametrize(
    "endpoint",
    [
        "mysql://root:s3cretpw@tcp(127.0.0.1:3306)/",
        "mysql://root:s3cretpw@127.0.0.1:3306",
        "mysql://root:s3cretpw@tcp(127.0.0.1:port)/k8s",
        "mysql://root:s3cretpw@127.0.0.1:3306/k8s?ssl-ca=/nonexistent/ca.pem",
        "postgres://k8s:s3cretpw@db:port/k8s",
        "postgres://k8s:s3cretpw@db/k8s?sslrootcert=/nonexistent/ca.pem",
        "ftp://k8s:s3cretpw@db/k8s",
        "sqlite://",
    ],
)
def test_bad_endpoints_are_one_line_without_the_password(endpoint: str) -> None:
    with pytest.raises(ValueError) as e:
        check_endpoint(endpoint)
    message = str(e.value)
    assert "s3cretpw" not in message
    assert "\n" not in message
    if "s3cretpw" in endpoint:
        assert "***" in message


def test_mysql_dsn_forms() -> None:
    args = parse_dsn("mysql://k8s:p%40ss@tcp([::1]:3307)/k8s")
    assert (args["host"], args["port"], args["user"], args["password"], args["database"]) == (
        "::1",
        3307,
        "k8s",
        "p@ss",
        "k8s",
    )
    assert parse_dsn("mysql://k8s@db/k8s")["port"] == 3306


def test_mysql_dsn_with_several_servers() -> None:
    from k8s_sql.backend.mysql import parse_hosts

    for text in ("mysql://u:pw@tcp(n1:3306,n2:3307,n3)/db", "mysql://u:pw@n1:3306,n2:3307,n3/db"):
        assert parse_hosts(text) == [("n1", 3306), ("n2", 3307), ("n3", 3306)]
        args = parse_dsn(text)
        assert (args["host"], args["port"], args["database"]) == ("n1", 3306, "db")
    assert parse_hosts("mysql://u@tcp([::1]:3307,[::2])/db") == [("::1", 3307), ("::2", 3306)]
    with pytest.raises(ValueError, match="invalid port"):
        parse_hosts("mysql://u:s3cretpw@tcp(n1:3306,n2:x)/db")
    with pytest.raises(ValueError, match="empty host"):
        parse_hosts("mysql://u@tcp(n1:3306,)/db")


async def test_a_server_refusing_new_connections_moves_the_pool_on() -> None:
    """A pool with no idle connection that cannot open one (its server was killed) is
    lost like one whose connection broke: the next request goes to the next host."""

    class Refusing:
        closed = False

        async def acquire(self) -> None:
            raise asyncmy.errors.OperationalError(2003, "Can't connect to MySQL server on 'h1' (111)")

        def close(self) -> None:
            self.closed = True

    backend = MySQLBackend("mysql://root@tcp(h1:3306,h2:3306)/db")
    pool = backend._pool = Refusing()
    with pytest.raises(asyncmy.errors.OperationalError):
        await backend._acquire()
    assert backend._pool is None and backend.server_name.startswith("h2") and pool.closed
