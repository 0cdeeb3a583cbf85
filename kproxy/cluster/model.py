"""The typed model of the cluster objects kproxy cares about.

Everything downstream of ``kproxy.cluster.convert`` (endpoint selection, the compiler,
the change tracker) works on these frozen values, never on raw manifests. Every
string here has been validated when it was converted: names are DNS labels,
addresses are canonical IP strings, ports are in range. That is what lets the
compiler put them into nft text without escaping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NewType

from kproxy.fastinit import quick_init

Protocol = Literal["tcp", "udp", "sctp"]
"""Transport protocol, spelled as nft spells it."""

IPFamily = Literal[4, 6]

ServiceKey = NewType("ServiceKey", str)
"""``namespace/name`` of a Service."""

SliceKey = NewType("SliceKey", str)
"""``namespace/name`` of an EndpointSlice."""

ZONE_LABEL = "topology.kubernetes.io/zone"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
KPROXY_ANNOTATION_PREFIX = "kproxy.io/"
"""Every annotation kproxy reads starts with it (a Service without one is converted without looking further)."""
RATE_LIMIT_ANNOTATION = "kproxy.io/rate-limit"
RATE_LIMIT_BURST_ANNOTATION = "kproxy.io/rate-limit-burst"
RATE_LIMIT_TOTAL_ANNOTATION = "kproxy.io/rate-limit-total"
RATE_LIMIT_TOTAL_BURST_ANNOTATION = "kproxy.io/rate-limit-total-burst"
CONNECTION_LIMIT_ANNOTATION = "kproxy.io/limit-connections"
BANDWIDTH_LIMIT_ANNOTATION = "kproxy.io/bandwidth-limit"
BANDWIDTH_LIMIT_BURST_ANNOTATION = "kproxy.io/bandwidth-limit-burst"
LIMIT_ALLOWLIST_ANNOTATION = "kproxy.io/limit-allowlist"
METRICS_ANNOTATION = "kproxy.io/metrics"
"""``"true"``: the Service exports per-Service series (with ``--service-metrics=annotated``, the default)."""
SERVICE_METRICS: tuple[str, ...] = ("none", "annotated", "all")
"""``--service-metrics``: which Services count their new connections and export
``kproxy_service_new_connections_total``.

``annotated`` (the default): those annotated ``kproxy.io/metrics: "true"``;
``all``: every Service; ``none``: no Service. ``kproxy_rate_limit_drops_total``
and ``kproxy_limit_drops_total`` are exported for every Service with a limit,
whatever the setting (the limit's annotation opts it in). Here, with the
model, because the compiler reads it too: only the Services that export the
series count (a counter is a rule, in a chain of the port's own).
"""
DEFAULT_SERVICE_METRICS = "annotated"
DEFAULT_AFFINITY_TIMEOUT = 10800


@dataclass(frozen=True, slots=True)
class RateLimit:
    """New connections allowed per client source IP, per Service port."""

    rate: int
    """How many new connections per ``unit``."""
    unit: Literal["second", "minute"]
    burst: int | None = None
    """Extra connections allowed in a burst; nft's default (5) when None."""


@dataclass(frozen=True, slots=True)
class BandwidthLimit:
    """Bytes per second allowed per client and direction, per Service port (policing: the excess is dropped)."""

    rate: int
    """Bytes per second."""
    burst: int | None = None
    """Bytes allowed above the rate in a burst; none when None (the bucket still holds one second of rate)."""


@quick_init
@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of ``spec.ports``."""

    name: str
    """The port name; empty for a Service with a single unnamed port."""
    protocol: Protocol
    port: int
    node_port: int | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class Service:
    """A Service kproxy programs (never headless, never owned by another proxy)."""

    namespace: str
    name: str
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"]
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    """``status.loadBalancer.ingress[].ip``."""
    load_balancer_source_ranges: tuple[str, ...] = ()
    """Canonical CIDRs; empty means every source is allowed."""
    affinity_timeout: int | None = None
    """ClientIP affinity timeout in seconds; None when affinity is off."""
    external_policy_local: bool = False
    """``externalTrafficPolicy: Local`` on an externally reachable Service."""
    internal_policy_local: bool = False
    traffic_distribution: str | None = None
    health_check_node_port: int | None = None
    rate_limit: RateLimit | None = None
    """``kproxy.io/rate-limit``: new connections per client."""
    rate_limit_total: RateLimit | None = None
    """``kproxy.io/rate-limit-total``: new connections from all clients together."""
    connection_limit: int | None = None
    """``kproxy.io/limit-connections``: concurrent connections per client."""
    bandwidth_limit: BandwidthLimit | None = None
    """``kproxy.io/bandwidth-limit``: bytes per second per client, in each direction."""
    limit_allowlist: tuple[str, ...] = ()
    """``kproxy.io/limit-allowlist``: canonical CIDRs of clients exempt from every limit above."""
    metrics: bool = False
    """Annotated ``kproxy.io/metrics: "true"``: per-Service series are exported for it."""

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(f"{self.namespace}/{self.name}")

    @property
    def limited(self) -> bool:
        """Whether any limit applies to the Service's clients (its drop counters are always exported)."""
        return (self.rate_limit is not None or self.rate_limit_total is not None or self.connection_limit is not None
                or self.bandwidth_limit is not None)

    @property
    def externally_accessible(self) -> bool:
        """Upstream's ExternallyAccessible: NodePort, LoadBalancer or externalIPs."""
        return self.type in ("NodePort", "LoadBalancer") or bool(self.external_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        """Upstream's UsesClusterEndpoints: an externally accessible Service always needs them,
        even under ``externalTrafficPolicy: Local``, for traffic from pods and the node (short-circuit)."""
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (
            self.externally_accessible and self.external_policy_local
        )


@quick_init
@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a slice (upstream uses only ``addresses[0]``)."""

    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    hint_zones: frozenset[str] = frozenset()
    hint_nodes: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    protocol: Protocol
    port: int


@quick_init
@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    family: IPFamily
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]
    trigger_time: str | None = None
    """``endpoints.kubernetes.io/last-change-trigger-time``, as written."""

    @property
    def key(self) -> SliceKey:
        return SliceKey(f"{self.namespace}/{self.name}")

    @property
    def service_key(self) -> ServiceKey:
        return ServiceKey(f"{self.namespace}/{self.service_name}")


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    internal_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    being_deleted: bool = False
    """Deletion timestamp set, or tainted ToBeDeletedByClusterAutoscaler."""
    pod_cidrs: tuple[str, ...] = ()
    """``spec.podCIDRs`` (else ``spec.podCIDR``), canonical: the pod ranges the node was given, if any."""

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")

    def addresses(self, family: IPFamily) -> tuple[str, ...]:
        """The node's primary addresses of one family, internal ones first."""
        sep = ":" if family == 6 else "."
        return tuple(a for a in self.internal_ips + self.external_ips if sep in a)


@dataclass(frozen=True, slots=True)
class ServiceCIDR:
    """A ``networking.k8s.io/v1`` ServiceCIDR: ranges the API server allocates ClusterIPs from."""

    name: str
    cidrs: tuple[str, ...]
    """``spec.cidrs``, canonical."""


def union_of_cidrs(cidrs: Iterable[ServiceCIDR]) -> tuple[str, ...]:
    """Every range of every ServiceCIDR, once, sorted (deterministic output)."""
    return tuple(sorted({c for item in cidrs for c in item.cidrs}))


@dataclass(frozen=True, slots=True)
class Cluster:
    """What the proxy knows: Services and slices by key, its own Node, and the ServiceCIDRs."""

    services: Mapping[ServiceKey, Service]
    slices: Mapping[SliceKey, EndpointSlice]
    node: Node | None = None
    service_cidrs: tuple[str, ...] = ()
    """The union of every ``networking.k8s.io/v1`` ServiceCIDR's ``spec.cidrs``, canonical and sorted."""

    def slices_by_service(self) -> dict[ServiceKey, list[EndpointSlice]]:
        grouped: dict[ServiceKey, list[EndpointSlice]] = {}
        for key in sorted(self.slices):
            s = self.slices[key]
            grouped.setdefault(s.service_key, []).append(s)
        return grouped
