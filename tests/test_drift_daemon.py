"""Drift repair, end to end: the daemon against the test API server, another program changing its tables, real traffic.

The daemon runs in the node namespace with a long --sync-period (60 s), so
what restores the tables within a second or two is the notification path,
not the hourly or periodic resync. Each case changes the ruleset with the
real ``nft`` binary, times the restore from the kernel (polling kproxy's
tables, 20 ms resolution) and counts the new connections that failed
meanwhile (a client loop sends one every 20 ms to the ClusterIP).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kproxy.daemon.config import DaemonConfig
from kproxy.daemon.run import Daemon, kube_api_client
from kproxy.observe.metrics import ProxyMetrics
from tests.harness.builders import endpoint, endpoint_slice, service
from tests.harness.daemonbed import ApiInNode, wait_until
from tests.harness.netbed import NetBed

pytestmark = pytest.mark.root

CLUSTER_IP, NODE_PORT = "10.96.0.70", 30070
RESTORE_WITHIN = 3.0  # typically 0.1-0.5 s; a second repair of one storm is paced 1 s after the first


def _create_web(api_in_node: ApiInNode, bed: NetBed) -> None:
    api_in_node.api.create(service("web", cluster_ip=CLUSTER_IP, type="NodePort",
                                   ports=[{"name": "http", "port": 80, "nodePort": NODE_PORT}]))
    api_in_node.api.create(endpoint_slice("web-abc", "web", [endpoint(p.ip4, node=p.node_name) for p in bed.pods[:2]]))


def _start_daemon(bed: NetBed, api_in_node: ApiInNode, registry: CollectorRegistry) -> Daemon:
    config = DaemonConfig(node_name=bed.node_name, cluster_cidrs=("10.244.0.0/16",), min_sync_period=0.02,
                          sync_period=60.0, kubeconfig=str(api_in_node.kubeconfig))
    with bed.node.entered():
        daemon = Daemon(config, kube_api_client(config.kubeconfig), observer=ProxyMetrics(registry))
        daemon.start()
    return daemon


@pytest.fixture
def running(daemon_bed: NetBed, api_in_node: ApiInNode) -> Iterator[tuple[NetBed, Daemon, CollectorRegistry]]:
    """The daemon in the node namespace, a NodePort Service on two pods, programmed."""
    bed = daemon_bed
    _create_web(api_in_node, bed)
    registry = CollectorRegistry()
    daemon = _start_daemon(bed, api_in_node, registry)
    try:
        wait_until(lambda: _programmed(bed), 15, "the Service programmed")
        assert daemon.drift.listening.wait(5), "the drift watcher reads notifications after the first full sync"
        yield bed, daemon, registry
    finally:
        daemon.stop()


def _programmed(bed: NetBed) -> bool:
    """From the kernel: the ClusterIP's dispatch element and its endpoints are in both places they must be."""
    listing = bed.node.run("nft", "list", "table", "ip", "kproxy", check=False)
    text = listing.stdout
    return listing.returncode == 0 and f"{CLUSTER_IP} . tcp . 80 . 65536" in text and ": goto pick-by-class" in text


def _untranslated(bed: NetBed, *match: str) -> str:
    """The node's TCP conntrack entries to the ClusterIP whose reply would come from the ClusterIP itself: attempts
    that went out untranslated, never DNATed."""
    listing = bed.node.run("conntrack", "-L", "-p", "tcp", "--orig-dst", CLUSTER_IP, "--reply-src", CLUSTER_IP,
                           *match, check=False)
    return listing.stdout


def _connect_after_outage(bed: NetBed) -> bool:
    """Whether 10 new connections from the pod that probed during the outage all land on the ClusterIP.

    While kproxy's table was gone, the probes' SYNs went out untranslated and
    left SYN_SENT conntrack entries on the node (120 s). A new connection that
    reuses one of their source ports would join that entry and never be
    DNATed. kproxy deletes those entries after the sync that builds the table
    again (kproxy.node.conntrack.cleanup_unanswered_tcp): none is left once
    the repair is done.
    """
    wait_until(lambda: not _untranslated(bed), 5, "kproxy to delete the attempts left untranslated during the outage")
    return bed.local_pods[0].netns.connect_many(CLUSTER_IP, 80, 10).all_ok


def _track_connections(bed: NetBed) -> None:
    """A node always has some program tracking connections (a CNI, a firewall): here, a stateful forward rule."""
    bed.node.nft("-f", "-", input="table inet cni {\n chain forward {\n type filter hook forward priority 0;\n"
                 " ct state established,related accept\n }\n}\n")


def _untranslated_deleted(registry: CollectorRegistry) -> float:
    return sum(s.value for m in registry.collect() if m.name == "kproxy_conntrack_untranslated_attempts_deleted"
               for s in m.samples if s.name.endswith("_total"))


def test_an_attempt_made_before_the_first_sync_lands_from_its_source_port_once_programmed(
        daemon_bed: NetBed, api_in_node: ApiInNode) -> None:
    """A node's boot: a pod connects to a ClusterIP before kproxy has programmed anything. Its SYN goes out
    untranslated and leaves an unanswered conntrack entry; once the table is built, kproxy deletes it, so a
    connection from the same source port (a retransmission's tuple) is DNATed instead of joining that entry."""
    bed = daemon_bed
    _create_web(api_in_node, bed)
    _track_connections(bed)
    pod = bed.local_pods[0].netns
    early = pod.connect(CLUSTER_IP, 80, timeout=0.5, src_port=41000)
    assert not early.ok, early
    assert "sport=41000" in _untranslated(bed, "--sport", "41000"), bed.diagnostics()
    registry = CollectorRegistry()
    daemon = _start_daemon(bed, api_in_node, registry)
    try:
        wait_until(lambda: _programmed(bed), 15, "the Service programmed")
        wait_until(lambda: _untranslated_deleted(registry) >= 1, 5, "the untranslated attempt deleted")
        assert not _untranslated(bed, "--sport", "41000")
        again = pod.connect(CLUSTER_IP, 80, timeout=2.0, src_port=41000)
        assert again.ok, again
    finally:
        daemon.stop()


def _repairs(registry: CollectorRegistry) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in registry.collect() if m.name == "kproxy_drift_repairs"
            for s in m.samples if s.name.endswith("_total")}


def _restored_after(bed: NetBed, change: Callable[[], Any]) -> float:
    """Make the change, then the seconds until the kernel holds kproxy's rules again (polled every 20 ms)."""
    start = time.monotonic()
    change()
    # No check that the rules are gone now: the repair can land before an
    # `nft list` does. Each test asserts instead that a repair was counted.
    wait_until(lambda: _programmed(bed), 10, "kproxy's tables restored", interval=0.02)
    return time.monotonic() - start


def _with_traffic(bed: NetBed, run: Callable[[], float]) -> tuple[float, int, int]:
    """Run while a pod connects to the ClusterIP every 20 ms; (seconds, failed connections, total)."""
    loop = bed.local_pods[0].netns.start_loop(CLUSTER_IP, 80, interval_ms=20, timeout=0.5)
    try:
        seconds = run()
        loop.wait_more_ok(10, 5)  # connections that started after the restore
    finally:
        summary = loop.stop()
    print(f"restored in {seconds:.2f} s; {summary.failed} of {summary.total} new connections failed meanwhile",
          file=sys.stderr)
    return seconds, summary.failed, summary.total


@pytest.mark.parametrize("family_cmds", [
    pytest.param([("delete", "table", "ip", "kproxy")], id="delete-table-ip"),
    pytest.param([("delete", "table", "ip", "kproxy"), ("delete", "table", "ip6", "kproxy")], id="delete-both-tables"),
])
def test_a_deleted_table_is_restored(running: tuple[NetBed, Daemon, CollectorRegistry],
                                     family_cmds: list[tuple[str, ...]]) -> None:
    bed, _, registry = running
    assert _repairs(registry) == {}, "the daemon's own transactions are not drift"

    def delete() -> None:  # one nft run, one transaction
        script = "".join(" ".join(cmd) + "\n" for cmd in family_cmds)
        subprocess.run(["ip", "netns", "exec", bed.node.name, "nft", "-f", "-"], input=script, text=True, check=True)

    seconds, _, _ = _with_traffic(bed, lambda: _restored_after(bed, delete))
    assert seconds < RESTORE_WITHIN, f"restored after {seconds:.2f} s"
    assert _repairs(registry).get("table_deleted", 0) >= 1
    assert bed.node.run("nft", "list", "table", "ip6", "kproxy", check=False).returncode == 0
    assert _connect_after_outage(bed)
    assert bed.client.connect_many(bed.node_ip4, NODE_PORT, 10).all_ok


def test_a_flushed_ruleset_restores_kproxy_and_nothing_else(running: tuple[NetBed, Daemon, CollectorRegistry]) -> None:
    """nft flush ruleset (a firewalld or nftables.service reload): kproxy's tables come back; others' do not."""
    bed, _, registry = running
    bed.node.nft("add", "table", "inet", "someone-else")
    bed.node.nft("add", "chain", "inet", "someone-else", "input", "{ type filter hook input priority 0; }")
    seconds, _, _ = _with_traffic(bed, lambda: _restored_after(bed, lambda: bed.node.nft("flush", "ruleset")))
    assert seconds < RESTORE_WITHIN, f"restored after {seconds:.2f} s"
    assert "someone-else" not in bed.node.nft("list", "tables").stdout, "another program's table is not kproxy's to restore"
    assert _repairs(registry)


def test_a_deleted_service_chain_and_endpoint_element_are_restored(running: tuple[NetBed, Daemon, CollectorRegistry]) -> None:
    bed, _, registry = running
    text = bed.node.nft("list", "table", "ip", "kproxy").stdout
    chain = "external-to-cluster"  # the NodePort's chain (a shared one: the port counts nothing, has no limit)
    assert f"chain {chain} " in text

    def delete_chain() -> None:
        """The NodePort's chain, with what refers to it (its dispatch element), and an endpoint of the ClusterIP."""
        script = (f"delete element ip kproxy service-nodeports {{ tcp . {NODE_PORT} }}\n"
                  f"flush chain ip kproxy {chain}\ndelete chain ip kproxy {chain}\n"
                  f"delete element ip kproxy endpoints-4 {{ {CLUSTER_IP} . tcp . 80 . 65536 }}\n")
        subprocess.run(["ip", "netns", "exec", bed.node.name, "nft", "-f", "-"], input=script, text=True, check=True)

    seconds, _, _ = _with_traffic(bed, lambda: _restored_after(bed, delete_chain))
    assert f"chain {chain}" in bed.node.nft("list", "table", "ip", "kproxy").stdout
    assert seconds < RESTORE_WITHIN, f"chain restored after {seconds:.2f} s"
    element = f"{CLUSTER_IP} . tcp . 80 . 65536"
    seconds, _, _ = _with_traffic(bed, lambda: _restored_after(
        bed, lambda: bed.node.nft("delete", "element", "ip", "kproxy", "endpoints-4", "{", element, "}")))
    assert seconds < RESTORE_WITHIN, f"element restored after {seconds:.2f} s"
    assert {"chain_deleted", "elements_changed"} <= set(_repairs(registry))
    assert bed.client.connect_many(bed.node_ip4, NODE_PORT, 10).all_ok


def test_a_storm_is_paced_and_converges_once_it_stops(running: tuple[NetBed, Daemon, CollectorRegistry],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A script deletes the table every 100 ms for 5 s: repairs are paced (not one per deletion), logged once, and the
    tables are back soon after the storm ends."""
    bed, _, registry = running
    storm = "for i in $(seq 50); do nft delete table ip kproxy 2>/dev/null; sleep 0.1; done"
    with caplog.at_level("INFO", logger="kproxy.daemon.drift"):
        subprocess.run(["ip", "netns", "exec", bed.node.name, "sh", "-c", storm], check=True, timeout=30)
        ended = time.monotonic()
        wait_until(lambda: _programmed(bed), 20, "the tables after the storm", interval=0.02)
        print(f"converged {time.monotonic() - ended:.2f} s after the storm", file=sys.stderr)
    repairs = sum(_repairs(registry).values())
    assert 1 <= repairs <= 15, f"{repairs} repairs for 50 deletions"
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "another program changed" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert _connect_after_outage(bed)


def test_an_attempt_during_a_flushed_table_lands_from_its_source_port_after_the_repair(
        running: tuple[NetBed, Daemon, CollectorRegistry]) -> None:
    """``nft flush table ip kproxy`` keeps the table and its base chains, so the repair is a full sync over a
    table that is there: it deletes the attempts that went out untranslated meanwhile too. (The test holds the
    proxier while it flushes and connects, so the attempt surely comes before the repair.)"""
    bed, daemon, registry = running
    _track_connections(bed)  # with its rules flushed, kproxy's table no longer has the node track them
    pod = bed.local_pods[0].netns
    with daemon.proxier.lock:
        bed.node.nft("flush", "table", "ip", "kproxy")
        early = pod.connect(CLUSTER_IP, 80, timeout=0.5, src_port=41001)
        assert not early.ok, early
        assert "sport=41001" in _untranslated(bed, "--sport", "41001"), bed.diagnostics()
    wait_until(lambda: _programmed(bed), 10, "the repair")
    wait_until(lambda: not _untranslated(bed, "--sport", "41001"), 5, "kproxy to delete the untranslated attempt")
    assert _untranslated_deleted(registry) >= 1
    again = pod.connect(CLUSTER_IP, 80, timeout=2.0, src_port=41001)
    assert again.ok, again
