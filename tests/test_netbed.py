"""Self-tests of the network-namespace test bed (no nftables rules loaded)."""
from __future__ import annotations

import subprocess
from ipaddress import ip_address, ip_network

import pytest

from tests.harness.netbed import NS_PREFIX, NetBed, build_netbed, require_root

pytestmark = pytest.mark.root


def _netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_topology_shape(netbed: NetBed):
    """The bed has unique kpt- namespaces, the documented addresses and forwarding on."""
    names = netbed.ns_names()
    assert len(names) == len(set(names)) == 4 + 3 + 2
    assert all(n.startswith(f"{NS_PREFIX}{netbed.suffix}-") for n in names)
    assert set(names) <= _netns_list()
    assert [p.ip4 for p in netbed.local_pods] == ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
    assert [p.ip6 for p in netbed.remote_pods] == ["fd00:244:0:2::11", "fd00:244:0:2::12"]
    for pods, cidr4, cidr6 in ((netbed.local_pods, netbed.node_pod_cidr4, netbed.node_pod_cidr6),
                               (netbed.remote_pods, netbed.remote_pod_cidr4, netbed.remote_pod_cidr6)):
        for p in pods:
            assert ip_address(p.ip4) in ip_network(cidr4) and ip_network(cidr4).subnet_of(ip_network(netbed.pod_cidr4))
            assert ip_address(p.ip6) in ip_network(cidr6) and ip_network(cidr6).subnet_of(ip_network(netbed.pod_cidr6))
    assert {(p.node_name, p.zone) for p in netbed.local_pods} == {("node-a", "zone-a")}
    assert {(p.node_name, p.zone) for p in netbed.remote_pods} == {("node-b", "zone-b")}
    for ns in (netbed.node, netbed.router):
        out = ns.run("sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding").stdout.split()
        assert out == ["1", "1"], ns
    addrs = netbed.node.ip("-br", "addr", "show", "dev", netbed.node_ext_if).stdout
    assert f"{netbed.node_ip4}/24" in addrs and f"{netbed.node_ip6}/64" in addrs


def test_client_reaches_node_ip(netbed: NetBed):
    """Both external clients reach a server on the node IP over TCP and UDP, v4 and v6."""
    netbed.start_server(netbed.node, "node-a", tcp_ports=[80], udp_ports=[53])
    for client, ip4, ip6 in ((netbed.client, netbed.client_ip4, netbed.client_ip6),
                             (netbed.client2, netbed.client2_ip4, netbed.client2_ip6)):
        for dst, src in ((netbed.node_ip4, ip4), (netbed.node_ip6, ip6)):
            for proto, port in (("tcp", 80), ("udp", 53)):
                res = client.connect_many(dst, port, 5, proto)
                assert res.all_ok, res.summary()
                assert res.servers == {"node-a"} and res.peers == {src}
                assert len({r.local_port for r in res}) == 5  # fresh source port per attempt
    # UDP replies leave from the address the datagram was sent to (IP_PKTINFO), so a
    # connected client socket accepts them even for a secondary node address.
    for dst in (netbed.node_transit_ip4, netbed.node_transit_ip6):
        assert netbed.client.connect_many(dst, 53, 2, "udp").servers == {"node-a"}


def test_local_pod_reaches_remote_pod(netbed: NetBed):
    """A local pod reaches remote pods by pod IP (TCP+UDP, v4+v6) and the server sees its real IP."""
    netbed.start_servers(tcp_ports=[8080], udp_ports=[5353])
    a1 = netbed.local_pods[0]
    for pod in netbed.remote_pods:
        for dst, src in ((pod.ip4, a1.ip4), (pod.ip6, a1.ip6)):
            for proto, port in (("tcp", 8080), ("udp", 5353)):
                res = a1.netns.connect_many(dst, port, 3, proto)
                assert res.all_ok, res.summary()
                assert res.servers == {pod.name} and res.peers == {src}


def test_node_reaches_every_pod(netbed: NetBed):
    """The node namespace reaches every local and remote pod on all server ports."""
    servers = netbed.start_servers()
    assert set(servers) == {p.name for p in netbed.pods}
    for pod in netbed.pods:
        for dst in pod.ips:
            for proto, port in (("tcp", 80), ("tcp", 8080), ("udp", 53), ("udp", 5353)):
                res = netbed.node.connect_many(dst, port, 2, proto)
                assert res.all_ok and res.servers == {pod.name}, (pod.name, dst, proto, res.summary())
    # Node-originated traffic to local pods is sourced from the pod gateway address.
    assert netbed.node.connect(netbed.local_pods[0].ip4, 80).peer == netbed.node_pod_gw4


def test_pod_to_pod_same_node_and_clients_cannot_address_pods(netbed: NetBed):
    """Local pods reach each other via the node; clients cannot address pod IPs directly."""
    netbed.start_servers(tcp_ports=[80], udp_ports=[])
    a1, a2 = netbed.local_pods[:2]
    res = a2.netns.connect_many(a1.ip6, 80, 2)
    assert res.all_ok and res.peers == {a2.ip6}
    res = a1.netns.connect_many(a2.ip4, 80, 2)
    assert res.all_ok and res.peers == {a1.ip4}
    for client in (netbed.client, netbed.client2):
        for pod in (a1, netbed.remote_pods[0]):
            for dst in pod.ips:
                assert client.connect(dst, 80).error == "unreachable", (client, dst)


def test_error_kinds(netbed: NetBed):
    """Closed ports give 'refused' (TCP RST, ICMP port unreachable); silence gives 'timeout'."""
    c = netbed.client
    assert c.connect_many(netbed.node_ip4, 81, 2, "tcp").by_error == {"refused": 2}
    assert c.connect_many(netbed.node_ip6, 81, 2, "tcp").by_error == {"refused": 2}
    assert c.connect_many(netbed.node_ip4, 81, 2, "udp").by_error == {"refused": 2}
    assert c.connect_many(netbed.node_ip6, 81, 2, "udp").by_error == {"refused": 2}
    # Nobody answers ARP for an unused on-link address.
    assert c.connect(f"192.168.50.{250}", 80, timeout=0.2).error == "timeout"
    # The node has no route to 10.96.0.0/12: ICMP net unreachable.
    assert c.connect("10.96.0.1", 80, timeout=0.5).error == "unreachable"


def test_subprocess_connect_matches_in_process(netbed: NetBed):
    """`trafficd.py connect` run inside the namespace gives the same results as in-process."""
    netbed.start_servers(tcp_ports=[80], udp_ports=[53], pods=netbed.remote_pods[:1])
    a1, b1 = netbed.local_pods[0], netbed.remote_pods[0]
    for proto, port in (("tcp", 80), ("udp", 53)):
        for in_process in (True, False):
            res = a1.netns.connect_many(b1.ip4, port, 4, proto, in_process=in_process)
            assert res.all_ok and res.servers == {b1.name} and res.peers == {a1.ip4}, res.summary()
    same = a1.netns.connect_many(b1.ip6, 53, 4, "udp", same_source_port=True, in_process=False)
    assert same.all_ok and len({r.local_port for r in same}) == 1, same.summary()
    assert a1.netns.connect_many(b1.ip6, 81, 2, "tcp", in_process=False).by_error == {"refused": 2}


def test_loop_and_udp_flow(netbed: NetBed):
    """The loop helper reports no failures on a stable path; udp-flow keeps one source port."""
    netbed.start_server(netbed.node, "node-a", tcp_ports=[80], udp_ports=[53])
    with netbed.client.start_loop(netbed.node_ip6, 80, interval_ms=5) as loop:
        loop.wait_ok(10, timeout=5)
        loop.wait_more_ok(5, timeout=5)
        summary = loop.stop()
    assert summary.failed == 0 and summary.ok >= 15 and summary.by_server == {"node-a": summary.ok}
    with netbed.client2.start_udp_flow(netbed.node_ip4, 53, interval_ms=10) as flow:
        got = [flow.wait_server("node-a", timeout=5) for _ in range(3)]
    assert {(r.local_port, r.peer) for r in got} == {(flow.local_port, netbed.client2_ip4)}


def test_build_netbed_tears_down():
    """build_netbed deletes all its namespaces and processes on exit, also after an exception."""
    require_root()
    with build_netbed(local_pods=2, remote_pods=1) as bed:
        names = bed.ns_names()
        assert len(names) == 7 and set(names) <= _netns_list()
        server = bed.start_server(bed.local_pods[1].netns, "x", tcp_ports=[80])
        loop = bed.client.start_loop(bed.node_ip4, 9, interval_ms=50)
    assert not set(names) & _netns_list()
    assert server.proc.poll() is not None and loop.proc.poll() is not None

    with pytest.raises(RuntimeError, match="boom"):
        with build_netbed(local_pods=1, remote_pods=1) as bed2:
            names2 = bed2.ns_names()
            bed2.start_servers(tcp_ports=[80], udp_ports=[])
            raise RuntimeError("boom")
    assert not set(names2) & _netns_list()


def test_build_netbed_cleans_up_failed_setup(monkeypatch):
    """If building fails half-way, the namespaces created so far are deleted."""
    require_root()
    import tests.harness.netbed as nb

    seen: list[str] = []

    def failing_batches(batches):
        seen.extend(batches)
        raise RuntimeError("setup failed")

    monkeypatch.setattr(nb, "_parallel_batches", failing_batches)
    with pytest.raises(RuntimeError, match="setup failed"):
        with build_netbed(local_pods=1, remote_pods=1):
            pytest.fail("body must not run")
    assert seen and not set(seen) & _netns_list()


def test_concurrent_beds_do_not_clash():
    """Two beds coexist with distinct namespace names and identical, isolated addressing."""
    require_root()
    with build_netbed(1, 1) as a, build_netbed(1, 1) as b:
        assert not set(a.ns_names()) & set(b.ns_names())
        a.start_server(a.node, "bed-a", tcp_ports=[80])
        b.start_server(b.node, "bed-b", tcp_ports=[80])
        assert a.client.connect(a.node_ip4, 80).server == "bed-a"
        assert b.client.connect(b.node_ip4, 80).server == "bed-b"


@pytest.mark.parametrize("netbed", [{"local_pods": 1, "remote_pods": 3}], indirect=True)
def test_pod_counts_are_configurable(netbed: NetBed):
    """Indirect parametrisation of the fixture sets the number of local and remote pods."""
    assert [p.name for p in netbed.pods] == ["pod-a1", "pod-b1", "pod-b2", "pod-b3"]
    netbed.start_servers(tcp_ports=[80], udp_ports=[])
    res = netbed.local_pods[0].netns.connect_many(netbed.pod("pod-b3").ip4, 80, 2)
    assert res.servers == {"pod-b3"}
