"""Prometheus metrics: kube-proxy's, under the same names, plus kproxy's own.

* ``ProxyMetrics`` is the proxier's ``SyncObserver``. It registers upstream's
  ``kubeproxy_*`` metrics with upstream's types, labels and buckets
  (``pkg/proxy/metrics/metrics.go``), in a registry that is passed in (never
  the global one).
* Upstream runs one proxier per IP family and labels most metrics
  ``ip_family="IPv4"|"IPv6"`` (the ``v1.IPFamily`` strings). kproxy programs
  both families in one transaction, so each observation is recorded once per
  family the node programs: dashboards that filter on ``ip_family`` work, and
  one family's series equals what an upstream proxier of that family reports.
* ``ProxierCollector`` computes at scrape time what is cheaper to read than
  to track: Services with a Local policy and no local endpoint, the last
  queued-change time, and the per-Service nft counters (new connections,
  limit drops). Counters are read at scrape time only, never in the sync
  path (``kproxy.nft.counters``: one netlink dump for ``all``; for the other
  settings, one request per exported counter, by name, which at 10k Services
  is a hundred or two instead of every Service's); a scrape never fails
  because nft did.
* Per-Service series are opt-in (``--service-metrics``, ``SERVICE_METRICS``):
  by default only Services annotated ``kproxy.io/metrics: "true"`` export
  their new connections; every Service with a limit (``kproxy.io/rate-limit``,
  ``-total``, ``limit-connections``, ``bandwidth-limit``) exports its drops. Their
  text is written directly (``ProxierCollector.exposition``), without a
  prometheus_client object per sample, which costs tens of microseconds each.
* The collector never waits long for the proxier's lock (a large full sync
  holds it for minutes): after ``lock_timeout`` it serves the last values it
  computed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kproxy.cluster.model import DEFAULT_SERVICE_METRICS, SERVICE_METRICS
from kproxy.rules.endpoints import LocalPolicyStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

IP_FAMILIES: tuple[str, ...] = ("IPv4", "IPv6")
"""Upstream's ``ip_family`` label values (``string(v1.IPv4Protocol)``, ``string(v1.IPv6Protocol)``)."""

NFT_FAMILY_LABELS: Mapping[str, str] = {"ip": "IPv4", "ip6": "IPv6"}
"""nft table family -> ``ip_family`` label value."""

SYNC_DURATION_BUCKETS: tuple[float, ...] = tuple(0.001 * 2**k for k in range(15))
"""``ExponentialBuckets(0.001, 2, 15)``: 1 ms .. 16.384 s."""

NETWORK_PROGRAMMING_BUCKETS: tuple[float, ...] = (
    0.0,  # upstream's MergeBuckets starts from a zero bucket
    0.25,
    0.5,
    *(float(s) for s in range(1, 60)),
    *(float(s) for s in range(60, 120, 5)),
    *(float(s) for s in range(120, 301, 30)),
)
"""``MergeBuckets(Linear(0.25, 0.25, 2), Linear(1, 1, 59), Linear(60, 5, 12), Linear(120, 30, 7))``."""

OPERATIONS_BUCKETS: tuple[float, ...] = tuple(float(4**k) for k in range(11))
"""kproxy_sync_operations: 1, 4, 16, ... 1048576 nft operations."""

COUNTER_KINDS: Mapping[str, str] = {
    "conns": "kproxy_service_new_connections",
    "drops": "kproxy_rate_limit_drops",
    "totaldrops": "kproxy_limit_drops",
    "conndrops": "kproxy_limit_drops",
    "bwdrops": "kproxy_limit_drops",
}
"""nft counter object prefix -> exported counter name (``_total`` is appended)."""
LIMIT_REASONS: Mapping[str, str] = {
    "drops": "rate_limit", "totaldrops": "rate_limit_total", "conndrops": "connections", "bwdrops": "bandwidth",
}
"""Drop counter prefix -> the ``reason`` label of ``kproxy_limit_drops_total`` (every limit's drops, by limit;
the compiler's ``LIMIT_COUNTERS``). ``drops`` (``kproxy.io/rate-limit``) is also exported alone, as
``kproxy_rate_limit_drops_total``, as it always was."""
LIMIT_DROPS = "kproxy_limit_drops"


class ProxyMetrics:
    """Records what the proxier, the watchers and the health servers report. Implements SyncObserver."""

    def __init__(
        self,
        registry: CollectorRegistry,
        families: Sequence[str] = IP_FAMILIES,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.families = tuple(families)
        self.wall_clock = wall_clock
        fam = ["ip_family"]
        r = registry
        # -- upstream kubeproxy_* ---------------------------------------------
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            fam, buckets=SYNC_DURATION_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs",
            fam, buckets=SYNC_DURATION_BUCKETS, registry=r)
        self.sync_partial_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            fam, buckets=SYNC_DURATION_BUCKETS, registry=r)
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds",
            fam, buckets=NETWORK_PROGRAMMING_BUCKETS, registry=r)
        self.last_timestamp = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced",
            fam, registry=r)
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes", registry=r)
        self.endpoint_changes_total = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes", registry=r)
        self.service_changes_total = Counter(
            "kubeproxy_sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes", registry=r)
        self.sync_failures = Counter(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "Cumulative proxy nftables sync failures",
            fam, registry=r)
        self.cleanup_failures = Counter(
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", "Cumulative proxy nftables cleanup failures",
            fam, registry=r)
        self.healthz_total = Counter(
            "kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"], registry=r)
        self.livez_total = Counter(
            "kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"], registry=r)
        # -- kproxy_* -------------------------------------------------------------
        self.rules = Gauge("kproxy_rules", "nft rules programmed (all families)", registry=r)
        self.elements = Gauge("kproxy_elements", "nft set and map elements programmed (all families)", registry=r)
        self.sync_operations = Histogram(
            "kproxy_sync_operations", "nft operations sent per successful sync", buckets=OPERATIONS_BUCKETS, registry=r)
        self.syncs_total = Counter("kproxy_syncs_total", "Successful syncs", ["kind"], registry=r)
        self.conntrack_deleted_total = Counter(
            "kproxy_conntrack_entries_deleted_total", "Stale UDP conntrack entries deleted", registry=r)
        self.unanswered_deleted_total = Counter(
            "kproxy_conntrack_untranslated_attempts_deleted_total",
            "TCP conntrack entries of connection attempts that went to a Service untranslated while kproxy's table "
            "was missing, deleted once it was built", registry=r)
        self.invalid_objects_total = Counter(
            "kproxy_invalid_objects_skipped_total", "API objects skipped as invalid", ["kind", "reason"], registry=r)
        self.watch_restarts_total = Counter(
            "kproxy_watch_restarts_total", "Watch restarts", ["resource", "reason"], registry=r)
        self.drift_repairs_total = Counter(
            "kproxy_drift_repairs_total",
            "Full syncs run because another program changed kproxy's tables, by what it did", ["reason"], registry=r)
        for family in self.families:
            self.sync_failures.labels(family)
            self.cleanup_failures.labels(family)
        for kind in ("full", "partial"):
            self.syncs_total.labels(kind)

    # -- SyncObserver -------------------------------------------------------------

    def sync_done(self, full: bool, seconds: float, operations: int, rules: int, elements: int) -> None:
        now = self.wall_clock()
        by_kind = self.sync_full_duration if full else self.sync_partial_duration
        for family in self.families:
            self.sync_duration.labels(family).observe(seconds)
            by_kind.labels(family).observe(seconds)
            self.last_timestamp.labels(family).set(now)
        self.syncs_total.labels("full" if full else "partial").inc()
        self.sync_operations.observe(operations)
        self.rules.set(rules)
        self.elements.set(elements)

    def sync_failed(self, full: bool, seconds: float) -> None:
        """A sync failed after ``seconds``: its duration counts, as upstream's does; the last-sync time does not move.

        A refused transaction changed nothing; when a table was being built,
        the pieces before the refused one stay, and the next (full) sync
        reads them back.
        """
        by_kind = self.sync_full_duration if full else self.sync_partial_duration
        for family in self.families:
            self.sync_failures.labels(family).inc()
            self.sync_duration.labels(family).observe(seconds)
            by_kind.labels(family).observe(seconds)

    def cleanup_failed(self) -> None:
        """Deleting stale chains failed (kproxy sends those deletes inside the sync transaction)."""
        for family in self.families:
            self.cleanup_failures.labels(family).inc()

    def programming_latency(self, seconds: float) -> None:
        for family in self.families:
            self.network_programming.labels(family).observe(seconds)

    def changes(self, service_changes: int, endpoint_changes: int, pending_services: int, pending_endpoints: int) -> None:
        self.service_changes_total.inc(max(0, service_changes))
        self.endpoint_changes_total.inc(max(0, endpoint_changes))
        self.service_changes_pending.set(pending_services)
        self.endpoint_changes_pending.set(pending_endpoints)

    def invalid_object(self, kind: str, reason: str) -> None:
        self.invalid_objects_total.labels(kind, reason).inc()

    def conntrack_deleted(self, count: int) -> None:
        self.conntrack_deleted_total.inc(max(0, count))

    def unanswered_deleted(self, count: int) -> None:
        self.unanswered_deleted_total.inc(max(0, count))

    def no_local_endpoints(self, internal: int, external: int) -> None:
        """Ignored: ProxierCollector computes ``sync_proxy_rules_no_local_endpoints_total`` at scrape time."""

    # -- others -----------------------------------------------------------------------

    def drift_repaired(self, reason: str) -> None:
        """Another program changed kproxy's tables; a full sync restores them (``kproxy.daemon.drift``)."""
        self.drift_repairs_total.labels(reason).inc()

    def watch_restarted(self, resource: str, reason: str) -> None:
        """A watch ended and restarts (the Watcher's ``on_restart``)."""
        self.watch_restarts_total.labels(resource, reason).inc()

    def healthz(self, code: int) -> None:
        self.healthz_total.labels(str(code)).inc()

    def livez(self, code: int) -> None:
        self.livez_total.labels(str(code)).inc()


# -- scrape-time values -------------------------------------------------------------


class PolicySource(Protocol):
    """What ProxierCollector reads at scrape time (a Proxier; tests pass a stub)."""

    oldest_pending_wall: float | None
    """Wall time of the oldest change not yet programmed (None when every change is)."""

    def local_policy_report(self, timeout: float | None = None) -> list[LocalPolicyStatus] | None:
        """Every Service with a Local policy; None if a sync held the state longer than ``timeout`` seconds."""
        ...

    def metrics_services(self, timeout: float | None = None) -> frozenset[str] | None:
        """``namespace/name`` of every Service annotated ``kproxy.io/metrics: "true"``;
        None if a sync held the state longer than ``timeout`` seconds."""
        ...

    def counter_names(self, timeout: float | None = None) -> Sequence[tuple[Any, str]] | None:
        """(nft family, name) of every named counter the last sync programmed;
        None if a sync held the state longer than ``timeout`` seconds."""
        ...


CounterReader = Callable[[], Mapping[tuple[Any, str], tuple[int, int]]]
"""Returns {(nft family "ip"/"ip6", counter object name): (packets, bytes)}."""
NamedCounterReader = Callable[[Sequence[tuple[Any, str]]], Mapping[tuple[Any, str], tuple[int, int]]]
"""The same for the named counters only (those that exist)."""
NAMED_READ_SHARE = 4
"""Named reads are used while they ask for at most 1/NAMED_READ_SHARE of the counters; past that, one dump."""

SERVICE_COUNTER_HELP: Mapping[str, str] = {
    "kproxy_service_new_connections": "New connections to a Service port (nft counter)",
    "kproxy_rate_limit_drops": "Packets to a Service port dropped by its rate limit (nft counter)",
    LIMIT_DROPS: "Packets of a Service port dropped by one of its limits, by reason: rate_limit, rate_limit_total, "
                 "connections, bandwidth (nft counters)",
}


@dataclass(frozen=True, slots=True)
class ServiceCounter:
    """A per-Service-port nft counter object, parsed from its name."""

    kind: str
    """``conns`` (new connections), or the drops of a limit (``LIMIT_REASONS``)."""
    namespace: str
    service: str
    protocol: str
    port: str
    """The port's name, or its number when unnamed."""

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service}"


def parse_counter_name(name: str) -> ServiceCounter | None:
    """``conns-HASH8-ns/name/tcp/http`` -> ServiceCounter; None for any other name."""
    kind, _, suffix = name.partition("-")
    if kind not in COUNTER_KINDS:
        return None
    digest, _, path = suffix.partition("-")
    parts = path.split("/")
    if not digest or len(parts) != 4 or not all(parts):
        return None
    namespace, service, protocol, port = parts
    return ServiceCounter(kind, namespace, service, protocol, port)


def label_value(text: str) -> str:
    """A label value escaped for the text formats (Prometheus 0.0.4 and OpenMetrics alike)."""
    if "\\" in text or '"' in text or "\n" in text:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text


@dataclass(frozen=True, slots=True)
class _Series:
    """What a counter object's name says, once parsed: which family and Service, and its sample's line head."""

    kind: str
    service_key: str
    head: str
    """``name{labels} ``: the sample line without its value."""
    limit_head: str | None = None
    """The line head of its ``kproxy_limit_drops_total`` sample, for a limit's drop counter."""


@dataclass(frozen=True, slots=True)
class NoLocalCounts:
    internal: int
    external: int


def no_local_counts(report: Iterable[LocalPolicyStatus]) -> NoLocalCounts:
    """Services with a Local policy for that traffic, endpoints somewhere, and none on this node."""
    internal = external = 0
    for status in report:
        if status.has_endpoints and status.local_endpoints == 0:
            internal += status.internal_local
            external += status.external_local
    return NoLocalCounts(internal, external)


class ProxierCollector(Collector):
    """Scrape-time metrics read from the proxier and from nft counters.

    Its two gauges are ordinary prometheus_client metric families
    (``collect``). The per-Service counters (``kproxy_service_new_connections_total``,
    ``kproxy_rate_limit_drops_total``, ``kproxy_limit_drops_total``), which can be tens of thousands of
    series, are not: ``exposition`` writes their text directly, one string
    per sample and no Metric or Sample object, for the HTTP server to append
    to the registry's (``kproxy.observe.exposition``).
    """

    def __init__(
        self,
        proxier: PolicySource,
        read_counters: CounterReader | None = None,
        families: Sequence[str] = IP_FAMILIES,
        wall_clock: Callable[[], float] = time.time,
        lock_timeout: float = 1.0,
        service_metrics: str = DEFAULT_SERVICE_METRICS,
        read_named: NamedCounterReader | None = None,
    ) -> None:
        if service_metrics not in SERVICE_METRICS:
            raise ValueError(f"service_metrics: {service_metrics!r} is not one of {', '.join(SERVICE_METRICS)}")
        self.proxier = proxier
        self.read_counters = read_counters
        self.read_named = read_named
        """With it, the settings other than ``all`` read only the counters they export (by name, from the proxier's
        ``counter_names``): at 10k Services, a hundred or two instead of a dump of every Service's."""
        self.families = tuple(families)
        self.lock_timeout = lock_timeout
        self.service_metrics = service_metrics
        self._state_lock = threading.Lock()
        self._render_lock = threading.Lock()
        self._last_counts: NoLocalCounts | None = None
        self._last_opted_in: frozenset[str] = frozenset()
        self._busy_at = float("-inf")
        """When the proxier's lock was last found held past ``lock_timeout``."""
        self._series: dict[tuple[Any, str], _Series | None] = {}
        self._classes: dict[tuple[Any, str], tuple[str, str] | None] = {}
        """(nft family, counter name) -> its kind and Service (``_class_of``), for the names the last sync programmed."""
        """(nft family, counter name) -> its parsed series (None: not a per-Service counter), for the names seen last."""
        self._last_queued = wall_clock()
        """Upstream sets the queued timestamp when its proxier starts; later, each time a change is queued."""

    def describe(self) -> Iterable[Metric]:
        """Names only, so registering never reads the proxier or nft."""
        return list(self._metric_families())

    def collect(self) -> Iterable[Metric]:
        no_local, queued = self._metric_families()
        counts = self._no_local_counts()
        if counts is not None:
            for family in self.families:
                no_local.add_metric(["internal", family], counts.internal)
                no_local.add_metric(["external", family], counts.external)
        for family in self.families:
            queued.add_metric([family], self._queued_timestamp())
        return [no_local, queued]

    def _metric_families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                labels=["traffic_policy", "ip_family"]),
            GaugeMetricFamily(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                labels=["ip_family"]),
        )

    def _no_local_counts(self) -> NoLocalCounts | None:
        try:
            report = self.proxier.local_policy_report(self.lock_timeout)
            if report is None:
                log.debug("a sync holds the proxier; serving the last no-local-endpoints counts")
                self._busy_at = time.monotonic()
                return self._last_counts
        except Exception as exc:  # a scrape must not fail
            log.warning("cannot compute no-local-endpoints counts: %s", exc)
            return self._last_counts
        counts = no_local_counts(report)
        with self._state_lock:
            self._last_counts = counts
        return counts

    def _queued_timestamp(self) -> float:
        pending = self.proxier.oldest_pending_wall
        with self._state_lock:
            if pending is not None and pending > self._last_queued:
                self._last_queued = pending
            return self._last_queued

    # -- the per-Service counters, as text ---------------------------------------------

    def exposition(self, openmetrics: bool = False) -> str:
        """The per-Service counter families as exposition text (Prometheus 0.0.4, or OpenMetrics without ``# EOF``).

        Both families are always declared (HELP and TYPE), with or without samples.
        Samples are sorted by their labels; two counter objects with the same
        labels are summed.
        """
        with self._render_lock:
            values = self._values()
        out: list[str] = []
        for name, samples in values.items():
            family = name if openmetrics else f"{name}_total"
            out.append(f"# HELP {family} {SERVICE_COUNTER_HELP[name]}\n# TYPE {family} counter\n")
            out.extend(f"{head}{samples[head]}\n" for head in sorted(samples))
        return "".join(out)

    def _ask(self, read: Callable[[float], T | None], what: str) -> T | None:
        """``read(timeout)`` from the proxier; None if a sync holds it, or if it fails (a scrape must not).

        If the proxier was found busy in this same scrape (its Local-policy
        report timed out a moment ago), it is not waited for a second time.
        """
        busy = time.monotonic() - self._busy_at < self.lock_timeout
        try:
            return read(0 if busy else self.lock_timeout)
        except Exception as exc:
            log.warning("cannot read %s: %s", what, exc)
            return None

    def _opted_in(self) -> frozenset[str]:
        """The Services annotated for per-Service series; the last known set while a sync holds the proxier."""
        found = self._ask(self.proxier.metrics_services, "which Services export per-Service metrics")
        with self._state_lock:
            if found is None:
                return self._last_opted_in
            self._last_opted_in = found
            return found

    def _values(self) -> dict[str, dict[str, int]]:
        """{metric name: {sample line head: packets}} of the counters this setting exports."""
        values: dict[str, dict[str, int]] = {name: {} for name in SERVICE_COUNTER_HELP}
        if self.read_counters is None:
            return values
        mode = self.service_metrics
        opted_in = self._opted_in() if mode == "annotated" else frozenset()
        wanted = self._wanted(mode, opted_in)
        try:
            raw = self._read(wanted)
        except Exception as exc:  # nft missing, table absent, timeouts: the scrape goes on
            log.warning("cannot read nft counters: %s", exc)
            return values
        known, seen = self._series, {}
        conns, drops, limits = values[COUNTER_KINDS["conns"]], values[COUNTER_KINDS["drops"]], values[LIMIT_DROPS]
        for key, (packets, _bytes) in raw.items():
            series = known.get(key, _UNKNOWN)
            if series is _UNKNOWN:
                series = _series_of(*key)
            seen[key] = series
            if series is None:
                continue
            if series.limit_head is not None:  # a limit's drops: exported whatever the setting
                limits[series.limit_head] = limits.get(series.limit_head, 0) + int(packets)
                if series.kind == "drops":
                    drops[series.head] = drops.get(series.head, 0) + int(packets)
            elif mode == "all" or (mode == "annotated" and series.service_key in opted_in):
                conns[series.head] = conns.get(series.head, 0) + int(packets)
        self._series = seen  # only the names of this read: a deleted Service's entry goes with it
        return values

    def _read(self, wanted: list[tuple[Any, str]] | None) -> Mapping[tuple[Any, str], tuple[int, int]]:
        """The ``wanted`` counters by name, or every counter with one dump (also when reading by name fails)."""
        assert self.read_counters is not None
        if wanted is not None and self.read_named is not None:
            try:
                return self.read_named(wanted)
            except Exception as exc:  # ENOBUFS, a timeout: the dump may still work
                log.warning("cannot read nft counters by name (%s); reading them all", exc)
        return self.read_counters()

    def _wanted(self, mode: str, opted_in: frozenset[str]) -> list[tuple[Any, str]] | None:
        """The counters ``mode`` exports, by name: every limit's drops, and the opted-in Services' new connections;
        None for a dump of them all (``all``, no named reader, the proxier busy, or too many wanted)."""
        if self.read_named is None or mode == "all":
            return None
        names = self._ask(self.proxier.counter_names, "the names of the programmed counters")
        if names is None:
            return None
        known, seen = self._classes, {}
        wanted = []
        for key in names:
            found = known.get(key, _UNKNOWN)
            if found is _UNKNOWN:
                found = _class_of(*key)
            seen[key] = found
            if found is not None and (found[0] in LIMIT_REASONS or (mode == "annotated" and found[1] in opted_in)):
                wanted.append(key)
        self._classes = seen  # the names the last sync programmed: a deleted Service's entry goes with it
        return wanted if len(wanted) * NAMED_READ_SHARE <= len(names) else None


_UNKNOWN: Any = object()


def _class_of(nft_family: Any, name: str) -> tuple[str, str] | None:
    """(kind, ``namespace/name``) of a per-Service counter, for choosing which to read; None where ``_series_of``
    gives None. Only the counters read get a ``_Series`` (its sample's text): at 30k Services, building one for
    every counter took most of the first scrape."""
    parsed = parse_counter_name(name) if nft_family in NFT_FAMILY_LABELS else None
    return None if parsed is None else (parsed.kind, parsed.service_key)


def _series_of(nft_family: Any, name: str) -> _Series | None:
    parsed = parse_counter_name(name)
    family = NFT_FAMILY_LABELS.get(nft_family)
    if parsed is None or family is None:
        return None
    labels = (f'namespace="{label_value(parsed.namespace)}",service="{label_value(parsed.service)}",'
              f'port="{label_value(parsed.port)}",ip_family="{family}"')
    reason = LIMIT_REASONS.get(parsed.kind)
    limit_head = f'{LIMIT_DROPS}_total{{{labels},reason="{reason}"}} ' if reason else None
    return _Series(parsed.kind, parsed.service_key, f"{COUNTER_KINDS[parsed.kind]}_total{{{labels}}} ", limit_head)
