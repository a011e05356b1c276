"""The ``k8s-sql`` command: serve the etcd v3 API from SQL, or restore a snapshot."""

from __future__ import annotations

import logging
import os
import sys

import click

from k8s_sql import __version__
from k8s_sql.config import (
    DEFAULT_CLIENT_URL,
    MAX_CONCURRENT_STREAMS,
    MAX_REQUEST_BYTES,
    Config,
    configure_logging,
    parse_duration,
)

# etcd's minWatchProgressInterval
MIN_PROGRESS_INTERVAL = 0.1


def _urls(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


class Duration(click.ParamType):
    """etcd's duration flags: Go's syntax (``1m30s``, ``500ms``, ``1.5h``, ``0``) or a
    plain number of seconds; a bad one is a usage error with Go's message."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _progress_interval(seconds: float) -> float:
    """etcd's rule (v3rpc/watch.go): zero or less keeps the default (10 minutes), and an
    interval under 100 ms is raised to 100 ms with a warning."""
    if seconds <= 0:
        return 600.0
    if seconds < MIN_PROGRESS_INTERVAL:
        logging.getLogger("k8s_sql").warning(
            "adjusting watch progress notify interval to the minimum period of %.0f ms", MIN_PROGRESS_INTERVAL * 1000
        )
        return MIN_PROGRESS_INTERVAL
    return seconds


@click.group(
    invoke_without_command=True,
    # Every flag can come from the environment as K8S_SQL_<FLAG>, as etcd's from ETCD_<FLAG>.
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "K8S_SQL"},
)
@click.option(
    "--name",
    default="default",
    show_default=True,
    metavar="NAME",
    help="This member's name in MemberList (with --workers N, members NAME-0 ... NAME-N-1); "
    "also names the default --data-dir.",
)
@click.option(
    "--data-dir",
    default="",
    metavar="DIR",
    help="Directory of the default SQLite database, DIR/state.db, created on first start; "
    "not used when --endpoint names a database. [default: ${name}.k8s-sql]",
)
@click.option(
    "--endpoint",
    default="",
    metavar="DSN",
    help="The database, SQLite, PostgreSQL or MySQL/MariaDB: sqlite:///PATH/state.db, "
    "postgres://USER:PASS@HOST:PORT/DB (or postgresql://; libpq's ?sslmode=, sslrootcert=, ...), "
    "mysql://USER:PASS@tcp(HOST:PORT)/DB or mysql://USER:PASS@HOST:PORT/DB (?ssl-ca=, tls=, ...). "
    "The database and its tables are created if absent. A password here shows in `ps`: prefer "
    "--endpoint-file or K8S_SQL_ENDPOINT (docs/operations.md). [default: sqlite:///${data-dir}/state.db]",
)
@click.option(
    "--endpoint-file",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    default=None,
    metavar="PATH",
    help="Read --endpoint from this file (its first non-empty line), so the DSN and its password stay "
    "out of argv. Not together with --endpoint.",
)
@click.option(
    "--read-endpoint",
    default="",
    metavar="DSN",
    help="A read-only replica of --endpoint's database (a PostgreSQL hot standby, a MySQL/MariaDB "
    "replica) to serve serializable Ranges from, never older than what this frontend has already "
    "answered; otherwise the primary answers (docs/high-availability.md).",
)
@click.option(
    "--listen-client-urls",
    default=DEFAULT_CLIENT_URL,
    show_default=True,
    metavar="URLS",
    help="Comma-separated http(s)://HOST:PORT URLs to serve the etcd v3 API on; "
    "https needs --cert-file and --key-file.",
)
@click.option(
    "--advertise-client-urls",
    default="",
    metavar="URLS",
    help="Comma-separated client URLs this member advertises in MemberList. [default: the listen URLs]",
)
@click.option(
    "--cert-file",
    default="",
    metavar="PATH",
    help="TLS certificate (PEM) for https client URLs; needs --key-file.",
)
@click.option("--key-file", default="", metavar="PATH", help="TLS private key (PEM, unencrypted) of --cert-file.")
@click.option(
    "--trusted-ca-file",
    default="",
    metavar="PATH",
    help="CA certificates (PEM) that client certificates are verified against on https client URLs.",
)
@click.option(
    "--client-cert-auth",
    is_flag=True,
    help="Refuse https clients without a certificate signed by a CA in --trusted-ca-file (which this flag needs).",
)
@click.option(
    "--max-request-bytes",
    default=MAX_REQUEST_BYTES,
    show_default=True,
    metavar="BYTES",
    help="Largest client request accepted (etcd's flag; a larger one gets `etcdserver: request is too large`); "
    "watch responses over it are split when the watcher asked for fragments.",
)
@click.option(
    "--max-txn-ops",
    default=128,
    show_default=True,
    metavar="N",
    help="Most compares, or operations in either branch, of one txn request; nested txns use up the same "
    "budget (etcd's flag).",
)
@click.option(
    "--max-concurrent-streams",
    default=MAX_CONCURRENT_STREAMS,
    show_default=True,
    type=click.IntRange(min=1, max=MAX_CONCURRENT_STREAMS),
    metavar="N",
    help="Most concurrent streams (calls) one client connection may have open; a client waits for "
    "one to end before it opens another (etcd's flag; the default is unlimited, as etcd's).",
)
@click.option(
    "--quota-backend-bytes",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    metavar="BYTES",
    help="Raise the NOSPACE alarm and refuse writes that add data once the database holds this many bytes "
    "in use (etcd's flag; 0: no quota, the database's own disk is the limit).",
)
@click.option(
    "--watch-progress-notify-interval",
    "--experimental-watch-progress-notify-interval",
    "progress_interval",
    envvar="K8S_SQL_WATCH_PROGRESS_NOTIFY_INTERVAL",
    default="10m",
    show_default=True,
    type=Duration(),
    help="How often idle watches with progress_notify get a progress response: a Go duration (10m, 1m30s, "
    "500ms) or seconds; 0 keeps 10m, less than 100ms is raised to 100ms (etcd's rules).",
)
@click.option(
    "--sqlite-synchronous",
    default="FULL",
    show_default=True,
    type=click.Choice(["OFF", "NORMAL", "FULL", "EXTRA"], case_sensitive=False),
    help="SQLite's synchronous setting (SQLite only; ?synchronous= in the --endpoint DSN wins over it). "
    "FULL makes every acknowledged write durable; NORMAL (kine's default) is faster but can lose the last "
    "acknowledged writes on power loss (not on a process crash).",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    metavar="N|auto",
    help="Frontend processes serving the same ports (SO_REUSEPORT) from the same database, so that one host "
    "uses every core; auto: one per core this process may run on.",
)
@click.option(
    "--event-loop",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "uvloop", "asyncio"], case_sensitive=False),
    help="The asyncio event loop: auto is uvloop when it is installed (it costs gRPC about a fifth less CPU "
    "per message), else asyncio's own loop.",
)
@click.option(
    "--transport",
    default="grpcio",
    show_default=True,
    type=click.Choice(["grpcio", "envoy"], case_sensitive=False),
    help="What speaks HTTP/2 and gRPC to clients: grpcio (grpc.aio), or envoy -- Envoy's HTTP/2 with this "
    "process's Python inside it (pyvoy; pip install 'k8s-sql[envoy]'), about a quarter of grpc.aio's CPU per call.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warn", "error"], case_sensitive=False),
    help="Log lines of this level and above go to stderr; at debug, logged errors carry their full tracebacks "
    "(else one line each). Passwords are redacted at every level.",
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="text: one line per entry; json: one JSON object per line with etcd's keys (level, ts, caller, msg, "
    "then the entry's fields).",
)
@click.option(
    "--log-outputs",
    default="stderr",
    show_default=True,
    metavar="OUTPUTS",
    help="Comma-separated places to log to: stderr, stdout or file paths (appended), as etcd's flag.",
)
@click.option(
    "--listen-metrics-urls",
    default="",
    metavar="URLS",
    help="Comma-separated http(s)://HOST:PORT URLs serving /metrics, /health, /livez, /readyz and /version "
    "(etcd's flag; https uses --cert-file and --key-file). Plain-HTTP client URLs serve them too.",
)
@click.option(
    "--client-url-http/--no-client-url-http",
    default=True,
    show_default=True,
    help="Serve /metrics, /health, /livez, /readyz and /version on plain-HTTP client URLs too, next to gRPC "
    "(as etcd does): gRPC connections are then relayed through the event loop, which costs CPU per request "
    "(docs/monitoring.md). Off: gRPC owns the port.",
)
@click.option(
    "--warning-apply-duration",
    default="100ms",
    show_default=True,
    type=Duration(),
    help="Log a warning for a request that takes longer than this (etcd's `apply request took too long`), "
    "with its method and keys; 0 turns it off.",
)
@click.version_option(__version__, "--version", prog_name="k8s-sql")
@click.pass_context
def main(
    ctx: click.Context,
    name: str,
    data_dir: str,
    endpoint: str,
    endpoint_file: str | None,
    read_endpoint: str,
    listen_client_urls: str,
    advertise_client_urls: str,
    cert_file: str,
    key_file: str,
    trusted_ca_file: str,
    client_cert_auth: bool,
    max_request_bytes: int,
    max_txn_ops: int,
    quota_backend_bytes: int,
    max_concurrent_streams: int,
    progress_interval: float,
    sqlite_synchronous: str,
    workers: str,
    event_loop: str,
    transport: str,
    log_level: str,
    log_format: str,
    log_outputs: str,
    listen_metrics_urls: str,
    client_url_http: bool,
    warning_apply_duration: float,
) -> None:
    """An etcd v3 API server that keeps its data in SQL.

    With no arguments it serves on 127.0.0.1:2379 from an SQLite file in
    ./default.k8s-sql/. Point kube-apiserver (--etcd-servers), etcdctl or any
    etcd v3 client at it.

    Every flag can also be set by an environment variable K8S_SQL_<FLAG>, as etcd's
    by ETCD_<FLAG>: K8S_SQL_ENDPOINT, K8S_SQL_LISTEN_CLIENT_URLS, ...
    """
    if endpoint and endpoint_file:
        raise click.UsageError("give --endpoint or --endpoint-file, not both")
    if endpoint_file:
        endpoint = _read_endpoint_file(endpoint_file)
    config = Config(
        name=name,
        data_dir=data_dir,
        endpoint=endpoint,
        read_endpoint=read_endpoint,
        listen_client_urls=_urls(listen_client_urls),
        advertise_client_urls=_urls(advertise_client_urls),
        cert_file=cert_file,
        key_file=key_file,
        trusted_ca_file=trusted_ca_file,
        client_cert_auth=client_cert_auth,
        max_request_bytes=max_request_bytes,
        max_txn_ops=max_txn_ops,
        quota_backend_bytes=quota_backend_bytes,
        max_concurrent_streams=max_concurrent_streams,
        sqlite_synchronous=sqlite_synchronous.upper(),
        workers=_workers(workers),
        event_loop=event_loop.lower(),
        transport=transport.lower(),
        log_level=log_level.lower(),
        log_format=log_format.lower(),
        log_outputs=[o.strip() for o in log_outputs.split(",") if o.strip()],
        listen_metrics_urls=_urls(listen_metrics_urls) if listen_metrics_urls else [],
        warning_apply_duration=warning_apply_duration,
        client_url_http=client_url_http,
    )
    try:
        configure_logging(config)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"data_dir": data_dir, "name": name}
        return
    config.watch_progress_notify_interval = _progress_interval(progress_interval)
    try:
        config.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from k8s_sql.server import StartupError, run, serve_workers

    try:
        if config.workers > 1:
            sys.exit(serve_workers(config))
        run(config)
    except StartupError as e:
        raise click.ClickException(str(e)) from None


def _workers(text: str) -> int:
    """--workers: a count, or auto -- the cores this process may run on."""
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number or auto", param_hint="'--workers'") from None


def _read_endpoint_file(path: str) -> str:
    """The DSN in an --endpoint-file: its first non-empty line, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}", param_hint="'--endpoint-file'") from None
    endpoint = next((line for line in lines if line), "")
    if not endpoint:
        raise click.BadParameter(f"{path} is empty", param_hint="'--endpoint-file'")
    return endpoint


@main.command(short_help="Copy a store into an empty database or etcd, revisions intact.")
@click.argument("source")
@click.argument("dest")
@click.option(
    "--verify",
    is_flag=True,
    help="Compare HashKV of the source's copy and the destination at the end (a live DEST "
    "endpoint: its keys, values and leases).",
)
@click.option("--dry-run", is_flag=True, help="Read the source and count its rows; write nothing.")
@click.option(
    "--replace",
    is_flag=True,
    help="Clear a DEST that already holds a store (its keys, history and leases; a live endpoint's keys "
    "and leases) instead of refusing it. Stop its frontends or kube-apiservers first.",
)
@click.option(
    "--cacert",
    default="",
    metavar="FILE",
    help="CA bundle to verify an https SOURCE or DEST endpoint (etcdctl's flag).",
)
@click.option("--cert", default="", metavar="FILE", help="Client certificate for an https endpoint.")
@click.option("--key", default="", metavar="FILE", help="Client key for an https endpoint.")
def migrate(
    source: str, dest: str, verify: bool, dry_run: bool, replace: bool, cacert: str, cert: str, key: str
) -> None:
    """Copy SOURCE into the empty DEST, keeping every key's revisions, the
    history, the revision counter and the leases.

    SOURCE: an etcd snapshot file (`etcdctl snapshot save` against etcd), a k8s-sql
    snapshot file, a k8s-sql database DSN (sqlite:///…, postgres://…, mysql://…), or a
    live etcd v3 endpoint http(s)://HOST:PORT -- etcd, kine or k8s-sql: its current
    state at one revision, without the history before it.
    DEST: a database DSN that k8s-sql has never written to, a new file: an etcd
    snapshot that `etcdutl snapshot restore` turns into an etcd data directory, or a
    live etcd endpoint http(s)://HOST:PORT with no keys: the current state only, every
    key at a revision above the source's.
    """
    import asyncio

    from k8s_sql.migrate import TLS, MigrationError, migrate as run_migration
    from k8s_sql.progress import for_terminal_or_log

    tls = TLS(cacert, cert, key)
    progress = for_terminal_or_log()
    try:
        summary = asyncio.run(
            run_migration(source, dest, verify=verify, dry_run=dry_run, tls=tls, progress=progress, replace=replace)
        )
    except MigrationError as e:
        progress.done()
        raise click.ClickException(str(e)) from None
    counts = ", ".join(f"{n} {table} rows" for table, n in summary.rows.items())
    what = "would copy" if dry_run else "copied"
    click.echo(
        f"{what} revision {summary.revision} (compacted at {summary.compact_revision}): {counts} "
        f"in {summary.seconds:.1f} s{'; --verify: ' + summary.check if summary.verified else ''}"
    )


@main.command(short_help="Create a data directory from an `etcdctl snapshot save` file.")
@click.argument("snapshot", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--data-dir",
    "target_dir",
    default="",
    metavar="DIR",
    help="The SQLite data directory to create; it must not hold a state.db yet. "
    "[default: the command's --data-dir, else ${name}.k8s-sql]",
)
@click.pass_context
def restore(ctx: click.Context, snapshot: str, target_dir: str) -> None:
    """Create a data directory from a snapshot taken with `etcdctl snapshot save`: from
    k8s-sql, or from etcd itself (its bbolt file: every key with its revisions, the
    history since its last compaction, and its leases)."""
    from k8s_sql.backend.snapshot import SnapshotError, restore as restore_snapshot
    from k8s_sql.formats import bbolt, etcd_snapshot

    data_dir = target_dir or ctx.obj["data_dir"] or f"{ctx.obj['name']}.k8s-sql"
    try:
        if bbolt.is_bolt(snapshot):
            target, converted = etcd_snapshot.restore(snapshot, data_dir)
            click.echo(
                f"restored the etcd snapshot {snapshot} (revision {converted.revision}, compacted at "
                f"{converted.compact_revision}: {converted.keys} keys, {converted.changes} changes, "
                f"{converted.leases} leases) into {target}"
            )
            return
        target, revision = restore_snapshot(snapshot, data_dir)
    except SnapshotError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"restored {snapshot} (revision {revision}) into {target}")
