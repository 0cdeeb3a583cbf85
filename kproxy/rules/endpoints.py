"""Which endpoints this node uses for each Service port.

This follows upstream kube-proxy's ``pkg/proxy/topology.go`` and
``endpointslicecache.go`` exactly:

* ready, serving and terminating conditions, with the fallback to
  serving-and-terminating endpoints when nothing is ready;
* topology from hints only (``forNodes`` for PreferSameNode, ``forZones`` for
  PreferSameZone/PreferClose), all-or-nothing: one ready endpoint without a
  hint disables it;
* Local traffic policies use this node's endpoints and ignore topology;
* an endpoint listed in two slices is kept once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kproxy.cluster.model import Endpoint, EndpointSlice, IPFamily, Service, ServicePort
from kproxy.fastinit import quick_init

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


@quick_init
@dataclass(frozen=True, slots=True)
class PortEndpoint:
    """An endpoint of one Service port: where the packet is sent, and its state."""

    address: str
    port: int
    endpoint: Endpoint

    def is_local(self, node_name: str) -> bool:
        return self.endpoint.node_name == node_name


@dataclass(frozen=True, slots=True)
class Selection:
    """The endpoints one Service port uses on this node."""

    cluster: tuple[PortEndpoint, ...]
    """For traffic under the Cluster policy (topology applied)."""
    local: tuple[PortEndpoint, ...]
    """For traffic under a Local policy: this node's endpoints."""
    has_any: bool
    """Whether any usable endpoint exists anywhere in the cluster."""
    topology: str
    """"", PreferSameZone or PreferSameNode: how ``cluster`` was narrowed."""


def _sort_key(ep: PortEndpoint) -> tuple[str, int]:
    """Address text, then port: any fixed order keeps the output deterministic, and this one is cheap."""
    return (ep.address, ep.port)


def port_endpoints(port: ServicePort, slices: Iterable[EndpointSlice], family: IPFamily) -> list[PortEndpoint]:
    """All endpoints of one Service port and family, each address:port once.

    Slices are read in name order. An endpoint repeated across slices keeps its
    first appearance, unless a later one is ready and the first is not.
    """
    chosen: dict[tuple[str, int], PortEndpoint] = {}
    for eps in sorted(slices, key=lambda s: s.name):
        if eps.family != family:
            continue
        number = next((p.port for p in eps.ports if p.name == port.name and p.protocol == port.protocol), None)
        if number is None:
            continue
        for ep in eps.endpoints:
            key = (ep.address, number)
            existing = chosen.get(key)
            if existing is None or (ep.ready and not existing.endpoint.ready):
                chosen[key] = PortEndpoint(ep.address, number, ep)
    return sorted(chosen.values(), key=_sort_key)


def topology_mode(endpoints: Iterable[PortEndpoint], node_name: str, zone: str) -> str:
    """Upstream's topologyModeFromHints."""
    has_ready = False
    for_node = for_zone = False
    all_node_hints = all_zone_hints = True
    for pe in endpoints:
        ep = pe.endpoint
        if not ep.ready:
            continue
        has_ready = True
        if not ep.hint_nodes:
            all_node_hints = False
        elif node_name in ep.hint_nodes:
            for_node = True
        if not ep.hint_zones:
            all_zone_hints = False
        elif zone in ep.hint_zones:
            for_zone = True
    if not has_ready:
        return ""
    if all_node_hints and for_node:
        return PREFER_SAME_NODE
    if all_zone_hints and for_zone:
        return PREFER_SAME_ZONE
    return ""


def _available(ep: Endpoint, mode: str, node_name: str, zone: str) -> bool:
    if mode == PREFER_SAME_NODE:
        return node_name in ep.hint_nodes
    if mode == PREFER_SAME_ZONE:
        return zone in ep.hint_zones
    return True


def select(service: Service, endpoints: list[PortEndpoint], node_name: str, zone: str) -> Selection:
    """Upstream's CategorizeEndpoints for one Service port."""
    cluster: tuple[PortEndpoint, ...] = ()
    local: tuple[PortEndpoint, ...] = ()
    has_any = False
    mode = ""
    if not endpoints:
        return Selection((), (), False, "")
    if service.uses_cluster_endpoints:
        mode = topology_mode(endpoints, node_name, zone)
        if mode:
            cluster = tuple(pe for pe in endpoints if pe.endpoint.ready and _available(pe.endpoint, mode, node_name, zone))
        else:
            cluster = tuple(pe for pe in endpoints if pe.endpoint.ready)
        if not cluster:
            cluster = tuple(pe for pe in endpoints if pe.endpoint.serving and pe.endpoint.terminating)
        has_any = bool(cluster)
    if service.uses_local_endpoints:
        local_ready = False
        local_terminating = False
        for pe in endpoints:
            ep = pe.endpoint
            if ep.ready:
                has_any = True
                local_ready = local_ready or pe.is_local(node_name)
            elif ep.serving and ep.terminating:
                has_any = True
                local_terminating = local_terminating or pe.is_local(node_name)
        if local_ready:
            local = tuple(pe for pe in endpoints if pe.is_local(node_name) and pe.endpoint.ready)
        elif local_terminating:
            local = tuple(
                pe
                for pe in endpoints
                if pe.is_local(node_name) and pe.endpoint.serving and pe.endpoint.terminating
            )
    return Selection(cluster, local, has_any, mode)


@dataclass(frozen=True, slots=True)
class LocalPolicyStatus:
    """A Service with a Local traffic policy, as this node serves it."""

    namespace: str
    name: str
    internal_local: bool
    external_local: bool
    local_endpoints: int
    """Distinct local endpoint addresses in use (ready ones, or serving-terminating as a fallback), in the family
    that has the most (a dual-stack pod counts once)."""
    local_ready_endpoints: int
    """Distinct local endpoint addresses that are ready (what health checks report, as upstream), per family likewise."""
    has_endpoints: bool
    """Whether it has usable endpoints anywhere."""
    health_check_node_port: int | None


def local_policy_status(service: Service, slices: Iterable[EndpointSlice], node_name: str, zone: str) -> LocalPolicyStatus:
    """How this node serves a Service with a Local traffic policy (for health checks and metrics)."""
    slices = tuple(slices)
    # Counted per family, as upstream's health servers (one per family) count: a dual-stack pod
    # has an address in each family and is one endpoint, not two.
    local: dict[int, set[str]] = {4: set(), 6: set()}
    ready: dict[int, set[str]] = {4: set(), 6: set()}
    has_any = False
    for port in service.ports:
        for family in (4, 6):
            selection = select(service, port_endpoints(port, slices, family), node_name, zone)
            local[family] |= {pe.address for pe in selection.local}
            ready[family] |= {pe.address for pe in selection.local if pe.endpoint.ready}
            has_any = has_any or selection.has_any
    return LocalPolicyStatus(
        namespace=service.namespace,
        name=service.name,
        internal_local=service.internal_policy_local,
        external_local=service.external_policy_local,
        local_endpoints=max(len(addresses) for addresses in local.values()),
        local_ready_endpoints=max(len(addresses) for addresses in ready.values()),
        has_endpoints=has_any,
        health_check_node_port=service.health_check_node_port,
    )
