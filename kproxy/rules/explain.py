"""``kproxy explain``: where a packet would go, read from the live tables, and why, from the model.

The kernel side answers *what*: which dispatch element matches the packet's
destination, which chain it jumps to, which endpoints that chain's rules can
DNAT to. The model side answers *why*: which Service port that is, the traffic
policy that applies, the topology that narrowed the endpoints, session
affinity, rate limits and masquerade. When the two disagree, the kernel is
behind the API server (a sync is pending) and the explanation says so.
This module is pure: the kernel is reached through a ``LiveTables`` protocol.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from kproxy.cluster.convert import Problem
from kproxy.cluster.model import Cluster, EndpointSlice, Service, ServicePort
from kproxy.nft.objects import Chain, Element, Family, chain_fingerprint
from kproxy.nft.statements import DnatTo, chains_it_reaches, render_bytes
from kproxy.rules.compiler import (
    PICK_CLASSES,
    NodeInfo,
    PortDecision,
    ProxyConfig,
    compile_service,
    decide_port,
    endpoints_map,
    port_label,
    shared_chains,
    slot,
)
from kproxy.rules.endpoints import PREFER_SAME_NODE, PREFER_SAME_ZONE, port_endpoints
from kproxy.rules.plan import SERVICE_CHAIN_PREFIXES


class LiveTables(Protocol):
    """What explain reads from the kernel."""

    def element(self, family: Family, set_name: str, key: str) -> Element | None: ...

    def set_keys(self, family: Family, set_name: str) -> list[str]: ...

    def chain_fingerprint(self, family: Family, chain: str) -> tuple[str, int] | None:
        """The digest of a chain's rules and their number, as kproxy wrote them; None if it does not exist."""
        ...


@dataclass(frozen=True, slots=True)
class Packet:
    source: str
    destination: str
    port: int
    protocol: str = "tcp"

    @property
    def family(self) -> Family:
        return "ip6" if ":" in self.destination else "ip"


def _in(address: str, cidrs: list[str]) -> str | None:
    ip = ipaddress.ip_address(address)
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr)
        if network.version == ip.version and ip in network:
            return cidr
    return None


def _find_service_port(cluster: Cluster, label: str) -> tuple[Service, ServicePort] | None:
    """The Service port named by an element comment ``ns/name:port`` (shortened for long names)."""
    key, _, name = label.partition(":")
    service = cluster.services.get(key)  # type: ignore[call-overload]
    if service is not None:
        for port in service.ports:
            if (port.name or str(port.port)) == name:
                return service, port
    for service in cluster.services.values():  # a comment shortened to nft's limit
        for port in service.ports:
            if port_label(service, port) == label:
                return service, port
    return None


def _skipped_lines(skipped: Sequence[Problem], key: str | None) -> list[str]:
    """What was skipped of the Service ``key``; with no key, every skipped Service (the one expected may be among them)."""
    if key is not None:
        return [f"skipped: {p}" for p in skipped if p.kind == "Service" and p.key == key]
    services = [p for p in skipped if p.kind == "Service" and not p.part]
    if not services:
        return []
    lines = ["skipped: these Services are not programmed; the one you expect may be among them:"]
    lines += [f"  {p.key}: {p.message} (reason={p.reason})" for p in services[:10]]
    if len(services) > 10:
        lines.append(f"  ... and {len(services) - 10} more")
    return lines


def _claimed_by(cluster: Cluster, packet: Packet) -> tuple[Service | None, bool]:
    """The Service with the packet's destination address in the model, and whether it also has the port."""
    found = None
    for key in sorted(cluster.services):
        service = cluster.services[key]
        if packet.destination in (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips):
            if any(p.port == packet.port and p.protocol == packet.protocol for p in service.ports):
                return service, True
            found = found or service
    return found, False


def explain(
    packet: Packet,
    cluster: Cluster,
    node: NodeInfo,
    config: ProxyConfig,
    live: LiveTables,
    skipped: Sequence[Problem] = (),
) -> list[str]:
    """Lines of explanation for one packet; ``skipped`` are the objects (or parts) kproxy could not program."""
    lines = _explain(packet, cluster, node, config, live)
    matched = next((line.split(" ", 2)[1] for line in lines if line.startswith("service: ")), None)
    if matched is None:
        claimed, with_port = _claimed_by(cluster, packet)
        if claimed is not None and with_port:
            lines.append(f"model: Service {claimed.key} has this address and port, but the kernel has no dispatch "
                         "element for it: it is quarantined (below) or a sync is pending")
        matched = claimed.key if claimed is not None else None
    return lines + _skipped_lines(skipped, matched)


def _explain(packet: Packet, cluster: Cluster, node: NodeInfo, config: ProxyConfig, live: LiveTables) -> list[str]:
    family = packet.family
    fam = 6 if family == "ip6" else 4
    out = [f"packet: {packet.protocol} {packet.source} -> {packet.destination}:{packet.port} ({family} kproxy)"]
    key = f"{packet.destination} . {packet.protocol} . {packet.port}"

    frontend = "ClusterIP, externalIP or load-balancer IP"
    element = live.element(family, "service-ips", key)
    set_name = "service-ips"
    if element is None and packet.destination in live.set_keys(family, "nodeport-ips"):
        element = live.element(family, "service-nodeports", f"{packet.protocol} . {packet.port}")
        set_name, frontend = "service-nodeports", "NodePort"
    if element is None:
        if packet.destination in live.set_keys(family, "cluster-ips"):
            out.append("kernel: the destination is a ClusterIP but no Service defines this port: rejected")
        else:
            out.append("kernel: no kproxy Service matches this destination; kproxy does not touch the packet")
        return out

    out.append(f"kernel: {set_name} {element.key} -> {element.value} ({element.comment})")
    found_port = _find_service_port(cluster, element.comment)
    if found_port is None:
        out.append(f"model: {element.comment} is not (any more) in the cluster model: a sync is pending")
        return out
    service, port = found_port
    out.append(
        f"service: {service.key} port {port.name or port.port} ({port.protocol} {port.port}"
        + (f", nodePort {port.node_port}" if port.node_port else "")
        + f"), type {service.type}"
    )
    if set_name == "service-ips" and packet.destination in service.load_balancer_ips and service.load_balancer_source_ranges:
        allowed = _in(packet.source, list(service.load_balancer_source_ranges))
        out.append(
            f"firewall: loadBalancerSourceRanges {', '.join(service.load_balancer_source_ranges)}: "
            + (f"source allowed by {allowed}" if allowed else "source NOT allowed: the packet is dropped")
        )
        if not allowed:
            return out

    slices = [s for s in cluster.slices.values() if s.service_key == service.key]
    decision = decide_port(service, port, slices, family, node, config)
    config, decision = _as_programmed(config, decision, element, service, port, slices, family, node)
    cidrs = [c for c in config.cluster_cidrs if (":" in c) == (fam == 6)]
    from_pod = _in(packet.source, cidrs)
    from_node = packet.source in node.addresses
    external = set_name == "service-nodeports" or packet.destination not in service.cluster_ips
    chain: str | None
    if external:
        expected = f"goto {decision.external_chain}"
        frontend = "NodePort" if set_name == "service-nodeports" else (
            "load-balancer IP" if packet.destination in service.load_balancer_ips else "externalIP")
        if service.external_policy_local and (from_pod or from_node):
            why = f"source is in --cluster-cidr {from_pod}" if from_pod else "source is this node"
            out.append(f"policy: {frontend}, externalTrafficPolicy Local, but {why}: short-circuited to the cluster endpoints"
                       + (", masqueraded" if from_node else ", client IP kept"))
            chain = decision.short_circuit
        elif service.external_policy_local:
            out.append(f"policy: {frontend}, externalTrafficPolicy Local: this node's endpoints only, client IP kept")
            chain = decision.external_local
        else:
            out.append(f"policy: {frontend}, externalTrafficPolicy Cluster: any endpoint, source masqueraded")
            chain = decision.external_cluster
    else:
        expected = f"goto {decision.internal}"
        if service.internal_policy_local:
            out.append("policy: ClusterIP, internalTrafficPolicy Local: this node's endpoints only")
        else:
            out.append("policy: ClusterIP, internalTrafficPolicy Cluster: cluster endpoints")
        if config.masquerade_all:
            out.append("masquerade: yes (--masquerade-all)")
        elif cidrs:
            out.append(f"masquerade: {'no' if from_pod else 'yes'} (source {'inside' if from_pod else 'outside'} "
                       f"--cluster-cidr {', '.join(cidrs)})")
        else:
            out.append("masquerade: no (--cluster-cidr is not set)")
        chain = decision.internal
    if element.value != expected:
        out.append(f"note: the model sends this frontend to {expected.split()[-1]}; the kernel is behind (a sync is pending)")

    selection = decision.selection
    use_local = chain is not None and chain == decision.local_chain
    chosen = selection.local if use_local else selection.cluster
    if not use_local:
        if selection.topology == PREFER_SAME_ZONE:
            out.append(f"topology: PreferSameZone: endpoints hinted for zone {node.zone!r} only")
        elif selection.topology == PREFER_SAME_NODE:
            out.append(f"topology: PreferSameNode: endpoints hinted for node {node.name!r} only")
        else:
            out.append("topology: none (no hints, or not every ready endpoint is hinted): all endpoints")
    if chosen and not any(pe.endpoint.ready for pe in chosen):
        out.append("endpoints: none ready; using serving-and-terminating endpoints (fallback)")
    if chain is None:
        out.append(f"model: {service.key} has no chain for this traffic: a sync is pending")
        return out

    compiled = _compiled_chain(service, slices, family, node, config, chain)
    live_fingerprint = live.chain_fingerprint(family, chain)
    if live_fingerprint is None or compiled is None:
        out.append(f"kernel: chain {chain} is missing: a sync is pending")
        return out
    if live_fingerprint != chain_fingerprint(compiled, family):
        out.append(f"kernel: chain {chain} differs from what the model compiles: the kernel is behind (a sync is pending)")
    pick = next((name for rule in compiled.rules for name in chains_it_reaches(rule) if name.startswith("pick-")), None)
    if pick is not None:  # the endpoints are elements: read them from the kernel
        live_targets = _slot_targets(live, family, f"{packet.destination} . {packet.protocol} . {packet.port}",
                                     pick.startswith("pick-local-"))
    else:
        live_targets = sorted({(s.address, s.port) for rule in compiled.rules for s in rule if isinstance(s, DnatTo)})
    model_targets = sorted({(pe.address, pe.port) for pe in chosen})
    if not live_targets:
        out.append(f"kernel: chain {chain}: no endpoint; the packet goes on untranslated")
        out += _unserved(live, family, packet, set_name == "service-nodeports", cluster, element.comment, node)
        if model_targets:
            out.append(f"note: the model selects {len(model_targets)} endpoint(s); the kernel is behind (a sync is pending)")
        return out
    out.append(f"kernel: chain {chain}: {len(live_targets)} endpoint(s), each with probability 1/{max(1, len(live_targets))}")
    for address, number in live_targets:
        pe = next((p for p in chosen if (p.address, p.port) == (address, number)), None)
        if pe is None:
            out.append(f"  {address}:{number}  (not in the model: a sync is pending)")
            continue
        ep = pe.endpoint
        state = "ready" if ep.ready else "serving, terminating" if ep.serving else "not ready"
        out.append(f"  {address}:{number}  node {ep.node_name or '?'} zone {ep.zone or '?'} {state}")
    if live_targets != model_targets:
        out.append(f"note: the model selects {len(model_targets)} endpoint(s); the kernel is behind (a sync is pending)")
    if service.affinity_timeout:
        out.append(f"affinity: ClientIP, {service.affinity_timeout}s since the last new connection; "
                   "a client that connected recently goes back to the same endpoint")
    else:
        out.append("affinity: none")
    return out + limit_lines(service, packet.source)


def _as_programmed(config: ProxyConfig, decision: PortDecision, element: Element, service: Service, port: ServicePort,
                   slices: list[EndpointSlice], family: Family, node: NodeInfo) -> tuple[ProxyConfig, PortDecision]:
    """The configuration and decision as the daemon applied them to this port, as far as the kernel shows.

    Whether a Service counts its new connections (and so has chains of its
    own) follows ``--service-metrics``, a flag of the daemon that its config
    file does not hold: the dispatch element says which layout the daemon
    chose, a chain of the port's own or a shared one.
    """
    own = element.value.split()[-1].startswith(SERVICE_CHAIN_PREFIXES)
    if own == (not decision.shared):
        return config, decision
    adjusted = replace(config, service_metrics="all" if own else "none")
    return adjusted, decide_port(service, port, slices, family, node, adjusted)


def limit_lines(service: Service, source: str) -> list[str]:
    """The Service's limits and whether they apply to this client (``kproxy.io/limit-allowlist``)."""
    allowed = _in(source, list(service.limit_allowlist)) if service.limited else None
    why = f" (not for this client: allowlisted by {allowed})" if allowed else ""
    out = []
    if service.rate_limit:
        limit = service.rate_limit
        out.append(f"rate limit: {limit.rate}/{limit.unit} new connections per client (burst {limit.burst or 5}); "
                   f"connections over it are dropped{why}")
    else:
        out.append("rate limit: none")
    if service.rate_limit_total:
        limit = service.rate_limit_total
        out.append(f"total rate limit: {limit.rate}/{limit.unit} new connections from all clients together "
                   f"(burst {limit.burst or 5}); connections over it are dropped{why}")
    if service.connection_limit is not None:
        out.append(f"connection limit: {service.connection_limit} concurrent connections per client (while conntrack "
                   f"holds them); new ones over it are dropped{why}")
    if service.bandwidth_limit:
        bandwidth = service.bandwidth_limit
        burst = f", burst {render_bytes(bandwidth.burst)}" if bandwidth.burst else ""
        out.append(f"bandwidth limit: {render_bytes(bandwidth.rate)}/second per client in each direction{burst}; "
                   f"packets over it are dropped (policing, not queueing){why}")
    if service.limited and service.limit_allowlist:
        out.append(f"limit allowlist: {', '.join(service.limit_allowlist)}: "
                   + (f"source in {allowed}, exempt from every limit" if allowed else "source not in it, limited"))
    return out


def _unserved(live: LiveTables, family: Family, packet: Packet, nodeport: bool, cluster: Cluster, label: str,
              node: NodeInfo) -> list[str]:
    """What endpoints-check does with a packet that got no endpoint (the ``no-endpoint-*`` sets), and why."""
    key = f"{packet.protocol} . {packet.port}" if nodeport else f"{packet.destination} . {packet.protocol} . {packet.port}"
    prefix = "no-endpoint-nodeport-" if nodeport else "no-endpoint-"
    for verdict, what in (("drop", "dropped"), ("reject", "rejected (TCP reset / ICMP unreachable)")):
        found = live.element(family, prefix + verdict, key)
        if found is not None:
            return [f"kernel: {prefix}{verdict} has {found.key} ({found.comment}): {what}",
                    *_why_no_endpoints(cluster, label, node, family)]
    return ["kernel: no no-endpoint element for this frontend: a sync is pending"]


def _compiled_chain(service: Service, slices: list[EndpointSlice], family: Family, node: NodeInfo, config: ProxyConfig,
                    name: str) -> Chain | None:
    """The chain ``name`` as the compiler builds it for this Service now (or for every table: a shared chain)."""
    shared = next((c for c in shared_chains(family, config) if c.name == name), None)
    if shared is not None:
        return shared
    rules = compile_service(service, slices, family, node, config)
    return next((c for c in rules.chains if c.name == name), None) if rules is not None else None


def _slot_targets(live: LiveTables, family: Family, frontend: str, local: bool) -> list[tuple[str, int]]:
    """The endpoints in the ``endpoints-C`` maps for one frontend: slots 1, 2, ... until the first empty one."""
    targets = []
    index = 1
    while index <= PICK_CLASSES[-1] and (
        element := live.element(family, endpoints_map(index), f"{frontend} . {slot(index, local)}")
    ) is not None:
        address, _, number = element.value.rpartition(" . ")
        targets.append((address, int(number)))
        index += 1
    return sorted(set(targets))


def _why_no_endpoints(cluster: Cluster, label: str, node: NodeInfo, family: Family) -> list[str]:
    found = _find_service_port(cluster, label)
    if found is None:
        return []
    service, port = found
    slices = [s for s in cluster.slices.values() if s.service_key == service.key]
    decision = decide_port(service, port, slices, family, node, ProxyConfig())  # its endpoints only
    if not decision.selection.has_any:
        count = len(port_endpoints(port, slices, 6 if family == "ip6" else 4))
        return [f"why: {service.key} has {count} endpoint(s), none ready or serving"]
    return [f"why: {service.key} uses a Local policy and this node ({node.name}) has no endpoint of it"]
