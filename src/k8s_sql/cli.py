"""The ``k8s-sql`` command: serve the etcd v3 API from SQL, or restore a snapshot."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import sys

import click

from k8s_sql import __version__
from k8s_sql.config import DEFAULT_CLIENT_URL, MAX_REQUEST_BYTES, Config


def _urls(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def _duration(value: str) -> float:
    """etcd-style durations: 10m, 1s, 500ms, 1h, or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--name", default="default", show_default=True, help="Human-readable name of this member (frontend).")
@click.option(
    "--data-dir",
    default="",
    help="Directory for the SQLite database (state.db); created on first start. [default: ${name}.k8s-sql]",
)
@click.option(
    "--endpoint",
    default="",
    help="The database: sqlite:///PATH/state.db. [default: sqlite:///${data-dir}/state.db]",
)
@click.option(
    "--listen-client-urls",
    default=DEFAULT_CLIENT_URL,
    show_default=True,
    help="Comma-separated http(s)://HOST:PORT URLs to serve the etcd v3 API on.",
)
@click.option(
    "--advertise-client-urls",
    default="",
    help="Comma-separated client URLs to advertise in MemberList. [default: the listen URLs]",
)
@click.option("--cert-file", default="", help="TLS certificate for https client URLs.")
@click.option("--key-file", default="", help="TLS private key for https client URLs.")
@click.option("--trusted-ca-file", default="", help="CA bundle to verify client certificates.")
@click.option("--client-cert-auth", is_flag=True, help="Refuse clients without a certificate signed by the trusted CA.")
@click.option(
    "--max-request-bytes",
    default=MAX_REQUEST_BYTES,
    show_default=True,
    help="Largest write request accepted (etcd's limit).",
)
@click.option("--max-txn-ops", default=128, show_default=True, help="Most operations in one txn.")
@click.option(
    "--watch-progress-notify-interval",
    "--experimental-watch-progress-notify-interval",
    "progress_interval",
    default="10m",
    show_default=True,
    help="How often idle watches with progress_notify get a progress response (e.g. 10m, 1s).",
)
@click.option(
    "--sqlite-synchronous",
    default="FULL",
    show_default=True,
    type=click.Choice(["OFF", "NORMAL", "FULL", "EXTRA"], case_sensitive=False),
    help="SQLite's synchronous setting. FULL makes every acknowledged write durable; "
    "NORMAL (kine's default) can lose the last writes on power loss.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    help="Frontend processes serving the same port (SO_REUSEPORT) and database, to use every core.",
)
@click.option(
    "--event-loop",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "uvloop", "asyncio"], case_sensitive=False),
    help="The asyncio event loop: uvloop (auto, when installed) costs gRPC about a fifth less CPU per "
    "message than the standard loop.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warn", "error"], case_sensitive=False),
)
@click.version_option(__version__, "--version", prog_name="k8s-sql")
@click.pass_context
def main(
    ctx: click.Context,
    name: str,
    data_dir: str,
    endpoint: str,
    listen_client_urls: str,
    advertise_client_urls: str,
    cert_file: str,
    key_file: str,
    trusted_ca_file: str,
    client_cert_auth: bool,
    max_request_bytes: int,
    max_txn_ops: int,
    progress_interval: str,
    sqlite_synchronous: str,
    workers: int,
    event_loop: str,
    log_level: str,
) -> None:
    """An etcd v3 API server that keeps its data in SQL.

    With no arguments it serves on 127.0.0.1:2379 from an SQLite file in
    ./default.k8s-sql/. Point kube-apiserver (--etcd-servers), etcdctl or any
    etcd v3 client at it.
    """
    logging.basicConfig(
        level={"warn": "WARNING"}.get(log_level.lower(), log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"data_dir": data_dir, "name": name}
        return
    config = Config(
        name=name,
        data_dir=data_dir,
        endpoint=endpoint,
        listen_client_urls=_urls(listen_client_urls),
        advertise_client_urls=_urls(advertise_client_urls),
        cert_file=cert_file,
        key_file=key_file,
        trusted_ca_file=trusted_ca_file,
        client_cert_auth=client_cert_auth,
        max_request_bytes=max_request_bytes,
        max_txn_ops=max_txn_ops,
        watch_progress_notify_interval=_duration(progress_interval),
        sqlite_synchronous=sqlite_synchronous.upper(),
        workers=workers,
        event_loop=event_loop.lower(),
    )
    try:
        config.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    from k8s_sql.server import run, serve_workers

    if config.workers > 1:
        sys.exit(serve_workers(config))
    run(config)


@main.command()
@click.argument("snapshot", type=click.Path(exists=True, dir_okay=False))
@click.option("--data-dir", "target_dir", default="", help="Data directory to create. [default: ${name}.k8s-sql]")
@click.pass_context
def restore(ctx: click.Context, snapshot: str, target_dir: str) -> None:
    """Create a data directory from a snapshot taken with `etcdctl snapshot save`."""
    data_dir = target_dir or ctx.obj["data_dir"] or f"{ctx.obj['name']}.k8s-sql"
    target = os.path.join(data_dir, "state.db")
    if os.path.exists(target):
        raise click.ClickException(f"{target} exists; restore into a new --data-dir")
    os.makedirs(data_dir, exist_ok=True)
    partial = target + ".part"
    try:
        _copy_verified(snapshot, partial)
        conn = sqlite3.connect(f"file:{os.path.abspath(partial)}?mode=ro", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        except sqlite3.DatabaseError as e:
            raise click.ClickException(f"{snapshot} is not a k8s-sql snapshot: {e}") from e
        finally:
            conn.close()
        if ok != "ok" or rev is None:
            raise click.ClickException(f"{snapshot} is not a valid k8s-sql snapshot ({ok})")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    click.echo(f"restored {snapshot} (revision {rev[0]}) into {target}")


def _copy_verified(snapshot: str, dest: str) -> None:
    """Copy the database part of a snapshot, checking the SHA-256 that ends it."""
    size = os.path.getsize(snapshot)
    if size % 512 != 32:
        raise click.ClickException(f"{snapshot} has no SHA-256 trailer: not a complete snapshot")
    digest = hashlib.sha256()
    with open(snapshot, "rb") as src, open(dest, "wb") as out:
        left = size - 32
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise click.ClickException(f"{snapshot} is truncated")
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
        if src.read(32) != digest.digest():
            raise click.ClickException(f"{snapshot} is corrupt: SHA-256 mismatch")
        out.flush()
        os.fsync(out.fileno())
