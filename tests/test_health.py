"""Health over real sockets: /healthz and /livez states, and healthCheckNodePort servers coming and going."""

from __future__ import annotations

import http.client
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kproxy.daemon.proxier import Proxier
from kproxy.nft.fake import FakeBackend
from kproxy.observe.health import (
    HealthInputs,
    ProxyHealth,
    ServiceHealthServers,
    go_time,
    proxier_health_inputs,
    service_health_body,
)
from kproxy.observe.http import HTTPService
from kproxy.observe.metrics import ProxyMetrics
from kproxy.rules.compiler import ProxyConfig
from kproxy.rules.endpoints import LocalPolicyStatus
from tests.harness.builders import endpoint, endpoint_slice, node, service

SYNC_PERIOD = 30.0
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
LOCALHOST = "127.0.0.1"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class State:
    """Mutable health inputs, read at request time like the Proxier's attributes."""

    last_updated: float | None = NOW - 5
    oldest_pending: float | None = None
    node_eligible: bool = True
    stopping: bool = False

    def __call__(self) -> HealthInputs:
        return HealthInputs(self.last_updated, self.oldest_pending, self.node_eligible, SYNC_PERIOD, self.stopping)


def _get(port: int, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served() -> Any:
    """A ProxyHealth on 127.0.0.1, a free port, with an injected clock, state and metrics."""
    registry, clock, state = CollectorRegistry(), Clock(), State()
    health = ProxyHealth(state, ProxyMetrics(registry), clock=clock, started=NOW - 100)
    server = health.serve((LOCALHOST, 0))
    yield health, server, clock, state, registry
    health.stop()


def _probe(server: HTTPService, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    status, headers, body = _get(server.port, path)
    return status, json.loads(body), headers


# -- /healthz and /livez ----------------------------------------------------------------


def test_healthy_proxy_answers_200_with_upstream_json(served: Any) -> None:
    """Synced and eligible: 200 on both, lastUpdated is now, per-family status carries the last sync."""
    _, server, _, _, registry = served
    status, body, headers = _probe(server, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert list(body) == ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
    assert body["lastUpdated"] == body["currentTime"] == "2026-01-01T00:00:00Z"
    assert body["nodeEligible"] is True and body["healthy"] is True
    assert body["status"] == {
        "IPv4": {"lastUpdated": "2025-12-31T23:59:55Z", "healthy": True},
        "IPv6": {"lastUpdated": "2025-12-31T23:59:55Z", "healthy": True},
    }
    status, body, headers = _probe(server, "/livez")
    assert status == 200 and "nodeEligible" not in body and body["healthy"] is True
    assert headers["x-content-type-options"] == "nosniff"
    assert registry.get_sample_value("kubeproxy_proxy_healthz_total", {"code": "200"}) == 1
    assert registry.get_sample_value("kubeproxy_proxy_livez_total", {"code": "200"}) == 1


def test_change_pending_less_than_the_timeout_is_still_healthy(served: Any) -> None:
    """A change pending for just under 2 x syncPeriod does not make the proxy unhealthy."""
    _, server, clock, state, _ = served
    state.oldest_pending = clock.now - 2 * SYNC_PERIOD + 0.001
    assert _probe(server, "/healthz")[0] == 200
    assert _probe(server, "/livez")[0] == 200


def test_stale_pending_change_makes_both_probes_503(served: Any) -> None:
    """A change pending for 2 x syncPeriod: 503 on /healthz and /livez, lastUpdated is the last sync."""
    _, server, clock, state, registry = served
    state.oldest_pending = clock.now - 2 * SYNC_PERIOD
    for path in ("/healthz", "/livez"):
        status, body, headers = _probe(server, path)
        assert status == 503
        assert body["healthy"] is False
        assert body["lastUpdated"] == "2025-12-31T23:59:55Z"
        assert body["currentTime"] == "2026-01-01T00:00:00Z"
        assert body["status"]["IPv4"] == {"lastUpdated": "2025-12-31T23:59:55Z", "healthy": False}
        assert headers["content-type"] == "application/json"
    assert registry.get_sample_value("kubeproxy_proxy_healthz_total", {"code": "503"}) == 1
    assert registry.get_sample_value("kubeproxy_proxy_livez_total", {"code": "503"}) == 1
    state.oldest_pending = None  # the sync went through
    assert _probe(server, "/healthz")[0] == 200


def test_node_being_deleted_fails_healthz_but_not_livez(served: Any) -> None:
    """A node being deleted: /healthz 503 with nodeEligible false (proxy still healthy); /livez 200."""
    _, server, _, state, _ = served
    state.node_eligible = False
    status, body, _ = _probe(server, "/healthz")
    assert status == 503
    assert body["nodeEligible"] is False and body["healthy"] is True
    assert body["lastUpdated"] == "2025-12-31T23:59:55Z"
    status, body, _ = _probe(server, "/livez")
    assert status == 200 and "nodeEligible" not in body


def test_before_the_first_sync_health_counts_from_the_start(served: Any) -> None:
    """Starting up is healthy; the start time stands for lastUpdated until a change is pending too long."""
    _, server, clock, state, _ = served
    state.last_updated = None
    state.oldest_pending = clock.now - 10
    status, body, _ = _probe(server, "/healthz")
    assert status == 200 and body["status"]["IPv6"]["lastUpdated"] == "2025-12-31T23:58:20Z"
    clock.now += 2 * SYNC_PERIOD
    status, body, _ = _probe(server, "/healthz")
    assert status == 503 and body["lastUpdated"] == "2025-12-31T23:58:20Z"


# -- /readyz -------------------------------------------------------------------------------


def test_readyz_waits_for_the_first_sync_while_healthz_does_not(served: Any) -> None:
    """Before the first full sync: /readyz 503 with the reason, /healthz and /livez 200 (upstream's semantics)."""
    _, server, clock, state, _ = served
    state.last_updated = None
    state.oldest_pending = clock.now - 10
    status, body, headers = _probe(server, "/readyz")
    assert status == 503 and headers["content-type"] == "application/json"
    assert body == {"ready": False, "reason": "the first full sync has not succeeded yet",
                    "lastUpdated": "0001-01-01T00:00:00Z", "currentTime": "2026-01-01T00:00:00Z"}
    assert _probe(server, "/healthz")[0] == 200 and _probe(server, "/livez")[0] == 200
    state.last_updated, state.oldest_pending = clock.now, None
    status, body, _ = _probe(server, "/readyz")
    assert status == 200 and body == {"ready": True, "lastUpdated": "2026-01-01T00:00:00Z",
                                      "currentTime": "2026-01-01T00:00:00Z"}


def test_readyz_fails_while_syncs_fail_for_the_health_timeout(served: Any) -> None:
    """Once synced, /readyz stays 200 through a short failure and turns 503 when a change has waited 2 x syncPeriod."""
    _, server, clock, state, _ = served
    state.oldest_pending = clock.now - 2 * SYNC_PERIOD + 1
    assert _probe(server, "/readyz")[0] == 200
    clock.now += 1
    status, body, _ = _probe(server, "/readyz")
    assert status == 503 and "2 x syncPeriod (60s)" in body["reason"]
    state.oldest_pending = None
    assert _probe(server, "/readyz")[0] == 200


def test_readyz_fails_while_stopping_and_ignores_the_node(served: Any) -> None:
    """A node being deleted keeps /readyz 200 (only /healthz drains); a stopping daemon answers 503."""
    _, server, _, state, _ = served
    state.node_eligible = False
    assert _probe(server, "/readyz")[0] == 200
    state.stopping = True
    status, body, _ = _probe(server, "/readyz")
    assert status == 503 and body["reason"] == "kproxy is stopping"


def test_unknown_path_is_404(served: Any) -> None:
    """Only /healthz, /livez and /readyz are served on the health port."""
    _, server, _, _, _ = served
    assert _get(server.port, "/healthz/extra")[0] == 404


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        pytest.param(None, "0001-01-01T00:00:00Z", id="zero"),
        pytest.param(0.0, "1970-01-01T00:00:00Z", id="epoch"),
        pytest.param(1.5, "1970-01-01T00:00:01.5Z", id="fraction-trimmed"),
        pytest.param(NOW + 0.123456, "2026-01-01T00:00:00.123456Z", id="micro"),
    ],
)
def test_go_time_formats_like_go_json(timestamp: float | None, text: str) -> None:
    """Times are RFC 3339 in UTC with trailing fraction zeros trimmed, as Go's time.Time marshals."""
    assert go_time(timestamp) == text


def test_inputs_from_the_proxier() -> None:
    """The Proxier's last sync, oldest pending change and Node state feed the health inputs."""
    wall = Clock()
    proxier = Proxier(FakeBackend(), "node-a", ProxyConfig(), wall_clock=wall)
    read = proxier_health_inputs(proxier, SYNC_PERIOD)
    assert read() == HealthInputs(None, None, False, SYNC_PERIOD)  # Node not known yet
    proxier.on_relist("Node", [node("node-a")])
    proxier.on_relist("Service", [])
    proxier.on_relist("EndpointSlice", [])
    assert read() == HealthInputs(None, NOW, True, SYNC_PERIOD)
    wall.now += 3
    proxier.sync()
    assert read() == HealthInputs(NOW + 3, None, True, SYNC_PERIOD)
    proxier.on_node("MODIFIED", node("node-a", deleting=True))
    assert read().node_eligible is False
    taint = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}
    proxier.on_node("MODIFIED", node("node-a", taints=[taint]))
    assert read().node_eligible is False


# -- healthCheckNodePort servers -----------------------------------------------------


def _lb(name: str, port: int, local: int, namespace: str = "shop") -> LocalPolicyStatus:
    return LocalPolicyStatus(namespace, name, False, True, local, local, True, port)


@pytest.fixture
def servers() -> Any:
    healthy = {"value": True}
    servers = ServiceHealthServers(lambda: healthy["value"], host=LOCALHOST)
    yield servers, healthy
    servers.stop()


def test_service_health_follows_local_endpoints(servers: Any) -> None:
    """0 local endpoints: 503 weight 0; 2 local endpoints: 200 weight 2; the body names the Service."""
    hc, _ = servers
    port = _free_port()
    hc.sync([_lb("web", port, 0)])
    status, headers, body = _get(port)
    assert (status, headers["x-load-balancing-endpoint-weight"]) == (503, "0")
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert json.loads(body) == {"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 0,
                                "serviceProxyHealthy": True}
    hc.sync([_lb("web", port, 2)])
    status, headers, body = _get(port, "/any/path")
    assert (status, headers["x-load-balancing-endpoint-weight"]) == (200, "2")
    assert body == service_health_body("shop", "web", 2, True)
    assert body.startswith(b'{\n\t"service": {\n\t\t"namespace": "shop",')


def test_service_health_is_503_when_the_proxy_is_unhealthy(servers: Any) -> None:
    """Local endpoints do not help when the proxy itself is unhealthy: 503, serviceProxyHealthy false."""
    hc, healthy = servers
    port = _free_port()
    hc.sync([_lb("web", port, 3)])
    healthy["value"] = False
    status, headers, body = _get(port)
    assert (status, headers["x-load-balancing-endpoint-weight"]) == (503, "3")
    assert json.loads(body)["serviceProxyHealthy"] is False


def test_removed_service_closes_its_server(servers: Any) -> None:
    """A Service that leaves the report has its port closed: connections are refused."""
    hc, _ = servers
    web, api = _free_port(), _free_port()
    hc.sync([_lb("web", web, 1), _lb("api", api, 1)])
    assert _get(web)[0] == 200 and _get(api)[0] == 200
    hc.sync([_lb("api", api, 1)])
    with pytest.raises(ConnectionRefusedError):
        _get(web)
    assert _get(api)[0] == 200
    assert hc.ports() == {("shop", "api"): api}


def test_changed_port_moves_the_server(servers: Any) -> None:
    """A new healthCheckNodePort closes the old port and opens the new one."""
    hc, _ = servers
    old, new = _free_port(), _free_port()
    hc.sync([_lb("web", old, 1)])
    hc.sync([_lb("web", new, 1)])
    with pytest.raises(ConnectionRefusedError):
        _get(old)
    assert _get(new)[0] == 200
    assert hc.ports() == {("shop", "web"): new}


def test_cluster_policy_or_no_port_means_no_server(servers: Any) -> None:
    """Only externalTrafficPolicy Local Services with a healthCheckNodePort get a server."""
    hc, _ = servers
    hc.sync([
        LocalPolicyStatus("shop", "internal-only", True, False, 0, 0, True, None),
        LocalPolicyStatus("shop", "no-port", False, True, 1, 1, True, None),
    ])
    assert hc.ports() == {}


def test_busy_port_is_retried_at_the_next_sync(servers: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A port that cannot be bound is logged once at warning and opened by a later sync once free."""
    hc, _ = servers
    blocker = socket.socket()
    blocker.bind((LOCALHOST, 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    with caplog.at_level(logging.DEBUG, logger="kproxy.observe.health"):
        hc.sync([_lb("web", port, 1)])
        hc.sync([_lb("web", port, 1)])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "retried at the next sync" in warnings[0].getMessage()
    assert hc.ports() == {}
    blocker.close()
    hc.sync([_lb("web", port, 1)])
    assert hc.ports() == {("shop", "web"): port}
    assert _get(port)[0] == 200


def test_stop_closes_every_server() -> None:
    """stop() closes all healthCheckNodePort servers."""
    hc = ServiceHealthServers(lambda: True, host=LOCALHOST)
    ports = [_free_port(), _free_port()]
    hc.sync([_lb("a", ports[0], 1), _lb("b", ports[1], 1)])
    hc.stop()
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            _get(port)


def test_servers_follow_a_real_proxier() -> None:
    """Registered as a Proxier listener, servers open after a sync and report the local endpoint count."""
    port = _free_port()
    proxier = Proxier(FakeBackend(), "node-a", ProxyConfig())
    health = ProxyHealth(proxier_health_inputs(proxier, SYNC_PERIOD))
    hc = ServiceHealthServers(health.healthy, host=LOCALHOST)
    proxier.listeners.append(lambda p: hc.sync(p.local_policy_report() or []))
    try:
        proxier.on_relist("Node", [node("node-a")])
        proxier.on_relist("Service", [service(
            "web", "shop", "10.96.0.10", type="LoadBalancer", externalTrafficPolicy="Local",
            healthCheckNodePort=port, ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
        )])
        proxier.on_relist("EndpointSlice", [endpoint_slice("web-1", "web", [
            endpoint("10.244.1.5", node="node-a"), endpoint("10.244.1.6", node="node-a"),
            endpoint("10.244.2.7", node="node-b"),
        ], namespace="shop")])
        proxier.sync()
        status, headers, _ = _get(port)
        assert (status, headers["x-load-balancing-endpoint-weight"]) == (200, "2")
        proxier.on_service("DELETED", service("web", "shop", "10.96.0.10"))
        proxier.sync()
        with pytest.raises(ConnectionRefusedError):
            _get(port)
    finally:
        hc.stop()
