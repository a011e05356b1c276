"""TLS between k8s-sql and its database: verified server certificates, and client
certificates that the database requires."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import free_port, missing
from databases import PostgresServer


def make_ca_and_cert(d: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost, signed by it."""
    if shutil.which("openssl") is None:
        missing("openssl is not installed")
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        d / f"{name}-{x}" for x in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name} CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ext = d / f"{name}-ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


def make_client_cert(d: Path, name: str, cn: str) -> tuple[Path, Path]:
    """A client certificate for ``cn`` signed by the CA that make_ca_and_cert made in ``d``."""
    ca, ca_key = d / f"{name}-ca.pem", d / f"{name}-ca.key"
    key, csr, cert = (d / f"{name}-client-{x}" for x in ("key.pem", "csr.pem", "cert.pem"))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr))
    run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-out", str(cert),
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@pytest.fixture
def tls_postgres(tmp_path: Path):
    reason = PostgresServer.available()
    if reason:
        missing(reason)
    db = PostgresServer(free_port())
    ca, cert, key = make_ca_and_cert(db.root / "tls", "pg")
    if os.geteuid() == 0:
        for f in (db.root / "tls").iterdir():
            shutil.chown(f, "postgres", "postgres")
        shutil.chown(db.root / "tls", "postgres", "postgres")
    key.chmod(0o600)
    db.settings = {"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}
    db.start()
    yield db, ca
    db.stop()


def test_postgres_over_verified_tls(tls_postgres, k8s_sql_factory, etcdctl, tmp_path: Path) -> None:
    db, ca = tls_postgres
    dsn = db.new_dsn() + f"?sslmode=verify-full&sslrootcert={ca}"
    server = k8s_sql_factory("--endpoint", dsn)
    etcdctl(server.url, "put", "over", "tls")
    assert etcdctl(server.url, "get", "over", "--print-value-only").stdout.strip() == "tls"

    # A server certificate that does not chain to the given CA is refused.
    other_ca, _, _ = make_ca_and_cert(tmp_path / "other", "other")
    bad = k8s_sql_factory("--endpoint", db.new_dsn() + f"?sslmode=verify-full&sslrootcert={other_ca}", start=False)
    with pytest.raises(RuntimeError, match="did not start"):
        bad.start(timeout=15)
    assert "certificate verify failed" in bad.log() or "CERTIFICATE_VERIFY_FAILED" in bad.log()


def test_mariadb_over_verified_tls(k8s_sql_factory, etcdctl, tmp_path: Path) -> None:
    from databases import MariaDBServer

    reason = MariaDBServer.available()
    if reason:
        missing(reason)
    db = MariaDBServer(free_port())
    ca, cert, key = make_ca_and_cert(tmp_path / "tls", "mariadb")
    db.extra_args = [f"--ssl-cert={cert}", f"--ssl-key={key}", f"--ssl-ca={ca}"]
    db.start()
    try:
        server = k8s_sql_factory("--endpoint", db.new_dsn() + f"?ssl-ca={ca}")
        etcdctl(server.url, "put", "over", "tls")
        assert etcdctl(server.url, "get", "over", "--print-value-only").stdout.strip() == "tls"
        # A server certificate that does not chain to the given CA is refused.
        other_ca, _, _ = make_ca_and_cert(tmp_path / "other", "other")
        bad = k8s_sql_factory("--endpoint", db.new_dsn() + f"?ssl-ca={other_ca}", start=False)
        with pytest.raises(RuntimeError, match="did not start"):
            bad.start(timeout=15)
        assert "CERTIFICATE_VERIFY_FAILED" in bad.log() or "certificate verify failed" in bad.log()
    finally:
        db.stop()


def test_postgres_requiring_client_certificates(k8s_sql_factory, etcdctl, tmp_path: Path) -> None:
    reason = PostgresServer.available()
    if reason:
        missing(reason)
    db = PostgresServer(free_port())
    tls = db.root / "tls"
    ca, cert, key = make_ca_and_cert(tls, "pg")
    client_cert, client_key = make_client_cert(tls, "pg", "postgres")  # cert auth: CN = user name
    if os.geteuid() == 0:
        for f in [*tls.iterdir(), tls]:
            shutil.chown(f, "postgres", "postgres")
    key.chmod(0o600)
    db.settings = {"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key), "ssl_ca_file": str(ca)}
    db.hba = "local all all trust\nhostssl all all 127.0.0.1/32 cert\n"  # TCP only with a client certificate
    db.start()
    try:
        verify = f"?sslmode=verify-full&sslrootcert={ca}"
        server = k8s_sql_factory("--endpoint", db.new_dsn() + f"{verify}&sslcert={client_cert}&sslkey={client_key}")
        etcdctl(server.url, "put", "client", "cert")
        assert etcdctl(server.url, "get", "client", "--print-value-only").stdout.strip() == "cert"

        # Without a client certificate the database turns k8s-sql away.
        bad = k8s_sql_factory("--endpoint", db.new_dsn() + verify, start=False)
        with pytest.raises(RuntimeError, match="did not start"):
            bad.start(timeout=15)
        assert "requires a valid client certificate" in bad.log(), bad.log()
    finally:
        db.stop()


def test_mariadb_requiring_client_certificates(k8s_sql_factory, etcdctl, tmp_path: Path) -> None:
    from databases import MariaDBServer

    reason = MariaDBServer.available()
    if reason:
        missing(reason)
    db = MariaDBServer(free_port(), grant_tables=True)
    ca, cert, key = make_ca_and_cert(tmp_path / "tls", "mariadb")
    client_cert, client_key = make_client_cert(tmp_path / "tls", "mariadb", "k8s-sql")
    db.extra_args = [f"--ssl-cert={cert}", f"--ssl-key={key}", f"--ssl-ca={ca}"]
    db.start()
    try:
        db.sql("CREATE USER 'k8s'@'%' REQUIRE X509; GRANT ALL PRIVILEGES ON *.* TO 'k8s'@'%'")
        dsn = f"mysql://k8s@tcp(127.0.0.1:{db.port})/k8s_sql_client_cert?ssl-ca={ca}"
        server = k8s_sql_factory("--endpoint", f"{dsn}&ssl-cert={client_cert}&ssl-key={client_key}")
        etcdctl(server.url, "put", "client", "cert")
        assert etcdctl(server.url, "get", "client", "--print-value-only").stdout.strip() == "cert"

        # The account requires a certificate: TLS with only the CA is refused.
        bad = k8s_sql_factory("--endpoint", dsn, start=False)
        with pytest.raises(RuntimeError, match="did not start"):
            bad.start(timeout=15)
        assert "Access denied" in bad.log(), bad.log()
    finally:
        db.stop()
