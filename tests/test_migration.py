"""Migrating a node from kube-proxy to kproxy, with real traffic in the network-namespace test bed.

kube-proxy's rules are mimicked in the node namespace (its nftables-mode table,
or its iptables chains through iptables-nft), shown to serve a ClusterIP, and
then kproxy is programmed for the same Service and ``cleanup_kube_proxy()``
runs while a client keeps connecting. Also: a host firewall that predates
kproxy keeps working and is left untouched, and the cleanup refuses to run
before kproxy's tables exist.
"""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import pytest

from kproxy.cluster.convert import build_cluster
from kproxy.nft.backend import NftablesBackend
from kproxy.node.kubeproxy_cleanup import KproxyNotReady, cleanup_kube_proxy
from kproxy.rules.compiler import NodeInfo, compile_ruleset
from kproxy.rules.plan import create
from tests.harness.builders import endpoint, endpoint_slice, service
from tests.harness.kube_proxy_rules import CLUSTER_IP, iptables_kube_proxy_rules, kube_proxy_table
from tests.harness.netbed import NetBed, Netns, Pod
from tests.harness.program import CONFIG, pod_slice, program

pytestmark = pytest.mark.root

KPROXY_TABLES = {("ip", "kproxy"), ("ip6", "kproxy")}


@pytest.fixture
def bed(netbed: NetBed) -> NetBed:
    """The test bed with a server on TCP 8080 in every pod, and default routes on the node."""
    netbed.node.ip("route", "add", "default", "via", netbed.router_ip4)
    netbed.node.ip("-6", "route", "add", "default", "via", netbed.router_ip6)
    netbed.start_servers(tcp_ports=[8080], udp_ports=[])
    return netbed


@pytest.fixture
def netns(empty_netns: Netns) -> Netns:
    """A fresh, empty network namespace (the shared ``empty_netns`` fixture)."""
    return empty_netns


def tables(ns: Netns) -> set[tuple[str, str]]:
    words = ns.nft("list", "tables").stdout.split()
    return {(words[i + 1], words[i + 2]) for i in range(0, len(words), 3)}


def web(endpoints: list[Pod]) -> list[dict[str, Any]]:
    """The Service both proxies serve: ClusterIP port 80 to the pods' 8080."""
    return [service("web", cluster_ip=CLUSTER_IP, ports=[{"name": "http", "port": 80, "targetPort": 8080}]),
            pod_slice("web", endpoints)]


def kube_proxy_packets(bed: NetBed) -> int:
    """Packets counted in kube-proxy's Service chain: new connections it translated."""
    listing = json.loads(bed.node.nft("-j", "list", "table", "ip", "kube-proxy").stdout)
    return sum(expr["counter"]["packets"] for item in listing["nftables"] if "rule" in item
               for expr in item["rule"]["expr"] if "counter" in expr)


def replace_during_traffic(client: Pod, node: Netns):
    """Remove kube-proxy's rules from ``node`` while ``client`` keeps connecting; return (report, loop summary)."""
    with client.netns.start_loop(CLUSTER_IP, 80, interval_ms=5) as loop:
        loop.wait_ok(10)
        with node.entered():
            report = cleanup_kube_proxy()
        loop.wait_more_ok(20)
        summary = loop.stop()
    return report, summary


def test_nftables_kube_proxy_replaced_without_a_failed_connection(bed: NetBed) -> None:
    """kproxy takes over from kube-proxy's nftables table: it decides new connections, and none fails."""
    client, endpoints = bed.local_pods[-1], bed.local_pods[:-1] + bed.remote_pods
    bed.node.nft("-f", "-", input=kube_proxy_table(endpoints))
    through_kube_proxy = client.netns.connect_many(CLUSTER_IP, 80, 80)  # 4 pods all seen: misses one in 2.5e9
    assert through_kube_proxy.all_ok, through_kube_proxy.summary()
    assert through_kube_proxy.servers == {p.name for p in endpoints}
    assert kube_proxy_packets(bed) == 80

    program(bed, web(endpoints))
    both = client.netns.connect_many(CLUSTER_IP, 80, 40)
    assert both.all_ok, both.summary()
    assert kube_proxy_packets(bed) == 80, "registered later at the same priority, kproxy's nat chains decide first"

    report, summary = replace_during_traffic(client, bed.node)
    assert summary.failed == 0, summary
    assert report.tables == ("ip kube-proxy", "ip6 kube-proxy") and report.chains == () and not report.forced
    assert tables(bed.node) == KPROXY_TABLES
    assert client.netns.connect_many(CLUSTER_IP, 80, 20).all_ok


KUBELET_AND_USER_RULES = """\
*mangle
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:USER-AUDIT - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp --dport 22 -j ACCEPT
-A FORWARD -j USER-AUDIT
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A USER-AUDIT -p tcp --dport 9999 -j DROP
COMMIT
*nat
:KUBE-KUBELET-CANARY - [0:0]
-A POSTROUTING -d 198.51.100.0/24 -j RETURN
COMMIT
"""


IP6_USER_RULES = """\
*nat
-A POSTROUTING -d 2001:db8::/32 -j RETURN
COMMIT
"""

IP6_KUBE_PROXY_RULES = """\
*nat
:KUBE-SERVICES - [0:0]
-A PREROUTING -j KUBE-SERVICES
COMMIT
"""


BUILTIN = re.compile(r"^-[AI] (PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) .*-j (KUBE-\S+)")


def declared(*scripts: tuple[str, str]) -> tuple[set[str], list[str]]:
    """From iptables-restore input: every chain it declares, and every jump to one from a built-in chain."""
    chains, jumps = set(), []
    for family, script in scripts:
        table = ""
        for line in script.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chains.add(f"{family} {table} {line[1:].split()[0]}")
            elif match := BUILTIN.match(line):
                jumps.append(f"{family} {table} {match.group(1)} -> {match.group(2)}")
    return chains, sorted(jumps)


def iptables_service_packets(ns: Netns) -> int:
    """Packets counted by kube-proxy's KUBE-SERVICES rule for the ClusterIP: new connections it translated."""
    listing = ns.run("iptables-nft", "-t", "nat", "-L", "KUBE-SERVICES", "-v", "-x", "-n").stdout
    return sum(int(line.split()[0]) for line in listing.splitlines() if CLUSTER_IP in line)


def iptables_state(ns: Netns) -> str:
    """iptables-nft-save and ip6tables-nft-save of the namespace, without comments and counters."""
    text = ns.run("iptables-nft-save").stdout + ns.run("ip6tables-nft-save").stdout
    return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#"))


@pytest.mark.skipif(shutil.which("iptables-nft-restore") is None, reason="iptables-nft is not installed")
def test_iptables_kube_proxy_replaced_and_other_rules_survive(bed: NetBed) -> None:
    """kube-proxy's KUBE-* chains and jumps go without a failed connection; kubelet's and the user's rules stay."""
    client, endpoints = bed.local_pods[-1], bed.local_pods[:-1] + bed.remote_pods
    bed.node.run("iptables-nft-restore", "--noflush", input=KUBELET_AND_USER_RULES)
    bed.node.run("ip6tables-nft-restore", "--noflush", input=IP6_USER_RULES)
    before = iptables_state(bed.node)
    bed.node.run("iptables-nft-restore", "--noflush", input=iptables_kube_proxy_rules(endpoints))
    bed.node.run("ip6tables-nft-restore", "--noflush", input=IP6_KUBE_PROXY_RULES)
    through_kube_proxy = client.netns.connect_many(CLUSTER_IP, 80, 80)
    assert through_kube_proxy.all_ok, through_kube_proxy.summary()
    assert through_kube_proxy.servers == {p.name for p in endpoints}
    assert iptables_service_packets(bed.node) == 80

    program(bed, web(endpoints))
    assert client.netns.connect_many(CLUSTER_IP, 80, 40).all_ok
    assert iptables_service_packets(bed.node) == 80, "kproxy's nat chains, registered later, decide first"

    report, summary = replace_during_traffic(client, bed.node)
    assert summary.failed == 0, summary
    assert iptables_state(bed.node) == before
    assert report.tables == ()
    chains, jumps = declared(("ip", iptables_kube_proxy_rules(endpoints)), ("ip6", IP6_KUBE_PROXY_RULES))
    assert set(report.chains) == chains
    assert sorted(r.split(" handle ")[0] + " -> " + r.split()[-1].rstrip(")") for r in report.rules) == jumps
    assert {k.split(" (")[0] for k in report.kept} == {
        "ip mangle KUBE-IPTABLES-HINT", "ip mangle KUBE-KUBELET-CANARY", "ip filter KUBE-FIREWALL",
        "ip filter KUBE-KUBELET-CANARY", "ip nat KUBE-KUBELET-CANARY"}
    assert tables(bed.node) >= KPROXY_TABLES


HOST_FIREWALL = """\
table inet host-firewall {
    chain input {
        type filter hook input priority 0; policy drop;
        ct state established,related accept
        iif "lo" accept
        meta l4proto { icmp, ipv6-icmp } accept
        tcp dport 22 accept
    }
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ct status dnat accept
    }
}
"""


def test_host_firewall_keeps_working_and_is_left_untouched(bed: NetBed) -> None:
    """A drop-by-default host firewall from before kproxy passes its Service traffic and stays byte for byte."""
    bed.node.nft("-f", "-", input=HOST_FIREWALL)
    before = bed.node.nft("list", "table", "inet", "host-firewall").stdout
    assert not bed.local_pods[-1].netns.connect(bed.local_pods[0].ip4, 8080, timeout=0.3).ok, "forward drops"
    program(bed, [
        service("web", cluster_ip=CLUSTER_IP, type="NodePort",
                ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]),
        pod_slice("web", bed.pods[:-1]),
    ])
    cluster_ip = bed.local_pods[-1].netns.connect_many(CLUSTER_IP, 80, 40)
    assert cluster_ip.all_ok, cluster_ip.summary()
    node_port = bed.client.connect_many(bed.node_ip4, 30080, 40)
    assert node_port.all_ok, node_port.summary()
    with bed.node.entered():
        assert not cleanup_kube_proxy().removed_anything
    assert bed.node.nft("list", "table", "inet", "host-firewall").stdout == before
    assert tables(bed.node) == KPROXY_TABLES | {("inet", "host-firewall")}


KUBE_PROXY_STUB = "table ip kube-proxy { chain nat-output { type nat hook output priority -100; }; }\n"
"""Enough of kube-proxy's nftables table for the checks that need no traffic."""


def test_cleanup_refuses_without_kproxy_unless_forced(netns: Netns) -> None:
    """Without kproxy's tables the cleanup changes nothing and says why; force=True removes kube-proxy's anyway."""
    netns.nft("-f", "-", input=KUBE_PROXY_STUB)
    netns.nft("add", "table", "inet", "other")
    with netns.entered(), pytest.raises(KproxyNotReady, match="ip kproxy"):
        cleanup_kube_proxy()
    assert tables(netns) == {("ip", "kube-proxy"), ("inet", "other")}
    with netns.entered():
        report = cleanup_kube_proxy(force=True)
    assert report.tables == ("ip kube-proxy",) and report.forced
    assert tables(netns) == {("inet", "other")}


def test_cleanup_waits_until_kproxy_first_build_is_complete(netns: Netns) -> None:
    """While kproxy's first build has declared its Service chains but not yet filled its maps, the cleanup refuses."""
    netns.nft("-f", "-", input=KUBE_PROXY_STUB)
    cluster, problems = build_cluster([
        service("web", cluster_ip=CLUSTER_IP),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.11")], ports=[{"name": "http", "port": 8080}]),
    ], "node-a")
    assert problems == []
    ruleset = compile_ruleset(cluster, NodeInfo("node-a", "zone-a", ("192.0.2.1",), ("192.0.2.1",)), CONFIG)
    pieces = create(ruleset.tables["ip"])
    with netns.entered():
        backend = NftablesBackend()
        for piece in pieces[:-1]:
            backend.apply(piece)
        with pytest.raises(KproxyNotReady, match="ip kproxy is still being built"):
            cleanup_kube_proxy()
        backend.apply(pieces[-1])
        report = cleanup_kube_proxy()
    assert report.tables == ("ip kube-proxy",) and not report.forced
    assert tables(netns) == {("ip", "kproxy")}
