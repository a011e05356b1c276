"""Server configuration: what the command line sets, with etcd's defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

DEFAULT_CLIENT_URL = "http://127.0.0.1:2379"
ETCD_VERSION = "3.6.0"  # the etcd API version k8s-sql implements and reports
MAX_REQUEST_BYTES = 1536 * 1024  # etcd's --max-request-bytes default
GRPC_OVERHEAD_BYTES = 512 * 1024  # etcd allows this much on top for gRPC framing


@dataclass
class Config:
    name: str = "default"
    data_dir: str = ""
    endpoint: str = ""
    listen_client_urls: list[str] = field(default_factory=lambda: [DEFAULT_CLIENT_URL])
    advertise_client_urls: list[str] = field(default_factory=list)
    cert_file: str = ""
    key_file: str = ""
    trusted_ca_file: str = ""
    client_cert_auth: bool = False
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_txn_ops: int = 128
    watch_progress_notify_interval: float = 600.0
    sqlite_synchronous: str = "FULL"
    workers: int = 1
    reuse_port: bool = False  # set for --workers: several processes listen on one port
    lease_check_interval: float = 0.5
    event_loop: str = "auto"  # auto (uvloop when installed), uvloop or asyncio

    def __post_init__(self) -> None:
        if not self.data_dir:
            self.data_dir = f"{self.name}.k8s-sql"
        if not self.endpoint:
            self.endpoint = "sqlite:///" + os.path.join(os.path.abspath(self.data_dir), "state.db")
        if not self.advertise_client_urls:
            self.advertise_client_urls = list(self.listen_client_urls)

    def validate(self) -> None:
        for url in self.listen_client_urls:
            u = urlparse(url)
            if u.scheme not in ("http", "https") or not u.hostname or not u.port:
                raise ValueError(f"invalid client URL {url!r}: want http(s)://HOST:PORT")
            if u.scheme == "https" and not (self.cert_file and self.key_file):
                raise ValueError(f"{url} is https: --cert-file and --key-file are required")
        if self.client_cert_auth and not self.trusted_ca_file:
            raise ValueError("--client-cert-auth needs --trusted-ca-file")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError("--event-loop must be auto, uvloop or asyncio")
        if self.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("--sqlite-synchronous must be OFF, NORMAL, FULL or EXTRA")
