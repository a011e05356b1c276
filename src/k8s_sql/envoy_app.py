"""The ASGI application pyvoy runs inside Envoy for ``--transport envoy``.

:mod:`k8s_sql.envoy` builds Envoy's configuration and becomes Envoy; this module is
what Envoy's Python imports (``k8s_sql.envoy_app:app``). Its lifespan starts the
frontend with :func:`k8s_sql.server.start` and a :class:`k8s_sql.asgi.GrpcOverAsgi`
as its transport, and stops it on Envoy's shutdown (SIGTERM). A start-up error is one
line on stderr and the process's exit status 1, as from the command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from k8s_sql.asgi import GrpcOverAsgi
from k8s_sql.config import GRPC_OVERHEAD_BYTES, Config, configure_logging
from k8s_sql.envoy import CONFIG_VARIABLE, STARTUP_FAILED
from k8s_sql.server import StartupError, return_large_allocations, start

log = logging.getLogger("k8s_sql")


class App:
    """The ASGI application pyvoy runs inside Envoy: the lifespan starts and stops the
    frontend; gRPC requests go to its :class:`k8s_sql.asgi.GrpcOverAsgi`."""

    def __init__(self) -> None:
        self.grpc: Any = None
        self.server: Any = None
        self._starting: asyncio.Task[Any] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self.grpc(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                config = _config()
                configure_logging(config)
                return_large_allocations()
                self.grpc = GrpcOverAsgi([], config.max_request_bytes + GRPC_OVERHEAD_BYTES)

                async def starting(config: Config) -> None:
                    try:
                        self.server = await start(config, transport=self.grpc)
                    except StartupError as e:
                        sys.stderr.write(f"Error: {e}\n")
                        sys.stderr.flush()
                        os._exit(STARTUP_FAILED)
                    except asyncio.CancelledError:  # SIGTERM while still waiting for the database
                        log.info("stopped before the database could be opened")
                        raise
                    except BaseException:
                        log.exception("the frontend could not start")
                        os._exit(STARTUP_FAILED)

                # The ports answer (UNAVAILABLE until the database is open) from the start.
                self._starting = asyncio.ensure_future(starting(config))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._starting is not None and not self._starting.done():
                    self._starting.cancel()  # start() closes what it opened
                    await asyncio.gather(self._starting, return_exceptions=True)
                elif self.server is not None:
                    log.info("shutting down")
                    await self.server.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _config() -> Config:
    """The frontend's settings, as `k8s-sql serve` left them for this process."""
    fd = os.environ.pop(CONFIG_VARIABLE, None)
    if fd is None:
        raise RuntimeError(f"{CONFIG_VARIABLE} is not set: run `k8s-sql serve --transport envoy`")
    with os.fdopen(int(fd), "rb") as pipe:
        raw = pipe.read()
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in json.loads(raw).items() if k in fields})


app = App()
