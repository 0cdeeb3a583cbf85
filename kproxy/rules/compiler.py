"""The compiler: (cluster model, node, config) -> nftables ruleset. Pure.

Layout (see rules/README.md for the packet path):

* The skeleton (rules/kproxy.nft) holds a fixed number of sets and maps. Every
  Service contributes *elements* to them, never sets of its own, and never an
  inline anonymous set or map: those load in quadratic time.
* A Service port that counts its new connections, has a limit on them or
  affinity gets up to three plain chains of its own: ``svc-`` (cluster
  endpoints), ``local-`` (this node's endpoints) and ``ext-`` (NodePort,
  externalIPs and load-balancer IPs). Every other port is elements only: its
  dispatch goes straight to the shared chains (``PortDecision.shared``), so
  the number of chains, which the kernel walks at every commit, does not
  grow with the cluster.
* Endpoints are data, not rules. Endpoint ``k`` (1-based) of a port is an
  element ``frontend . protocol . port . slot(k)`` of an ``endpoints-C`` map,
  one per frontend (ClusterIP, external IP, NodePort address), and the
  frontend is in the ``class-C`` set of the smallest size class ``C`` that
  holds its endpoints. The Service chain ends in ``goto pick-by-class``,
  which goes to ``pick-C`` by that set. The shared pick chains try slots
  ``C`` down to 1 with ``numgen random mod k offset slot(k)``: the lookup
  hits with probability 1/k when slot k is filled and misses (falls
  through) when it is empty, so the choice is uniform over the filled
  slots. A frontend in no class (no endpoint) goes on untranslated, and the
  ``no-endpoint-*`` sets say whether ``endpoints-check`` rejects or drops
  it. So any change of endpoints, the first and the last included, changes
  elements without verdicts only, which the kernel commits without
  checking the table. Services with ClientIP affinity, or more endpoints
  than the largest class, get a cascade of ``numgen random mod (N-i) 0``
  rules in their own chain instead.
* Nothing here reads a file, the clock or the kernel; the same input always
  gives the same ruleset.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from kproxy.cluster.model import (
    DEFAULT_SERVICE_METRICS,
    Cluster,
    EndpointSlice,
    IPFamily,
    Node,
    Service,
    ServiceKey,
    ServicePort,
)
from kproxy.cluster.validate import collapse, spell, spell_network
from kproxy.memory import gc_paused
from kproxy.nft.objects import Chain, Element, Family, Ruleset, ServiceRules, Table, fit_comment
from kproxy.nft.statements import (
    Const,
    Counter,
    DnatFromMap,
    DnatTo,
    FromLocal,
    Key,
    Limit,
    Lookup,
    MarkXor,
    MatchPrefix,
    MatchProtocol,
    NewConnection,
    Numgen,
    NumgenIs,
    Rule,
    SetUpdate,
    Verdict,
    VerdictMap,
)
from kproxy.rules.assembly import Assembly
from kproxy.rules.endpoints import PortEndpoint, Selection, port_endpoints, select
from kproxy.rules.skeleton import skeleton_table

FAMILIES: dict[Family, IPFamily] = {"ip": 4, "ip6": 6}
_PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
Unserved = Literal["reject", "drop"]
"""What becomes of a packet to a Service port that gets no endpoint here (``no-endpoint-*`` sets)."""
DROP_RULE: Rule = (Verdict("drop"),)
DISPATCH_KEY: Key = ("daddr", "l4proto", "dport")
"""Where a packet is going: what dispatch and the endpoint maps are keyed by."""
AFFINITY_KEY: Key = ("saddr", "daddr", "l4proto", "dport", "mark")
PICK_CLASSES = (4, 8, 16, 32, 64, 128, 256)
"""Sizes of the shared pick chains; a port with more endpoints gets a per-Service cascade."""
_LOCAL_SLOT = 0x8000
"""Set in the slot numbers of the local-endpoint pick chains (``pick-local-``)."""
PICK_BY_CLASS = {False: "pick-by-class", True: "pick-local-by-class"}
"""Where a Service chain that picks through the maps goes: on to the pick chain of the frontend's class."""
EXTERNAL_TO_CLUSTER, EXTERNAL_TO_LOCAL = "external-to-cluster", "external-to-local"
"""The shared external chains of the Service ports that need no chain of their own (externalTrafficPolicy
Cluster and Local): what an ``ext-`` chain does, going on to the shared pick chains."""
ALLOW_KEY: Key = ("daddr", "l4proto", "dport", "saddr")
"""``kproxy.io/limit-allowlist`` in the nat chains: frontend . protocol . port . client (``limit-allow``)."""
ORIGINAL_KEY: Key = ("original-daddr", "l4proto", "original-dport")
"""A connection's frontend, read from conntrack: the same for every packet of it, in both directions."""
ORIGINAL_ALLOW_KEY: Key = (*ORIGINAL_KEY, "original-saddr")
"""``kproxy.io/limit-allowlist`` in the bandwidth chains."""
LIMIT_COUNTERS = {"rate_limit": "drops", "rate_limit_total": "totaldrops", "connections": "conndrops",
                  "bandwidth": "bwdrops"}
"""The drop counter of each limit (``PREFIX-SUFFIX``), by the reason its metric names."""
BANDWIDTH_HOOKS = {"bandwidth-prerouting": "type filter hook prerouting priority dstnat - 5; policy accept;",
                   "bandwidth-output": "type filter hook output priority -105; policy accept;"}
"""The base chains that police every packet of Services with a bandwidth limit, while some Service has one."""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The options that shape the ruleset (kube-proxy's flags of the same names)."""

    cluster_cidrs: tuple[str, ...] = ()
    """--cluster-cidr: traffic to a ClusterIP from outside these is masqueraded."""
    nodeport_addresses: tuple[str, ...] = ()
    """--nodeport-addresses as CIDRs; empty means the node's primary IPs."""
    masquerade_all: bool = False
    """--masquerade-all: masquerade all traffic to ClusterIPs."""
    service_metrics: str = DEFAULT_SERVICE_METRICS
    """--service-metrics: whose new connections are counted (a ``conns-`` counter per port): the Services
    annotated ``kproxy.io/metrics: "true"``, ``all`` or ``none``. A counter is a rule, so it needs a chain
    of the port's own; a port without one dispatches straight to the shared chains."""

    def counts(self, service: Service) -> bool:
        """Whether the Service's ports count their new connections (the counters ``/metrics`` exports)."""
        return self.service_metrics == "all" or (self.service_metrics == "annotated" and service.metrics)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the compiler needs to know about the node it compiles for."""

    name: str
    zone: str = ""
    primary_ips: tuple[str, ...] = ()
    """At most one per family: the default NodePort addresses."""
    addresses: tuple[str, ...] = ()
    """Every address of the node: its interfaces' (global) addresses where they are known, else
    the Node object's. Matched against --nodeport-addresses CIDRs."""


def node_info(name: str, node: Node | None, interface_addresses: tuple[str, ...] | None = None) -> NodeInfo:
    """NodeInfo from the Node object: primary = first InternalIP per family, else ExternalIP.

    ``interface_addresses`` are the addresses of this network namespace (None
    when compiling for a node elsewhere, as ``--dry-run`` does). Without a Node
    object (or one without addresses), NodePorts answer on every one of them.
    """
    if node is None or not (node.internal_ips + node.external_ips):
        local = interface_addresses or ()
        return NodeInfo(name, node.zone if node else "", local, local)
    node_ips = node.internal_ips + node.external_ips
    primary: list[str] = []
    for separator in (".", ":"):
        candidates = [a for a in node.internal_ips if separator in a] or [a for a in node.external_ips if separator in a]
        if candidates:
            primary.append(candidates[0])
    addresses = interface_addresses if interface_addresses is not None else node_ips
    return NodeInfo(node.name, node.zone, tuple(primary), addresses)


def _family_of(address: str) -> IPFamily:
    return 6 if ":" in address else 4


def _cidrs_of(cidrs: Iterable[str], fam: IPFamily) -> list[str]:
    """The CIDRs (or addresses) of one family, in their order."""
    return [c for c in cidrs if _family_of(c.split("/")[0]) == fam]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8].upper()


def port_label(service: Service, port: ServicePort) -> str:
    """``ns/name:port`` as used in comments: the port's name, or its number (shortened to nft's limit)."""
    return fit_comment(f"{service.namespace}/{service.name}:{port.name or port.port}")


def chain_suffix(service: Service, port: ServicePort) -> str:
    """``HASH8-ns/name/tcp/http``: unique per Service port, and readable."""
    label = port.name or str(port.port)
    path = f"{service.namespace}/{service.name}/{port.protocol}/{label}"
    return f"{_hash(path)}-{path}"


def chain_name(kind: str, service: Service, port: ServicePort) -> str:
    """``svc-HASH8-ns/name/tcp/http`` (kinds: svc, local, ext)."""
    return f"{kind}-{chain_suffix(service, port)}"


def _interval(cidr: str) -> str:
    """A CIDR as an interval-set element: a full-length prefix is written (and read back) as the address."""
    network = ipaddress.ip_network(cidr)
    return spell(network.network_address) if network.prefixlen == network.max_prefixlen else spell_network(network)


def endpoint_id(pe: PortEndpoint) -> int:
    """A stable, non-zero 32-bit id of an endpoint, for the affinity set."""
    digest = hashlib.sha256(f"{pe.address}:{pe.port}".encode()).digest()
    return int.from_bytes(digest[:4], "big") or 1


def pick_class(count: int) -> int | None:
    """The smallest pick chain size that holds ``count`` endpoints; None if none does."""
    return next((size for size in PICK_CLASSES if size >= count), None)


def slot(index: int, local: bool) -> int:
    """The ``numgen`` value that selects endpoint ``index`` (1-based) in the pick chains."""
    return (index << 16) | (_LOCAL_SLOT if local else 0)


def pick_chain_name(size: int, local: bool) -> str:
    return f"pick-{'local-' if local else ''}{size}"


def endpoints_map(index: int) -> str:
    """The map that holds slot ``index``: ``endpoints-C`` for the pick chain size C that tries it."""
    return _ENDPOINTS_MAPS[index]


_ENDPOINTS_MAPS = ("",) + tuple(f"endpoints-{pick_class(k)}" for k in range(1, PICK_CLASSES[-1] + 1))
_SLOTS = {local: ("",) + tuple(str(slot(k, local)) for k in range(1, PICK_CLASSES[-1] + 1)) for local in (False, True)}


def class_set(size: int, local: bool) -> str:
    """The set of frontends whose (local) endpoints fill the pick chain of size ``size``."""
    return f"{'local-' if local else ''}class-{size}"


@functools.cache
def pick_chains(family: Family) -> tuple[Chain, ...]:
    """The shared pick chains, every class, cluster and local, and the two chains that choose among them.

    ``pick-C`` tries slots C down to C/2+1 and continues in ``pick-C/2``;
    ``pick-4`` ends with slot 1, which is always filled, then a drop that
    only an inconsistent map could reach. ``pick-by-class`` goes to the pick
    chain of the frontend's class (the ``class-C`` sets); a frontend in no
    class has no endpoint: the packet goes on untranslated, and
    ``endpoints-check`` rejects or drops it. They are in every table, so
    that no change of endpoints, a Service's first or last included, ever
    changes a rule.
    """
    chains = []
    for local in (False, True):
        kind = "local" if local else "cluster"
        for class_size in PICK_CLASSES:
            low = class_size // 2 if class_size > PICK_CLASSES[0] else 0
            rules: list[Rule] = [
                (DnatFromMap((*DISPATCH_KEY, Numgen(k, slot(k, local))), f"endpoints-{class_size}"),)
                for k in range(class_size, low, -1)
            ]
            rules.append((Verdict("goto", pick_chain_name(low, local)),) if low else DROP_RULE)
            chains.append(Chain(pick_chain_name(class_size, local), tuple(rules),
                                f"pick one of up to {class_size} {kind} endpoints"))
        dispatch = tuple((Lookup(DISPATCH_KEY, class_set(size, local)), Verdict("goto", pick_chain_name(size, local)))
                         for size in PICK_CLASSES)
        chains.append(Chain(PICK_BY_CLASS[local], dispatch,
                            f"on to the pick chain for the number of {kind} endpoints of the frontend (none: untranslated)"))
    return tuple(chains)


@functools.cache
def external_chains(cluster_cidrs: tuple[str, ...]) -> tuple[Chain, ...]:
    """The shared external chains, for the Service ports without chains of their own (see ``PortDecision.shared``).

    ``external-to-cluster`` (externalTrafficPolicy Cluster): mark for
    masquerade, then any cluster endpoint. ``external-to-local``
    (externalTrafficPolicy Local): traffic from the cluster CIDRs (of the
    table's family) and from the node itself is short-circuited to the
    cluster endpoints, the node's own masqueraded, as upstream's
    ``clusterPolicyChain``; the rest goes to this node's endpoints. They read
    the frontend from the packet, as the pick chains do, so every port shares
    them.
    """
    cluster, local = PICK_BY_CLASS[False], PICK_BY_CLASS[True]
    return (
        Chain(EXTERNAL_TO_CLUSTER, external_rules(False, cluster_cidrs, cluster),
              "externalTrafficPolicy Cluster, ports without a chain of their own: masquerade, any endpoint"),
        Chain(EXTERNAL_TO_LOCAL, external_rules(True, cluster_cidrs, cluster, local),
              "externalTrafficPolicy Local, ports without a chain of their own: the endpoints on this node"),
    )


def external_rules(local_policy: bool, cluster_cidrs: Sequence[str], cluster: str, local: str | None = None
                   ) -> tuple[Rule, ...]:
    """What externalTrafficPolicy does to NodePort, externalIP and load-balancer IP traffic, on to the chains
    ``cluster`` (any endpoint) and ``local`` (this node's endpoints): an ``ext-`` chain's rules, or a shared one's.

    Cluster: masquerade, then any endpoint. Local: traffic from the cluster
    CIDRs and from the node itself is short-circuited to any endpoint (the
    node's own masqueraded), as upstream's ``clusterPolicyChain``; the rest
    goes to this node's endpoints.
    """
    masquerade = Verdict("jump", "mark-for-masquerade")
    if not local_policy:
        return (masquerade,), (Verdict("goto", cluster),)
    assert local is not None
    short_circuit = Verdict("goto", cluster)
    rules: list[Rule] = [(MatchPrefix("saddr", cidr), short_circuit) for cidr in cluster_cidrs]
    rules += [(FromLocal(), masquerade), (FromLocal(), short_circuit), (Verdict("goto", local),)]
    return tuple(rules)


@functools.cache
def bandwidth_hooks(family: Family) -> tuple[Chain, ...]:
    """The base chains of ``kproxy.io/bandwidth-limit``: every packet whose connection's original destination is
    a frontend in ``bandwidth-ips`` jumps to its port's ``bw-`` chain.

    Every Service with a bandwidth limit contributes these same chains (the
    assembly keeps one copy while any does), so they exist only while some
    Service has a limit: other traffic pays nothing otherwise. nft reads
    ``ct original proto-dst`` as a port only after a protocol match, hence a
    rule per protocol.
    """
    rules = tuple((MatchProtocol(proto), VerdictMap(ORIGINAL_KEY, "bandwidth-ips")) for proto in ("tcp", "udp", "sctp"))
    return tuple(Chain(name, rules, "kproxy.io/bandwidth-limit: police every packet of limited Services", base)
                 for name, base in BANDWIDTH_HOOKS.items())


def _constants(cluster_ip: str, port: ServicePort) -> Key:
    """ClusterIP . protocol . port as constants: a Service port's key in the meters, whatever the frontend."""
    return (Const(cluster_ip, "addr"), Const(str(_PROTO_NUMBERS[port.protocol]), "proto"), Const(str(port.port), "port"))


def limit_rules(service: Service, port: ServicePort, cluster_ip: str, suffix: str, allowlisted: bool) -> list[Rule]:
    """The rules of a Service port's limits on new connections, in the order the nat chains apply them.

    The per-client rate first, so that a client over its own rate spends
    nothing of the shared one; the connection count last, so that only
    connections that go on are counted. With an allowlist, each rule is
    guarded by a lookup that skips the clients in ``limit-allow``.
    """
    guard: Rule = (Lookup(ALLOW_KEY, "limit-allow", negate=True),) if allowlisted else ()
    port_key = _constants(cluster_ip, port)
    rules: list[Rule] = []
    if service.rate_limit is not None:
        limit = service.rate_limit
        rules.append((*guard, NewConnection(), SetUpdate("rate-limit-meter", ("saddr", *port_key),
                                                           limit=Limit(limit.rate, limit.unit, limit.burst)),
                      Counter(f"drops-{suffix}"), Verdict("drop")))
    if service.rate_limit_total is not None:
        limit = service.rate_limit_total
        rules.append((*guard, NewConnection(), SetUpdate("rate-limit-total-meter", port_key,
                                                           limit=Limit(limit.rate, limit.unit, limit.burst)),
                      Counter(f"totaldrops-{suffix}"), Verdict("drop")))
    if service.connection_limit is not None:
        rules.append((*guard, NewConnection(), SetUpdate("conn-limit", ("saddr", *port_key),
                                                           connections=service.connection_limit),
                      Counter(f"conndrops-{suffix}"), Verdict("drop")))
    return rules


def bandwidth_chain(service: Service, port: ServicePort, label: str, cluster_ip: str, suffix: str,
                    allowlisted: bool) -> Chain:
    """``bw-``: police every packet of the port's connections, per client and direction (a byte meter)."""
    limit = service.bandwidth_limit
    assert limit is not None
    guard: Rule = (MatchProtocol(port.protocol), Lookup(ORIGINAL_ALLOW_KEY, "limit-allow", negate=True)) if allowlisted else ()
    key: Key = ("original-saddr", *_constants(cluster_ip, port), "direction")
    meter = SetUpdate("bandwidth-meter", key, limit=Limit(limit.rate, "second", limit.burst, bytes=True))
    counter = Counter(f"{LIMIT_COUNTERS['bandwidth']}-{suffix}")
    return Chain(f"bw-{suffix}", ((*guard, meter, counter, Verdict("drop")),), label)


def _endpoint_chain(
    name: str,
    service: Service,
    port: ServicePort,
    label: str,
    cluster_ip: str,
    endpoints: Sequence[PortEndpoint],
    suffix: str,
    local: bool,
    allowlisted: bool = False,
    counted: bool = True,
) -> Chain:
    """A chain that counts (if ``counted``), applies the limits on new connections and affinity, and picks an endpoint."""
    proto = port.protocol
    counter = Counter(f"conns-{suffix}")
    rules: list[Rule] = [(counter,)] if counted else []
    rules += limit_rules(service, port, cluster_ip, suffix, allowlisted)
    count = len(endpoints)
    affinity = service.affinity_timeout
    if uses_pick_chains(service, endpoints):
        goto = Verdict("goto", PICK_BY_CLASS[local])
        if counted and len(rules) == 1:  # just the counter: one rule per Service port loads faster than two
            return Chain(name, ((counter, goto),), label)
        return Chain(name, (*rules, (goto,)), label)
    if not endpoints:  # nothing to translate to: on, untranslated, to endpoints-check
        return Chain(name, tuple(rules), label)
    if affinity is None:
        for i, pe in enumerate(endpoints):
            pick: Rule = (NumgenIs(count - i),) if i < count - 1 else ()
            rules.append((MatchProtocol(proto), *pick, DnatTo(pe.address, pe.port)))
        return Chain(name, tuple(rules), label)

    # ClientIP affinity. The affinity set remembers (client, frontend, endpoint
    # id); nft cannot put a constant into the key of a lookup, so the endpoint id
    # is XORed into the packet mark around the lookup and XORed out again. The
    # mark leaves this chain as it came in. An endpoint that goes away takes its
    # rules with it, so its entries simply stop matching.
    remember = SetUpdate("affinity", AFFINITY_KEY, timeout=affinity)
    ids = [endpoint_id(pe) for pe in endpoints]
    previous = 0
    for pe, ident in zip(endpoints, ids, strict=True):
        # The XOR comes first in the rule and takes effect even when the lookup
        # after it misses: the next rule builds on it.
        rules.append((MarkXor(previous ^ ident), MatchProtocol(proto), Lookup(AFFINITY_KEY, "affinity"), remember,
                      MarkXor(ident), DnatTo(pe.address, pe.port)))
        previous = ident
    rules.append((MarkXor(previous),))
    for i, (pe, ident) in enumerate(zip(endpoints, ids, strict=True)):
        pick = (NumgenIs(count - i),) if i < count - 1 else ()
        rules.append((MatchProtocol(proto), *pick, MarkXor(ident), remember, MarkXor(ident), DnatTo(pe.address, pe.port)))
    return Chain(name, tuple(rules), label)


def uses_pick_chains(service: Service, endpoints: Sequence[PortEndpoint]) -> bool:
    """Whether a chain for these endpoints picks through the ``endpoints`` map."""
    return service.affinity_timeout is None and pick_class(len(endpoints)) is not None


ADDRESS_FRONTEND, NODEPORT_FRONTEND = 0, 1
"""Ranks of frontends: ``services`` looks up ``service-ips`` (ClusterIP, external and
load-balancer IPs) before ``service-nodeports``, so for one address . port an
address frontend wins over a NodePort; among equals the first Service in key order."""


def _claim(
    owned: dict[str, tuple[int, int, list[tuple[str, Element]]]],
    frontends: Sequence[tuple[str, int]],
    port_index: int,
    items: Callable[[str], list[tuple[str, Element]]],
) -> None:
    """Add one port's per-frontend elements to ``owned`` (frontend -> (rank, port index, [(set, element)])).

    A frontend's elements (its endpoint slots, its firewall) come into a table
    from one Service port only, the one dispatch reaches (see
    ``ServiceRules.slots``). A frontend that one Service reaches through two
    ports (an external IP equal to a node address, on a port equal to another
    port's NodePort) gets the elements of the port that dispatch reaches: the
    better rank, then the first port.
    """
    for frontend, rank in frontends:
        held = owned.get(frontend)
        if held is not None and (held[0], held[1]) != (rank, port_index):
            if held[0] <= rank:
                continue
            held = None
        if held is None:
            held = owned[frontend] = (rank, port_index, [])
        held[2].extend(items(frontend))


def _slot_items(endpoints: Sequence[PortEndpoint], local: bool, label: str) -> Callable[[str], list[tuple[str, Element]]]:
    numbers = _SLOTS[local]
    targets = [(_ENDPOINTS_MAPS[k], numbers[k], f"{pe.address} . {pe.port}") for k, pe in enumerate(endpoints, 1)]
    classes = class_set(pick_class(len(endpoints)) or 0, local)
    return lambda frontend: [(classes, Element(frontend, comment=label))] + [
        (map_name, Element(f"{frontend} . {number}", target, label)) for map_name, number, target in targets
    ]


def _limit_items(allowlist: Sequence[str], bandwidth_chain_name: str | None,
                 label: str) -> Callable[[str], list[tuple[str, Element]]]:
    """A limited port's frontend: its clients exempt from the limits, and the jump to its bandwidth chain."""
    ranges = [_interval(cidr) for cidr in allowlist]
    jump = [("bandwidth-ips", f"jump {bandwidth_chain_name}")] if bandwidth_chain_name else []
    return lambda frontend: [("limit-allow", Element(f"{frontend} . {r}", comment=label)) for r in ranges] + [
        (name, Element(frontend, value, label)) for name, value in jump]


def _firewall_items(sources: Sequence[str], label: str) -> Callable[[str], list[tuple[str, Element]]]:
    return lambda frontend: [("firewall-ips", Element(frontend, comment=label))] + [
        ("firewall-allow", Element(f"{frontend} . {_interval(source)}", comment=label)) for source in sources
    ]


@dataclass(frozen=True, slots=True)
class PortDecision:
    """Where one Service port's traffic goes on this node, in one family: the compiler's choices, which explain reads.

    The chains exist whatever the endpoints: a chain that finds no endpoint
    lets the packet go on untranslated, and what happens to it then is
    ``internal_unserved`` / ``external_unserved`` (the ``no-endpoint-*``
    sets that ``endpoints-check`` reads after DNAT).
    """

    label: str
    suffix: str
    selection: Selection
    cluster_chain: str | None
    """``svc-``: the cluster endpoints (topology applied), if the port uses them."""
    local_chain: str | None
    """``local-``: this node's endpoints, if a Local policy uses them."""
    internal: str
    """The ClusterIP's chain (internalTrafficPolicy)."""
    internal_unserved: Unserved | None
    """What becomes of ClusterIP traffic: rejected (no usable endpoint anywhere), dropped (Local, none here), or served."""
    external_chain: str | None
    """``ext-``: the NodePort, externalIP and load-balancer IP frontends' chain (None without any)."""
    external_cluster: str | None
    """externalTrafficPolicy Cluster: the chain external traffic goes to (after masquerading)."""
    short_circuit: str | None
    """externalTrafficPolicy Local: the chain for traffic from pods and from this node (upstream's clusterPolicyChain)."""
    external_local: str | None
    """externalTrafficPolicy Local: the chain for other sources."""
    external_unserved: Unserved | None
    """What becomes of external traffic from other sources that gets no endpoint: rejected, dropped, or served."""
    shared: bool = False
    """The port has no chain of its own: it counts nothing, has no limit on new connections and no
    affinity, and its endpoints fit the pick chains. The chain names above are then the shared chains
    (``pick-by-class``, ``pick-local-by-class``, ``external-to-cluster``, ``external-to-local``), and
    the port is only elements: adding or removing it never makes the kernel walk a chain of its own."""


def decide_port(service: Service, port: ServicePort, slices: Sequence[EndpointSlice], family: Family,
                node: NodeInfo, config: ProxyConfig) -> PortDecision:
    """The traffic policy decisions for one port: made here once, for the compiler and for explain."""
    selection = select(service, port_endpoints(port, slices, FAMILIES[family]), node.name, node.zone)
    suffix = chain_suffix(service, port)
    uses_cluster, uses_local = service.uses_cluster_endpoints, service.uses_local_endpoints
    shared = (
        not config.counts(service)
        and service.rate_limit is None and service.rate_limit_total is None and service.connection_limit is None
        and (not uses_cluster or uses_pick_chains(service, selection.cluster))
        and (not uses_local or uses_pick_chains(service, selection.local))
    )
    if shared:
        cluster_chain = PICK_BY_CLASS[False] if uses_cluster else None
        local_chain = PICK_BY_CLASS[True] if uses_local else None
    else:
        cluster_chain = f"svc-{suffix}" if uses_cluster else None
        local_chain = f"local-{suffix}" if uses_local else None
    internal = local_chain if service.internal_policy_local else cluster_chain
    assert internal is not None  # a Service uses local endpoints when its internal policy is Local
    internal_endpoints = selection.local if service.internal_policy_local else selection.cluster
    fam = FAMILIES[family]
    has_external = port.node_port is not None or any(
        _family_of(ip) == fam for ip in service.external_ips + service.load_balancer_ips)
    local_policy = service.external_policy_local
    if not has_external:
        external_chain = None
    elif shared:
        external_chain = EXTERNAL_TO_LOCAL if local_policy else EXTERNAL_TO_CLUSTER
    else:
        external_chain = f"ext-{suffix}"
    external_endpoints = selection.local if local_policy else selection.cluster

    def unserved(endpoints: Sequence[PortEndpoint]) -> Unserved | None:
        return "reject" if not selection.has_any else None if endpoints else "drop"

    return PortDecision(
        label=port_label(service, port),
        suffix=suffix,
        selection=selection,
        cluster_chain=cluster_chain,
        local_chain=local_chain,
        internal=internal,
        internal_unserved=unserved(internal_endpoints),
        external_chain=external_chain,
        external_cluster=cluster_chain if external_chain and not local_policy else None,
        short_circuit=cluster_chain if external_chain and local_policy else None,
        external_local=local_chain if external_chain and local_policy else None,
        external_unserved=unserved(external_endpoints) if external_chain else None,
        shared=shared,
    )


def compile_service(
    service: Service,
    slices: Iterable[EndpointSlice],
    family: Family,
    node: NodeInfo,
    config: ProxyConfig,
) -> ServiceRules | None:
    """Chains and elements of one Service in one family; None if it has no IP there."""
    fam = FAMILIES[family]
    cluster_ip = next((ip for ip in service.cluster_ips if _family_of(ip) == fam), None)
    if cluster_ip is None:
        return None
    slices = list(slices)
    svc_label = fit_comment(f"{service.namespace}/{service.name}")
    chains: list[Chain] = []
    counters: list[tuple[str, str]] = []
    elements: list[tuple[str, Element]] = [("cluster-ips", Element(cluster_ip, comment=svc_label))]
    slots: dict[str, tuple[int, int, list[tuple[str, Element]]]] = {}
    external_ips = [ip for ip in service.external_ips + service.load_balancer_ips if _family_of(ip) == fam]
    lb_ips = [ip for ip in service.load_balancer_ips if _family_of(ip) == fam]
    ranges = _cidrs_of(service.load_balancer_source_ranges, fam)
    allowed_sources = ranges
    if ranges and any(_in_any(ip, ranges) for ip in node.primary_ips if _family_of(ip) == fam):
        # A range holds the node itself: the load-balancer IPs are allowed as sources too, as
        # upstream does, since a connection from the node to its own load balancer often
        # comes back with the load-balancer IP as its source (MetalLB, kube-vip, clouds).
        allowed_sources = ranges + [f"{ip}/{32 if fam == 4 else 128}" for ip in lb_ips]
    # An interval set refuses overlapping elements: 10.0.0.0/8 and 10.1.0.0/16 are one range.
    allowed_sources = collapse(allowed_sources) if allowed_sources else allowed_sources
    cidrs = _cidrs_of(config.cluster_cidrs, fam)
    allowlist = collapse(_cidrs_of(service.limit_allowlist, fam)) if service.limited else []

    counted = config.counts(service)
    for port_index, port in enumerate(service.ports):
        decision = decide_port(service, port, slices, family, node, config)
        label, proto, suffix, selection = decision.label, port.protocol, decision.suffix, decision.selection
        svc_chain, local_chain, ext_chain = decision.cluster_chain, decision.local_chain, decision.external_chain
        if not decision.shared:
            if counted:
                counters.append((f"conns-{suffix}", label))
            limits = {"rate_limit": service.rate_limit, "rate_limit_total": service.rate_limit_total,
                      "connections": service.connection_limit}
            counters += [(f"{LIMIT_COUNTERS[reason]}-{suffix}", label) for reason, on in limits.items() if on is not None]
        frontends: dict[str, int] = {}  # first wins: the ClusterIP, then external IPs, then NodePort addresses
        for ip in (cluster_ip, *external_ips):
            frontends.setdefault(f"{ip} . {proto} . {port.port}", ADDRESS_FRONTEND)
        if port.node_port:
            for ip in _nodeport_ips(node, config, family):
                frontends.setdefault(f"{ip} . {proto} . {port.node_port}", NODEPORT_FRONTEND)
        port_frontends = list(frontends.items())
        allowlisted = bool(allowlist)
        bandwidth: str | None = None
        if service.bandwidth_limit is not None:
            chain = bandwidth_chain(service, port, label, cluster_ip, suffix, allowlisted)
            chains.append(chain)
            counters.append((f"{LIMIT_COUNTERS['bandwidth']}-{suffix}", label))
            bandwidth = chain.name
        if allowlisted or bandwidth:
            # Per frontend, as the dispatch elements: a frontend's exemptions and policing are its owner's.
            _claim(slots, port_frontends, port_index, _limit_items(allowlist, bandwidth, label))
        if svc_chain:
            if not decision.shared:
                chains.append(_endpoint_chain(svc_chain, service, port, label, cluster_ip, selection.cluster, suffix,
                                              False, allowlisted, counted))
            if selection.cluster and uses_pick_chains(service, selection.cluster):
                _claim(slots, port_frontends, port_index, _slot_items(selection.cluster, False, label))
        if local_chain:
            if not decision.shared:
                chains.append(_endpoint_chain(local_chain, service, port, label, cluster_ip, selection.local, suffix,
                                              True, allowlisted, counted))
            if selection.local and uses_pick_chains(service, selection.local):
                _claim(slots, port_frontends, port_index, _slot_items(selection.local, True, label))
        # Every endpoint, wherever it runs: nodeName may be unset or stale (as upstream, whose
        # endpoint chains all start with "ip saddr <endpoint> jump mark-for-masquerade").
        for address in sorted({pe.address for pe in selection.cluster + selection.local}):
            elements.append(("hairpin", Element(f"{address} . {address}", comment=label)))

        # Traffic to the ClusterIP follows internalTrafficPolicy; without an endpoint, it goes on
        # untranslated to endpoints-check (its elements, not rules, say what becomes of it).
        key = f"{cluster_ip} . {proto} . {port.port}"
        elements.append(("service-ips", Element(key, f"goto {decision.internal}", label)))
        if decision.internal_unserved is not None:
            elements.append((f"no-endpoint-{decision.internal_unserved}", Element(key, comment=label)))

        # loadBalancerSourceRanges of this family guard the load-balancer IPs, endpoints or not:
        # the firewall of a frontend is its owner's (a Service that loses it adds nothing).
        if ranges:
            lb_frontends = [(f"{ip} . {proto} . {port.port}", ADDRESS_FRONTEND) for ip in lb_ips]
            _claim(slots, lb_frontends, port_index, _firewall_items(allowed_sources, label))

        # NodePort, externalIPs and load-balancer IPs follow externalTrafficPolicy.
        if ext_chain is None:
            continue
        if not decision.shared:  # else the shared chain of its policy (external_chains)
            if service.external_policy_local:
                assert decision.short_circuit is not None
                rules = external_rules(True, cidrs, decision.short_circuit, decision.external_local)
            else:
                assert decision.external_cluster is not None
                rules = external_rules(False, cidrs, decision.external_cluster)
            chains.append(Chain(ext_chain, rules, label))
        unserved = decision.external_unserved
        for ip in external_ips:
            frontend = f"{ip} . {proto} . {port.port}"
            elements.append(("service-ips", Element(frontend, f"goto {ext_chain}", label)))
            if unserved is not None:
                elements.append((f"no-endpoint-{unserved}", Element(frontend, comment=label)))
        if port.node_port:
            elements.append(("service-nodeports", Element(f"{proto} . {port.node_port}", f"goto {ext_chain}", label)))
            if unserved is not None:
                elements.append((f"no-endpoint-nodeport-{unserved}", Element(f"{proto} . {port.node_port}", comment=label)))
    if service.bandwidth_limit is not None and service.ports:
        chains.extend(bandwidth_hooks(family))
    return ServiceRules(
        tuple(chains), tuple(elements), tuple(counters),
        tuple((frontend, rank, tuple(items)) for frontend, (rank, _, items) in slots.items()),
    )


def _in_any(address: str, cidrs: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(c) for c in cidrs if ipaddress.ip_network(c).version == ip.version)


def nodeport_addresses(node: NodeInfo, config: ProxyConfig, family: Family) -> list[str]:
    """The node addresses NodePorts answer on, as upstream's ``--nodeport-addresses``.

    ``primary`` (the default): the node's primary IP of the family. CIDRs: every
    address of the node's interfaces inside them; a family without a CIDR of its
    own, or with ``0.0.0.0/0`` / ``::/0``, gets every address of the family
    (upstream matches those with ``fib daddr type local``). Never loopback.
    """
    fam = FAMILIES[family]
    if config.nodeport_addresses:
        cidrs = _cidrs_of(config.nodeport_addresses, fam)
        everything = not cidrs or any(c.endswith("/0") for c in cidrs)
        candidates = [a for a in node.addresses if everything or _in_any(a, cidrs)]
    else:
        candidates = list(node.primary_ips)
    chosen = []
    for address in candidates:
        if _family_of(address) == fam and not ipaddress.ip_address(address).is_loopback and address not in chosen:
            chosen.append(address)
    return chosen


@functools.lru_cache(maxsize=16)
def _nodeport_ips(node: NodeInfo, config: ProxyConfig, family: Family) -> tuple[str, ...]:
    return tuple(nodeport_addresses(node, config, family))


def shared_chains(family: Family, config: ProxyConfig) -> tuple[Chain, ...]:
    """The chains every table has besides the skeleton's: the pick chains and the shared external chains."""
    return (*pick_chains(family), *external_chains(tuple(_cidrs_of(config.cluster_cidrs, FAMILIES[family]))))


def table_options(config: ProxyConfig, family: Family) -> frozenset[str]:
    """Which '# if' rules of the skeleton this configuration switches on."""
    if config.masquerade_all:
        return frozenset({"masquerade-all"})
    fam = FAMILIES[family]
    if _cidrs_of(config.cluster_cidrs, fam):
        return frozenset({"cluster-cidr"})
    return frozenset()


def base_table(node: NodeInfo, config: ProxyConfig, family: Family, service_cidrs: Sequence[str] = ()) -> Table:
    """The skeleton plus the elements that come from the node, the config and the ServiceCIDRs."""
    table = skeleton_table(family, table_options(config, family))
    for chain in shared_chains(family, config):
        table.chains[chain.name] = chain
    fam = FAMILIES[family]
    for cidr in collapse(_cidrs_of(config.cluster_cidrs, fam)):
        table.add_element("cluster-cidrs", Element(_interval(cidr), comment="--cluster-cidr"))
    for address in nodeport_addresses(node, config, family):
        table.add_element("nodeport-ips", Element(address, comment=fit_comment(f"node {node.name}")))
    for cidr in collapse(_cidrs_of(service_cidrs, fam)):
        table.add_element("service-cidrs", Element(_interval(cidr), comment="ServiceCIDR"))
    return table


def compile_ruleset(
    cluster: Cluster, node: NodeInfo, config: ProxyConfig, failed: dict[ServiceKey, str] | None = None
) -> Ruleset:
    """The whole ruleset for a node: both families, Services in key order.

    A Service the compiler cannot compile is left out (and named in ``failed``,
    with the error); it never stops the others.
    """
    with gc_paused():
        return _compile_ruleset(cluster, node, config, failed if failed is not None else {})


def _compile_ruleset(cluster: Cluster, node: NodeInfo, config: ProxyConfig, failed: dict[ServiceKey, str]) -> Ruleset:
    by_service = cluster.slices_by_service()
    ruleset = Ruleset()
    for family in FAMILIES:
        # The same assembly the daemon keeps up to date one Service at a time, so a
        # full compile and a run of partial syncs resolve shared keys the same way.
        assembly = Assembly(base_table(node, config, family, cluster.service_cidrs))
        for key in sorted(cluster.services):
            if key in failed:
                continue
            try:
                rules = compile_service(cluster.services[key], by_service.get(key, ()), family, node, config)
            except Exception as exc:  # one Service must never stop the others
                failed[key] = f"{type(exc).__name__}: {exc}"
                assembly.set_service(key, None, track=False)
                continue
            assembly.set_service(key, rules, track=False)
        ruleset.tables[family] = assembly.table
    return ruleset
