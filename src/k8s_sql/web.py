"""etcd's HTTP endpoints: ``/metrics``, ``/health``, ``/livez``, ``/readyz``, ``/version``.

etcd serves them on every client URL (next to gRPC, on the same port) and on
``--listen-metrics-urls``. Here aiohttp serves the one application on each
``--listen-metrics-urls`` URL (http or https, with the client TLS files as etcd
does), and on plain-HTTP client URLs behind :mod:`k8s_sql.mux`, which tells an HTTP/1
request from a gRPC connection by its first bytes.

Answers are etcd's byte for byte where a client could parse them: ``/health``'s
JSON (and 503 with the same JSON when unhealthy), the check lines of ``/livez`` and
``/readyz`` (``?verbose``, ``?exclude=``), 404 for an unknown check, 405 for a method
other than GET.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from k8s_sql.config import ETCD_VERSION
from k8s_sql.monitor import Health

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# etcd's handlers add these (CORS for browsers' dashboards, nosniff on plain text).
CORS = {
    "Access-Control-Allow-Headers": "accept, content-type, authorization",
    "Access-Control-Allow-Methods": "POST, GET, OPTIONS, PUT, DELETE",
    "Access-Control-Allow-Origin": "*",
}
TEXT = "text/plain; charset=utf-8"


def _text(body: str, status: int = 200) -> web.Response:
    """Go's http.Error and Fprint: text with nosniff."""
    headers = {**CORS, "X-Content-Type-Options": "nosniff"}
    return web.Response(status=status, body=body.encode(), headers={**headers, "Content-Type": TEXT})


def _get_only(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            resp = _text("Method Not Allowed\n", 405)
            resp.headers["Allow"] = "GET"
            return resp
        return await handler(request)

    return wrapped


def _query_set(request: web.Request, name: str) -> set[str]:
    """etcd's getQuerySet: every value of a repeated parameter, comma lists split."""
    out: set[str] = set()
    for value in request.query.getall(name, []):
        out.update(v.strip() for v in value.split(",") if v.strip())
    return out


def application(health: Health, server_version: str) -> web.Application:
    """The endpoints, over one frontend's health checks and the process's registry."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(REGISTRY), headers={"Content-Type": content_type})

    async def health_handler(request: web.Request) -> web.StreamResponse:
        serializable = request.query.get("serializable", "") == "true"
        ok, reason = await health.health(_query_set(request, "exclude"), serializable)
        body = json.dumps({"health": "true" if ok else "false", "reason": reason}, separators=(",", ":"))
        if not ok:
            log.warning("/health error: %s", reason)
            return _text(body + "\n", 503)
        return web.Response(body=body.encode(), headers={**CORS, "Content-Type": TEXT})

    def check_root(kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            outcome, unknown = await health.check_all(kind, _query_set(request, "exclude"))
            if unknown:
                log.warning("some health checks cannot be excluded: %s", ",".join(f'"{n}"' for n in unknown))
            return _outcome(request, kind, outcome.ok, outcome.text)

        return handler

    def check_one(kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            outcome = await health.check_one(kind, request.match_info["check"])
            if outcome is None:
                return _text("404 page not found\n", 404)
            return _outcome(request, kind, outcome.ok, outcome.text)

        return handler

    async def version(request: web.Request) -> web.StreamResponse:
        info = {"etcdserver": server_version, "etcdcluster": ETCD_VERSION, "storage": ETCD_VERSION}
        body = json.dumps(info, separators=(",", ":"))
        return web.Response(body=body.encode(), headers={**CORS, "Content-Type": "application/json"})

    app = web.Application()
    routes = [
        ("/metrics", metrics),
        ("/health", health_handler),
        ("/livez", check_root("livez")),
        ("/readyz", check_root("readyz")),
        ("/livez/{check}", check_one("livez")),
        ("/readyz/{check}", check_one("readyz")),
        ("/version", version),
    ]
    for path, handler in routes:
        app.router.add_route("*", path, _get_only(handler))
    return app


def _outcome(request: web.Request, kind: str, ok: bool, text: str) -> web.Response:
    """etcd's newHealthHandler: a failure always lists the checks (503); success says
    ``ok``, after the checks when ``?verbose``."""
    if not ok:
        log.error("health check error: /%s: %s", kind, " ".join(text.split("\n")).strip())
        return _text(f"{text}{kind} check failed\n", 503)
    verbose = "verbose" in request.query
    return _text((text if verbose else "") + "ok\n")


class _Gathered(Collector):
    """Metric families parsed from the workers' expositions, each series labelled with
    its worker (``worker="<name>"``), every family once."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def gather(texts: list[tuple[str, str]]) -> bytes:
    """One exposition from several: ``(worker name, its /metrics text)`` each."""
    merged: dict[str, Metric] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            into.samples.extend(
                Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar) for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gathered(list(merged.values())))
    return generate_latest(registry)


def workers_application(workers: list[tuple[str, str]]) -> web.Application:
    """The endpoints of a --workers parent, which serves none itself: ``/metrics``
    gathers every worker's (labelled ``worker``); a health endpoint passes when it
    passes on every worker, and answers with the first failing worker's answer (else
    the first worker's). ``workers``: ``(name, Unix socket path)`` each."""

    async def ask(session: aiohttp.ClientSession, path: str, request: web.Request) -> tuple[int, bytes, dict[str, str]]:
        url = f"http://worker{request.path_qs}"
        try:
            async with session.get(url, headers={"Accept": request.headers.get("Accept", "")}) as r:
                return r.status, await r.read(), {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return 503, f"worker unreachable: {e}\n".encode(), {"Content-Type": TEXT}

    async def each(request: web.Request) -> list[tuple[int, bytes, dict[str, str]]]:
        async def one(path: str) -> tuple[int, bytes, dict[str, str]]:
            connector = aiohttp.UnixConnector(path=path)
            async with aiohttp.ClientSession(connector=connector, timeout=WORKER_TIMEOUT) as session:
                return await ask(session, path, request)

        return list(await asyncio.gather(*(one(path) for _, path in workers)))

    async def metrics(request: web.Request) -> web.StreamResponse:
        answers = await each(request)
        texts = [
            (name, body.decode())
            for (name, _), (status, body, _) in zip(workers, answers, strict=True)
            if status == 200
        ]
        return web.Response(body=gather(texts), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def forwarded(request: web.Request) -> web.StreamResponse:
        answers = await each(request)
        status, body, headers = next((a for a in answers if a[0] != 200), answers[0])
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/metrics", _get_only(metrics))
    for path in ("/health", "/livez", "/readyz", "/livez/{check}", "/readyz/{check}", "/version"):
        app.router.add_route("*", path, forwarded)
    return app


HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server"}
WORKER_TIMEOUT = aiohttp.ClientTimeout(total=10)


class WebServer:
    """The application served on a list of URLs (``--listen-metrics-urls``)."""

    def __init__(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._started = False

    async def start(self) -> None:
        await self.runner.setup()
        self._started = True

    async def listen(self, host: str, port: int, ssl_context: ssl.SSLContext | None, reuse_port: bool) -> int:
        """Serve on one address; the bound port (for port 0)."""
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio.Server here
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def listen_unix(self, path: str) -> None:
        """Serve on a Unix socket (a --workers process, for its parent to gather)."""
        await web.UnixSite(self.runner, path).start()

    def protocol_factory(self) -> asyncio.Protocol:
        """A protocol serving one HTTP/1 connection accepted elsewhere (mux.py)."""
        server = self.runner.server
        assert server is not None, "start() first"
        return server()

    async def stop(self) -> None:
        if self._started:
            await self.runner.cleanup()
            self._started = False
