"""Packet flows without root: compiled rulesets traced by ``kproxy.nft.trace``.

The cases and their expected outcomes are upstream kube-proxy's
(``pkg/proxy/nftables/proxier_test.go``: TestClusterIPGeneral, TestNoEndpointsReject,
TestLoadBalancer, TestNodePorts, TestExternalTrafficPolicyLocal/Cluster,
TestInternalTrafficPolicy, TestTerminatingEndpointsTrafficPolicyLocal; topology
from ``pkg/proxy/topology_test.go``), in upstream's test conventions: pods in
10.0.0.0/8, ClusterIPs in 172.30.0.0/16, the node at 192.168.0.2 (and
192.168.1.2, 192.168.99.11), outside clients in 203.0.113.0/24. Where upstream
lists the endpoints a packet may reach, the tracer's exact distribution must give
each of them the same share.

A connection from one of the node's own addresses is traced as sent by the node
(``local``); any other arrives on an interface (``forwarded``).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import pytest

from kproxy.cluster.convert import build_cluster
from kproxy.nft.fake import FakeBackend
from kproxy.nft.objects import Chain, Element, Ruleset, SetDecl, Table
from kproxy.nft.statements import DnatTo, Verdict
from kproxy.nft.trace import NodeFacts, Outcome, Packet, PacketTracer, Target, Trace, TraceError, trace_packet
from kproxy.rules.compiler import PICK_CLASSES, NodeInfo, ProxyConfig, compile_ruleset
from kproxy.rules.plan import plan
from tests.harness.builders import endpoint, endpoint_slice, service

NODE_NAME = "test-node"
NODE_IP, NODE_IP_ALT, EXTERNAL_IP_ON_NODE = "192.168.0.2", "192.168.1.2", "192.168.99.11"
NODE_IP6, NODE_IP6_ALT = "2001:db8::1", "2001:db8:1::2"
NODE = NodeInfo(NODE_NAME, "", (NODE_IP, NODE_IP6), (NODE_IP, NODE_IP_ALT, EXTERNAL_IP_ON_NODE, NODE_IP6, NODE_IP6_ALT))
CONFIG = ProxyConfig(cluster_cidrs=("10.0.0.0/8", "fd00:10::/64"),
                     nodeport_addresses=(f"{NODE_IP}/32", f"{NODE_IP6}/128"))
POD, POD6 = "10.0.0.2", "fd00:10::2"
CLIENT, CLIENT_BLOCKED, CLIENT6 = "203.0.113.2", "203.0.113.130", "2600:5200::1"

Distribution = dict[Outcome, Fraction]
Flow = tuple[str, str, str, int, Distribution]
"""(name, source, destination, port, the expected outcomes)."""

DROPPED: Distribution = {Outcome("dropped"): Fraction(1)}
REJECTED: Distribution = {Outcome("rejected"): Fraction(1)}
UNTOUCHED: Distribution = {Outcome("accepted"): Fraction(1)}
"""Accepted, not translated: the packet is not for a Service."""


# --- helpers --------------------------------------------------------------------------------------


def _service_cidrs(*cidrs: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": list(cidrs)}}


SERVICE_CIDRS = _service_cidrs("172.30.0.0/16", "fd00:172:30::/112")


def _ports(*ports: tuple[str, int, str]) -> list[dict[str, Any]]:
    return [{"name": name, "port": port, "protocol": protocol} for name, port, protocol in ports]


def _node_port(port: int, node_port: int, name: str = "p80") -> list[dict[str, Any]]:
    return [{"name": name, "port": port, "protocol": "TCP", "nodePort": node_port}]


def _lb_status(*ips: str) -> dict[str, Any]:
    return {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}}


def _compile(objects: list[dict[str, Any]], config: ProxyConfig = CONFIG, node: NodeInfo = NODE) -> Ruleset:
    cluster, problems = build_cluster(objects, node.name)
    assert problems == []
    return compile_ruleset(cluster, node, config)


def _tracer(objects: list[dict[str, Any]], config: ProxyConfig = CONFIG, node: NodeInfo = NODE) -> PacketTracer:
    return PacketTracer(_compile(objects, config, node), NodeFacts(node.addresses))


def _trace(tracer: PacketTracer, source: str, destination: str, port: int, protocol: str = "tcp") -> Trace:
    origin = "local" if source in tracer.node.addresses else "forwarded"
    return tracer.trace(Packet(source, destination, port, protocol, origin))  # type: ignore[arg-type]


def _reach(tracer: PacketTracer, source: str, destination: str, port: int, protocol: str = "tcp") -> Distribution:
    return _trace(tracer, source, destination, port, protocol).outcomes


def _target(text: str) -> Target:
    address, _, port = text.rpartition(":")
    return address.strip("[]"), int(port)


def _to(*targets: str, masq: bool = False) -> Distribution:
    """Accepted and DNATed to one of ``targets`` (``address:port``), each as likely, masqueraded or not."""
    return {Outcome("accepted", _target(t), masq): Fraction(1, len(targets)) for t in targets}


def _check(tracer: PacketTracer, flows: list[Flow], protocol: str = "tcp") -> None:
    """Every flow as expected; every one that is not, named at once."""
    wrong = []
    for name, source, destination, port, expected in flows:
        trace = _trace(tracer, source, destination, port, protocol)
        if trace.outcomes != expected:
            wrong.append(f"{name}: expected {expected}\n{trace}")
    assert not wrong, "\n".join(wrong)


# --- ClusterIPs -----------------------------------------------------------------------------------

SVC1, SVC2 = "172.30.0.41", "172.30.0.42"


def _cluster_ip_general() -> list[dict[str, Any]]:
    svc2_ports = _ports(("http", 80, "TCP"), ("https", 443, "TCP"), ("dns-udp", 53, "UDP"), ("dns-tcp", 53, "TCP"),
                        ("dns-sctp", 53, "SCTP"))
    svc2_endpoint_ports = _ports(("http", 80, "TCP"), ("https", 8443, "TCP"), ("dns-udp", 53, "UDP"),
                                 ("dns-tcp", 5353, "TCP"), ("dns-sctp", 53, "SCTP"))
    return [
        service("svc1", "ns1", SVC1, ports=_ports(("http", 80, "TCP"))),
        service("svc2", "ns2", SVC2, ports=svc2_ports),
        endpoint_slice("svc1-1", "svc1", [endpoint("10.180.0.1", node=NODE_NAME)], namespace="ns1",
                       ports=_ports(("http", 80, "TCP"))),
        endpoint_slice("svc2-1", "svc2", [endpoint("10.180.0.1", node=NODE_NAME), endpoint("10.180.2.1", node="node2")],
                       namespace="ns2", ports=svc2_endpoint_ports),
        SERVICE_CIDRS,
    ]


def test_cluster_ip_general() -> None:
    """Upstream's TestClusterIPGeneral: endpoints by port and protocol, hairpin, undefined ports, unallocated IPs."""
    tracer = _tracer(_cluster_ip_general())
    pod = "10.180.0.2"
    _check(tracer, [
        ("simple clusterIP", pod, SVC1, 80, _to("10.180.0.1:80")),
        ("hairpin to cluster IP", "10.180.0.1", SVC1, 80, _to("10.180.0.1:80", masq=True)),
        ("clusterIP with multiple endpoints", pod, SVC2, 80, _to("10.180.0.1:80", "10.180.2.1:80")),
        ("clusterIP with TargetPort", pod, SVC2, 443, _to("10.180.0.1:8443", "10.180.2.1:8443")),
        ("TCP, UDP and SCTP on the same port (TCP)", pod, SVC2, 53, _to("10.180.0.1:5353", "10.180.2.1:5353")),
        ("svc1 does not accept svc2's ports", pod, SVC1, 443, REJECTED),
        ("packet to unallocated cluster ip", pod, "172.30.0.50", 80, DROPPED),
    ])
    _check(tracer, [
        ("TCP, UDP and SCTP on the same port (UDP)", pod, SVC2, 53, _to("10.180.0.1:53", "10.180.2.1:53")),
        ("TCP-only port does not match UDP traffic", pod, SVC2, 80, REJECTED),
    ], protocol="udp")
    _check(tracer, [
        ("TCP, UDP and SCTP on the same port (SCTP)", pod, SVC2, 53, _to("10.180.0.1:53", "10.180.2.1:53")),
    ], protocol="sctp")


def test_hairpin_masquerades_only_the_pod_that_reaches_itself() -> None:
    """A pod reaching its own Service is masqueraded when it lands on itself, and not when it lands on another pod."""
    tracer = _tracer(_cluster_ip_general())
    assert _reach(tracer, "10.180.0.1", SVC2, 80) == {
        Outcome("accepted", ("10.180.0.1", 80), True): Fraction(1, 2),
        Outcome("accepted", ("10.180.2.1", 80), False): Fraction(1, 2),
    }


def test_hairpin_in_ipv6() -> None:
    """In IPv6 too, only the pod that lands on itself is masqueraded, and the node's own connection always is."""
    tracer = _tracer([
        service("web6", "ns1", "fd00:172:30::10"),
        endpoint_slice("web6-1", "web6", [endpoint("fd00:10::a"), endpoint("fd00:10::b", node="node2")],
                       namespace="ns1", address_type="IPv6"),
        SERVICE_CIDRS,
    ])
    assert _reach(tracer, "fd00:10::a", "fd00:172:30::10", 80) == {
        Outcome("accepted", ("fd00:10::a", 8080), True): Fraction(1, 2),
        Outcome("accepted", ("fd00:10::b", 8080), False): Fraction(1, 2),
    }
    assert _reach(tracer, NODE_IP6, "fd00:172:30::10", 80) == _to("[fd00:10::a]:8080", "[fd00:10::b]:8080", masq=True)
    assert _reach(tracer, POD6, "fd00:172:30::99", 80) == DROPPED


def test_cluster_ip_masquerade_follows_the_cluster_cidr() -> None:
    """A pod's ClusterIP traffic keeps its source; from outside --cluster-cidr, or from the node, it is masqueraded."""
    tracer = _tracer(_cluster_ip_general())
    assert _reach(tracer, POD, SVC1, 80) == _to("10.180.0.1:80")
    assert _reach(tracer, CLIENT, SVC1, 80) == _to("10.180.0.1:80", masq=True)
    assert _reach(tracer, NODE_IP, SVC1, 80) == _to("10.180.0.1:80", masq=True)


def test_masquerade_all_masquerades_pods_too() -> None:
    """--masquerade-all: every connection to a ClusterIP is masqueraded, a pod's included."""
    tracer = _tracer(_cluster_ip_general(), dataclasses.replace(CONFIG, masquerade_all=True))
    assert _reach(tracer, POD, SVC2, 80) == _to("10.180.0.1:80", "10.180.2.1:80", masq=True)


def test_without_cluster_cidr_nothing_is_masqueraded_for_a_cluster_ip() -> None:
    """Without --cluster-cidr (nor --masquerade-all) no source counts as outside: ClusterIP traffic keeps it."""
    tracer = _tracer(_cluster_ip_general(), dataclasses.replace(CONFIG, cluster_cidrs=()))
    assert _reach(tracer, CLIENT, SVC1, 80) == _to("10.180.0.1:80")


def test_service_cidr_addresses_no_service_holds_are_dropped() -> None:
    """A ServiceCIDR address no Service holds is dropped (from a pod or the node); outside them nothing happens."""
    tracer = _tracer(_cluster_ip_general())
    assert _reach(tracer, POD, "172.30.0.50", 80) == DROPPED
    assert _reach(tracer, NODE_IP, "172.30.0.50", 80) == DROPPED
    assert _reach(tracer, POD, "172.31.0.50", 80) == UNTOUCHED
    without = _tracer([o for o in _cluster_ip_general() if o["kind"] != "ServiceCIDR"])
    assert _reach(without, POD, "172.30.0.50", 80) == UNTOUCHED


# --- no endpoints ---------------------------------------------------------------------------------


def test_no_endpoints_reject() -> None:
    """Upstream's TestNoEndpointsReject: a Service without endpoints rejects on every frontend."""
    tracer = _tracer([
        service("svc1", "ns1", SVC1, type="LoadBalancer", externalIPs=[EXTERNAL_IP_ON_NODE],
                ports=_node_port(80, 3001), status=_lb_status("1.2.3.4")),
        SERVICE_CIDRS,
    ])
    _check(tracer, [
        ("pod to cluster IP with no endpoints", POD, SVC1, 80, REJECTED),
        ("external to external IP with no endpoints", CLIENT, EXTERNAL_IP_ON_NODE, 80, REJECTED),
        ("pod to NodePort with no endpoints", POD, NODE_IP, 3001, REJECTED),
        ("external to NodePort with no endpoints", CLIENT, NODE_IP, 3001, REJECTED),
        ("pod to LoadBalancer IP with no endpoints", POD, "1.2.3.4", 80, REJECTED),
        ("external to LoadBalancer IP with no endpoints", CLIENT, "1.2.3.4", 80, REJECTED),
        ("node to NodePort with no endpoints", NODE_IP, NODE_IP, 3001, REJECTED),
    ])


# --- load balancers -------------------------------------------------------------------------------

LB1, LB2 = "1.2.3.4", "5.6.7.8"


def _load_balancer(ranges: list[str]) -> list[dict[str, Any]]:
    return [
        service("svc1", "ns1", SVC1, type="LoadBalancer", loadBalancerSourceRanges=ranges, ports=_node_port(80, 3001),
                status=_lb_status(LB1, LB2)),
        endpoint_slice("svc1-1", "svc1", [endpoint("10.180.0.1", node=None)], namespace="ns1",
                       ports=_ports(("p80", 80, "TCP"))),
        SERVICE_CIDRS,
    ]


def test_load_balancer_source_ranges() -> None:
    """Upstream's TestLoadBalancer: source ranges guard the LB IPs, not the NodePort; a range with the node admits the
    LB IPs as sources."""
    tracer = _tracer(_load_balancer(["192.168.0.0/24", "203.0.113.0/25"]))
    plain, masqueraded = _to("10.180.0.1:80"), _to("10.180.0.1:80", masq=True)
    _check(tracer, [
        ("pod to cluster IP", POD, SVC1, 80, plain),
        ("external to nodePort", CLIENT, NODE_IP, 3001, masqueraded),
        ("nodePort bypasses LoadBalancerSourceRanges", CLIENT_BLOCKED, NODE_IP, 3001, masqueraded),
        ("accepted external to LB1", CLIENT, LB1, 80, masqueraded),
        ("accepted external to LB2", CLIENT, LB2, 80, masqueraded),
        ("blocked external to LB1", CLIENT_BLOCKED, LB1, 80, DROPPED),
        ("blocked external to LB2", CLIENT_BLOCKED, LB2, 80, DROPPED),
        ("pod to LB1 (blocked by LoadBalancerSourceRanges)", POD, LB1, 80, DROPPED),
        ("pod to LB2 (blocked by LoadBalancerSourceRanges)", POD, LB2, 80, DROPPED),
        ("node to LB1 (allowed by LoadBalancerSourceRanges)", NODE_IP, LB1, 80, masqueraded),
        ("node to LB2 (allowed by LoadBalancerSourceRanges)", NODE_IP, LB2, 80, masqueraded),
        ("same node to LB1, SNATted to LB1 (implicitly allowed)", LB1, LB1, 80, masqueraded),
        ("same node to LB2, SNATted to LB2 (implicitly allowed)", LB2, LB2, 80, masqueraded),
    ])


def test_load_balancer_without_the_node_in_a_range_does_not_let_its_own_ips_in() -> None:
    """When no range holds the node, a connection coming back with the LB IP as its source is refused like any other."""
    tracer = _tracer(_load_balancer(["203.0.113.0/25"]))
    assert _reach(tracer, LB1, LB1, 80) == DROPPED
    assert _reach(tracer, NODE_IP, LB1, 80) == DROPPED
    assert _reach(tracer, CLIENT, LB1, 80) == _to("10.180.0.1:80", masq=True)


def test_space_padded_source_range_is_trimmed_as_upstream() -> None:
    """Upstream's TestLoadBalancer writes " 203.0.113.0/25" and expects it trimmed (backward compatibility)."""
    tracer = _tracer(_load_balancer(["192.168.0.0/24", " 203.0.113.0/25"]))
    assert _reach(tracer, CLIENT, LB1, 80) == _to("10.180.0.1:80", masq=True)


# --- NodePorts ------------------------------------------------------------------------------------

_FAMILY_ADDRESSES = {
    # ClusterIP, endpoint without a node, endpoint on this node, node IP, its other IP, pod, outside client
    4: (SVC1, "10.180.0.1", "10.180.2.1", NODE_IP, NODE_IP_ALT, POD, CLIENT),
    6: ("fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1", NODE_IP6, NODE_IP6_ALT, POD6, CLIENT6),
}


@pytest.mark.parametrize(("family", "nodeport_addresses", "alt_allowed"), [
    (4, (f"{NODE_IP}/32", f"{NODE_IP6}/128"), False),
    (4, ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"), True),
    (6, (f"{NODE_IP}/32", f"{NODE_IP6}/128"), False),
    (6, ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64", "2001:db8:1::2/128"), True),
], ids=["ipv4", "ipv4, multiple nodeport-addresses", "ipv6", "ipv6, multiple nodeport-addresses"])
def test_node_ports(family: int, nodeport_addresses: tuple[str, ...], alt_allowed: bool) -> None:
    """Upstream's TestNodePorts: NodePorts answer on the --nodeport-addresses only, in both families."""
    svc_ip, ep1, ep2, node_ip, alt_ip, pod, client = _FAMILY_ADDRESSES[family]
    tracer = _tracer([
        service("svc1", "ns1", svc_ip, type="NodePort", ports=_node_port(80, 3001)),
        endpoint_slice("svc1-1", "svc1", [endpoint(ep1, node=None), endpoint(ep2, node=NODE_NAME)], namespace="ns1",
                       ports=_ports(("p80", 80, "TCP")), address_type=f"IPv{family}"),
        SERVICE_CIDRS,
    ], dataclasses.replace(CONFIG, nodeport_addresses=nodeport_addresses))
    both = [f"[{ep1}]:80", f"[{ep2}]:80"]
    masqueraded = _to(*both, masq=True)
    _check(tracer, [
        ("pod to cluster IP", pod, svc_ip, 80, _to(*both)),
        ("external to nodePort", client, node_ip, 3001, masqueraded),
        ("node to nodePort", node_ip, node_ip, 3001, masqueraded),
        ("external to nodePort on secondary IP", client, alt_ip, 3001, masqueraded if alt_allowed else UNTOUCHED),
    ])


# --- traffic policies -----------------------------------------------------------------------------


def _external_policy(policy: str) -> list[dict[str, Any]]:
    return [
        service("svc1", "ns1", SVC1, type="LoadBalancer", externalTrafficPolicy=policy, healthCheckNodePort=30000,
                externalIPs=[EXTERNAL_IP_ON_NODE], ports=_node_port(80, 3001), status=_lb_status(LB1)),
        endpoint_slice("svc1-1", "svc1", [endpoint("10.180.0.1", node=None), endpoint("10.180.2.1", node=NODE_NAME)],
                       namespace="ns1", ports=_ports(("p80", 80, "TCP"))),
        SERVICE_CIDRS,
    ]


def test_external_traffic_policy_local() -> None:
    """Upstream's TestExternalTrafficPolicyLocal: outside clients reach the local endpoint only, pods every one;
    neither is masqueraded."""
    tracer = _tracer(_external_policy("Local"))
    both, local = _to("10.180.0.1:80", "10.180.2.1:80"), _to("10.180.2.1:80")
    _check(tracer, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", POD, SVC1, 80, both),
        ("pod to external IP hits both endpoints, unmasqueraded", POD, EXTERNAL_IP_ON_NODE, 80, both),
        ("external to external IP hits only local endpoint, unmasqueraded", CLIENT, EXTERNAL_IP_ON_NODE, 80, local),
        ("pod to LB IP hits only both endpoints, unmasqueraded", POD, LB1, 80, both),
        ("external to LB IP hits only local endpoint, unmasqueraded", CLIENT, LB1, 80, local),
        ("pod to NodePort hits both endpoints, unmasqueraded", POD, NODE_IP, 3001, both),
        ("external to NodePort hits only local endpoint, unmasqueraded", CLIENT, NODE_IP, 3001, local),
    ])


def test_external_traffic_policy_local_short_circuits_the_node_to_every_endpoint() -> None:
    """From the node, an eTP=Local NodePort or LB IP goes to the cluster endpoints (pick-by-class, not
    pick-local-by-class), masqueraded."""
    tracer = _tracer(_external_policy("Local"))
    both = _to("10.180.0.1:80", "10.180.2.1:80", masq=True)
    assert _reach(tracer, NODE_IP, NODE_IP, 3001) == both
    assert _reach(tracer, NODE_IP, LB1, 80) == both
    chains = [c for branch in _trace(tracer, NODE_IP, NODE_IP, 3001).branches for c in branch.chains]
    assert "pick-by-class" in chains and "pick-local-by-class" not in chains


def test_external_traffic_policy_cluster() -> None:
    """Upstream's TestExternalTrafficPolicyCluster: every external frontend reaches every endpoint, masqueraded."""
    tracer = _tracer(_external_policy("Cluster"))
    both, masqueraded = _to("10.180.0.1:80", "10.180.2.1:80"), _to("10.180.0.1:80", "10.180.2.1:80", masq=True)
    _check(tracer, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", POD, SVC1, 80, both),
        ("pod to external IP hits both endpoints, masqueraded", POD, EXTERNAL_IP_ON_NODE, 80, masqueraded),
        ("external to external IP hits both endpoints, masqueraded", CLIENT, EXTERNAL_IP_ON_NODE, 80, masqueraded),
        ("pod to LB IP hits both endpoints, masqueraded", POD, LB1, 80, masqueraded),
        ("external to LB IP hits both endpoints, masqueraded", CLIENT, LB1, 80, masqueraded),
        ("pod to NodePort hits both endpoints, masqueraded", POD, NODE_IP, 3001, masqueraded),
        ("external to NodePort hits both endpoints, masqueraded", CLIENT, NODE_IP, 3001, masqueraded),
    ])


def _terminating(address: str, node: str = NODE_NAME, serving: bool = True) -> dict[str, Any]:
    return endpoint(address, node=node, ready=False, serving=serving, terminating=True)


def _unnamed_port(**spec: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A Service ``svc1`` with one unnamed TCP port 80, and the matching endpoint ports."""
    return (service("svc1", "ns1", "172.30.1.1", ports=[{"port": 80, "protocol": "TCP"}], **spec),
            [{"name": "", "port": 80, "protocol": "TCP"}])


@pytest.mark.parametrize(("endpoints", "pod_expects", "client_expects"), [
    ([endpoint("10.0.1.1", node=NODE_NAME), endpoint("10.0.1.2", node=NODE_NAME), _terminating("10.0.1.3"),
      _terminating("10.0.1.4", serving=False), endpoint("10.0.1.5", node="node-1")],
     _to("10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"), _to("10.0.1.1:80", "10.0.1.2:80")),
    ([_terminating("10.0.1.2"), _terminating("10.0.1.3"), _terminating("10.0.1.4", serving=False),
      endpoint("10.0.1.5", node="node-1")],
     _to("10.0.1.5:80"), _to("10.0.1.2:80", "10.0.1.3:80")),
    ([_terminating("10.0.1.5", node="node-1")], _to("10.0.1.5:80"), DROPPED),
    ([_terminating("10.0.1.5", serving=False), _terminating("10.0.1.5", node="node-1", serving=False)],
     REJECTED, REJECTED),
], ids=["ready endpoints exist", "only terminating endpoints exist", "terminating endpoints on remote node",
        "no usable endpoints on any node"])
def test_terminating_endpoints_traffic_policy_local(endpoints: list[dict[str, Any]], pod_expects: Distribution,
                                                    client_expects: Distribution) -> None:
    """Upstream's TestTerminatingEndpointsTrafficPolicyLocal: ready endpoints, else serving-terminating ones;
    an LB without a usable local endpoint drops outside clients."""
    svc, ports = _unnamed_port(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30000,
                               status=_lb_status(LB1))
    tracer = _tracer([svc, endpoint_slice("svc1-1", "svc1", endpoints, namespace="ns1", ports=ports)])
    assert _reach(tracer, POD, "172.30.1.1", 80) == pod_expects
    assert _reach(tracer, CLIENT, LB1, 80) == client_expects


@pytest.mark.parametrize(("policy", "nodes", "expected"), [
    ("Cluster", [NODE_NAME, "node1", "node2"], _to("10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80")),
    ("Local", [NODE_NAME, "node1", "node2"], _to("10.0.1.1:80")),
    ("Local", [NODE_NAME, NODE_NAME, "node2"], _to("10.0.1.1:80", "10.0.1.2:80")),
    ("Local", ["node0", "node1", "node2"], DROPPED),
], ids=["internalTrafficPolicy is cluster", "local and there is one local endpoint",
        "local and there are multiple local endpoints", "local and there are no local endpoints"])
def test_internal_traffic_policy(policy: str, nodes: list[str], expected: Distribution) -> None:
    """Upstream's TestInternalTrafficPolicy: iTP=Local keeps ClusterIP traffic on this node's endpoints, else drops."""
    svc, ports = _unnamed_port(internalTrafficPolicy=policy)
    endpoints = [endpoint(f"10.0.1.{i}", node=n) for i, n in enumerate(nodes, 1)]
    tracer = _tracer([svc, endpoint_slice("svc1-1", "svc1", endpoints, namespace="ns1", ports=ports)])
    assert _reach(tracer, POD, "172.30.1.1", 80) == expected
    assert _reach(_tracer([svc]), POD, "172.30.1.1", 80) == REJECTED  # "endpoints deleted"


def _local_policy_without_local_endpoints() -> list[dict[str, Any]]:
    svc, ports = _unnamed_port(internalTrafficPolicy="Local")
    return [svc, endpoint_slice("svc1-1", "svc1", [endpoint("10.0.1.1", node="node1")], namespace="ns1", ports=ports)]


def test_internal_traffic_policy_local_without_local_endpoints_drops_the_node_too() -> None:
    """Upstream checks no-endpoint-services before cluster-ips in one output chain: the node is dropped like a pod."""
    assert _reach(_tracer(_local_policy_without_local_endpoints()), NODE_IP, "172.30.1.1", 80) == DROPPED


# --- endpoint choice ------------------------------------------------------------------------------


def _addresses(count: int) -> list[str]:
    return [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(count)]


def _many(count: int, **spec: Any) -> list[dict[str, Any]]:
    return [service("big", "ns1", "172.30.0.60", **spec),
            endpoint_slice("big-1", "big", [endpoint(a, node="node1") for a in _addresses(count)], namespace="ns1")]


@pytest.mark.parametrize("count", [1, 3, 4, 5, 100])
def test_pick_chains_choose_uniformly(count: int) -> None:
    """Through the shared pick chains (slots that miss fall through), every endpoint gets exactly 1/N."""
    trace = _trace(_tracer(_many(count)), POD, "172.30.0.60", 80)
    assert trace.outcomes == _to(*(f"{a}:8080" for a in _addresses(count)))
    assert all(any(c.startswith("pick-") for c in b.chains) for b in trace.branches)


def test_more_endpoints_than_the_largest_pick_chain_cascade_uniformly() -> None:
    """Past the largest pick chain the Service chain holds a numgen cascade: still exactly 1/N, no pick chain."""
    count = PICK_CLASSES[-1] + 1
    trace = _trace(_tracer(_many(count)), POD, "172.30.0.60", 80)
    assert trace.outcomes == _to(*(f"{a}:8080" for a in _addresses(count)))
    assert not any(c.startswith("pick-") for b in trace.branches for c in b.chains)


def test_session_affinity_first_connection_is_uniform_and_leaves_the_mark_alone() -> None:
    """ClientIP affinity: a first connection finds nothing remembered and picks uniformly; the mark XORs cancel
    out, so only the pod that reaches itself is masqueraded."""
    objects = [service("sticky", "ns1", "172.30.0.45", sessionAffinity="ClientIP",
                       sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}}),
               endpoint_slice("sticky-1", "sticky", [endpoint("10.180.0.3"), endpoint("10.180.0.4", node="node2"),
                                                     endpoint("10.180.0.5", node="node3")], namespace="ns1"),
               SERVICE_CIDRS]
    trace = _trace(_tracer(objects), "10.180.0.4", "172.30.0.45", 80)
    assert trace.outcomes == {
        Outcome("accepted", ("10.180.0.3", 8080), False): Fraction(1, 3),
        Outcome("accepted", ("10.180.0.4", 8080), True): Fraction(1, 3),
        Outcome("accepted", ("10.180.0.5", 8080), False): Fraction(1, 3),
    }
    assert not any(c.startswith("pick-") for b in trace.branches for c in b.chains)


def test_rate_limit_lets_a_first_connection_through() -> None:
    """kproxy.io/rate-limit: a first connection is under the limit, so it is not dropped."""
    tracer = _tracer(_many(2, annotations={"kproxy.io/rate-limit": "5/second"}))
    assert _reach(tracer, POD, "172.30.0.60", 80) == _to("10.1.0.1:8080", "10.1.0.2:8080")


def test_every_limit_lets_a_first_connection_through_and_polices_it_on_the_way() -> None:
    """Issue 19's limits: a first connection is under every one (rate, total rate, count, bandwidth); its first
    packet crosses the bandwidth hook (bandwidth-prerouting, then the port's bw- chain) before dispatch."""
    limits = {"kproxy.io/rate-limit": "5/second", "kproxy.io/rate-limit-total": "50/second",
              "kproxy.io/limit-connections": "3", "kproxy.io/bandwidth-limit": "1 mbytes/second",
              "kproxy.io/limit-allowlist": "10.0.0.0/8"}
    tracer = _tracer(_many(2, annotations=limits))
    trace = _trace(tracer, POD, "172.30.0.60", 80)
    assert trace.outcomes == _to("10.1.0.1:8080", "10.1.0.2:8080")
    chains = trace.branches[0].chains
    assert chains.index("bandwidth-prerouting") < chains.index(next(c for c in chains if c.startswith("svc-")))
    assert any(c.startswith("bw-") for c in chains)


@pytest.mark.parametrize(("zone", "hints", "expected"), [
    ("zone-a", [["zone-a"], ["zone-b"], ["zone-c"], ["zone-a"]], ["10.1.2.3", "10.1.2.6"]),
    ("zone-a", [["zone-a"], ["zone-b"], None, ["zone-a"]], ["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"]),
    ("zone-c", [["zone-a", "zone-b", "zone-c"], ["zone-b", "zone-c"], ["zone-b", "zone-d"], ["zone-c"]],
     ["10.1.2.3", "10.1.2.4", "10.1.2.6"]),
    ("zone-b", [["zone-a"]], ["10.1.2.3"]),
], ids=["normal endpoint filtering", "missing hints, no filtering applied",
        "multiple hints per endpoint, filtering includes any endpoint with zone included",
        "node in different zone, no endpoint filtering"])
def test_topology_hints_narrow_the_cluster_endpoints(zone: str, hints: list[list[str] | None],
                                                     expected: list[str]) -> None:
    """Upstream's TestCategorizeEndpoints: zone hints (PreferClose) narrow the endpoints, all or nothing."""
    endpoints = [endpoint(f"10.1.2.{i}", node="node9", for_zones=h) for i, h in enumerate(hints, 3)]
    objects = [service("svc1", "ns1", "172.30.0.70", trafficDistribution="PreferClose"),
               endpoint_slice("svc1-1", "svc1", endpoints, namespace="ns1")]
    tracer = _tracer(objects, node=dataclasses.replace(NODE, zone=zone))
    assert _reach(tracer, POD, "172.30.0.70", 80) == _to(*(f"{a}:8080" for a in expected))


def test_topology_is_ignored_for_local_endpoints() -> None:
    """Upstream: under eTP=Local, outside clients get this node's endpoints whatever their hints; pods the zone's."""
    hinted = [("10.1.2.3", "zone-a", NODE_NAME), ("10.1.2.4", "zone-b", NODE_NAME), ("10.1.2.5", "zone-c", "node9"),
              ("10.1.2.6", "zone-a", "node9")]
    objects = [service("svc1", "ns1", "172.30.0.70", type="NodePort", externalTrafficPolicy="Local",
                       ports=_node_port(80, 30070, "http")),
               endpoint_slice("svc1-1", "svc1", [endpoint(a, node=n, for_zones=[z]) for a, z, n in hinted],
                              namespace="ns1")]
    tracer = _tracer(objects, node=dataclasses.replace(NODE, zone="zone-a"))
    assert _reach(tracer, CLIENT, NODE_IP, 30070) == _to("10.1.2.3:8080", "10.1.2.4:8080")
    assert _reach(tracer, POD, NODE_IP, 30070) == _to("10.1.2.3:8080", "10.1.2.6:8080")


# --- the tracer itself ----------------------------------------------------------------------------


def _held_by(fake: FakeBackend) -> Ruleset:
    """The fake's tables with their rules, as a Ruleset."""
    ruleset = Ruleset()
    for family, table in fake.tables.items():
        chains = {name: dataclasses.replace(chain, rules=tuple(fake.chain_rules(family, name)))
                  for name, chain in table.chains.items()}
        elements = {name: dict(members) for name, members in table.elements.items()}
        ruleset.tables[family] = Table(family, table.comment, dict(table.sets), chains, elements, dict(table.counters))
    return ruleset


def test_what_the_fake_backend_holds_traces_as_what_was_compiled() -> None:
    """The fake backend's tables, with their rules, send packets where the compiled ones do; read back, refused."""
    compiled = _compile(_external_policy("Local"))
    fake = FakeBackend()
    fake.apply(plan(fake.read(), compiled))
    facts = NodeFacts(NODE.addresses)
    for source, destination, port in [(POD, SVC1, 80), (CLIENT, NODE_IP, 3001), (NODE_IP, LB1, 80)]:
        packet = Packet(source, destination, port, origin="local" if source == NODE_IP else "forwarded")
        assert trace_packet(_held_by(fake), packet, facts).outcomes == trace_packet(compiled, packet, facts).outcomes
    with pytest.raises(TraceError, match="read back without their rules"):
        trace_packet(fake.read(), Packet(POD, SVC1, 80), facts)


def test_hook_order_comes_from_the_declared_priorities() -> None:
    """Move filter-output-post-dnat before DNAT (-120): the node's connection to a served ClusterIP is then rejected."""
    ruleset = _compile(_external_policy("Cluster"))
    packet, facts = Packet(NODE_IP, SVC1, 80, origin="local"), NodeFacts(NODE.addresses)
    assert all(o.verdict == "accepted" and o.target for o in trace_packet(ruleset, packet, facts).outcomes)
    chains = ruleset.table("ip").chains
    post = chains["filter-output-post-dnat"]
    chains[post.name] = dataclasses.replace(post, base=post.base.replace("priority -90", "priority -120"))
    assert trace_packet(ruleset, packet, facts).outcomes == REJECTED, "cluster-ips-check sees the ClusterIP"


def _hooks(trace: Trace) -> list[str]:
    return [c for c in trace.branches[0].chains if c.startswith(("filter-", "nat-"))]


def test_the_walk_follows_the_kernel_path() -> None:
    """Forwarded: prerouting, then forward and postrouting, or input for the node; local: output, postrouting."""
    tracer = _tracer(_external_policy("Cluster"))
    assert _hooks(_trace(tracer, POD, SVC1, 80)) == ["filter-prerouting", "nat-prerouting", "filter-forward",
                                                     "nat-postrouting"]
    assert _hooks(_trace(tracer, CLIENT, NODE_IP_ALT, 22)) == ["filter-prerouting", "nat-prerouting", "filter-input"]
    assert _hooks(_trace(tracer, NODE_IP, SVC1, 80)) == ["filter-output-pre-dnat", "nat-output",
                                                         "filter-output-post-dnat", "nat-postrouting"]


def test_probabilities_sum_to_one_and_branches_merge() -> None:
    """Branches that end alike through the same chains are merged; the distribution sums to exactly 1."""
    trace = _trace(_tracer(_many(5)), POD, "172.30.0.60", 80)
    assert sum(trace.outcomes.values()) == 1 and sum(b.probability for b in trace.branches) == 1
    assert len(trace.branches) == 5 and len({(b.outcome, b.chains) for b in trace.branches}) == 5
    assert trace.targets == {(f"10.1.0.{i}", 8080): Fraction(1, 5) for i in range(1, 6)}


def test_only_names_the_single_outcome() -> None:
    """``Trace.only`` gives the outcome of a deterministic packet and refuses a random one."""
    tracer = _tracer(_cluster_ip_general())
    assert _trace(tracer, POD, SVC1, 80).only == Outcome("accepted", ("10.180.0.1", 80))
    with pytest.raises(TraceError, match="2 outcomes"):
        _ = _trace(tracer, POD, SVC2, 80).only


def _broken(change: str) -> Ruleset:
    ruleset = _compile(_cluster_ip_general())
    table = ruleset.table("ip")
    if change == "statement":
        table.chains["services"] = Chain("services", (("not a statement",),))  # type: ignore[arg-type]
    elif change == "set type":
        table.sets["cluster-ips"] = SetDecl("set", "cluster-ips", ("type ether_addr",))
    elif change == "element":
        table.elements["cluster-ips"]["172.30.0.99 . tcp"] = Element("172.30.0.99 . tcp")
    elif change == "chain":
        table.chains["services"] = Chain("services", ((Verdict("jump", "nowhere"),),))
    elif change == "dnat in a filter chain":
        table.chains["firewall-check"] = Chain("firewall-check", ((DnatTo("10.0.0.9", 80),),))
    elif change == "hook":
        table.chains["odd"] = Chain("odd", (), base="type filter hook ingress priority 0; policy accept;")
    elif change == "verdict after a verdict":
        table.chains["services"] = Chain("services", ((Verdict("accept"), Verdict("drop")),))
    return ruleset


@pytest.mark.parametrize(("change", "message"), [
    ("statement", "is not understood"),
    ("set type", "unknown type 'ether_addr'"),
    ("element", "does not have 1 parts"),
    ("chain", "no chain nowhere"),
    ("dnat in a filter chain", "outside a nat prerouting or output chain"),
    ("hook", "hook 'ingress' is not traced"),
    ("verdict after a verdict", "a statement after a verdict"),
])
def test_what_it_does_not_understand_is_an_error(change: str, message: str) -> None:
    """A statement, set type, element, chain or hook the tracer does not know is a TraceError, never a guess."""
    with pytest.raises(TraceError, match=message):
        trace_packet(_broken(change), Packet(POD, SVC1, 80), NodeFacts(NODE.addresses))


@pytest.mark.parametrize("arguments", [
    (POD, NODE_IP6, 80, "tcp"),
    (POD, SVC1, 70000, "tcp"),
    (POD, SVC1, 80, "icmp"),
    ("pod-a", SVC1, 80, "tcp"),
], ids=["mixed families", "port", "protocol", "address"])
def test_a_malformed_packet_is_an_error(arguments: tuple[str, str, int, str]) -> None:
    """A packet the tracer cannot walk is refused when it is made."""
    with pytest.raises(TraceError):
        Packet(*arguments)  # type: ignore[arg-type]
