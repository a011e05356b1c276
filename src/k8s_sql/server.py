"""Assembling a k8s-sql frontend: backend, store, watch hub, leases, gRPC server."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import random
import signal
from dataclasses import dataclass
from urllib.parse import urlparse

import grpc

from k8s_sql.api.common import Context, Identity
from k8s_sql.api.decoding import DecodeErrorInterceptor
from k8s_sql.api.kv import KVServicer
from k8s_sql.api.lease import LeaseServicer
from k8s_sql.api.maintenance import AuthServicer, ClusterServicer, MaintenanceServicer
from k8s_sql.api.watch import WatchServicer, add_to_server as add_watch_to_server
from k8s_sql.backend import open_backend
from k8s_sql.backend.base import Backend
from k8s_sql.cluster import Membership
from k8s_sql.config import ETCD_VERSION, GRPC_OVERHEAD_BYTES, Config
from k8s_sql.lease.manager import LeaseExpirer
from k8s_sql.pb import rpc_pb2_grpc
from k8s_sql.store.store import Store
from k8s_sql.watch.follower import Follower
from k8s_sql.watch.hub import Hub

log = logging.getLogger("k8s_sql")


def grpc_options(config: Config) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_request_bytes + GRPC_OVERHEAD_BYTES),
        ("grpc.max_send_message_length", 2**31 - 1),
        # Kubernetes' client pings every 30 s, even when idle: never answer that with
        # GOAWAY too_many_pings (etcd's --grpc-keepalive-min-time is 5 s).
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 2 * 60 * 60 * 1000),
        ("grpc.keepalive_timeout_ms", 20 * 1000),
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
    ]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def member_id(cluster_id: int, name: str, urls: list[str]) -> int:
    """A stable member id (63 bits, so every database stores it), derived like etcd's
    from what identifies the member."""
    digest = hashlib.sha256(f"{cluster_id}/{name}/{','.join(sorted(urls))}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) or 1


@dataclass
class Server:
    config: Config
    backend: Backend
    store: Store
    hub: Hub
    grpc_server: grpc.aio.Server
    watch: WatchServicer
    expirer: LeaseExpirer
    follower: Follower
    membership: Membership
    ports: list[int]

    async def stop(self, grace: float = 1.0) -> None:
        await self.grpc_server.stop(grace)
        await self.membership.leave()
        await self.follower.stop()
        await self.watch.stop()
        await self.expirer.stop()
        await self.store.stop()
        await self.backend.close()


async def start(config: Config) -> Server:
    """Open the database and start serving; returns once the ports are listening."""
    config.validate()
    backend = open_backend(config.endpoint, sqlite_synchronous=config.sqlite_synchronous)
    await backend.open()
    cluster_id = await backend.meta_set_default("cluster_id", random.getrandbits(63) or 1)
    identity = Identity(
        cluster_id=cluster_id,
        member_id=member_id(cluster_id, config.name, config.advertise_client_urls),
        name=config.name,
        client_urls=config.advertise_client_urls,
    )
    membership = Membership(backend, identity.member_id, identity.name, identity.client_urls)
    await membership.join()
    store = Store(backend, max_txn_ops=config.max_txn_ops)
    await store.start()
    hub = Hub(backend)
    hub.start(store.revision)
    hub.compact_revision = lambda: store.compact_revision
    store.on_commit(hub.publish)
    ctx = Context(
        store=store,
        identity=identity,
        membership=membership,
        max_request_bytes=config.max_request_bytes,
        version=ETCD_VERSION,
    )

    server = grpc.aio.server(options=grpc_options(config), interceptors=[DecodeErrorInterceptor()])
    watch = WatchServicer(ctx, hub, config.watch_progress_notify_interval)
    rpc_pb2_grpc.add_KVServicer_to_server(KVServicer(ctx), server)
    add_watch_to_server(watch, server)
    rpc_pb2_grpc.add_LeaseServicer_to_server(LeaseServicer(ctx), server)
    rpc_pb2_grpc.add_MaintenanceServicer_to_server(MaintenanceServicer(ctx), server)
    rpc_pb2_grpc.add_ClusterServicer_to_server(ClusterServicer(ctx), server)
    rpc_pb2_grpc.add_AuthServicer_to_server(AuthServicer(ctx), server)

    ports = []
    for url in config.listen_client_urls:
        u = urlparse(url)
        address = f"[{u.hostname}]:{u.port}" if ":" in (u.hostname or "") else f"{u.hostname}:{u.port}"
        if u.scheme == "https":
            creds = grpc.ssl_server_credentials(
                [(_read(config.key_file), _read(config.cert_file))],
                root_certificates=_read(config.trusted_ca_file) if config.trusted_ca_file else None,
                require_client_auth=config.client_cert_auth,
            )
            ports.append(server.add_secure_port(address, creds))
        else:
            ports.append(server.add_insecure_port(address))
    await server.start()
    watch.start()
    expirer = LeaseExpirer(store, interval=config.lease_check_interval, active=lambda: membership.is_leader)
    expirer.start()
    follower = Follower(hub, store, interval=backend.follow_interval)
    follower.start()
    log.info(
        "ready to serve client requests on %s (store %s, revision %d)",
        ", ".join(config.listen_client_urls),
        config.endpoint,
        store.revision,
    )
    return Server(config, backend, store, hub, server, watch, expirer, follower, membership, ports)


def serve_workers(config: Config) -> int:
    """Run ``config.workers`` frontend processes on the same port (SO_REUSEPORT): the
    kernel spreads connections over them and the shared database keeps them one
    store, exactly as separate frontends. Returns when they have all stopped."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(config.workers):
        worker = dataclasses.replace(config, name=f"{config.name}-{i}", workers=1, reuse_port=True)
        p = ctx.Process(target=_run_worker, args=(worker,), name=worker.name)
        p.start()
        procs.append(p)

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while any(p.is_alive() for p in procs):
        for p in procs:
            p.join(0.5)
            if p.exitcode not in (None, 0):  # one worker failed: stop them all
                log.error("worker %s exited with %s; stopping", p.name, p.exitcode)
                forward(signal.SIGTERM, None)
    return max((p.exitcode or 0) for p in procs)


def _run_worker(config: Config) -> None:
    logging.basicConfig(level=logging.getLogger().level or logging.INFO)
    run(config)


def run(config: Config) -> None:
    """Serve on the event loop ``config.event_loop`` names. uvloop is the default where
    it is installed: gRPC's per-message work goes through the loop, and uvloop cuts the
    CPU of a streamed watch response by about a fifth (see docs/benchmarks.md)."""
    loop_factory = None
    if config.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if config.event_loop == "uvloop":
                raise
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config))


async def serve(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully."""
    server = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
