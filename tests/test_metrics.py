"""Metrics: upstream's kubeproxy_* names, labels and buckets; scrape-time values; the /metrics server."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from kproxy.daemon.proxier import Proxier
from kproxy.nft.fake import FakeBackend
from kproxy.observe.exposition import SharedExposition
from kproxy.observe.http import HTTPService, Request, Response, metrics_routes, start_metrics_server
from kproxy.observe.metrics import (
    DEFAULT_SERVICE_METRICS,
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
    """Stands for the Proxier: a Local-policy report and the annotated Services behind a lock, and a pending time."""

    report: list[LocalPolicyStatus]
    oldest_pending_wall: float | None = None
    lock: Any = field(default_factory=threading.Lock)
    calls: int = field(default=0)
    opted_in: frozenset[str] = frozenset()
    timeouts: list[float | None] = field(default_factory=list)
    """The timeouts metrics_services was called with."""
    names: tuple[tuple[str, str], ...] | None = None
    """What counter_names answers (None: as if a sync held the lock)."""

    def counter_names(self, timeout: float | None = None) -> tuple[tuple[str, str], ...] | None:
        return self.names

    def local_policy_report(self, timeout: float | None = None) -> list[LocalPolicyStatus] | None:
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            self.calls += 1
            return list(self.report)
        finally:
            self.lock.release()

    def metrics_services(self, timeout: float | None = None) -> frozenset[str] | None:
        self.timeouts.append(timeout)
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            return self.opted_in
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
CONNS, DROPS = "kproxy_service_new_connections_total", "kproxy_rate_limit_drops_total"
WEB = {"namespace": "shop", "service": "web", "port": "http"}
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def _collector(stub: Stub, read_counters: Any = None, **kw: Any) -> tuple[CollectorRegistry, ProxierCollector]:
    registry = CollectorRegistry()
    collector = ProxierCollector(stub, read_counters, wall_clock=WallClock(1000.0), **kw)
    registry.register(collector)
    return registry, collector


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry, collector: ProxierCollector, accept: str = "") -> tuple[bytes, Samples]:
    """A /metrics body as the daemon renders it, and its samples as prometheus_client's parser reads them back."""
    body, content_type = SharedExposition(registry, [collector], max_age=0).render(accept)
    if content_type.startswith("application/openmetrics-text"):
        families = openmetrics_parser.text_string_to_metric_families(body.decode())
    else:
        families = text_string_to_metric_families(body.decode())
    samples: Samples = {}
    for family in families:
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return body, samples


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return sorted((dict(labels) for n, labels in samples if n == name), key=lambda d: sorted(d.items()))


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


@pytest.mark.parametrize("accept", ["", OPENMETRICS], ids=["text", "openmetrics"])
def test_collector_exports_per_service_nft_counters(accept: str) -> None:
    """With ``all``, conns-/drops- counters become per-Service-port counters labelled by namespace, service, port, family."""
    registry, collector = _collector(Stub([]), lambda: COUNTERS, service_metrics="all")
    _, samples = scrape(registry, collector, accept)
    assert sample(samples, CONNS, **WEB, ip_family="IPv4") == 120
    assert sample(samples, CONNS, **WEB, ip_family="IPv6") == 30
    assert sample(samples, DROPS, **WEB, ip_family="IPv4") == 5
    assert sample(samples, DROPS, **WEB, ip_family="IPv6") is None
    assert sample(samples, CONNS, namespace="kube-system", service="kube-dns", port="53", ip_family="IPv4") == 9
    assert len(series(samples, CONNS)) == 3  # the unknown name and the unknown family are skipped
    # The registry's own metrics are still there, once each (the parser refuses a family twice).
    assert sample(samples, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", ip_family="IPv4") == 1000.0


@pytest.mark.parametrize(
    ("setting", "expected_conns"),
    [
        pytest.param("annotated", [{**WEB, "ip_family": "IPv4"}, {**WEB, "ip_family": "IPv6"}], id="annotated"),
        pytest.param("none", [], id="none"),
    ],
)
def test_per_service_series_are_opt_in(setting: str, expected_conns: list[dict[str, str]]) -> None:
    """``annotated`` exports new connections of the annotated Services only, ``none`` of no Service;
    the drops of a rate-limited Service are exported whatever the setting."""
    stub = Stub([], opted_in=frozenset({"shop/web"}))
    registry, collector = _collector(stub, lambda: COUNTERS, service_metrics=setting)
    body, samples = scrape(registry, collector)
    assert series(samples, CONNS) == expected_conns
    assert series(samples, DROPS) == [{**WEB, "ip_family": "IPv4"}]
    # Both families are declared, with or without samples.
    assert f"# TYPE {CONNS} counter\n".encode() in body and f"# TYPE {DROPS} counter\n".encode() in body


class NamedReads:
    """A counter reader by name, over ``counters``, recording what it was asked for."""

    def __init__(self, counters: dict[tuple[str, str], tuple[int, int]]) -> None:
        self.counters = counters
        self.asked: list[list[tuple[str, str]]] = []

    def __call__(self, names: Any) -> dict[tuple[str, str], tuple[int, int]]:
        self.asked.append(list(names))
        return {key: self.counters[key] for key in names if key in self.counters}


def _many_counters(services: int) -> dict[tuple[str, str], tuple[int, int]]:
    many = {("ip", f"conns-ABCDEFGH-other/svc-{i}/tcp/http"): (i, 60 * i) for i in range(services)}
    return {**many, **COUNTERS}


@pytest.mark.parametrize("setting", ["none", "annotated", "all"])
def test_settings_other_than_all_read_only_the_counters_they_export_by_name(setting: str) -> None:
    """With a reader by name, ``none`` and ``annotated`` ask for the limits' drops and the opted-in Services' new
    connections only, among every counter the last sync programmed; ``all`` dumps them all. The samples are the
    same as from a dump."""
    counters = _many_counters(100)
    names = tuple(sorted(counters))
    stub = Stub([], opted_in=frozenset({"shop/web"}), names=names)
    named = NamedReads(counters)
    dumps: list[int] = []

    def dump() -> dict[tuple[str, str], tuple[int, int]]:
        dumps.append(1)
        return counters

    registry, collector = _collector(stub, dump, service_metrics=setting, read_named=named)
    _, samples = scrape(registry, collector)
    _, expected = scrape(*_collector(Stub([], opted_in=frozenset({"shop/web"})), lambda: counters,
                                     service_metrics=setting))
    assert samples == expected
    if setting == "all":
        assert dumps and not named.asked
        return
    assert not dumps
    web = {("ip", "drops-ABCDEFGH-shop/web/tcp/http")}
    if setting == "annotated":
        web |= {("ip", "conns-ABCDEFGH-shop/web/tcp/http"), ("ip6", "conns-ABCDEFGH-shop/web/tcp/http")}
    assert named.asked == [sorted(web)]


def test_a_dump_is_read_when_the_names_are_unknown_or_most_counters_are_wanted() -> None:
    """While a sync holds the proxier (no names), or when a quarter or more of the counters would be asked for, one
    dump is cheaper and is read instead."""
    counters = _many_counters(100)
    for stub in (Stub([], opted_in=frozenset({"shop/web"}), names=None),
                 Stub([], opted_in=frozenset({"shop/web"}), names=tuple(sorted(COUNTERS)))):
        named, dumps = NamedReads(counters), []
        registry, collector = _collector(stub, lambda: dumps.append(1) or counters, read_named=named)
        _, samples = scrape(registry, collector)
        assert dumps == [1] and not named.asked
        assert sample(samples, CONNS, **WEB, ip_family="IPv4") == 120


def test_a_failed_read_by_name_falls_back_to_a_dump(caplog: pytest.LogCaptureFixture) -> None:
    """Reading by name can fail where a dump does not (a small receive buffer): the scrape then dumps."""
    counters = _many_counters(100)

    def refuse(names: Any) -> dict[tuple[str, str], tuple[int, int]]:
        raise OSError(105, "No buffer space available")

    stub = Stub([], opted_in=frozenset({"shop/web"}), names=tuple(sorted(counters)))
    registry, collector = _collector(stub, lambda: counters, read_named=refuse)
    with caplog.at_level("WARNING"):
        _, samples = scrape(registry, collector)
    assert sample(samples, CONNS, **WEB, ip_family="IPv4") == 120
    assert sample(samples, DROPS, **WEB, ip_family="IPv4") == 5
    assert "reading them all" in caplog.text


def test_the_proxier_names_its_committed_counters_once_per_sync() -> None:
    """counter_names lists the committed tables' counters, as of the last sync; the Local-policy report likewise."""
    proxier = Proxier(FakeBackend(), "node-a", ProxyConfig(service_metrics="all"))
    proxier.on_relist("Node", [node("node-a")])
    proxier.on_relist("Service", [service("web", "shop", "10.96.0.10", internalTrafficPolicy="Local")])
    proxier.on_relist("EndpointSlice", [endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], namespace="shop")])
    assert proxier.counter_names() is None, "before the first sync the kernel may hold a previous process's tables"
    proxier.sync()
    names = proxier.counter_names()
    assert names is not None and [name for _, name in names if name.startswith("conns-")] == [
        name for name in proxier.committed()["ip"].counters if name.startswith("conns-")]
    assert [r.name for r in proxier.local_policy_report() or []] == ["web"]
    proxier.on_service("ADDED", service("api", "shop", "10.96.0.11", internalTrafficPolicy="Local"))
    assert [r.name for r in proxier.local_policy_report() or []] == ["web"], "as of the last sync"
    assert proxier.counter_names() is names
    proxier.sync()
    assert [r.name for r in proxier.local_policy_report() or []] == ["api", "web"]
    assert len(proxier.counter_names() or ()) > len(names)
    with proxier.lock:
        assert _in_thread(lambda: proxier.counter_names(0.01)) is None


@pytest.mark.parametrize("setting", ["none", "annotated", "all"])
@pytest.mark.parametrize("accept", ["", OPENMETRICS], ids=["text", "openmetrics"])
def test_every_limit_exports_its_drops_with_a_reason(setting: str, accept: str) -> None:
    """Issue 19: each limit's drop counter is a ``kproxy_limit_drops_total`` series with its ``reason``, whatever
    ``--service-metrics`` says; the rate limit's is also ``kproxy_rate_limit_drops_total``, as before."""
    counters = {
        ("ip", "drops-ABCDEFGH-shop/web/tcp/http"): (5, 300),
        ("ip", "totaldrops-ABCDEFGH-shop/web/tcp/http"): (6, 360),
        ("ip", "conndrops-ABCDEFGH-shop/web/tcp/http"): (7, 420),
        ("ip", "bwdrops-ABCDEFGH-shop/web/tcp/http"): (8, 12000),
        ("ip6", "bwdrops-ABCDEFGH-shop/web/tcp/http"): (9, 13500),
        ("ip", "conns-ABCDEFGH-shop/web/tcp/http"): (100, 6000),
    }
    registry, collector = _collector(Stub([]), lambda: counters, service_metrics=setting)
    body, samples = scrape(registry, collector, accept)
    limits = "kproxy_limit_drops_total"
    for reason, value in (("rate_limit", 5), ("rate_limit_total", 6), ("connections", 7), ("bandwidth", 8)):
        assert sample(samples, limits, **WEB, ip_family="IPv4", reason=reason) == value
    assert sample(samples, limits, **WEB, ip_family="IPv6", reason="bandwidth") == 9
    assert len(series(samples, limits)) == 5
    assert series(samples, DROPS) == [{**WEB, "ip_family": "IPv4"}] and sample(samples, DROPS, **WEB, ip_family="IPv4") == 5
    assert (sample(samples, CONNS, **WEB, ip_family="IPv4") is not None) == (setting == "all")
    assert b"# TYPE kproxy_limit_drops" in body


def test_default_setting_is_annotated() -> None:
    _, collector = _collector(Stub([]))
    assert collector.service_metrics == "annotated" == DEFAULT_SERVICE_METRICS
    with pytest.raises(ValueError, match="not one of none, annotated, all"):
        ProxierCollector(Stub([]), service_metrics="some")


def test_annotated_set_is_read_at_scrape_time_and_kept_while_a_sync_holds_the_lock() -> None:
    """Which Services opted in is read at each scrape; during a long sync, the last set read is used, without waiting."""
    stub = Stub([], lock=threading.Lock(), opted_in=frozenset({"shop/web"}))
    registry, collector = _collector(stub, lambda: COUNTERS, lock_timeout=0.01)
    web_v4 = {**WEB, "ip_family": "IPv4"}
    assert web_v4 in series(scrape(registry, collector)[1], CONNS)
    stub.opted_in = frozenset({"kube-system/kube-dns"})
    with stub.lock:  # a sync is running: the last set read, without waiting twice in one scrape
        assert web_v4 in series(scrape(registry, collector)[1], CONNS)
    assert stub.timeouts == [0.01, 0]
    assert series(scrape(registry, collector)[1], CONNS) == [
        {"namespace": "kube-system", "service": "kube-dns", "port": "53", "ip_family": "IPv4"}]


def test_objects_with_the_same_labels_are_summed_and_gone_ones_disappear() -> None:
    """Two counter objects of one Service port (another hash) add up; a deleted object's series goes away."""
    counters = dict(COUNTERS)
    counters[("ip", "conns-ZZZZZZZZ-shop/web/tcp/http")] = (1, 60)
    registry, collector = _collector(Stub([]), lambda: counters, service_metrics="all")
    assert sample(scrape(registry, collector)[1], CONNS, **WEB, ip_family="IPv4") == 121
    del counters[("ip", "conns-ABCDEFGH-shop/web/tcp/http")], counters[("ip", "conns-ZZZZZZZZ-shop/web/tcp/http")]
    _, samples = scrape(registry, collector)
    assert sample(samples, CONNS, **WEB, ip_family="IPv4") is None
    assert sample(samples, CONNS, **WEB, ip_family="IPv6") == 30


@pytest.mark.parametrize("accept", ["", OPENMETRICS], ids=["text", "openmetrics"])
def test_label_values_are_escaped(accept: str) -> None:
    """Counter names come from the kernel (anyone may add one): quotes, backslashes and newlines are escaped."""
    hostile = 'conns-ABCDEFGH-a"b/c\\d/tcp/e\nf'
    registry, collector = _collector(Stub([]), lambda: {("ip", hostile): (7, 7)}, service_metrics="all")
    _, samples = scrape(registry, collector, accept)
    assert sample(samples, CONNS, namespace='a"b', service="c\\d", port="e\nf", ip_family="IPv4") == 7


def test_large_counter_values_are_exact_integers() -> None:
    """A 64-bit counter is written as an integer (prometheus_client would write it as a rounded float)."""
    registry, collector = _collector(Stub([]), lambda: {("ip", "conns-A-ns/a/tcp/80"): (2**63 + 1, 0)}, service_metrics="all")
    body, _ = scrape(registry, collector)
    assert f'{CONNS}{{namespace="ns",service="a",port="80",ip_family="IPv4"}} {2**63 + 1}\n'.encode() in body


def test_openmetrics_ends_with_one_eof_after_every_family() -> None:
    registry, collector = _collector(Stub([]), lambda: COUNTERS, service_metrics="all")
    body, _ = scrape(registry, collector, OPENMETRICS)
    assert body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
    assert b"# TYPE kproxy_service_new_connections counter\n" in body


def test_collector_survives_failing_counter_reads(caplog: pytest.LogCaptureFixture) -> None:
    """If reading nft counters fails, the scrape still succeeds without them and a warning is logged."""

    def broken() -> dict[tuple[str, str], tuple[int, int]]:
        raise RuntimeError("nft: table not found")

    registry, collector = _collector(Stub([_status("a")]), broken, service_metrics="all")
    with caplog.at_level(logging.WARNING, logger="kproxy.observe.metrics"):
        _, samples = scrape(registry, collector)
    assert sample(samples, "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                  traffic_policy="external", ip_family="IPv4") == 1
    assert series(samples, CONNS) == []
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


def test_proxier_reports_the_annotated_services() -> None:
    """The real Proxier answers which Services opted in; a bad annotation value is a problem and opts nothing in."""
    proxier = Proxier(FakeBackend(), "node-a", ProxyConfig())
    proxier.on_relist("Service", [
        service("web", "shop", "10.96.0.10", annotations={"kproxy.io/metrics": "true"}),
        service("quiet", "shop", "10.96.0.11", annotations={"kproxy.io/metrics": "false"}),
        service("typo", "shop", "10.96.0.12", annotations={"kproxy.io/metrics": "yes"}),
        service("plain", "shop", "10.96.0.13"),
    ])
    assert proxier.metrics_services() == frozenset({"shop/web"})
    problems = [(p.key, p.reason, p.message) for p in proxier.skipped()]
    assert problems == [("shop/typo", "invalid_annotation",
                         "kproxy.io/metrics: 'yes' is not \"true\" or \"false\"; the Service exports no per-Service metrics")]
    with proxier.lock:  # a sync holds the state: the caller is told, after its timeout
        assert _in_thread(lambda: proxier.metrics_services(0.01)) is None


def _in_thread(call: Any) -> Any:
    """``call()`` from another thread (the proxier's lock is reentrant for its holder)."""
    found: list[Any] = []
    thread = threading.Thread(target=lambda: found.append(call()))
    thread.start()
    thread.join()
    return found[0]


# -- one collection at a time ---------------------------------------------------------


class SlowSource:
    """A TextSource that takes its time, and counts how many collections run at once."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds
        self.running = self.most = self.calls = 0
        self.lock = threading.Lock()
        self.fail = False

    def exposition(self, openmetrics: bool = False) -> str:
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.seconds)
            if self.fail:
                raise RuntimeError("collection failed")
            return f"# TYPE slow gauge\nslow {self.calls}\n"
        finally:
            with self.lock:
                self.running -= 1


def _render_all(exposition: SharedExposition, accepts: list[str]) -> list[tuple[bytes, str]]:
    results: list[Any] = [None] * len(accepts)

    def one(i: int) -> None:
        try:
            results[i] = exposition.render(accepts[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(accepts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_concurrent_scrapes_share_one_collection() -> None:
    """Twenty scrapers at once: one collection runs, the others wait for it and get the very same body."""
    source = SlowSource()
    exposition = SharedExposition(CollectorRegistry(), [source])
    results = _render_all(exposition, [""] * 20)
    assert source.most == 1 and source.calls == 1 and exposition.collections == 1
    assert len({id(body) for body, _ in results}) == 1  # one bytes object, shared
    assert results[0][0].endswith(b"slow 1\n")


def test_a_result_is_shared_for_max_age_then_collected_again() -> None:
    clock = WallClock(100.0)
    source = SlowSource(0)
    exposition = SharedExposition(CollectorRegistry(), [source], max_age=1.0, clock=clock)
    first, _ = exposition.render("")
    clock.now += 0.9
    assert exposition.render("")[0] is first
    clock.now += 0.2
    assert exposition.render("")[0].endswith(b"slow 2\n")
    assert source.calls == 2


def test_formats_are_collected_one_at_a_time_each_for_itself() -> None:
    """A text scraper does not take an OpenMetrics result: it waits, then collects its own, never at the same time."""
    source = SlowSource()
    exposition = SharedExposition(CollectorRegistry(), [source])
    results = _render_all(exposition, [OPENMETRICS] * 5 + [""] * 5)
    assert source.most == 1 and source.calls == 2
    for body, content_type in results[:5]:
        assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    for body, content_type in results[5:]:
        assert content_type.startswith("text/plain; version=0.0.4") and b"# EOF" not in body


def test_a_failed_collection_is_not_shared() -> None:
    """A collection that raises answers its scrapers with the error (the server's 500); the next one runs afresh."""
    source = SlowSource(0.05)
    source.fail = True
    exposition = SharedExposition(CollectorRegistry(), [source])
    results = _render_all(exposition, ["", ""])
    assert all(isinstance(r, RuntimeError) for r in results)
    source.fail = False
    assert exposition.render("")[0].startswith(b"# TYPE slow gauge")


def test_metrics_server_handles_a_bounded_number_of_requests_at_once() -> None:
    """With max_handlers, further clients wait (in the listen backlog) instead of costing a thread each."""
    busy = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow(request: Request) -> Response:
        with lock:
            busy["now"] += 1
            busy["most"] = max(busy["most"], busy["now"])
        time.sleep(0.1)
        with lock:
            busy["now"] -= 1
        return Response(200, b"ok\n")

    server = HTTPService(("127.0.0.1", 0), {"/slow": slow}, max_handlers=3).start()
    try:
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(_get(server, "/slow")[0])) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert statuses == [200] * 12
        assert busy["most"] == 3
    finally:
        server.stop()


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


@pytest.mark.parametrize(
    ("client", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True), ("10.0.0.1", False),
     ("::ffff:10.0.0.1", False), ("fd00::1", False), ("", False), ("not-an-ip", False)],
)
def test_rules_and_skipped_answer_loopback_clients_only(client: str, loopback: bool) -> None:
    """/rules and /skipped answer 403 to a client that is not loopback (naming --expose-rules); /metrics answers all;
    with expose_rules every client gets them."""
    routes = metrics_routes(CollectorRegistry(), lambda: "table ip kproxy {\n}\n", lambda: [])
    request = Request("GET", "/rules", client=client)
    assert routes["/metrics"](request).status == 200
    for path in ("/rules", "/skipped"):
        response = routes[path](Request("GET", path, client=client))
        assert response.status == (200 if loopback else 403), (path, client)
        if not loopback:
            assert b"--expose-rules" in response.body
    opened = metrics_routes(CollectorRegistry(), lambda: "", lambda: [], expose_rules=True)
    assert opened["/rules"](request).status == opened["/skipped"](request).status == 200
