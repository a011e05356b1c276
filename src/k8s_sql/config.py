"""Server configuration: what the command line sets, with etcd's defaults."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlparse

from k8s_sql import logs

DEFAULT_CLIENT_URL = "http://127.0.0.1:2379"
ETCD_VERSION = "3.6.0"  # the etcd API version k8s-sql implements and reports
MAX_REQUEST_BYTES = 1536 * 1024  # etcd's --max-request-bytes default
GRPC_OVERHEAD_BYTES = 512 * 1024  # etcd allows this much on top for gRPC framing
MAX_CONCURRENT_STREAMS = 2**32 - 1  # etcd's --max-concurrent-streams default (math.MaxUint32)
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


@dataclass
class Config:
    name: str = "default"
    data_dir: str = ""
    endpoint: str = field(default="", repr=False)  # may hold a password: never in a repr
    read_endpoint: str = field(default="", repr=False)  # a replica for serializable reads (store/replica.py)
    listen_client_urls: list[str] = field(default_factory=lambda: [DEFAULT_CLIENT_URL])
    advertise_client_urls: list[str] = field(default_factory=list)
    cert_file: str = ""
    key_file: str = ""
    trusted_ca_file: str = ""
    client_cert_auth: bool = False
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_txn_ops: int = 128
    quota_backend_bytes: int = 0  # etcd's --quota-backend-bytes; 0: none (see store/space.py)
    # etcd's --max-concurrent-streams: streams one client connection may have open at
    # once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); etcd's default is math.MaxUint32.
    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    watch_progress_notify_interval: float = 600.0
    sqlite_synchronous: str = "FULL"
    workers: int = 1
    reuse_port: bool = False  # set for --workers: several processes listen on one port
    lease_check_interval: float = 0.5
    event_loop: str = "auto"  # auto (uvloop when installed), uvloop or asyncio
    # grpcio (grpc.aio) or envoy (Envoy's HTTP/2 through pyvoy: k8s_sql/envoy.py)
    transport: str = "grpcio"
    # Logging travels with the config so that --workers processes (spawned, so they
    # inherit no logging setup) log exactly as the parent does.
    log_level: str = "info"
    log_format: str = "text"  # text or json (etcd's zap keys: level, ts, caller, msg)
    log_outputs: list[str] = field(default_factory=lambda: ["stderr"])
    # etcd's --listen-metrics-urls: /metrics and the health endpoints on their own URLs.
    listen_metrics_urls: list[str] = field(default_factory=list)
    # Serve the HTTP endpoints on plain-HTTP client URLs too, next to gRPC (mux.py).
    client_url_http: bool = True
    # etcd's --warning-apply-duration: a unary request slower than this is logged.
    warning_apply_duration: float = 0.1
    # Where a --workers process serves its endpoints for the parent to gather (a Unix
    # socket path); set by the parent, empty otherwise.
    worker_socket: str = ""

    def __post_init__(self) -> None:
        if not self.data_dir:
            self.data_dir = f"{self.name}.k8s-sql"
        if not self.endpoint:
            # sqlite:// and an absolute path: sqlite:///var/lib/…, as documented
            self.endpoint = "sqlite://" + os.path.join(os.path.abspath(self.data_dir), "state.db")
        if not self.advertise_client_urls:
            self.advertise_client_urls = list(self.listen_client_urls)

    def validate(self) -> None:
        """Raise ValueError with one line naming the flag if any setting is wrong.

        Everything that can be checked without the database is checked here, before
        anything listens: URLs, the DSN's form, that the TLS files exist and are PEM
        certificates and keys (etcd too refuses to start on a bad --cert-file).
        """
        for url in self.listen_client_urls:
            _check_url(url, "--listen-client-urls")
            if url.startswith("https:") and not (self.cert_file and self.key_file):
                raise ValueError(f"{url} is https: --cert-file and --key-file are required")
        for url in self.advertise_client_urls:
            _check_url(url, "--advertise-client-urls")
        for url in self.listen_metrics_urls:
            _check_url(url, "--listen-metrics-urls")
            if url.startswith("https:") and not (self.cert_file and self.key_file):
                raise ValueError(f"{url} is https: --cert-file and --key-file are required")
        if self.log_format not in logs.FORMATS:
            raise ValueError("--log-format must be text or json")
        logs.check_outputs(self.log_outputs)
        if self.warning_apply_duration < 0:
            raise ValueError("--warning-apply-duration must not be negative")
        if self.client_cert_auth and not self.trusted_ca_file:
            raise ValueError("--client-cert-auth needs --trusted-ca-file")
        _check_tls_files(self.cert_file, self.key_file, self.trusted_ca_file)
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.max_request_bytes < 1:
            raise ValueError("--max-request-bytes must be positive")
        if self.max_txn_ops < 1:
            raise ValueError("--max-txn-ops must be positive")
        if not 1 <= self.max_concurrent_streams <= MAX_CONCURRENT_STREAMS:
            raise ValueError(f"--max-concurrent-streams must be between 1 and {MAX_CONCURRENT_STREAMS}")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError("--event-loop must be auto, uvloop or asyncio")
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("--event-loop uvloop: uvloop is not installed")
        if self.transport not in ("grpcio", "envoy"):
            raise ValueError("--transport must be grpcio or envoy")
        if self.transport == "envoy":
            from k8s_sql import envoy

            envoy.check(self)
        if self.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("--sqlite-synchronous must be OFF, NORMAL, FULL or EXTRA")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError("--log-level must be debug, info, warn or error")
        from k8s_sql.backend import check_endpoint

        check_endpoint(self.endpoint)
        if self.read_endpoint:
            check_endpoint(self.read_endpoint)
            scheme = self.read_endpoint.split("://", 1)[0].replace("postgresql", "postgres")
            if scheme not in ("postgres", "mysql"):
                raise ValueError("--read-endpoint must name a PostgreSQL or MySQL/MariaDB replica")
            if scheme != self.endpoint.split("://", 1)[0].replace("postgresql", "postgres"):
                raise ValueError("--read-endpoint must be a replica of --endpoint's database, of the same kind")


def _check_url(url: str, flag: str) -> None:
    """etcd's client URLs: http(s)://HOST:PORT (etcd: "URL address does not have the form host:port")."""
    try:
        u = urlparse(url)
        port = u.port
    except ValueError:
        port = None
        u = urlparse("")
    if u.scheme not in ("http", "https") or not u.hostname or not port:
        raise ValueError(f"{flag}: invalid URL {url!r}: want http(s)://HOST:PORT")


def _no_passphrase() -> bytes:
    raise ValueError("encrypted private keys are not supported")


def _check_tls_files(cert_file: str, key_file: str, ca_file: str) -> None:
    """The TLS files load as PEM (as gRPC will load them), each error one line."""
    for flag, path in (("--cert-file", cert_file), ("--key-file", key_file), ("--trusted-ca-file", ca_file)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"{flag} {path}: not readable")
    if bool(cert_file) != bool(key_file):
        raise ValueError("--cert-file and --key-file must be given together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
        except (ssl.SSLError, ValueError) as e:
            reason = getattr(e, "reason", None) or str(e)
            raise ValueError(
                f"--cert-file {cert_file} / --key-file {key_file}: not a PEM certificate and its key ({reason})"
            ) from None
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, ValueError) as e:
            reason = getattr(e, "reason", None) or str(e)
            raise ValueError(f"--trusted-ca-file {ca_file}: no PEM CA certificate ({reason})") from None


# Go's time.ParseDuration, which etcd's duration flags use: a sequence of decimal
# numbers, each with an optional fraction and a unit, with an optional sign.
_NANOSECONDS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # µs, MICRO SIGN
    "\u03bcs": 1_000,  # μs, GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX_NANOSECONDS = (1 << 63) - 1
_PLAIN_SECONDS = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_duration(text: str) -> float:
    """Seconds from a duration in Go's ``time.ParseDuration`` syntax, as etcd's flags
    take them (``1m30s``, ``500ms``, ``1.5h``, ``300us``/``µs``, ``0``), or from a
    plain number of seconds (k8s-sql's earlier form, still accepted).

    Raises ValueError with Go's message for anything else, so that a mistake reads
    as it would from etcd: ``time: unknown unit "x" in duration "1x"``.
    """
    if _PLAIN_SECONDS.fullmatch(text):
        return float(text)
    s = text
    negative = s[:1] == "-"
    if s[:1] in "+-" and s:
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"time: invalid duration {_quote(text)}")
    total = 0
    while s:
        if not (s[0] == "." or s[0].isdigit()):
            raise ValueError(f"time: invalid duration {_quote(text)}")
        i = 0
        while i < len(s) and "0" <= s[i] <= "9":
            i += 1
        whole, s, has_whole = int(s[:i] or 0), s[i:], i > 0
        fraction, scale, has_fraction = 0, 1, False
        if s[:1] == ".":
            s = s[1:]
            i = 0
            while i < len(s) and "0" <= s[i] <= "9":
                i += 1
            fraction, scale, has_fraction = int(s[:i] or 0), 10**i, i > 0
            s = s[i:]
        if not (has_whole or has_fraction):
            raise ValueError(f"time: invalid duration {_quote(text)}")
        i = 0
        while i < len(s) and s[i] != "." and not ("0" <= s[i] <= "9"):
            i += 1
        unit_name, s = s[:i], s[i:]
        if not unit_name:
            raise ValueError(f"time: missing unit in duration {_quote(text)}")
        unit = _NANOSECONDS.get(unit_name)
        if unit is None:
            raise ValueError(f"time: unknown unit {_quote(unit_name)} in duration {_quote(text)}")
        # Go truncates the fraction to whole nanoseconds the same way.
        total += whole * unit + int(fraction * (unit / scale))
        if total > _MAX_NANOSECONDS:
            raise ValueError(f"time: invalid duration {_quote(text)}")
    return (-total if negative else total) / 1e9


def configure_logging(config: Config) -> None:
    """Set up the root logger from the config (level, format, outputs), keeping the
    endpoint's password out of every line (see :mod:`k8s_sql.logs`). Called by the
    command and again in each --workers process."""
    level = LOG_LEVELS.get(config.log_level.lower(), logging.INFO)
    logs.configure(level, config.log_format, config.log_outputs, config.endpoint, config.read_endpoint)
