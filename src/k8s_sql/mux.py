"""gRPC and HTTP/1 on one plain-HTTP client URL, as etcd serves them (its cmux).

etcd answers ``curl http://127.0.0.1:2379/metrics`` (and ``/health``, ``/version``)
on the port its gRPC clients use. grpcio owns the sockets it listens on and cannot
be handed a connection, so a plain-HTTP client URL is listened on here instead: the
first bytes of each connection decide. HTTP/2's connection preface
(``PRI * HTTP/2.0``) is a gRPC client, and the connection is relayed, byte for
byte, to the gRPC server listening on a private Unix socket; anything else is an
HTTP/1 request, handed to the aiohttp application (:mod:`k8s_sql.web`) on the same
connection.

The relay is the price: each gRPC read and write passes through the event loop once
more (bench/micro/mux_cost.py measures it; docs/monitoring.md states the number).
``--client-url-http=false`` listens with gRPC directly, as before, and leaves the
HTTP endpoints to ``--listen-metrics-urls``. TLS client URLs are always gRPC's own
(etcd needs the TLS handshake before it can look; so would we, and gRPC does it).

Flow control: each side's reading pauses while the other side's write buffer is
above asyncio's high-water mark (a slow client backs up into the gRPC server's own
flow control, never into our memory).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SNIFF_TIMEOUT = 10.0  # a connection that sends nothing for this long is closed


class _Relay(asyncio.Protocol):
    """One direction's reader: what arrives is written to ``peer``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Relay | None = None
        # What arrived before the two sides were joined: uvloop may still deliver data
        # already read after pause_reading(), and the gRPC server sends its SETTINGS as
        # soon as it accepts, possibly before the connecting coroutine resumes
        # (measured: 26 of 40 connections hung when this was dropped).
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        elif peer is None:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        # The side that ended is closed, and with it the other (connection_lost): no
        # half-closed relay. HTTP/2 has no use for TCP's half-close, and passing it on
        # (write_eof) crashed the process: uvloop 0.23 frees a transport twice when it
        # is closed while its shutdown request is pending -- "double free or
        # corruption" under connection churn, reproduced with 8 threads opening a
        # channel per call, found by a --workers test in CI.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None and peer.transport is not None:
            peer.peer = None
            peer.transport.close()
        self.transport = None

    # The other side's writes are backed up: stop reading from this side until they drain.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Sniffer(asyncio.Protocol):
    """The first bytes of a client connection decide where it goes."""

    def __init__(self, mux: Mux) -> None:
        self.mux = mux
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(SNIFF_TIMEOUT, transport.close)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        n = min(len(self.buffer), len(PREFACE))
        if self.buffer[:n] == PREFACE[:n]:
            if n < len(PREFACE):
                return  # could still be HTTP/2: wait for the rest of the preface
            self._decided()
            self.mux.to_grpc(self.transport, self.buffer)  # type: ignore[arg-type]
        else:
            self._decided()
            self.mux.to_http(self.transport, self.buffer)  # type: ignore[arg-type]

    def _decided(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._decided()


class Mux:
    """One plain-HTTP client URL: the public listener, relaying gRPC connections to
    ``grpc_path`` (a Unix socket the gRPC server listens on) and serving HTTP/1 with
    ``http_factory`` (aiohttp's protocol factory)."""

    def __init__(self, grpc_path: str, http_factory: Callable[[], asyncio.Protocol]) -> None:
        self.grpc_path = grpc_path
        self.http_factory = http_factory
        self.server: asyncio.Server | None = None
        self._connecting: set[asyncio.Task[Any]] = set()

    async def listen(self, host: str, port: int, reuse_port: bool) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Sniffer(self), host or None, port, reuse_address=True, reuse_port=reuse_port or None, backlog=4096
        )
        return int(self.server.sockets[0].getsockname()[1])

    def to_http(self, transport: asyncio.Transport, first: bytes) -> None:
        handler = self.http_factory()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(first)

    def to_grpc(self, transport: asyncio.Transport, first: bytes) -> None:
        client = _Relay()
        transport.set_protocol(client)
        client.connection_made(transport)
        transport.pause_reading()  # until the gRPC side is connected

        async def connect() -> None:
            loop = asyncio.get_running_loop()
            try:
                # Connected here: uvloop does not take an abstract address as a path.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, self.grpc_path)
                except BaseException:
                    sock.close()
                    raise
                _, upstream = await loop.create_unix_connection(_Relay, sock=sock)
            except OSError as e:
                log.warning("cannot reach the gRPC server's socket: %s", e)
                transport.close()
                return
            if client.transport is None:  # the client went away meanwhile
                upstream.transport.close()  # type: ignore[union-attr]
                return
            client.peer, upstream.peer = upstream, client
            upstream.transport.write(b"".join([first, *client.early]))  # type: ignore[union-attr]
            if upstream.early:  # the server may speak first, before this coroutine resumed
                transport.write(b"".join(upstream.early))
            client.early = upstream.early = []
            transport.resume_reading()

        task = asyncio.ensure_future(connect())
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def private_socket_path(n: int) -> str:
    """A Unix socket address for the gRPC server behind a mux: in Linux's abstract
    namespace (a leading NUL: nothing on disk, gone with the process), unique to this
    process and URL."""
    return f"\0k8s-sql-{os.getpid()}-{n}-{secrets.token_hex(4)}"
