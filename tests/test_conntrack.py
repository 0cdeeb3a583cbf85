"""Conntrack cleanups (stale UDP flows, untranslated TCP attempts): the pure targets and filters, the fake, and the kernel."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import pytest

from kproxy.cluster.convert import build_cluster
from kproxy.cluster.model import Cluster, IPFamily
from kproxy.nft.backend import NftablesBackend
from kproxy.node import conntrack
from kproxy.node.conntrack import (
    DeferredConntrack,
    FakeConntrack,
    FlowEntry,
    PyrouteConntrack,
    cleanup_stale_udp,
    cleanup_unanswered_tcp,
    stale_entries,
    tcp_frontends,
    udp_cleanup_targets,
    unanswered_to_frontends,
)
from kproxy.rules.compiler import NodeInfo, ProxyConfig, compile_ruleset
from kproxy.rules.plan import plan
from tests.harness.builders import endpoint, endpoint_slice, service
from tests.harness.netbed import NetBed, Netns, Pod, Results, UdpFlow

UDP, TCP = socket.IPPROTO_UDP, socket.IPPROTO_TCP
NODE = NodeInfo(name="node-a", zone="zone-a", primary_ips=("192.168.50.1", "fd00:50::1"))
CLIENT4, CLIENT6 = "192.168.50.100", "fd00:50::100"


def _cluster(objects: list[dict[str, Any]]) -> Cluster:
    cluster, problems = build_cluster(objects, "node-a")
    assert not problems, problems
    return cluster


def _udp_ports(node_port: int) -> list[dict[str, Any]]:
    return [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": node_port}]


DNS_PORTS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]

# "dns" (UDP 53 -> 5353, NodePort 30053, an externalIP and a load-balancer IP,
# dual-stack) has serving endpoints .11 (ready) and .12 (serving, terminating)
# and a not-serving one, .13. "down" (UDP, NodePort 30020) has none serving.
# "web" is TCP only.
OBJECTS = [
    service(
        "dns",
        cluster_ip=["10.96.0.10", "fd00:96::10"],
        ipFamilies=["IPv4", "IPv6"],
        type="LoadBalancer",
        externalIPs=["203.0.113.7"],
        ports=_udp_ports(30053),
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}},
    ),
    endpoint_slice(
        "dns-v4",
        "dns",
        [
            endpoint("10.244.1.11"),
            endpoint("10.244.1.12", ready=False, serving=True, terminating=True),
            endpoint("10.244.1.13", ready=False, serving=False, terminating=True),
        ],
        ports=DNS_PORTS,
    ),
    endpoint_slice("dns-v6", "dns", [endpoint("fd00:244:0:1::11")], ports=DNS_PORTS, address_type="IPv6"),
    service("down", cluster_ip="10.96.0.20", type="NodePort", ports=_udp_ports(30020)),
    endpoint_slice("down-1", "down", [endpoint("10.244.1.21", ready=False, serving=False)], ports=DNS_PORTS),
    service("web", cluster_ip="10.96.0.30", ports=[{"name": "http", "port": 53, "protocol": "TCP"}]),
    endpoint_slice("web-1", "web", [endpoint("10.244.1.31")]),
]
TARGETS = udp_cleanup_targets(_cluster(OBJECTS), NODE, ProxyConfig())


def flow(dst: str, dport: int, reply_src: str, reply_sport: int, proto: int = UDP, sport: int = 40000) -> FlowEntry:
    """A conntrack entry from a client to dst:dport whose replies come from reply_src:reply_sport."""
    family: IPFamily = 6 if ":" in dst else 4
    return FlowEntry(
        family=family,
        proto=proto,
        orig_src=CLIENT6 if family == 6 else CLIENT4,
        orig_dst=dst,
        orig_sport=sport,
        orig_dport=dport,
        reply_src=reply_src,
        reply_sport=reply_sport,
    )


CASES = [
    pytest.param(flow("10.96.0.10", 53, "10.244.1.99", 5353), True, id="stale-clusterip-entry-deleted"),
    pytest.param(flow("10.96.0.10", 53, "10.244.1.11", 5353), False, id="current-endpoint-kept"),
    pytest.param(flow("10.96.0.10", 53, "10.244.1.12", 5353), False, id="serving-terminating-endpoint-kept"),
    pytest.param(flow("10.96.0.10", 53, "10.244.1.13", 5353), True, id="not-serving-endpoint-deleted"),
    pytest.param(flow("10.96.0.10", 53, "10.244.1.11", 53), True, id="endpoint-ip-on-old-port-deleted"),
    pytest.param(flow("10.96.0.10", 53, "10.96.0.10", 53), True, id="un-dnatted-clusterip-entry-deleted"),
    pytest.param(flow("10.96.0.10", 54, "10.244.1.99", 5353), False, id="clusterip-other-port-kept"),
    pytest.param(flow("10.96.0.10", 53, "10.244.1.99", 5353, proto=TCP), False, id="tcp-ignored"),
    pytest.param(flow("10.96.0.30", 53, "10.244.1.99", 8080), False, id="tcp-only-service-ignored"),
    pytest.param(flow("203.0.113.7", 53, "10.244.1.99", 5353), True, id="external-ip-stale-deleted"),
    pytest.param(flow("198.51.100.9", 53, "10.244.1.99", 5353), True, id="load-balancer-ip-stale-deleted"),
    pytest.param(flow("198.51.100.9", 53, "10.244.1.11", 5353), False, id="load-balancer-ip-current-kept"),
    pytest.param(flow("192.168.50.1", 30053, "10.244.1.99", 5353), True, id="nodeport-on-node-ip-deleted"),
    pytest.param(flow("192.168.50.1", 30053, "10.244.1.11", 5353), False, id="nodeport-current-endpoint-kept"),
    pytest.param(flow("192.0.2.1", 30053, "192.0.2.1", 30053), False, id="nodeport-number-on-other-ip-kept"),
    pytest.param(flow("10.96.0.20", 53, "10.244.1.99", 5353), False, id="zero-serving-endpoints-clusterip-kept"),
    pytest.param(flow("192.168.50.1", 30020, "10.244.1.99", 5353), False, id="zero-serving-endpoints-nodeport-kept"),
    pytest.param(flow("1.1.1.1", 53, "1.1.1.1", 53), False, id="unrelated-ip-kept"),
    pytest.param(flow("fd00:96::10", 53, "fd00:244:0:1::99", 5353), True, id="ipv6-stale-deleted"),
    pytest.param(flow("fd00:96::10", 53, "fd00:244:0:1::11", 5353), False, id="ipv6-current-endpoint-kept"),
    pytest.param(flow("fd00:50::1", 30053, "fd00:244:0:1::99", 5353), True, id="ipv6-nodeport-deleted"),
    pytest.param(flow("fd00:50::1", 30053, "fd00:244:0:1::11", 5353), False, id="ipv6-nodeport-current-kept"),
    pytest.param(flow("2001:db8::1", 53, "2001:db8::1", 53), False, id="ipv6-unrelated-ip-kept"),
]


@pytest.mark.parametrize(("entry", "stale"), CASES)
def test_stale_entries(entry: FlowEntry, stale: bool) -> None:
    """stale_entries picks the entry exactly when it is stale."""
    assert stale_entries([entry], TARGETS) == ([entry] if stale else [])


@pytest.mark.parametrize(("entry", "stale"), CASES)
def test_cleanup_with_fake(entry: FlowEntry, stale: bool) -> None:
    """cleanup_stale_udp deletes a stale entry from the table, keeps any other, and counts."""
    table = FakeConntrack([entry])
    assert cleanup_stale_udp(table, TARGETS) == int(stale)
    assert table.entries == ([] if stale else [entry])
    assert table.deleted == ([entry] if stale else [])


def test_cleanup_whole_table(caplog: pytest.LogCaptureFixture) -> None:
    """One pass over a table with every case cleans both families and logs an info summary."""
    entries = [p.values[0] for p in CASES]
    expected_stale = [p.values[0] for p in CASES if p.values[1]]
    table = FakeConntrack(entries)
    with caplog.at_level(logging.DEBUG, logger="kproxy.node.conntrack"):
        assert cleanup_stale_udp(table, TARGETS) == len(expected_stale)
    assert sorted(table.deleted, key=str) == sorted(expected_stale, key=str)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"deleted {len(expected_stale)} stale UDP conntrack entries"
    ]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == len(expected_stale)
    assert cleanup_stale_udp(table, TARGETS) == 0  # idempotent


def test_cleanup_lists_only_entries_that_can_be_stale() -> None:
    """The table is asked for the entries to the UDP frontends and, for NodePorts, to the node's addresses: a node's
    other UDP flows (thousands, on a busy one) are never listed. (The fake filters as the kernel does, so the cases
    above prove no stale entry is missed.)"""
    table = FakeConntrack()
    cleanup_stale_udp(table, TARGETS)
    assert table.listed == [
        (4, frozenset({"10.96.0.10", "203.0.113.7", "198.51.100.9", "192.168.50.1"})),
        (6, frozenset({"fd00:96::10", "fd00:50::1"})),
    ]


def test_targets() -> None:
    """Targets hold every UDP frontend and NodePort with its serving (ip, port) endpoints, per family."""
    serving4 = frozenset({("10.244.1.11", 5353), ("10.244.1.12", 5353)})
    assert dict(TARGETS.ipv4.frontends) == {
        ("10.96.0.10", 53): serving4,
        ("203.0.113.7", 53): serving4,
        ("198.51.100.9", 53): serving4,
    }
    assert dict(TARGETS.ipv4.node_ports) == {30053: serving4}
    assert TARGETS.ipv4.node_ips == {"192.168.50.1"}
    serving6 = frozenset({("fd00:244:0:1::11", 5353)})
    assert dict(TARGETS.ipv6.frontends) == {("fd00:96::10", 53): serving6}
    assert dict(TARGETS.ipv6.node_ports) == {30053: serving6}
    assert TARGETS.ipv6.node_ips == {"fd00:50::1"}


def test_nodeport_addresses_follow_config() -> None:
    """With --nodeport-addresses, NodePort entries count only on the node addresses inside them."""
    node = NodeInfo(name="node-a", primary_ips=("192.168.50.1",), addresses=("192.168.50.1", "172.30.0.1"))
    targets = udp_cleanup_targets(_cluster(OBJECTS), node, ProxyConfig(nodeport_addresses=("172.30.0.0/30",)))
    assert targets.ipv4.node_ips == {"172.30.0.1"}
    on_primary = flow("192.168.50.1", 30053, "10.244.1.99", 5353)
    on_transit = flow("172.30.0.1", 30053, "10.244.1.99", 5353)
    assert stale_entries([on_primary, on_transit], targets) == [on_transit]


def test_no_targets_lists_nothing() -> None:
    """Without a UDP port that has serving endpoints, the table is not even listed."""

    class Unlistable(FakeConntrack):
        def list_udp(self, family: IPFamily, destinations: Collection[str] | None = None) -> list[FlowEntry]:
            raise AssertionError("listed")

    targets = udp_cleanup_targets(_cluster(OBJECTS[3:]), NODE, ProxyConfig())
    assert not targets
    assert targets.ipv4.node_ips == {"192.168.50.1"}  # the node is known, there is just nothing to clean
    assert cleanup_stale_udp(Unlistable(), targets) == 0


def test_entry_already_gone_is_not_an_error() -> None:
    """An entry that vanishes between listing and deleting is skipped and not counted."""

    class Expiring(FakeConntrack):
        def list_udp(self, family: IPFamily, destinations: Collection[str] | None = None) -> list[FlowEntry]:
            listed = super().list_udp(family, destinations)
            self.entries.clear()  # the kernel expires them right after the dump
            return listed

    table = Expiring([flow("10.96.0.10", 53, "10.244.1.99", 5353), flow("fd00:96::10", 53, "fd00:244::99", 53)])
    assert cleanup_stale_udp(table, TARGETS) == 0
    assert table.deleted == []


# --------------------------------------------------------------------------- the kernel

SVC4, SVC6, NODE_PORT = "10.96.0.10", "fd00:96::10", 30053


def _dns_objects(pod: Pod) -> list[dict[str, Any]]:
    return [
        service("dns", cluster_ip=[SVC4, SVC6], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                ports=_udp_ports(NODE_PORT)),
        endpoint_slice("dns-v4", "dns", [endpoint(pod.ip4, node=pod.node_name)], ports=DNS_PORTS),
        endpoint_slice("dns-v6", "dns", [endpoint(pod.ip6, node=pod.node_name)], ports=DNS_PORTS,
                       address_type="IPv6"),
    ]


def _next_results(flow: UdpFlow, n: int, timeout: float = 5.0) -> Results:
    """The flow's next ``n`` results, all sent after this call."""
    start = time.time()
    results = Results()
    while len(results) < n:
        results.append(flow.wait_for(lambda r: r.t >= start, timeout))
    return results


@pytest.mark.root
def test_kernel_stale_udp_flow_follows_new_endpoint(netbed: NetBed) -> None:
    """In the kernel, a UDP flow stays on the old endpoint until cleanup, then moves to the new one."""
    bed = netbed
    pod_a, pod_b = bed.local_pods[0], bed.local_pods[1]
    bed.start_servers(tcp_ports=(), udp_ports=(5353,), pods=[pod_a, pod_b])
    node = NodeInfo(name=bed.node_name, zone=bed.zone, primary_ips=(bed.node_ip4, bed.node_ip6))
    config = ProxyConfig(cluster_cidrs=(bed.pod_cidr4, bed.pod_cidr6))
    cluster_a, cluster_b = _cluster(_dns_objects(pod_a)), _cluster(_dns_objects(pod_b))
    ruleset_a, ruleset_b = compile_ruleset(cluster_a, node, config), compile_ruleset(cluster_b, node, config)
    with bed.node.entered():
        NftablesBackend().apply(plan(None, ruleset_a))

    # One socket (one 5-tuple) per flow: ClusterIP v4 and v6, and the NodePort.
    flows = {
        "clusterip-v4": bed.client.start_udp_flow(SVC4, 53, interval_ms=20),
        "clusterip-v6": bed.client.start_udp_flow(SVC6, 53, interval_ms=20),
        "nodeport-v4": bed.client2.start_udp_flow(bed.node_ip4, NODE_PORT, interval_ms=20),
    }
    for f in flows.values():
        f.wait_server(pod_a.name)

    with bed.node.entered():
        NftablesBackend().apply(plan(ruleset_a, ruleset_b))
    # The rules now send new flows to B, but every running flow still goes to A.
    for dst, port in ((SVC4, 53), (SVC6, 53), (bed.node_ip4, NODE_PORT)):
        fresh = bed.client.connect(dst, port, "udp")
        assert fresh.ok and fresh.server == pod_b.name, (dst, str(fresh))
    # Where datagrams land is the point; on a loaded machine a reply may miss its 20 ms interval (a "timeout"):
    # that is not a wrong endpoint, so only answered datagrams are judged.
    for name, f in flows.items():
        later = _next_results(f, 5)
        assert later.servers == {pod_a.name} and later.ok, (name, later.summary())

    targets = udp_cleanup_targets(cluster_b, node, config)
    with bed.node.entered():
        with PyrouteConntrack() as ct:  # its netlink sockets are opened here, in the node namespace
            stale = stale_entries(ct.list_udp(4) + ct.list_udp(6), targets)
            assert {(e.orig_dst, e.orig_dport, e.reply_src) for e in stale} == {
                (SVC4, 53, pod_a.ip4), (SVC6, 53, pod_a.ip6), (bed.node_ip4, NODE_PORT, pod_a.ip4)
            }, bed.diagnostics()
            assert cleanup_stale_udp(ct, targets) == 3  # the fresh flows to B are kept
            # ENOENT: gone. The flow may already have a new entry with the same
            # tuple (to B); the kernel id in the handle keeps that one safe.
            assert ct.delete(stale[0]) is False
            # Another thread may use it only while in the same namespace.
            seen: list[object] = []
            _in_thread(seen, lambda: ct.list_udp(4))  # a new thread starts in its creator's namespace
            assert isinstance(seen[0], list), seen
            assert (SVC4, 53, pod_b.ip4) in {(e.orig_dst, e.orig_dport, e.reply_src) for e in seen[0]}
            seen.clear()
            _in_thread(seen, lambda: _entered_call(bed.client, ct.list_udp, 4))
            assert isinstance(seen[0], RuntimeError), seen

    for name, f in flows.items():
        f.wait_server(pod_b.name, timeout=5.0)
        later = _next_results(f, 3)
        assert later.servers == {pod_b.name} and later.ok, (name, later.summary())


@pytest.mark.root
def test_kernel_listing_by_destination_is_the_full_listing_narrowed(empty_netns: Netns,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One dump per destination, filtered in the kernel, finds exactly the entries to those destinations that a dump
    of every UDP entry finds, in both families (the other entries stand for a busy node's unrelated flows). IPv6 is
    listed whole: the kernel's filter inverts the IPv6 address comparison, which this test caught."""
    inserted = [("10.96.0.10", "10.1.0.1"), ("10.96.0.11", "10.1.0.2"), ("fd00:96::10", "fd00:1::1")]
    inserted += [(f"10.97.{i // 200}.{i % 200 + 1}", "10.1.0.3") for i in range(400)]
    for dst, src in inserted:
        for sport in (20000, 20001):
            empty_netns.run("conntrack", "-I", "-p", "udp", "-s", src, "-d", dst, "--sport", str(sport),
                            "--dport", "53", "-t", "120")
    dumps: list[object] = []
    real_dump = PyrouteConntrack._dump
    monkeypatch.setattr(PyrouteConntrack, "_dump", lambda self, family, match: dumps.append(match.daddr)
                        or real_dump(self, family, match))
    with empty_netns.entered(), PyrouteConntrack() as ct:
        for budget in (conntrack._FILTERED_WALK_BUDGET, 100):  # 3 destinations x 808 entries: over 100
            monkeypatch.setattr(conntrack, "_FILTERED_WALK_BUDGET", budget)
            for family, destinations in ((4, {"10.96.0.10", "10.96.0.11", "10.96.0.99"}), (6, {"fd00:96::10"})):
                everything = ct.list_udp(family)
                dumps.clear()
                narrowed = ct.list_udp(family, destinations)
                expected = [e for e in everything if e.orig_dst in destinations]
                assert len(expected) == 2 * (len(destinations) - (family == 4))  # 10.96.0.99 has no entry
                assert len(everything) == (2 * 402 if family == 4 else 2)
                filtered = family == 4 and budget > 100
                assert dumps == (sorted(destinations) if filtered else [None]), (family, budget, dumps)
                # Filtered: exactly those entries; otherwise everything (a listing may hold more, never less).
                assert sorted(map(str, narrowed)) == sorted(map(str, expected if filtered else everything))


def _in_thread(out: list[object], fn: Callable[[], object]) -> None:
    """Run fn in a new thread; append its result, or the exception it raised, to out."""

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(10)


def _entered_call(ns: Netns, fn: Callable[..., object], *args: object) -> object:
    with ns.entered():
        return fn(*args)


GC_PROBE = """
import gc
from kproxy.node.conntrack import CleanupTargets, FamilyTargets, PyrouteConntrack, cleanup_stale_udp
targets = CleanupTargets(ipv4=FamilyTargets(frontends={("10.96.0.10", 53): frozenset({("10.244.1.11", 5353)})}))
with PyrouteConntrack() as ct:
    gc.collect()
    gc.disable()  # as --once runs
    before = len(gc.get_objects())
    deleted = cleanup_stale_udp(ct, targets)
    print(deleted, len(gc.get_objects()) - before, gc.isenabled())
"""


@pytest.mark.root
def test_conntrack_cleanup_leaves_no_garbage_with_the_gc_off(empty_netns: Netns) -> None:
    """pyroute2's parsed messages are cycles (about 110 objects per conntrack entry): with the GC off, as in
    --once, listing a busy node's table kept them all until exit. The cleanup collects them and leaves the GC off."""
    for sport in range(20000, 20300):  # 300 un-DNATed entries to a UDP ClusterIP: all stale
        empty_netns.run("conntrack", "-I", "-p", "udp", "-s", "10.1.0.1", "-d", "10.96.0.10", "--sport", str(sport),
                        "--dport", "53", "-t", "120")
    out = empty_netns.run(sys.executable, "-c", GC_PROBE).stdout.split()
    deleted, left, enabled = int(out[0]), int(out[1]), out[2]
    assert deleted == 300
    assert left < 2_000, f"{left} objects left for the GC (about 65,000 when the cleanup ran with it off)"
    assert enabled == "False", "the GC is off again afterwards"


# --------------------------------------------------------------------------- untranslated TCP attempts


def test_tcp_frontends_are_the_tcp_ports_at_every_service_address_of_the_family() -> None:
    cluster = _cluster([
        service("web", cluster_ip=["10.96.0.20", "fd00:96::20"], ipFamilies=["IPv4", "IPv6"], type="LoadBalancer",
                externalIPs=["203.0.113.8", "2001:db8::8"],
                ports=[{"name": "http", "port": 80, "nodePort": 30080},
                       {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
                status={"loadBalancer": {"ingress": [{"ip": "198.51.100.8"}]}}),
        service("v6only", cluster_ip="fd00:96::21", ipFamilies=["IPv6"], externalIPs=["203.0.113.9"],
                ports=[{"name": "https", "port": 443}]),
    ])
    services = list(cluster.services.values())
    assert tcp_frontends(services, 4) == {("10.96.0.20", 80), ("203.0.113.8", 80), ("198.51.100.8", 80)}
    # An IPv4 external IP of an IPv6-only Service is not programmed anywhere: nothing of it is a frontend.
    assert tcp_frontends(services, 6) == {("fd00:96::20", 80), ("2001:db8::8", 80), ("fd00:96::21", 443)}


def test_only_attempts_to_a_frontend_whose_reply_would_come_from_it_are_untranslated() -> None:
    frontends = {("10.96.0.20", 80)}
    untranslated = FlowEntry(4, TCP, "10.244.1.5", "10.96.0.20", 40000, 80, "10.96.0.20", 80)
    dnated = FlowEntry(4, TCP, "10.244.1.5", "10.96.0.20", 40001, 80, "10.244.2.7", 8080)
    other_port = FlowEntry(4, TCP, "10.244.1.5", "10.96.0.20", 40002, 81, "10.96.0.20", 81)
    udp = FlowEntry(4, UDP, "10.244.1.5", "10.96.0.20", 40003, 80, "10.96.0.20", 80)
    entries = [untranslated, dnated, other_port, udp]
    assert unanswered_to_frontends(entries, frontends) == [untranslated]


def test_cleanup_unanswered_lists_only_families_with_frontends_and_counts_deletions() -> None:
    v4 = FlowEntry(4, TCP, "10.244.1.5", "10.96.0.20", 40000, 80, "10.96.0.20", 80)
    v6 = FlowEntry(6, TCP, "fd00:244::5", "fd00:96::20", 40000, 80, "fd00:96::20", 80)
    answered = FlowEntry(4, TCP, "10.244.1.6", "10.96.0.20", 40000, 80, "10.96.0.20", 80)
    table = FakeConntrack([answered], unanswered=[v4, v6])
    assert cleanup_unanswered_tcp(table, {4: {("10.96.0.20", 80)}, 6: set()}) == 1
    assert table.deleted == [v4] and table.listed_unanswered == [4]
    assert cleanup_unanswered_tcp(table, {4: {("10.96.0.20", 80)}}) == 0, "already gone"


@pytest.mark.root
def test_kernel_lists_unanswered_untranslated_tcp_entries_only(empty_netns: Netns, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The kernel's status and protocol filters leave out answered, DNATed and UDP entries (made with ``conntrack
    -I``, among 300 established ones standing for a busy node): it sends only the unanswered, untranslated TCP
    entries. The cleanup deletes the untranslated attempts to the frontends, in both families, and keeps
    everything else; past its budget, a listing stops and says so, and the socket still answers the next one."""
    def insert(*args: str) -> None:
        empty_netns.run("conntrack", "-I", *args, "-t", "120")

    tcp_syn = ("-p", "tcp", "--state", "SYN_SENT")
    insert(*tcp_syn, "-s", "10.1.0.1", "-d", "10.96.0.10", "--sport", "40000", "--dport", "80")  # untranslated
    insert(*tcp_syn, "-s", "fd00:1::1", "-d", "fd00:96::10", "--sport", "40000", "--dport", "80")  # untranslated, v6
    insert(*tcp_syn, "-s", "10.1.0.1", "-d", "10.96.0.10", "--sport", "40001", "--dport", "81")  # not a frontend
    insert(*tcp_syn, "-s", "10.1.0.1", "-d", "10.96.0.10", "--sport", "40002", "--dport", "80",  # reply from a pod
           "--reply-src", "10.244.1.5", "--reply-dst", "10.1.0.1", "--reply-port-src", "8080",
           "--reply-port-dst", "40002")
    insert("-p", "udp", "-s", "10.1.0.1", "-d", "10.96.0.10", "--sport", "40003", "--dport", "80")  # UDP
    insert(*tcp_syn, "-s", "10.1.0.1", "-d", "10.96.0.10", "--sport", "40004", "--dport", "80",  # DNATed
           "--dst-nat", "10.244.1.6")
    for i in range(300):  # answered
        insert("-p", "tcp", "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-s", "10.1.1.1", "-d",
               "10.96.0.10", "--sport", str(20000 + i), "--dport", "80")
    with empty_netns.entered(), PyrouteConntrack() as ct:
        sent = {}
        listed = set()
        for family in (4, 6):
            listed |= {str(e) for e in ct.list_unanswered_tcp(family)}
            sent[family] = ct.unanswered_messages
        assert sent == {4: 3, 6: 1}, "the kernel filters out the answered, the DNATed and the UDP entries itself"
        assert listed == {
            "10.1.0.1:40000 -> 10.96.0.10:80 (reply from 10.96.0.10:80)",
            "[fd00:1::1]:40000 -> [fd00:96::10]:80 (reply from [fd00:96::10]:80)",
            "10.1.0.1:40001 -> 10.96.0.10:81 (reply from 10.96.0.10:81)",
            "10.1.0.1:40002 -> 10.96.0.10:80 (reply from 10.244.1.5:8080)",
        }, "answered entries and UDP are filtered out in the kernel"
        monkeypatch.setattr(conntrack, "_UNANSWERED_BUDGET", 1)
        with caplog.at_level(logging.WARNING, logger="kproxy.node.conntrack"):
            assert len(ct.list_unanswered_tcp(4)) == 1
        assert "more than 1 unanswered TCP connection attempts" in caplog.text
        monkeypatch.undo()
        assert {str(e) for e in ct.list_unanswered_tcp(4)} <= listed and ct.unanswered_messages == 3
        assert cleanup_unanswered_tcp(ct, {4: {("10.96.0.10", 80)}, 6: {("fd00:96::10", 80)}}) == 2
        left = {str(e) for family in (4, 6) for e in ct.list_unanswered_tcp(family)}
    assert left == listed - {"10.1.0.1:40000 -> 10.96.0.10:80 (reply from 10.96.0.10:80)",
                             "[fd00:1::1]:40000 -> [fd00:96::10]:80 (reply from [fd00:96::10]:80)"}
    everything = empty_netns.run("conntrack", "-L", check=False).stdout
    assert everything.count("ESTABLISHED") == 300 and "udp" in everything


# --- the daemon's table, opened on first use --------------------------------------------------------------


class _Opened(FakeConntrack):
    closed = False

    def close(self) -> None:
        self.closed = True


def test_deferred_conntrack_opens_the_table_on_first_use_once_and_closes_it() -> None:
    """The daemon's table is opened by its first cleanup, not at start-up (pyroute2's import left the cold start):
    then kept for every later use; close closes it."""
    made: list[_Opened] = []
    entry = FlowEntry(4, UDP, "10.1.0.1", "10.96.0.10", 4000, 53, "10.244.1.5", 53)

    def make() -> _Opened:
        made.append(_Opened([entry]))
        return made[-1]

    table = DeferredConntrack(make)
    assert not made and not table.opened
    assert table.list_udp(4) == [entry] and table.opened
    assert table.list_unanswered_tcp(4) == [] and table.delete(entry)
    assert len(made) == 1 and made[0].deleted == [entry]
    table.close()
    assert made[0].closed and not table.opened


def test_deferred_conntrack_raises_a_failed_open_to_that_use_and_tries_again() -> None:
    attempts: list[int] = []

    def make() -> FakeConntrack:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(1, "opening the conntrack netlink socket: Operation not permitted")
        return FakeConntrack()

    table = DeferredConntrack(make)
    with pytest.raises(OSError, match="not permitted"):
        table.list_udp(4)
    assert table.list_udp(4) == [] and len(attempts) == 2


def test_deferred_conntrack_is_opened_once_by_threads_racing() -> None:
    made: list[int] = []
    start = threading.Barrier(8)

    def make() -> FakeConntrack:
        made.append(1)
        return FakeConntrack()

    table = DeferredConntrack(make)

    def use() -> None:
        start.wait()
        table.list_udp(4)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1


@pytest.mark.root
def test_deferred_conntrack_reads_the_namespace_it_was_made_in(empty_netns: Netns) -> None:
    """Made in a namespace, it lists that namespace's table, first used from another thread of that namespace; a
    first use from a thread in any other namespace is refused rather than silently reading the wrong table."""
    empty_netns.run("conntrack", "-I", "-p", "udp", "-s", "10.1.0.1", "-d", "10.96.0.10", "--sport", "4000",
                    "--dport", "53", "-t", "120")
    with empty_netns.entered():
        refused = DeferredConntrack()
        table = DeferredConntrack()
        listed: list[FlowEntry] = []
        inside = threading.Thread(target=lambda: listed.extend(table.list_udp(4)))  # (starts in the namespace)
        inside.start()
        inside.join()
    try:
        assert [(e.orig_src, e.orig_dst, e.orig_dport) for e in listed] == [("10.1.0.1", "10.96.0.10", 53)]
        with pytest.raises(RuntimeError, match="another network namespace"):
            refused.list_udp(4)
        assert not refused.opened
    finally:
        table.close()
