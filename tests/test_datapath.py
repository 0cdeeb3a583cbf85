"""Real packets through kproxy's rules, in the network-namespace test bed.

Every test builds Services for the bed's pods, programs the node namespace's
kernel (in-process, through the same compiler, planner and libnftables backend
``kproxy --once`` uses), and sends real TCP and UDP from pods, the node and
external clients.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.builders import endpoint_slice, service
from tests.harness.netbed import NetBed, Pod
from tests.harness.program import node_manifest, pod_endpoint, pod_slice, program

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
# Chi-square critical values at p = 1e-6, by degrees of freedom: an even spread fails by chance once in a million
# checks (at p = 0.001 the suite's three checks failed one run in 350), while one endpoint at double weight still
# gives a statistic of about 70 (N=600) or 50 (N=400) with 4 endpoints, and a missing endpoint is caught by name.
CHI2_CRITICAL = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89, 6: 38.26, 7: 40.52}


def chi_square(counts: dict[str, int], expected_keys: list[str]) -> float:
    total = sum(counts.get(k, 0) for k in expected_keys)
    expected = total / len(expected_keys)
    return sum((counts.get(k, 0) - expected) ** 2 / expected for k in expected_keys)


def assert_even_spread(results, pods: list[Pod]) -> None:
    assert results.all_ok, results.summary()
    names = [p.name for p in pods]
    counts = dict(results.by_server)
    assert set(counts) == set(names), counts
    statistic = chi_square(counts, names)
    assert statistic < CHI2_CRITICAL[len(names) - 1], (statistic, counts)


@pytest.fixture
def bed(netbed: NetBed) -> NetBed:
    """The test bed with servers in every pod (TCP 8080, UDP 5353), and a default route on the node.

    A real node has a default route; without one, the node's own connections to
    a ClusterIP fail routing before the output hook can translate them.
    """
    netbed.node.ip("route", "add", "default", "via", netbed.router_ip4)
    netbed.node.ip("-6", "route", "add", "default", "via", netbed.router_ip6)
    netbed.start_servers(tcp_ports=[8080], udp_ports=[5353])
    return netbed


def test_clusterip_spreads_evenly_from_pod_and_node(bed: NetBed) -> None:
    """A ClusterIP reaches every endpoint, evenly, from a pod and from the node itself."""
    client_pod, endpoints = bed.local_pods[-1], bed.local_pods[:-1] + bed.remote_pods
    program(bed, [service("web", cluster_ip="10.96.0.10"), pod_slice("web", endpoints)])
    assert_even_spread(client_pod.netns.connect_many("10.96.0.10", 80, 600), endpoints)
    assert_even_spread(bed.node.connect_many("10.96.0.10", 80, 600), endpoints)


def test_clusterip_udp(bed: NetBed) -> None:
    """UDP to a ClusterIP reaches the endpoints."""
    program(bed, [service("dns", cluster_ip="10.96.0.53", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
                  pod_slice("dns", bed.remote_pods, port=5353, protocol="UDP", port_name="dns")])
    results = bed.local_pods[0].netns.connect_many("10.96.0.53", 53, 60, proto="udp")
    assert results.all_ok, results.summary()
    assert results.servers == {p.name for p in bed.remote_pods}


def test_udp_reaches_every_endpoint_when_they_fill_a_pick_chain(bed: NetBed) -> None:
    """UDP with exactly 4 endpoints (every slot of pick-4, the first rule included) spreads over all 4.

    nft 1.0.6 once made the first pick rule of a batch TCP-only, so the 4th
    endpoint of a UDP Service never got a new flow. The table is built as the
    daemon builds it: the skeleton first, then the Service in a later batch.
    """
    client, endpoints = bed.local_pods[0], bed.local_pods[1:] + bed.remote_pods
    assert len(endpoints) == 4
    program(bed, [])
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    program(bed, [service("dns", cluster_ip="10.96.0.53", ports=ports),
                  pod_slice("dns", endpoints, port=5353, protocol="UDP", port_name="dns")])
    assert_even_spread(client.netns.connect_many("10.96.0.53", 53, 400, proto="udp"), endpoints)


def test_nodeport_loadbalancer_and_external_ip_from_outside(bed: NetBed) -> None:
    """An external client reaches a NodePort on the node IP, a load-balancer IP and an external IP."""
    program(bed, [
        service("web", cluster_ip="10.96.0.10", type="LoadBalancer", externalIPs=["198.51.100.10"],
                ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}),
        pod_slice("web", bed.pods),
    ])
    for dst, port in ((bed.node_ip4, 30080), ("203.0.113.10", 80), ("198.51.100.10", 80)):
        results = bed.client.connect_many(dst, port, 100)
        assert results.all_ok, (dst, results.summary())
        assert results.servers == {p.name for p in bed.pods}, dst


def test_source_ip_kept_under_local_policy_and_masqueraded_under_cluster(bed: NetBed) -> None:
    """externalTrafficPolicy Local shows the client's IP; Cluster shows a node address."""
    local = bed.local_pods[:1]
    program(bed, [
        service("keep", cluster_ip="10.96.0.11", type="NodePort", externalTrafficPolicy="Local",
                ports=[{"name": "http", "port": 80, "nodePort": 30081}]),
        pod_slice("keep", local + bed.remote_pods),
        service("masq", cluster_ip="10.96.0.12", type="NodePort",
                ports=[{"name": "http", "port": 80, "nodePort": 30082}]),
        pod_slice("masq", local + bed.remote_pods),
    ])
    kept = bed.client.connect_many(bed.node_ip4, 30081, 40)
    assert kept.all_ok, kept.summary()
    assert kept.servers == {local[0].name}, "Local policy must only use local endpoints"
    assert kept.peers == {bed.client_ip4}
    masqueraded = bed.client.connect_many(bed.node_ip4, 30082, 40)
    assert masqueraded.all_ok, masqueraded.summary()
    assert masqueraded.peers <= {bed.node_pod_gw4, bed.node_transit_ip4}, masqueraded.peers


def test_hairpin(bed: NetBed) -> None:
    """A pod reaches itself through its own Service."""
    pod = bed.local_pods[0]
    program(bed, [service("self", cluster_ip="10.96.0.13"), pod_slice("self", [pod])])
    results = pod.netns.connect_many("10.96.0.13", 80, 20)
    assert results.all_ok, results.summary()
    assert results.servers == {pod.name}


def test_session_affinity(bed: NetBed) -> None:
    """ClientIP affinity sends every connection from one client to one endpoint."""
    program(bed, [service("sticky", cluster_ip="10.96.0.14", type="NodePort", sessionAffinity="ClientIP",
                          ports=[{"name": "http", "port": 80, "nodePort": 30084}]),
                  pod_slice("sticky", bed.pods)])
    for client in (bed.client, bed.client2):
        results = client.connect_many(bed.node_ip4, 30084, 60, parallel=1)
        assert results.all_ok, results.summary()
        assert len(results.servers) == 1, results.by_server
    from_pod = bed.local_pods[0].netns.connect_many("10.96.0.14", 80, 60, parallel=1)
    assert from_pod.all_ok and len(from_pod.servers) == 1, from_pod.by_server


def test_no_endpoints_refuses_at_once_and_local_policy_drops(bed: NetBed) -> None:
    """A Service without endpoints refuses fast; Local policy without local endpoints drops."""
    program(bed, [
        service("empty", cluster_ip="10.96.0.15", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30085}]),
        pod_slice("empty", bed.local_pods[:1], ready=False),
        service("remote-only", cluster_ip="10.96.0.16", type="NodePort", externalTrafficPolicy="Local",
                ports=[{"name": "http", "port": 80, "nodePort": 30086}]),
        pod_slice("remote-only", bed.remote_pods),
    ])
    for ns, dst, port in ((bed.local_pods[1].netns, "10.96.0.15", 80), (bed.client, bed.node_ip4, 30085),
                          (bed.node, "10.96.0.15", 80)):
        result = ns.connect(dst, port, timeout=2.0)
        assert result.error == "refused" and result.elapsed < 0.5, (dst, str(result))
    dropped = bed.client.connect(bed.node_ip4, 30086, timeout=0.5)
    assert dropped.error == "timeout", str(dropped)
    from_pod = bed.local_pods[0].netns.connect_many(bed.node_ip4, 30086, 10)
    assert from_pod.all_ok, "pods still reach a Local-policy Service through the cluster endpoints"


def test_undefined_clusterip_port_is_rejected(bed: NetBed) -> None:
    """A ClusterIP port no Service defines is refused, not silently dropped."""
    program(bed, [service("web", cluster_ip="10.96.0.17"), pod_slice("web", bed.pods)])
    result = bed.local_pods[0].netns.connect("10.96.0.17", 81, timeout=2.0)
    assert result.error == "refused" and result.elapsed < 0.5, str(result)


def test_load_balancer_source_ranges(bed: NetBed) -> None:
    """A client outside loadBalancerSourceRanges is blocked; one inside gets through."""
    program(bed, [
        service("fw", cluster_ip="10.96.0.18", type="LoadBalancer", loadBalancerSourceRanges=[f"{bed.client_ip4}/32"],
                ports=[{"name": "http", "port": 80, "nodePort": 30088}],
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.18"}]}}),
        pod_slice("fw", bed.pods),
    ])
    allowed = bed.client.connect_many("203.0.113.18", 80, 10)
    assert allowed.all_ok, allowed.summary()
    blocked = bed.client2.connect("203.0.113.18", 80, timeout=0.5)
    assert blocked.error == "timeout", str(blocked)
    nodeport = bed.client2.connect(bed.node_ip4, 30088)
    assert nodeport.ok, "source ranges restrict the load-balancer IP only, not the NodePort"


def test_prefer_close(bed: NetBed) -> None:
    """With zone hints only same-zone endpoints get traffic; one un-hinted endpoint restores all."""
    def slice_for(hinted_all: bool) -> dict[str, Any]:
        eps = [pod_endpoint(p, for_zones=[p.zone]) for p in bed.pods]
        if not hinted_all:
            eps[-1] = pod_endpoint(bed.pods[-1])
        return endpoint_slice("close-1", "close", eps)

    spec = dict(cluster_ip="10.96.0.19", trafficDistribution="PreferClose")
    program(bed, [service("close", **spec), slice_for(True)])
    results = bed.local_pods[0].netns.connect_many
    same_zone = results("10.96.0.19", 80, 200)
    assert same_zone.all_ok and same_zone.servers == {p.name for p in bed.local_pods}, same_zone.by_server
    program(bed, [service("close", **spec), slice_for(False)])
    everywhere = results("10.96.0.19", 80, 300)
    assert everywhere.all_ok and everywhere.servers == {p.name for p in bed.pods}, everywhere.by_server


def test_rate_limit_meter_isolates_clients(bed: NetBed) -> None:
    """A client over the limit has its excess dropped; another client at the same time is unaffected."""
    program(bed, [
        service("limited", cluster_ip="10.96.0.20", type="NodePort",
                annotations={"kproxy.io/rate-limit": "5/minute", "kproxy.io/rate-limit-burst": "5"},
                ports=[{"name": "http", "port": 80, "nodePort": 30090}]),
        pod_slice("limited", bed.pods),
    ])
    noisy: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: noisy.setdefault("results", bed.client.connect_many(bed.node_ip4, 30090, 40, timeout=0.5))
    )
    thread.start()
    quiet = bed.client2.connect_many(bed.node_ip4, 30090, 5, parallel=1, timeout=2.0)
    thread.join()
    flood = noisy["results"]
    assert quiet.all_ok, "the second client stays within its own limit: " + quiet.summary()
    assert 1 <= len(flood.ok) <= 11, flood.summary()
    assert set(flood.by_error) == {"timeout"}, flood.summary()


def test_ipv6_dual_stack(bed: NetBed) -> None:
    """A dual-stack Service works over IPv6: ClusterIP from a pod, NodePort from a client."""
    program(bed, [
        service("web", cluster_ip=["10.96.0.21", "fd00:96::21"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                ports=[{"name": "http", "port": 80, "nodePort": 30091}]),
        pod_slice("web", bed.pods, family=4),
        pod_slice("web", bed.pods, family=6),
    ])
    from_pod = bed.local_pods[0].netns.connect_many("fd00:96::21", 80, 100)
    assert from_pod.all_ok and from_pod.servers == {p.name for p in bed.pods}, from_pod.summary()
    from_client = bed.client.connect_many(bed.node_ip6, 30091, 50)
    assert from_client.all_ok, from_client.summary()
    assert bed.local_pods[0].netns.connect_many("10.96.0.21", 80, 10).all_ok


def test_atomic_switch_loses_no_connection(bed: NetBed) -> None:
    """A client connecting all the time sees no failure while endpoints are added and removed 30 times."""
    client = bed.local_pods[-1]
    pods = bed.local_pods[:-1] + bed.remote_pods
    svc = service("churn", cluster_ip="10.96.0.22")
    program(bed, [svc, pod_slice("churn", pods[:1])])
    with client.netns.start_loop("10.96.0.22", 80, interval_ms=5) as loop:
        loop.wait_ok(5)
        for i in range(30):
            subset = [p for j, p in enumerate(pods) if (i >> j) & 1] or pods[i % len(pods):][:1]
            program(bed, [svc, pod_slice("churn", subset)])
            loop.wait_more_ok(2)
        summary = loop.stop()
    assert summary.failed == 0, summary
    assert summary.ok >= 60


def _kproxy_in_node(bed: NetBed, *args: str) -> subprocess.CompletedProcess[str]:
    return bed.node.run(sys.executable, "-m", "kproxy", *args, check=False)


def test_once_twice_changes_nothing_and_cleanup_removes_only_kproxy(bed: NetBed, tmp_path: Path) -> None:
    """kproxy --once converges; a second run sends 0 operations; --cleanup leaves other tables alone."""
    manifests = tmp_path / "cluster.yaml"
    manifests.write_text(yaml.safe_dump_all([
        node_manifest(bed),
        service("web", cluster_ip="10.96.0.23", type="NodePort", sessionAffinity="ClientIP",
                ports=[{"name": "http", "port": 80, "nodePort": 30093}]),
        pod_slice("web", bed.pods),
    ]))
    bed.node.nft("add table inet host-firewall")
    bed.node.nft("add chain inet host-firewall input { type filter hook input priority 0; policy accept; }")
    args = ["--once", "--from-file", str(manifests), "--node-name", bed.node_name, "--cluster-cidr", "10.244.0.0/16"]
    first = _kproxy_in_node(bed, *args)
    assert first.returncode == 0, first.stderr
    assert "applied 0 operations" not in first.stdout
    assert bed.client.connect_many(bed.node_ip4, 30093, 5).all_ok
    second = _kproxy_in_node(bed, *args)
    assert second.returncode == 0, second.stderr
    assert "applied 0 operations" in second.stdout, second.stdout
    cleanup = _kproxy_in_node(bed, "--cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    tables = bed.node.nft("list tables").stdout.split()
    assert "host-firewall" in tables and "kproxy" not in tables, tables


def test_once_without_node_object_uses_interface_addresses(bed: NetBed, tmp_path: Path) -> None:
    """Without the Node object, NodePorts answer on the namespace's own addresses."""
    manifests = tmp_path / "cluster.yaml"
    manifests.write_text(yaml.safe_dump_all([
        service("web", cluster_ip="10.96.0.24", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30094}]),
        pod_slice("web", bed.pods),
    ]))
    result = _kproxy_in_node(bed, "--once", "--from-file", str(manifests), "--node-name", bed.node_name)
    assert result.returncode == 0, result.stderr
    assert bed.client.connect_many(bed.node_ip4, 30094, 5).all_ok
