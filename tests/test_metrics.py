"""Metrics: upstream's kubeproxy_* names, labels and buckets; scrape-time values; the /metrics server."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kproxy.daemon.proxier import Proxier
from kproxy.nft.fake import FakeBackend
from kproxy.observe.http import HTTPService, start_metrics_server
from kproxy.observe.metrics import (
    IP_FAMILIES,
    NETWORK_PROGRAMMING_BUCKETS,
    ProxierCollector,
    ProxyMetrics,
    ServiceCounter,
    parse_counter_name,
)
from kproxy.rules.compiler import ProxyConfig
from kproxy.rules.endpoints import LocalPolicyStatus
from tests.harness.builders import endpoint, endpoint_slice, node, service


class WallClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _metrics() -> tuple[CollectorRegistry, ProxyMetrics, WallClock]:
    registry, clock = CollectorRegistry(), WallClock()
    return registry, ProxyMetrics(registry, wall_clock=clock), clock


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _buckets(registry: CollectorRegistry, name: str, **labels: str) -> list[float]:
    """The ``le`` bounds of a histogram's buckets, in order (+Inf included)."""
    for family in registry.collect():
        if family.name == name:
            return [
                float(s.labels["le"])
                for s in family.samples
                if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
            ]
    raise AssertionError(f"{name} is not registered")


def _status(name: str, internal: bool = False, external: bool = True, local: int = 0, anywhere: bool = True,
            port: int | None = None) -> LocalPolicyStatus:
    return LocalPolicyStatus("ns", name, internal, external, local, local, anywhere, port)


# -- ProxyMetrics: each SyncObserver call moves its metric -----------------------------


@pytest.mark.parametrize("full", [True, False], ids=["full", "partial"])
def test_sync_done_records_duration_per_family_and_kind(full: bool) -> None:
    """A successful sync is observed once per IP family, in the total and the full/partial histograms."""
    registry, metrics, clock = _metrics()
    metrics.sync_done(full, 0.05, 12, 100, 250)
    kind, other = ("full", "partial") if full else ("partial", "full")
    for family in IP_FAMILIES:
        assert _value(registry, "kubeproxy_sync_proxy_rules_duration_seconds_count", ip_family=family) == 1
        assert _value(registry, "kubeproxy_sync_proxy_rules_duration_seconds_sum", ip_family=family) == 0.05
        assert _value(registry, f"kubeproxy_sync_{kind}_proxy_rules_duration_seconds_count", ip_family=family) == 1
        assert _value(registry, f"kubeproxy_sync_{other}_proxy_rules_duration_seconds_count", ip_family=family) is None
        assert _value(registry, "kubeproxy_sync_proxy_rules_duration_seconds_bucket", ip_family=family, le="0.032") == 0
        assert _value(registry, "kubeproxy_sync_proxy_rules_duration_seconds_bucket", ip_family=family, le="0.064") == 1
        assert _value(registry, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family=family) == clock.now
    assert _value(registry, "kproxy_syncs_total", kind=kind) == 1
    assert _value(registry, "kproxy_syncs_total", kind=other) == 0
    assert _value(registry, "kproxy_rules") == 100
    assert _value(registry, "kproxy_elements") == 250
    assert _value(registry, "kproxy_sync_operations_count") == 1
    assert _value(registry, "kproxy_sync_operations_sum") == 12
    assert _value(registry, "kproxy_sync_operations_bucket", le="16.0") == 1


def test_sync_failed_counts_a_failure_for_each_family() -> None:
    """A failed sync counts one nftables sync failure per family, and its duration; cleanup failures stay at zero."""
    registry, metrics, _ = _metrics()
    metrics.sync_failed(True, 0.25)
    metrics.sync_failed(False, 0.003)
    for family in IP_FAMILIES:
        assert _value(registry, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total", ip_family=family) == 2
        assert _value(registry, "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", ip_family=family) == 0
        assert _value(registry, "kubeproxy_sync_proxy_rules_duration_seconds_count", ip_family=family) == 2
        assert _value(registry, "kubeproxy_sync_proxy_rules_duration_seconds_sum", ip_family=family) == pytest.approx(0.253)
    metrics.cleanup_failed()
    assert _value(registry, "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", ip_family="IPv6") == 1


def test_programming_latency_lands_in_upstream_buckets() -> None:
    """Network programming latency is observed per family into upstream's 0.25/0.5/1 s... buckets."""
    registry, metrics, _ = _metrics()
    metrics.programming_latency(0.3)
    metrics.programming_latency(61.0)
    name = "kubeproxy_network_programming_duration_seconds"
    for family in IP_FAMILIES:
        assert _value(registry, f"{name}_count", ip_family=family) == 2
        assert _value(registry, f"{name}_bucket", ip_family=family, le="0.25") == 0
        assert _value(registry, f"{name}_bucket", ip_family=family, le="0.5") == 1
        assert _value(registry, f"{name}_bucket", ip_family=family, le="60.0") == 1
        assert _value(registry, f"{name}_bucket", ip_family=family, le="65.0") == 2


def test_changes_add_to_totals_and_set_pending() -> None:
    """Change counts accumulate in the _total counters; pending counts replace the gauges."""
    registry, metrics, _ = _metrics()
    metrics.changes(3, 5, 1, 2)
    metrics.changes(1, 1, 0, 0)
    assert _value(registry, "kubeproxy_sync_proxy_rules_service_changes_total") == 4
    assert _value(registry, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 6
    assert _value(registry, "kubeproxy_sync_proxy_rules_service_changes_pending") == 0
    assert _value(registry, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    metrics.changes(0, 0, 7, 9)
    assert _value(registry, "kubeproxy_sync_proxy_rules_service_changes_pending") == 7
    assert _value(registry, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 9


def test_skips_conntrack_watch_restarts_and_probe_codes_are_counted() -> None:
    """Invalid objects, conntrack deletions, watch restarts and health answers each move their counter."""
    registry, metrics, _ = _metrics()
    metrics.invalid_object("Service", "bad-port")
    metrics.invalid_object("Service", "bad-port")
    metrics.conntrack_deleted(17)
    metrics.watch_restarted("EndpointSlice", "expired")
    metrics.healthz(200)
    metrics.healthz(503)
    metrics.livez(200)
    assert _value(registry, "kproxy_invalid_objects_skipped_total", kind="Service", reason="bad-port") == 2
    assert _value(registry, "kproxy_conntrack_entries_deleted_total") == 17
    assert _value(registry, "kproxy_watch_restarts_total", resource="EndpointSlice", reason="expired") == 1
    assert _value(registry, "kubeproxy_proxy_healthz_total", code="200") == 1
    assert _value(registry, "kubeproxy_proxy_healthz_total", code="503") == 1
    assert _value(registry, "kubeproxy_proxy_livez_total", code="200") == 1


def test_no_local_endpoints_is_left_to_the_collector() -> None:
    """ProxyMetrics registers no no-local-endpoints gauge, so the collector can own the name."""
    registry, metrics, _ = _metrics()
    metrics.no_local_endpoints(3, 4)
    names = {family.name for family in registry.collect()}
    assert "kubeproxy_sync_proxy_rules_no_local_endpoints_total" not in names
    registry.register(ProxierCollector(Stub([])))  # no duplicate-name error


def test_sync_duration_buckets_match_upstream() -> None:
    """The three sync histograms use ExponentialBuckets(0.001, 2, 15): 1 ms to 16.384 s, then +Inf."""
    registry, metrics, _ = _metrics()
    metrics.sync_done(True, 0.01, 1, 1, 1)
    metrics.sync_done(False, 0.01, 1, 1, 1)
    expected = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512,
                1.024, 2.048, 4.096, 8.192, 16.384, float("inf")]
    for name in ("sync_proxy_rules", "sync_full_proxy_rules", "sync_partial_proxy_rules"):
        assert _buckets(registry, f"kubeproxy_{name}_duration_seconds", ip_family="IPv4") == pytest.approx(expected)


def test_network_programming_buckets_match_upstream() -> None:
    """MergeBuckets(...) starts at 0, then 0.25, 0.5, 1..59 by 1, 60..115 by 5, 120..300 by 30, then +Inf."""
    registry, metrics, _ = _metrics()
    metrics.programming_latency(1.0)
    expected = [0.0, 0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30), float("inf")]
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 81
    assert _buckets(registry, "kubeproxy_network_programming_duration_seconds", ip_family="IPv6") == expected


# -- ProxierCollector ---------------------------------------------------------------


@dataclass
class Stub:
    """Stands for the Proxier: a Local-policy report behind a lock, and a pending time."""

    report: list[LocalPolicyStatus]
    oldest_pending_wall: float | None = None
    lock: Any = field(default_factory=threading.Lock)
    calls: int = field(default=0)

    def local_policy_report(self, timeout: float | None = None) -> list[LocalPolicyStatus] | None:
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            self.calls += 1
            return list(self.report)
        finally:
            self.lock.release()


COUNTERS = {
    ("ip", "conns-ABCDEFGH-shop/web/tcp/http"): (120, 7200),
    ("ip6", "conns-ABCDEFGH-shop/web/tcp/http"): (30, 2400),
    ("ip", "drops-ABCDEFGH-shop/web/tcp/http"): (5, 300),
    ("ip", "conns-QRSTUVWX-kube-system/kube-dns/udp/53"): (9, 600),
    ("ip", "some-other-counter"): (1, 1),
    ("inet", "conns-ABCDEFGH-shop/web/tcp/http"): (1, 1),
}


def _collector(stub: Stub, read_counters: Any = None, **kw: Any) -> tuple[CollectorRegistry, ProxierCollector]:
    registry = CollectorRegistry()
    collector = ProxierCollector(stub, read_counters, wall_clock=WallClock(1000.0), **kw)
    registry.register(collector)
    return registry, collector


def test_collector_counts_local_policy_services_without_local_endpoints() -> None:
    """Only Services with endpoints elsewhere and none here count, per traffic policy, for both families."""
    stub = Stub([
        _status("a", internal=True, external=False, local=0),      # internal only
        _status("b", internal=True, external=True, local=0),       # both
        _status("c", internal=False, external=True, local=2),      # has local endpoints
        _status("d", internal=False, external=True, local=0, anywhere=False),  # no endpoints at all
    ])
    registry, _ = _collector(stub)
    name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    for family in IP_FAMILIES:
        assert _value(registry, name, traffic_policy="internal", ip_family=family) == 2
        assert _value(registry, name, traffic_policy="external", ip_family=family) == 1


def test_collector_reads_the_report_at_scrape_time_only() -> None:
    """Registering does not read the proxier; each scrape reads it again and sees the latest state."""
    stub = Stub([_status("a", local=0)])
    registry, _ = _collector(stub)
    assert stub.calls == 0
    assert _value(registry, "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                  traffic_policy="external", ip_family="IPv4") == 1
    stub.report = [_status("a", local=1)]
    assert _value(registry, "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                  traffic_policy="external", ip_family="IPv4") == 0


def test_collector_serves_last_counts_while_a_sync_holds_the_lock() -> None:
    """A scrape during a long sync does not wait: it answers with the last counts it computed."""
    stub = Stub([_status("a", local=0)], lock=threading.Lock())
    registry, _ = _collector(stub, lock_timeout=0.01)
    name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    assert _value(registry, name, traffic_policy="external", ip_family="IPv4") == 1
    stub.report = []
    with stub.lock:  # a sync is running
        assert _value(registry, name, traffic_policy="external", ip_family="IPv4") == 1
    assert _value(registry, name, traffic_policy="external", ip_family="IPv4") == 0


def test_collector_exports_per_service_nft_counters() -> None:
    """conns-/drops- counters become per-Service-port counters labelled by namespace, service, port, family."""
    registry, _ = _collector(Stub([]), lambda: COUNTERS)
    conns, drops = "kproxy_service_new_connections_total", "kproxy_rate_limit_drops_total"
    web = {"namespace": "shop", "service": "web", "port": "http"}
    assert _value(registry, conns, **web, ip_family="IPv4") == 120
    assert _value(registry, conns, **web, ip_family="IPv6") == 30
    assert _value(registry, drops, **web, ip_family="IPv4") == 5
    assert _value(registry, drops, **web, ip_family="IPv6") is None
    assert _value(registry, conns, namespace="kube-system", service="kube-dns", port="53", ip_family="IPv4") == 9
    samples = [s for f in registry.collect() if f.name == "kproxy_service_new_connections" for s in f.samples]
    assert len(samples) == 3  # the unknown name and the unknown family are skipped


def test_collector_survives_failing_counter_reads(caplog: pytest.LogCaptureFixture) -> None:
    """If reading nft counters fails, the scrape still succeeds without them and a warning is logged."""

    def broken() -> dict[tuple[str, str], tuple[int, int]]:
        raise RuntimeError("nft: table not found")

    registry, _ = _collector(Stub([_status("a")]), broken)
    with caplog.at_level(logging.WARNING, logger="kproxy.observe.metrics"):
        assert _value(registry, "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                      traffic_policy="external", ip_family="IPv4") == 1
        assert _value(registry, "kproxy_service_new_connections_total", namespace="shop", service="web",
                      port="http", ip_family="IPv4") is None
    assert "cannot read nft counters" in caplog.text


def test_last_queued_timestamp_follows_pending_changes() -> None:
    """The queued timestamp starts at the collector's start and moves forward with pending changes only."""
    stub = Stub([])
    registry, _ = _collector(stub)
    name = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
    assert _value(registry, name, ip_family="IPv4") == 1000.0
    stub.oldest_pending_wall = 1500.0
    assert _value(registry, name, ip_family="IPv6") == 1500.0
    stub.oldest_pending_wall = None  # synced: the gauge keeps its value
    assert _value(registry, name, ip_family="IPv4") == 1500.0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("conns-ABCDEFGH-ns/web/tcp/http", ServiceCounter("conns", "ns", "web", "tcp", "http"), id="conns"),
        pytest.param("drops-ABCDEFGH-my-ns/my-svc/udp/53", ServiceCounter("drops", "my-ns", "my-svc", "udp", "53"),
                     id="drops-dashed-names"),
        pytest.param("svc-ABCDEFGH-ns/web/tcp/http", None, id="chain-prefix"),
        pytest.param("conns-ABCDEFGH-ns/web/tcp", None, id="too-short"),
        pytest.param("conns-ns/web/tcp/http", None, id="no-hash"),
        pytest.param("conns", None, id="bare"),
    ],
)
def test_parse_counter_name(name: str, expected: ServiceCounter | None) -> None:
    """Counter object names are parsed back into namespace, service, protocol and port label."""
    assert parse_counter_name(name) == expected


def test_metrics_follow_a_real_proxier() -> None:
    """Wired as the Proxier's observer and collector, a sync and a Local Service show up in the registry."""
    registry, metrics, _ = _metrics()
    proxier = Proxier(FakeBackend(), "node-a", ProxyConfig(), observer=metrics)
    registry.register(ProxierCollector(proxier))
    proxier.on_relist("Node", [node("node-a")])
    proxier.on_relist("Service", [service("web", "ns", "10.96.0.10", internalTrafficPolicy="Local")])
    proxier.on_relist("EndpointSlice", [endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node="node-b")],
                                                       namespace="ns")])
    proxier.sync()
    assert _value(registry, "kproxy_syncs_total", kind="full") == 1
    assert _value(registry, "kproxy_rules") > 0
    assert _value(registry, "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                  traffic_policy="internal", ip_family="IPv4") == 1


# -- the HTTP server ----------------------------------------------------------------


def _get(server: HTTPService, path: str, method: str = "GET", host: str = "127.0.0.1",
         **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, server.port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_metrics_server_serves_metrics_rules_and_404() -> None:
    """/metrics is Prometheus text, /rules is the rule dump, anything else is 404; port 0 picks a free port."""
    registry, metrics, _ = _metrics()
    metrics.sync_done(True, 0.01, 3, 4, 5)
    server = start_metrics_server(("127.0.0.1", 0), registry, lambda: "table ip kproxy {\n}\n")
    try:
        assert server.port > 0
        status, headers, body = _get(server, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b'kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.016"} 1.0' in body
        status, headers, body = _get(server, "/metrics", Accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        status, headers, body = _get(server, "/rules")
        assert (status, headers["content-type"], body) == (200, "text/plain; charset=utf-8", b"table ip kproxy {\n}\n")
        assert _get(server, "/rules", method="HEAD")[2] == b""
        assert _get(server, "/nope")[0] == 404
    finally:
        server.stop()
    with pytest.raises(ConnectionRefusedError):
        _get(server, "/metrics")


def test_metrics_server_answers_500_when_rules_fail() -> None:
    """A failing rule dump answers 500; the server keeps serving."""

    def broken() -> str:
        raise RuntimeError("nft list failed")

    server = start_metrics_server(("127.0.0.1", 0), CollectorRegistry(), broken)
    try:
        assert _get(server, "/rules")[0] == 500
        assert _get(server, "/metrics")[0] == 200
    finally:
        server.stop()


def test_wildcard_host_listens_dual_stack() -> None:
    """An empty or 0.0.0.0 host answers on IPv4 and, where the kernel allows it, on IPv6 too (as Go does)."""
    for host in ("", "0.0.0.0"):
        server = start_metrics_server((host, 0), CollectorRegistry(), lambda: "")
        try:
            assert _get(server, "/rules")[0] == 200
            if socket.has_dualstack_ipv6():
                assert _get(server, "/rules", host="::1")[0] == 200
        finally:
            server.stop()
