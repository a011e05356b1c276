"""Assembling a k8s-sql frontend: backend, store, watch hub, leases, gRPC server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import random
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import grpc
from grpc_health.v1 import health as grpc_health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from k8s_sql import envoy, errors, mux
from k8s_sql.api.common import Context, Identity
from k8s_sql.api.interceptor import ErrorInterceptor
from k8s_sql.api.kv import KVServicer
from k8s_sql.api.lease import LeaseServicer
from k8s_sql.api.maintenance import AuthServicer, ClusterServicer, MaintenanceServicer
from k8s_sql.api.readiness import ReadinessGate
from k8s_sql.api.watch import WatchServicer, add_to_server as add_watch_to_server
from k8s_sql.asgi import GrpcOverAsgi
from k8s_sql.backend import migrations, open_backend
from k8s_sql.backend.base import Backend, BackendUnavailable
from k8s_sql.cluster import Membership
from k8s_sql.config import ETCD_VERSION, GRPC_OVERHEAD_BYTES, MAX_CONCURRENT_STREAMS, Config, configure_logging
from k8s_sql.dsn import redact, scrub, secrets
from k8s_sql.lease.manager import LeaseExpirer
from k8s_sql.migrate import MARKER as MIGRATING
from k8s_sql.monitor import Health, Monitor, ServerCollector
from k8s_sql.pb import rpc_pb2, rpc_pb2_grpc
from k8s_sql.store.replica import ReadReplica
from k8s_sql.store.space import Space
from k8s_sql.store.store import Store
from k8s_sql.watch.counts import RangeCounts
from k8s_sql.watch.follower import Follower
from k8s_sql.watch.hub import Hub
from k8s_sql.web import WebServer, application, workers_application

log = logging.getLogger("k8s_sql")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# gRPC core holds the calls that have arrived but that the grpc.aio server has not yet
# taken (it takes them one at a time per method, each a trip through the event loop) in
# a pending queue, and with its default limits (grpc.server.max_pending_requests 1,000,
# hard limit 3,000) rejects new calls at random above 1,000 of them: the call ends at
# once with CANCELLED (Trailers-Only, then RST_STREAM), which a grpc.aio client writing
# its first request reports as "INTERNAL: Internal error from Core". 5,000 Watch streams
# opened at once on a 2-core machine lost 10,712 of 64,288 that way; etcd (gRPC-Go, one
# goroutine per stream) none. etcd has no such queue limit: the limits below take it
# out of the way for any realistic burst, while a waiting call is still ended after
# gRPC's 30 s (grpc.server_max_unrequested_time_in_server) and what one connection may
# open is --max-concurrent-streams.
MAX_PENDING_CALLS = 1 << 20


def grpc_options(config: Config) -> list[tuple[str, int]]:
    streams = []
    if config.max_concurrent_streams < MAX_CONCURRENT_STREAMS:
        # gRPC core's default is already unlimited (2^32-1, etcd's default); the option
        # is a C int, so only a smaller limit is passed.
        streams = [("grpc.max_concurrent_streams", min(config.max_concurrent_streams, 2**31 - 1))]
    return [
        *streams,
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
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


class _GenericHandlersOnly:
    """What the generated ``add_*Servicer_to_server`` functions are given instead of
    the server: their generic handlers are added, their "registered methods" are not.

    grpc.aio's server keeps one pending request-call task per registered method and,
    for every call that arrives, runs ``asyncio.wait(FIRST_COMPLETED)`` over all of
    them: with etcd's 46 methods that is 46 callbacks added and removed per call.
    Measured (SQLite, one pinned core, etcd's benchmark): Put at 64 clients 647 ->
    552 µs of server CPU, one-key Range at 64 clients 422 -> 381 µs, with calls
    found through the generic handlers instead (a lookup by service name)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        pass


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def member_id(cluster_id: int, name: str, urls: list[str]) -> int:
    """A stable member id (63 bits, so every database stores it), derived like etcd's
    from what identifies the member."""
    digest = hashlib.sha256(f"{cluster_id}/{name}/{','.join(sorted(urls))}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) or 1


@dataclass
class Frontend:
    """One frontend's parts as the monitor, the health checks and the metrics see them
    (the membership and the space are the real ones once the database is open)."""

    ctx: Context
    hub: Hub
    backend: Backend

    @property
    def store(self) -> Store:
        return self.ctx.store

    @property
    def membership(self) -> Membership:
        return self.ctx.membership

    @property
    def space(self) -> Space:
        return self.ctx.space

    @property
    def version(self) -> str:
        return self.ctx.version


@dataclass
class Observers:
    """What reports on a frontend: monitor, HTTP endpoints, gRPC health, metrics."""

    monitor: Monitor
    web: WebServer
    grpc_health: grpc_health.aio.HealthServicer
    collector: ServerCollector | None = None
    metrics_ports: list[int] = dataclasses.field(default_factory=list)
    muxes: list[mux.Mux] = dataclasses.field(default_factory=list)

    async def stop(self) -> None:
        for m in self.muxes:
            await m.close()
        self.muxes = []
        if self.collector is not None:
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(self.collector)
            self.collector = None
        await self.monitor.stop()
        await self.grpc_health.enter_graceful_shutdown()
        await self.web.stop()


@dataclass
class Server:
    config: Config
    backend: Backend
    store: Store
    hub: Hub
    grpc_server: grpc.aio.Server | GrpcOverAsgi
    watch: WatchServicer
    expirer: LeaseExpirer
    follower: Follower
    membership: Membership
    space: Space
    ports: list[int]
    observers: Observers

    @property
    def metrics_ports(self) -> list[int]:
        return self.observers.metrics_ports

    async def stop(self, grace: float = 1.0) -> None:
        await self.observers.stop()
        await self.grpc_server.stop(grace)
        await self.membership.leave()
        await self.follower.stop()
        await self.watch.stop()
        await self.expirer.stop()
        await self.space.stop()
        await self.store.corruption.stop()
        if self.store.replica is not None:
            await self.store.replica.close()
        await self.store.stop()
        await self.backend.close()


class StartupError(Exception):
    """k8s-sql cannot start and retrying will not help: the message is one line for
    the operator, without the database password."""


# A database unreachable at start is retried: the first retry after 0.5 s, each
# wait twice the last, at most 10 s (a frontend started before its database joins
# within 10 s of it coming up).
RETRY_FIRST = 0.5
RETRY_MAX = 10.0


async def start(config: Config, transport: GrpcOverAsgi | None = None) -> Server:
    """Listen, then open the database (retrying while it is unreachable), then serve;
    returns once requests are served.

    ``transport``: serve the calls through this ASGI application (inside Envoy,
    --transport envoy: :mod:`k8s_sql.envoy`) instead of a grpc.aio server; Envoy
    then owns the client ports, and the HTTP endpoints listen on the socket it
    routes them to.

    The ports listen from the start and answer UNAVAILABLE with etcd's "database
    unavailable" until the store is ready (:mod:`k8s_sql.api.readiness`). Errors that
    retrying cannot fix raise :class:`StartupError`; a failed or cancelled start closes
    everything it opened (ports, pool, tasks, threads)."""
    try:
        config.validate()
        backend = open_backend(config.endpoint, sqlite_synchronous=config.sqlite_synchronous)
    except ValueError as e:
        raise StartupError(str(e)) from None
    log.debug("frontend %s starting (pid %d)", config.name, os.getpid())
    gate = ReadinessGate()
    store = Store(backend, max_txn_ops=config.max_txn_ops)
    hub = Hub(store, store.revisions)
    store.counts = RangeCounts(hub)
    # Servicers are registered before the database is known; the gate keeps calls from
    # them until identity and membership below are the real ones.
    ctx = Context(
        store=store,
        identity=Identity(cluster_id=0, member_id=0, name=config.name, client_urls=config.advertise_client_urls),
        membership=Membership(backend, 0, config.name, config.advertise_client_urls),
        space=Space(backend, 0, config.quota_backend_bytes),
        max_request_bytes=config.max_request_bytes,
        version=ETCD_VERSION,
    )

    calls = ErrorInterceptor(slow=config.warning_apply_duration)
    calls.register([*rpc_pb2.DESCRIPTOR.services_by_name.values(), health_pb2.DESCRIPTOR.services_by_name["Health"]])
    server: grpc.aio.Server | GrpcOverAsgi
    if transport is None:
        server = grpc.aio.server(options=grpc_options(config), interceptors=[gate, calls])
    else:
        transport.interceptors = [gate, calls]
        server = transport
    health_service = grpc_health.aio.HealthServicer()
    await health_service.set("", NOT_SERVING)  # until the store is ready and the database answers
    frontend = Frontend(ctx, hub, backend)

    def health_changed(healthy: bool) -> None:
        task = asyncio.ensure_future(health_service.set("", SERVING if healthy else NOT_SERVING))
        background.add(task)
        task.add_done_callback(background.discard)

    background: set[asyncio.Future[None]] = set()

    monitor = Monitor(frontend, on_change=health_changed)
    observers = Observers(monitor, WebServer(application(Health(frontend, monitor), ETCD_VERSION)), health_service)
    watch = WatchServicer(ctx, hub, config.watch_progress_notify_interval)
    services = _GenericHandlersOnly(server)  # type: ignore[arg-type]
    rpc_pb2_grpc.add_KVServicer_to_server(KVServicer(ctx), services)  # type: ignore[arg-type]
    add_watch_to_server(watch, server)  # type: ignore[arg-type]
    rpc_pb2_grpc.add_LeaseServicer_to_server(LeaseServicer(ctx), services)  # type: ignore[arg-type]
    rpc_pb2_grpc.add_MaintenanceServicer_to_server(MaintenanceServicer(ctx), services)  # type: ignore[arg-type]
    rpc_pb2_grpc.add_ClusterServicer_to_server(ClusterServicer(ctx), services)  # type: ignore[arg-type]
    rpc_pb2_grpc.add_AuthServicer_to_server(AuthServicer(ctx), services)  # type: ignore[arg-type]
    # Last: a handler registered earlier is tried first for every call.
    health_pb2_grpc.add_HealthServicer_to_server(health_service, services)  # type: ignore[arg-type]

    undo: list[Callable[[], Awaitable[object]]] = [backend.close]  # run in reverse on a failed start
    try:
        if transport is None:
            ports, muxed = _listen(server, config)  # type: ignore[arg-type]
        else:
            ports, muxed = [urlparse(url).port or 0 for url in config.listen_client_urls], []
        await observers.web.start()
        undo.append(observers.stop)
        observers.metrics_ports = await _listen_metrics(observers.web, config)
        if transport is not None and config.client_url_http:
            await observers.web.listen_unix(envoy.endpoints_socket())
        await server.start()
        undo.append(lambda: server.stop(None))
        observers.muxes = await _listen_muxed(observers.web, config, ports, muxed)
        log.info(
            "listening for client requests on %s; opening the database %s",
            ", ".join(config.listen_client_urls),
            redact(config.endpoint),
        )
        cluster_id, membership = await _open_database(config, backend, store)
        undo.append(store.stop)
        undo.append(membership.leave)
        ctx.identity = Identity(
            cluster_id=cluster_id,
            member_id=membership.member_id,
            name=config.name,
            client_urls=config.advertise_client_urls,
        )
        ctx.membership = membership
        space = ctx.space
        space.member_id = membership.member_id
        await space.open()
        space.start()
        undo.append(space.stop)
        store.on_database_full = space.database_full
        if config.read_endpoint:
            store.replica = ReadReplica(open_backend(config.read_endpoint), redact(config.read_endpoint))
            await store.replica.open()
            undo.append(store.replica.close)
        corruption = store.corruption
        corruption.member_id = membership.member_id
        corruption.on_change = lambda raised: hub.refuse_watches(errors.Corrupt.message if raised else "")
        await corruption.open()
        corruption.start()
        undo.append(corruption.stop)
        hub.start(store.revision)
        store.subscribe(hub.publish)
        watch.start()
        undo.append(watch.stop)
        expirer = LeaseExpirer(store, interval=config.lease_check_interval, active=lambda: membership.is_leader)
        expirer.start()
        undo.append(expirer.stop)
        follower = Follower(hub, store, interval=store.follow_interval)
        follower.start()
        undo.append(follower.stop)
        await monitor.probe_once()
        monitor.start()
        observers.collector = ServerCollector(frontend, monitor)
        REGISTRY.register(observers.collector)
        gate.open()
    except BaseException as e:
        for step in reversed(undo):
            with contextlib.suppress(Exception):
                await step()
        if isinstance(e, BackendUnavailable):  # lost between opening and serving: start again
            reason = scrub(str(e), secrets(config.endpoint))
            raise StartupError(f"lost the database {redact(config.endpoint)} while starting: {reason}") from None
        raise
    log.info(
        "ready to serve client requests on %s (store %s, revision %d)",
        ", ".join(config.listen_client_urls),
        redact(config.endpoint),
        store.revision,
    )
    return Server(config, backend, store, hub, server, watch, expirer, follower, membership, space, ports, observers)


async def _listen_metrics(web: WebServer, config: Config) -> list[int]:
    """Serve the HTTP endpoints on every --listen-metrics-urls URL (and on a --workers
    process's socket for its parent); the bound ports."""
    ports = []
    for url in config.listen_metrics_urls:
        u = urlparse(url)
        _probe_bind(url, u.hostname or "", u.port or 0, False)
        context = _server_ssl_context(config) if u.scheme == "https" else None
        try:
            ports.append(await web.listen(u.hostname or "", u.port or 0, context, reuse_port=False))
        except OSError as e:
            raise StartupError(f"cannot listen on {url}: {e.strerror or e}") from None
    if config.worker_socket:
        await web.listen_unix(config.worker_socket)
    return ports


def _server_ssl_context(config: Config) -> ssl.SSLContext:
    """The client TLS settings for an https metrics URL, as etcd uses them."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.cert_file, config.key_file)
    if config.trusted_ca_file:
        context.load_verify_locations(config.trusted_ca_file)
        if config.client_cert_auth:
            context.verify_mode = ssl.CERT_REQUIRED
    return context


def _listen(server: grpc.aio.Server, config: Config) -> tuple[list[int], list[tuple[int, str, str]]]:
    """Add every client URL's port; a port that cannot be bound is a StartupError.
    A plain-HTTP URL, when --client-url-http is on, gets a private Unix socket for
    gRPC instead: returned as ``(index in ports, url, socket path)`` for
    :func:`_listen_muxed` to put the URL's listener in front of once gRPC serves."""
    ports: list[int] = []
    muxed: list[tuple[int, str, str]] = []
    for url in config.listen_client_urls:
        u = urlparse(url)
        address = f"[{u.hostname}]:{u.port}" if ":" in (u.hostname or "") else f"{u.hostname}:{u.port}"
        _probe_bind(url, u.hostname or "", u.port or 0, config.reuse_port)
        try:
            if u.scheme == "http" and config.client_url_http:
                path = mux.private_socket_path(len(muxed))
                server.add_insecure_port(f"unix-abstract:{path[1:]}" if path.startswith("\0") else f"unix:{path}")
                muxed.append((len(ports), url, path))
                ports.append(u.port or 0)
            elif u.scheme == "https":
                creds = grpc.ssl_server_credentials(
                    [(_read(config.key_file), _read(config.cert_file))],
                    root_certificates=_read(config.trusted_ca_file) if config.trusted_ca_file else None,
                    require_client_auth=config.client_cert_auth,
                )
                ports.append(server.add_secure_port(address, creds))
            else:
                ports.append(server.add_insecure_port(address))
        except (OSError, RuntimeError) as e:
            # etcd: "listen tcp 127.0.0.1:2379: bind: address already in use"
            raise StartupError(f"cannot listen on {url}: {e}") from None
    return ports, muxed


async def _listen_muxed(
    web: WebServer, config: Config, ports: list[int], muxed: list[tuple[int, str, str]]
) -> list[mux.Mux]:
    """Listen on the plain-HTTP client URLs: gRPC relayed to its private socket, HTTP/1
    answered by the endpoints (see :mod:`k8s_sql.mux`)."""
    out = []
    for index, url, path in muxed:
        u = urlparse(url)
        m = mux.Mux(path, web.protocol_factory)
        try:
            ports[index] = await m.listen(u.hostname or "", u.port or 0, config.reuse_port)
        except OSError as e:
            raise StartupError(f"cannot listen on {url}: {e.strerror or e}") from None
        out.append(m)
    return out


def _probe_bind(url: str, host: str, port: int, reuse_port: bool) -> None:
    """Bind the address once ourselves, as gRPC will (SO_REUSEADDR, and SO_REUSEPORT for
    --workers), so that a port in use or a host that is not ours is one clear line,
    as etcd's ``listen tcp 127.0.0.1:2379: bind: address already in use``, rather than
    gRPC's own error and its C-core log line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise StartupError(f"cannot listen on {url}: {e.strerror or e}") from None
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(sockaddr)
            except OSError as e:
                raise StartupError(f"cannot listen on {url}: bind: {e.strerror or e}") from None


async def _open_database(config: Config, backend: Backend, store: Store) -> tuple[int, Membership]:
    """Open the database, start the store and join the members, trying again with
    backoff for as long as the database is unreachable (BackendUnavailable), with one
    log line per attempt. Any other error ends the start with a StartupError.
    Returns the cluster id and the joined membership."""
    delay = RETRY_FIRST
    attempt = 0
    shown = redact(config.endpoint)
    while True:
        attempt += 1
        try:
            await backend.open()
            if await backend.meta_get(MIGRATING):
                await _close_quietly(store, backend)
                raise StartupError(
                    f"the database {shown} holds an unfinished `k8s-sql migrate`: run it again to completion"
                )
            cluster_id = await backend.meta_set_default("cluster_id", random.getrandbits(63) or 1)
            membership = Membership(
                backend,
                member_id(cluster_id, config.name, config.advertise_client_urls),
                config.name,
                config.advertise_client_urls,
            )
            await store.start()
            await membership.join()
            return cluster_id, membership
        except BackendUnavailable as e:
            log.warning("database %s unavailable (attempt %d), retrying in %.1f s: %s", shown, attempt, delay, e)
        except migrations.SchemaTooNew as e:
            await _close_quietly(store, backend)
            raise StartupError(str(e)) from None
        except Exception as e:
            log.debug("opening the database %s failed", shown, exc_info=True)
            await _close_quietly(store, backend)
            reason = " ".join(str(e).split()) or type(e).__name__
            raise StartupError(f"cannot open the database {shown}: {scrub(reason, secrets(config.endpoint))}") from None
        except BaseException:
            await _close_quietly(store, backend)
            raise
        await _close_quietly(store, backend)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


async def _close_quietly(store: Store, backend: Backend) -> None:
    """Undo a failed attempt: the store's tasks (if it started), the pool (if open)."""
    with contextlib.suppress(Exception):
        await store.stop()
    with contextlib.suppress(Exception):
        await backend.close()


def serve_workers(config: Config) -> int:
    """Run ``config.workers`` frontend processes on the same port (SO_REUSEPORT): the
    kernel spreads connections over them and the shared database keeps them one
    store, exactly as separate frontends. Returns when they have all stopped.

    Workers are spawned, so they inherit no logging setup: each sets it up again from
    the config (level, format, the password kept out), see :func:`_run_worker`."""
    ctx = multiprocessing.get_context("spawn")
    sockets = tempfile.mkdtemp(prefix="k8s-sql-workers-") if config.listen_metrics_urls else ""
    configs = []
    for i in range(config.workers):
        worker = dataclasses.replace(config, name=f"{config.name}-{i}", workers=1, reuse_port=True)
        if sockets:  # the parent serves the metrics URLs, gathering from the workers' sockets
            worker.listen_metrics_urls = []
            worker.worker_socket = os.path.join(sockets, f"{i}.sock")
        configs.append(worker)
    gatherer = None
    try:
        if sockets:
            gatherer = _Gatherer(config, [(w.name, w.worker_socket) for w in configs])
        procs = []
        for worker in configs:
            p = ctx.Process(target=_run_worker, args=(worker,), name=worker.name)
            p.start()
            procs.append(p)
        return _supervise(procs)
    finally:
        if gatherer is not None:
            gatherer.stop()
        if sockets:
            shutil.rmtree(sockets, ignore_errors=True)


class _Gatherer:
    """A --workers parent's HTTP endpoints (web.workers_application), served on the
    metrics URLs by an event loop on a thread of their own."""

    def __init__(self, config: Config, workers: list[tuple[str, str]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.web = WebServer(workers_application(workers))
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, args=(config, started), name="metrics", daemon=True)
        self.thread.start()
        started.result()  # a URL that cannot be listened on is the command's error

    def _run(self, config: Config, started: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(self.loop)

        async def listen() -> None:
            await self.web.start()
            await _listen_metrics(self.web, dataclasses.replace(config, worker_socket=""))

        try:
            self.loop.run_until_complete(listen())
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(None)
        self.loop.run_forever()
        self.loop.run_until_complete(self.web.stop())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _supervise(procs: Sequence[multiprocessing.process.BaseProcess]) -> int:
    """Wait for the workers; stop them all when one fails. Their exit status."""

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    stopping = False
    while any(p.is_alive() for p in procs):
        for p in procs:
            p.join(0.5)
            if p.exitcode not in (None, 0) and not stopping:  # one worker failed: stop them all
                if p.exitcode == WORKER_START_FAILED:  # it said why in its own one line
                    log.info("worker %s could not start; stopping the others", p.name)
                else:
                    log.error("worker %s exited with %s; stopping", p.name, p.exitcode)
                stopping = True
                forward(signal.SIGTERM, None)
    codes = [p.exitcode or 0 for p in procs]
    return 1 if WORKER_START_FAILED in codes else max(codes)


WORKER_START_FAILED = 3  # a worker's exit status after its own one-line start-up error


def _run_worker(config: Config) -> None:
    """One --workers process: the parent's logging settings, then serve. A start-up
    error is one line on stderr, as from the command itself, and the parent stops the
    other workers and exits with status 1."""
    configure_logging(config)
    try:
        run(config)
    except StartupError as e:
        sys.stderr.write(f"Error: {config.name}: {e}\n")
        sys.exit(WORKER_START_FAILED)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 256 * 1024


def return_large_allocations() -> None:
    """Make glibc give large blocks back to the system when they are freed.

    glibc serves a block over its mmap threshold (128 KiB at first) with mmap and
    unmaps it on free, but raises the threshold each time such a block is freed, up to
    32 MiB: after a few big values, 1 MiB blocks come from the heap, where a freed one
    stays in the process. Measured: four concurrent 63 MB Ranges left PostgreSQL- and
    MariaDB-backed servers 80-90 MB larger for good. A fixed threshold keeps big
    blocks (values, rows, responses) mapped and returned; small objects are not
    concerned (Python's allocator serves them)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


def run(config: Config) -> None:
    """Serve on the event loop ``config.event_loop`` names. uvloop is the default where
    it is installed: gRPC's per-message work goes through the loop, and uvloop cuts the
    CPU of a streamed watch response by about a fifth (see docs/benchmarks.md)."""
    if config.transport == "envoy":
        for url in config.listen_client_urls:
            u = urlparse(url)
            _probe_bind(url, u.hostname or "", u.port or 0, True)
        envoy.exec_envoy(config)  # never returns: this process becomes Envoy
    return_large_allocations()
    loop_factory = None
    if config.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if config.event_loop == "uvloop":
                raise StartupError("--event-loop uvloop: uvloop is not installed") from None
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config))


async def serve(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully. A signal while the start
    is still waiting for the database ends the start (closing what it opened)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(start(config))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    if starting.cancelled():
        log.info("stopped before the database could be opened")
        return
    server = starting.result()  # raises the start's error
    await stop.wait()
    log.info("shutting down")
    await server.stop()
