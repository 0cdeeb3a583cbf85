"""Where kube-proxy and kproxy once differed: real packets, in the network-namespace test bed.

Each test is one of the cases where a cluster that works with upstream
kube-proxy (nftables mode) broke under kproxy, programmed with ``kproxy
--once`` (the daemon's sync engine) and checked with TCP connections, in IPv4
and, where it applies, IPv6. Each failed on the code before the fix.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.builders import endpoint, endpoint_slice, node, service
from tests.harness.netbed import NetBed, Pod

pytestmark = pytest.mark.root

CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/48"


@pytest.fixture
def bed(netbed: NetBed) -> NetBed:
    """Servers in every pod (TCP 8080), and default routes on the node (through the router)."""
    netbed.node.ip("route", "add", "default", "via", netbed.router_ip4)
    netbed.node.ip("-6", "route", "add", "default", "via", netbed.router_ip6)
    netbed.start_servers(tcp_ports=[8080], udp_ports=[])
    return netbed


def pod_slice(name: str, pods: list[Pod], family: int = 4, **kw: Any) -> dict[str, Any]:
    eps = [endpoint(p.ip4 if family == 4 else p.ip6, node=p.node_name, zone=p.zone) for p in pods]
    for ep in eps:
        ep.update(kw)
    return endpoint_slice(f"{name}-{family}", name, eps, address_type="IPv4" if family == 4 else "IPv6")


def once(bed: NetBed, tmp_path: Path, objects: list[dict[str, Any]], *flags: str) -> None:
    """``kproxy --once`` in the node namespace for ``objects`` (and the bed's Node)."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump_all([node(bed.node_name, [bed.node_ip4, bed.node_ip6], zone=bed.zone), *objects]))
    result = bed.node.run(sys.executable, "-m", "kproxy", "--once", "--from-file", str(path), "--node-name",
                          bed.node_name, "--cluster-cidr", CLUSTER_CIDRS, *flags, check=False)
    assert result.returncode == 0, result.stderr


def test_source_ranges_holding_the_node_allow_the_load_balancer_ips(bed: NetBed, tmp_path: Path) -> None:
    """A range with the node's IP lets the node reach its own LB IP with the LB IP as source (MetalLB, kube-vip)."""
    once(bed, tmp_path, [
        service("lb", cluster_ip=["10.96.0.30", "fd00:96::30"], ipFamilies=["IPv4", "IPv6"], type="LoadBalancer",
                loadBalancerSourceRanges=[f"{bed.node_ip4}/32", f"{bed.node_ip6}/128"],
                ports=[{"name": "http", "port": 80, "nodePort": 30130}],
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.30"}, {"ip": "2001:db8::30"}]}}),
        pod_slice("lb", bed.pods, 4), pod_slice("lb", bed.pods, 6),
    ])
    bed.node.ip("addr", "add", "203.0.113.30/32", "dev", "lo")  # the VIP held by the node itself
    bed.node.ip("-6", "addr", "add", "2001:db8::30/128", "dev", "lo", "nodad")
    for vip in ("203.0.113.30", "2001:db8::30"):
        from_vip = bed.node.connect_many(vip, 80, 10, src=vip)
        assert from_vip.all_ok, f"{vip} as its own source: {from_vip.summary()}"
    blocked = bed.client.connect("203.0.113.30", 80, timeout=0.5)
    assert blocked.error == "timeout", "a source outside the ranges is still dropped"


def test_nodeport_addresses_cidrs_match_the_interfaces(bed: NetBed, tmp_path: Path) -> None:
    """--nodeport-addresses CIDRs open NodePorts on interface addresses the Node object does not list."""
    bed.node.ip("link", "add", "second0", "type", "veth", "peer", "name", "second1")  # a second NIC
    for link in ("second0", "second1"):
        bed.node.ip("link", "set", link, "up")
    bed.node.ip("addr", "add", "10.20.0.5/32", "dev", "second0")
    bed.node.ip("-6", "addr", "add", "fd00:20::5/128", "dev", "second0", "nodad")
    objects = [
        service("np", cluster_ip=["10.96.0.31", "fd00:96::31"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                ports=[{"name": "http", "port": 80, "nodePort": 30131}]),
        pod_slice("np", bed.pods, 4), pod_slice("np", bed.pods, 6),
    ]
    once(bed, tmp_path, objects, "--nodeport-addresses", "10.20.0.0/16,fd00:20::/64")
    for dst in ("10.20.0.5", "fd00:20::5"):
        results = bed.client.connect_many(dst, 30131, 20)
        assert results.all_ok, f"NodePort on {dst}: {results.summary()}"
    # From client2: the refused probe leaves an untranslated conntrack entry that the 'all' check below from client
    # could meet again if it reused the probe's source port.
    assert bed.client2.connect(bed.node_ip4, 30131).error == "refused", "the primary IP is not in the CIDRs"

    once(bed, tmp_path, objects, "--nodeport-addresses", "all")
    for dst in (bed.node_ip4, bed.node_ip6, "10.20.0.5", "fd00:20::5"):
        results = bed.client.connect_many(dst, 30131, 10)
        assert results.all_ok, f"'all' includes {dst}: {results.summary()}"


@pytest.mark.parametrize("node_name", [None, "node-z"], ids=["no-node-name", "another-node-name"])
def test_hairpin_whatever_the_endpoint_node_name(bed: NetBed, tmp_path: Path, node_name: str | None) -> None:
    """A pod reaching itself through its Service is masqueraded even when the slice does not say it is local."""
    pod = bed.local_pods[0]
    eps4 = endpoint_slice("self-4", "self", [endpoint(pod.ip4, node=node_name)])
    eps6 = endpoint_slice("self-6", "self", [endpoint(pod.ip6, node=node_name)], address_type="IPv6")
    once(bed, tmp_path, [service("self", cluster_ip=["10.96.0.32", "fd00:96::32"], ipFamilies=["IPv4", "IPv6"]),
                         eps4, eps6])
    for vip in ("10.96.0.32", "fd00:96::32"):
        results = pod.netns.connect_many(vip, 80, 10, timeout=2)
        assert results.all_ok and results.servers == {pod.name}, f"{vip}: {results.summary()}"


def test_local_external_policy_short_circuits_to_the_cluster_endpoints(bed: NetBed, tmp_path: Path) -> None:
    """eTP=Local with iTP=Local: pods and the node reach the LB IP and NodePort through all endpoints, as upstream."""
    once(bed, tmp_path, [
        service("both-local", cluster_ip=["10.96.0.33", "fd00:96::33"], ipFamilies=["IPv4", "IPv6"],
                type="LoadBalancer", externalTrafficPolicy="Local", internalTrafficPolicy="Local",
                ports=[{"name": "http", "port": 80, "nodePort": 30133}],
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.33"}, {"ip": "2001:db8::33"}]}}),
        pod_slice("both-local", bed.remote_pods, 4), pod_slice("both-local", bed.remote_pods, 6),
    ])
    remote = {p.name for p in bed.remote_pods}
    client_pod = bed.local_pods[0].netns
    for dst, port in (("203.0.113.33", 80), (bed.node_ip4, 30133), ("2001:db8::33", 80), (bed.node_ip6, 30133)):
        from_pod = client_pod.connect_many(dst, port, 40)
        assert from_pod.all_ok and from_pod.servers == remote, f"pod -> {dst}:{port}: {from_pod.summary()}"
        pod_ip = bed.local_pods[0].ip6 if ":" in dst else bed.local_pods[0].ip4
        assert from_pod.peers == {pod_ip}, "a pod's traffic keeps its source"
        from_node = bed.node.connect_many(dst, port, 40)
        assert from_node.all_ok and from_node.servers == remote, f"node -> {dst}:{port}: {from_node.summary()}"
    assert bed.client.connect(bed.node_ip4, 30133, timeout=0.5).error == "timeout", \
        "external traffic still needs a local endpoint"
    assert client_pod.connect("10.96.0.33", 80, timeout=0.5).error == "timeout", \
        "the ClusterIP follows internalTrafficPolicy Local: no local endpoint, dropped"


def test_unallocated_service_ips_are_dropped(bed: NetBed, tmp_path: Path) -> None:
    """A connection to an address of the ServiceCIDRs that no Service holds is dropped on the node."""
    for address in ("10.96.99.99/32", "10.97.0.9/32"):
        bed.router.ip("addr", "add", address, "dev", "lo")
    bed.router.ip("-6", "addr", "add", "fd00:96::9999/128", "dev", "lo", "nodad")
    bed.start_server(bed.router, "outside", tcp_ports=[80])
    client = bed.local_pods[0].netns
    assert client.connect("10.96.99.99", 80).ok, "without kproxy the address is reached off the node"
    cidrs = {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
             "spec": {"cidrs": ["10.96.0.0/16", "fd00:96::/112"]}}
    once(bed, tmp_path, [cidrs, service("web", cluster_ip="10.96.0.34"), pod_slice("web", bed.pods[:1])])
    for dst in ("10.96.99.99", "fd00:96::9999"):
        result = client.connect(dst, 80, timeout=0.5)
        assert result.error == "timeout", f"{dst}: {result}"
        assert bed.node.connect(dst, 80, timeout=0.5).error == "timeout", f"{dst} from the node itself"
    assert client.connect_many("10.96.0.34", 80, 10).all_ok, "an allocated ClusterIP works"
    assert client.connect("10.96.0.34", 81, timeout=2).error == "refused", "an undefined port is still refused"
    assert client.connect("10.97.0.9", 80).ok, "an address outside the ServiceCIDRs is left alone"


def test_source_ranges_guard_a_load_balancer_without_endpoints(bed: NetBed, tmp_path: Path) -> None:
    """A blocked source is dropped even while the Service has no endpoints (not told the port exists by a reject)."""
    once(bed, tmp_path, [
        service("idle-lb", cluster_ip="10.96.0.35", type="LoadBalancer", loadBalancerSourceRanges=[f"{bed.client_ip4}/32"],
                ports=[{"name": "http", "port": 80, "nodePort": 30135}],
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.35"}]}}),
    ])
    assert bed.client.connect("203.0.113.35", 80, timeout=2).error == "refused", "an allowed source learns: no endpoints"
    assert bed.client2.connect("203.0.113.35", 80, timeout=0.5).error == "timeout", "a blocked source learns nothing"


def test_ipv6_spelled_as_nft_spells_it_converges(bed: NetBed, tmp_path: Path) -> None:
    """An IPv4-compatible IPv6 external IP ('::1:2', which nft prints '::0.1.0.2'): a second --once sends nothing."""
    objects = [service("v6", cluster_ip="fd00:96::36", ipFamilies=["IPv6"], externalIPs=["::1:2"]),
               pod_slice("v6", bed.pods[:1], 6)]
    path = tmp_path / "v6.yaml"
    path.write_text(yaml.safe_dump_all([node(bed.node_name, [bed.node_ip4, bed.node_ip6], zone=bed.zone), *objects]))
    args = (sys.executable, "-m", "kproxy", "--once", "--from-file", str(path), "--node-name", bed.node_name)
    assert "applied 0 operations" not in bed.node.run(*args).stdout
    again = bed.node.run(*args).stdout
    assert "applied 0 operations" in again, again


def test_internal_local_policy_without_local_endpoints_drops_the_node_as_a_pod(bed: NetBed, tmp_path: Path) -> None:
    """iTP=Local with endpoints only elsewhere: the node's own connection is dropped, as a pod's (upstream), not rejected.

    Found by the packet tracer: the node's no-endpoint check ran after the
    ClusterIP check, which rejected the port as undefined.
    """
    once(bed, tmp_path, [service("far", cluster_ip="10.96.0.36", internalTrafficPolicy="Local"),
                         pod_slice("far", bed.remote_pods[:1])])
    assert bed.local_pods[0].netns.connect("10.96.0.36", 80, timeout=0.5).error == "timeout", "a pod is dropped"
    assert bed.node.connect("10.96.0.36", 80, timeout=0.5).error == "timeout", "so is the node itself"
    assert bed.node.connect("10.96.0.36", 81, timeout=2).error == "refused", "an undefined port is still refused"
