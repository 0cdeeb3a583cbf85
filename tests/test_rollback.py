"""Rolling a node back from kproxy to kube-proxy, with real traffic in the network-namespace test bed.

The reverse of tests/test_migration.py: kproxy's tables serve a ClusterIP,
``python -m kproxy --rollback-to-kube-proxy --wait-for-kube-proxy 20s`` runs in
the node namespace while a client connects every 20 ms, kube-proxy's rules
(its iptables chains through iptables-nft, or its nftables table) appear, and
the command deletes kproxy's tables: no connection fails. Without kube-proxy's
rules, or with rules that miss a Service, it refuses with exit code 1 and
deletes nothing, unless --force; and it notices a kproxy daemon that restores
its tables.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kproxy.node.rollback import frontends_in_chain, frontends_in_map, ipvs_services
from tests.harness.builders import service
from tests.harness.kube_proxy_rules import CLUSTER_IP, iptables_kube_proxy_rules, kube_proxy_table
from tests.harness.netbed import NetBed, Netns, Pod
from tests.harness.program import pod_slice, program

ROOT = Path(__file__).resolve().parent.parent
KPROXY_TABLES = {("ip", "kproxy"), ("ip6", "kproxy")}


@pytest.fixture
def bed(netbed: NetBed) -> NetBed:
    """The test bed with a server on TCP 8080 in every pod, and default routes on the node."""
    netbed.node.ip("route", "add", "default", "via", netbed.router_ip4)
    netbed.node.ip("-6", "route", "add", "default", "via", netbed.router_ip6)
    netbed.start_servers(tcp_ports=[8080], udp_ports=[])
    return netbed


def tables(ns: Netns) -> set[tuple[str, str]]:
    words = ns.nft("list", "tables").stdout.split()
    return {(words[i + 1], words[i + 2]) for i in range(0, len(words), 3)}


def web(endpoints: list[Pod], name: str = "web", cluster_ip: str = CLUSTER_IP) -> list[dict[str, Any]]:
    return [service(name, cluster_ip=cluster_ip, ports=[{"name": "http", "port": 80, "targetPort": 8080}]),
            pod_slice(name, endpoints)]


def rollback(ns: Netns, *flags: str) -> subprocess.Popen:
    """``python -m kproxy --rollback-to-kube-proxy FLAGS`` in the namespace, from this tree."""
    return ns.popen(sys.executable, "-m", "kproxy", "--rollback-to-kube-proxy", *flags, cwd=str(ROOT),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def install_iptables(bed: NetBed, endpoints: list[Pod]) -> None:
    bed.node.run("iptables-nft-restore", "--noflush", input=iptables_kube_proxy_rules(endpoints))


def install_nftables(bed: NetBed, endpoints: list[Pod]) -> None:
    bed.node.nft("-f", "-", input=kube_proxy_table(endpoints))


needs_iptables_nft = pytest.mark.skipif(shutil.which("iptables-nft-restore") is None,
                                        reason="iptables-nft is not installed")


@pytest.mark.root
@pytest.mark.parametrize("install", [
    pytest.param(install_iptables, id="iptables", marks=needs_iptables_nft),
    pytest.param(install_nftables, id="nftables"),
])
def test_rollback_waits_for_kube_proxy_then_removes_kproxy_without_a_failed_connection(bed: NetBed,
                                                                                      install: Any) -> None:
    """The command waits while only kproxy serves the ClusterIP; once kube-proxy's rules are in, it deletes
    kproxy's tables; a client connecting every 20 ms throughout sees 0 failures, then goes through kube-proxy."""
    client, endpoints = bed.local_pods[-1], bed.local_pods[:-1] + bed.remote_pods
    program(bed, web(endpoints))
    with client.netns.start_loop(CLUSTER_IP, 80, interval_ms=20) as loop:
        loop.wait_ok(10)
        proc = rollback(bed.node, "--wait-for-kube-proxy", "20s")
        time.sleep(1.5)
        assert proc.poll() is None, finished(proc)
        assert tables(bed.node) >= KPROXY_TABLES, "nothing is deleted before kube-proxy's rules are in"
        install(bed, endpoints)
        code, out, err = finished(proc)
        assert code == 0, (out, err)
        loop.wait_more_ok(25)
        summary = loop.stop()
    assert summary.failed == 0, summary
    print(f"rollback ({install.__name__}): {summary}")
    assert not tables(bed.node) & KPROXY_TABLES
    assert "serve 1 of kproxy's 1 Service frontends" in out and "deleted table ip kproxy" in out, out
    after = client.netns.connect_many(CLUSTER_IP, 80, 20)
    assert after.all_ok and after.servers <= {p.name for p in endpoints}, after.summary()


@pytest.mark.root
def test_rollback_refuses_without_kube_proxy_unless_forced(bed: NetBed) -> None:
    """No kube-proxy rules: exit code 1, one message naming what is unserved, kproxy's tables intact; --force
    deletes them anyway; a second run finds nothing to do."""
    program(bed, web(bed.pods))
    code, out, err = finished(rollback(bed.node))
    assert code == 1 and out == "", (out, err)
    assert err.startswith("kproxy: error: kube-proxy's rules do not serve 1 of kproxy's 1 Service frontends")
    assert "ip tcp 10.96.0.30:80" in err and "kube-proxy's rules found: none at all" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1
    assert tables(bed.node) >= KPROXY_TABLES
    code, out, err = finished(rollback(bed.node, "--force"))
    assert code == 0 and "forced: 1 frontends were not served by kube-proxy" in out, (out, err)
    assert not tables(bed.node) & KPROXY_TABLES
    code, out, _ = finished(rollback(bed.node))
    assert (code, out) == (0, "kproxy: no kproxy tables on this node; nothing to roll back\n")


@pytest.mark.root
def test_rollback_refuses_while_kube_proxy_misses_a_service(bed: NetBed) -> None:
    """kube-proxy's table serves one of kproxy's two Services (and a NodePort it lacks): refused, naming the other."""
    program(bed, web(bed.pods) + web(bed.pods, "api", "10.96.0.31"))
    install_nftables(bed, bed.pods)
    code, out, err = finished(rollback(bed.node, "--wait-for-kube-proxy", "1s"))
    assert code == 1, (out, err)
    assert "do not serve 1 of kproxy's 2 Service frontends on this node after 1." in err
    assert "ip tcp 10.96.0.31:80" in err and "10.96.0.30" not in err and "nftables ip kube-proxy" in err
    assert tables(bed.node) >= KPROXY_TABLES


@pytest.mark.root
def test_rollback_notices_a_kproxy_daemon_that_restores_its_tables(bed: NetBed) -> None:
    """A process that puts kproxy's table back at once (as a running daemon does) makes the rollback fail loudly."""
    program(bed, web(bed.pods))
    install_nftables(bed, bed.pods)
    restorer = bed.node.popen("sh", "-c", "while :; do nft add table ip kproxy; sleep 0.05; done")
    try:
        code, out, err = finished(rollback(bed.node))
    finally:
        restorer.kill()
        restorer.wait()
    assert code == 1, (out, err)
    assert "came back: a kproxy daemon still runs on this node" in err


def test_rollback_usage_errors() -> None:
    """--wait-for-kube-proxy and --force belong to a mode; a bad duration is named."""
    for argv, message in ((["--wait-for-kube-proxy", "5s"], "goes with --rollback-to-kube-proxy"),
                          (["--rollback-to-kube-proxy", "--wait-for-kube-proxy", "soon"],
                           "--wait-for-kube-proxy: invalid duration 'soon'")):
        result = subprocess.run([sys.executable, "-m", "kproxy", *argv], cwd=ROOT, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2 and message in result.stderr, result.stderr


# --- parsing kube-proxy's rules (no kernel) ----------------------------------------------------------


def test_map_elements_with_and_without_comments() -> None:
    """Dispatch map keys, with comments or not, as libnftables writes them in JSON; NodePorts as proto . port."""
    document = {"nftables": [{"map": {"elem": [
        [{"concat": ["10.96.0.30", "tcp", 80]}, {"goto": {"target": "svc"}}],
        [{"elem": {"val": {"concat": ["fd00::a", "udp", 53]}, "comment": "ns/dns:dns"}}, {"goto": {"target": "x"}}],
        [{"concat": ["sctp", 30080]}, {"goto": {"target": "ext"}}],
        [{"concat": ["10.96.0.31", 6, 443]}, {"goto": {"target": "svc"}}],
    ]}}]}
    assert frontends_in_map(document, "ip") == {("ip", "10.96.0.30", "tcp", 80), ("ip", "fd00::a", "udp", 53),
                                                ("ip", "*", "sctp", 30080), ("ip", "10.96.0.31", "tcp", 443)}


def test_iptables_nft_rules() -> None:
    """KUBE-SERVICES rules give destination, protocol and port (a rule without a full-length destination is
    skipped); in the NodePort chains, rules without a destination give protocol and port."""
    def rule(*exprs: dict[str, Any]) -> dict[str, Any]:
        return {"rule": {"expr": [*exprs, {"jump": {"target": "KUBE-SVC-X"}}]}}

    daddr = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": {"prefix": {"addr": "10.96.0.30", "len": 32}}}}
    proto = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    dport = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}
    wide = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                      "right": {"prefix": {"addr": "10.96.0.0", "len": 12}}}}
    udp = {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 30053}}
    document = {"nftables": [rule(daddr, proto, dport), rule(wide, proto, dport), rule(udp)]}
    assert frontends_in_chain(document, "ip", nodeports=False) == {("ip", "10.96.0.30", "tcp", 80)}
    assert frontends_in_chain(document, "ip", nodeports=True) == {("ip", "*", "udp", 30053)}


class _Attrs:
    def __init__(self, **attrs: Any) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_ipvs_virtual_servers() -> None:
    """IPVS services (pyroute2's messages) count as their address, protocol and port, and as a NodePort."""
    messages = [_Attrs(IPVS_CMD_ATTR_SERVICE=_Attrs(IPVS_SVC_ATTR_ADDR="10.96.0.30", IPVS_SVC_ATTR_PORT=80,
                                                     IPVS_SVC_ATTR_PROTOCOL=6)),
                _Attrs(IPVS_CMD_ATTR_SERVICE=_Attrs(IPVS_SVC_ATTR_FWMARK=5)), _Attrs()]
    assert ipvs_services(messages) == {("ip", "10.96.0.30", "tcp", 80), ("ip", "*", "tcp", 80)}


IPTABLES_NODEPORTS = """\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-EXT-WEB - [0:0]
-A KUBE-SERVICES -d 10.96.0.40/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-EXT-WEB
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-EXT-WEB
COMMIT
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
-A KUBE-SERVICES -d 10.96.0.41/32 -p udp -m comment --comment "default/dns:dns has no endpoints" -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "default/empty:x has no endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30132 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-EXTERNAL-SERVICES -p sctp -m comment --comment "default/sctp:x has no endpoints" -m addrtype --dst-type LOCAL -m sctp --dport 30133 -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""


@pytest.mark.root
@needs_iptables_nft
def test_iptables_nft_rules_as_the_kernel_lists_them(empty_netns: Netns) -> None:
    """kube-proxy's iptables rules, loaded with iptables-nft-restore and read back over libnftables: ClusterIPs with
    and without endpoints, a NodePort, and a NodePort without endpoints."""
    from kproxy.node.rollback import _Nft, kube_proxy_frontends

    empty_netns.run("iptables-nft-restore", "--noflush", input=IPTABLES_NODEPORTS)
    with empty_netns.entered():
        nft = _Nft()
        found, sources = kube_proxy_frontends(nft, nft.tables(), ipvs=lambda: None)
    assert found == {("ip", "10.96.0.40", "tcp", 80), ("ip", "10.96.0.41", "udp", 53), ("ip", "*", "tcp", 30080),
                     ("ip", "*", "tcp", 30132)}, "iptables-nft writes an SCTP port as an opaque xt match: not read"
    assert sources == ["iptables-nft ip KUBE-SERVICES"]
