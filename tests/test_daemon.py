"""The daemon end to end: the test API server, a kproxy process in the node namespace, real traffic."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.harness.builders import endpoint, endpoint_slice, service
from tests.harness.daemonbed import ApiInNode, KproxyProcess, dispatched, wait_until
from tests.harness.netbed import NetBed, Pod

pytestmark = pytest.mark.root


def pod_slice(name: str, pods: list[Pod], **kw: Any) -> dict[str, Any]:
    return endpoint_slice(f"{name}-abc", name, [endpoint(p.ip4, node=p.node_name, zone=p.zone) for p in pods], **kw)


@pytest.fixture
def bed(daemon_bed: NetBed) -> NetBed:
    """The daemon test bed (tests/harness/daemonbed.py)."""
    return daemon_bed


def servers_seen(bed: NetBed, dst: str, port: int = 80, count: int = 60) -> set[str]:
    """Which pods answer on ``dst``, asked from the external client (the steady loops run in a pod).

    The timeout leaves room for one SYN retransmission (1 s): parallel
    connections through masquerade can lose a SYN to the kernel's conntrack
    insertion race, which is not what these tests are about.
    """
    results = bed.client.connect_many(dst, port, count, timeout=2.5)
    return results.servers if results.all_ok else set()


def test_daemon_follows_changes(bed: NetBed, api_in_node: ApiInNode) -> None:
    """Create, scale up, scale down, scale to zero, delete: traffic follows; after deletion connects are refused."""
    api = api_in_node.api
    kproxy = KproxyProcess(bed, api_in_node)
    api.create(service("web", cluster_ip="10.96.0.10"))
    api.create(pod_slice("web", bed.pods[:1]))
    wait_until(lambda: servers_seen(bed, "10.96.0.10") == {bed.pods[0].name}, 15, "first endpoint")
    api.update(pod_slice("web", bed.pods))
    wait_until(lambda: servers_seen(bed, "10.96.0.10", count=200) == {p.name for p in bed.pods}, 5, "scale up")
    api.update(pod_slice("web", bed.remote_pods))
    wait_until(lambda: servers_seen(bed, "10.96.0.10") == {p.name for p in bed.remote_pods}, 5, "scale down")
    api.delete("EndpointSlice", "default", "web-abc")
    wait_until(lambda: bed.local_pods[0].netns.connect("10.96.0.10", 80).error == "refused", 5, "refusal")
    api.delete("Service", "default", "web")
    wait_until(lambda: "default/web/" not in bed.node.nft("list", "table", "ip", "kproxy").stdout, 5, "removal")
    gone = bed.local_pods[0].netns.connect("10.96.0.10", 80, timeout=2.0)
    assert gone.error == "refused" and gone.elapsed < 0.5, f"a deleted Service's ClusterIP refuses: {gone}"
    assert kproxy.stop() == 0


def test_partial_sync_touches_only_the_changed_service(bed: NetBed, api_in_node: ApiInNode) -> None:
    """With 30 Services programmed, one endpoint change is one small partial sync."""
    api = api_in_node.api
    for i in range(30):
        api.create(service(f"s{i}", cluster_ip=f"10.96.1.{i + 1}"))
        api.create(pod_slice(f"s{i}", bed.pods[:2]))
    kproxy = KproxyProcess(bed, api_in_node)
    wait_until(lambda: servers_seen(bed, "10.96.1.30"), 15, "Services programmed")
    before = len(kproxy.syncs())
    api.update(pod_slice("s7", bed.pods[:3]))
    wait_until(lambda: bed.pods[2].name in servers_seen(bed, "10.96.1.8", count=100), 5, "the change")
    syncs = kproxy.syncs()[before:]
    changed = [s for s in syncs if s["operations"]]
    assert len(changed) == 1 and changed[0]["sync"] == "partial", syncs
    # the new endpoint's slot in the endpoints map + its hairpin element: no rule changes
    assert changed[0]["services"] == 1 and changed[0]["operations"] == 2, changed
    kproxy.stop()


def test_daemon_survives_the_api_server(bed: NetBed, api_in_node: ApiInNode) -> None:
    """Dropped watches, 410 Gone and 10 s of API server downtime: rules converge, steady traffic never fails."""
    api = api_in_node.api
    api.create(service("steady", cluster_ip="10.96.0.20"))
    api.create(pod_slice("steady", bed.pods))
    kproxy = KproxyProcess(bed, api_in_node)
    wait_until(lambda: servers_seen(bed, "10.96.0.20"), 15, "steady Service")
    with bed.local_pods[-1].netns.start_loop("10.96.0.20", 80, interval_ms=10) as loop:
        loop.wait_ok(10)
        api.drop_watches()
        api.create(service("after-drop", cluster_ip="10.96.0.21"))
        api.create(pod_slice("after-drop", bed.pods[:1]))
        wait_until(lambda: servers_seen(bed, "10.96.0.21"), 10, "change after a dropped watch")

        api.compact()
        api.force_410_on_next_watch(count=3)
        api.drop_watches()
        api.create(service("after-410", cluster_ip="10.96.0.22"))
        api.create(pod_slice("after-410", bed.pods[:1]))
        wait_until(lambda: servers_seen(bed, "10.96.0.22"), 10, "change after 410 Gone")

        api_in_node.stop()
        api.create(service("while-down", cluster_ip="10.96.0.23"))
        api.create(pod_slice("while-down", bed.pods[:1]))
        api.delete("Service", "default", "after-drop")
        loop.wait_more_ok(400, timeout=15)  # about 10 s of traffic while the API server is down
        api_in_node.start()
        # Each watch retries with capped exponential backoff and full jitter (0.5 s doubling up to 30 s, as client-go's
        # reflectors): after ~10 s down, the next attempt may come up to 30 s after the API server is back (20 s
        # here failed once in CI).
        wait_until(lambda: servers_seen(bed, "10.96.0.23"), 40, "changes made while the API server was down")
        wait_until(lambda: "default/after-drop/" not in bed.node.nft("list", "table", "ip", "kproxy").stdout, 5,
                   "the deletion")
        summary = loop.stop()
    assert summary.failed == 0, f"{summary}\n{kproxy.tail(80)}"
    assert kproxy.stop() == 0


def test_restart_without_a_blip(bed: NetBed, api_in_node: ApiInNode) -> None:
    """kill -9 and restart under steady traffic: no connection fails and conntrack is not flushed."""
    api = api_in_node.api
    api.create(service("steady", cluster_ip="10.96.0.30",
                       ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]))
    api.create(endpoint_slice("steady-abc", "steady", [endpoint(p.ip4, node=p.node_name) for p in bed.pods],
                              ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]))
    first = KproxyProcess(bed, api_in_node)
    wait_until(lambda: servers_seen(bed, "10.96.0.30"), 15, "steady Service")
    udp = bed.local_pods[-1].netns.start_udp_flow("10.96.0.30", 53, interval_ms=20)
    server = udp.next_result(timeout=5).server
    conntrack_before = bed.node.run("conntrack", "-L", "-p", "udp", "--dport", "53").stdout
    with bed.local_pods[-1].netns.start_loop("10.96.0.30", 80, interval_ms=10) as loop:
        loop.wait_ok(20)
        first.stop(signal.SIGKILL)
        loop.wait_more_ok(50)
        second = KproxyProcess(bed, api_in_node)
        second.wait_syncs(1, timeout=15)
        api.create(service("after-restart", cluster_ip="10.96.0.31"))
        api.create(pod_slice("after-restart", bed.pods[:1]))
        wait_until(lambda: servers_seen(bed, "10.96.0.31"), 10, "the restarted daemon")
        loop.wait_more_ok(50)
        summary = loop.stop()
    assert summary.failed == 0, summary
    adopted = second.syncs()[0]
    assert adopted["sync"] == "full" and adopted["operations"] == 0, adopted
    replies = [udp.next_result(timeout=5) for _ in range(5)]
    assert all(r.ok and r.server == server for r in replies), [str(r) for r in replies]
    conntrack_after = bed.node.run("conntrack", "-L", "-p", "udp", "--dport", "53").stdout
    assert conntrack_before.strip() and _flow_ids(conntrack_before) <= _flow_ids(conntrack_after)
    udp.stop()
    second.stop()


def _flow_ids(listing: str) -> set[str]:
    return {part for line in listing.splitlines() for part in line.split() if part.startswith("sport=")}


def test_drift_repaired_and_sigterm_leaves_rules(bed: NetBed, api_in_node: ApiInNode) -> None:
    """A table deleted by hand is restored by the next full resync (SIGHUP); SIGTERM keeps the rules."""
    api = api_in_node.api
    api.create(service("web", cluster_ip="10.96.0.40"))
    api.create(pod_slice("web", bed.pods))
    kproxy = KproxyProcess(bed, api_in_node)
    # Waits read the kernel, not traffic: a connection made while the Service is not programmed goes out
    # un-translated and leaves a conntrack entry that captures a later connection reusing its port (34 such
    # entries after one probe loop made a later check of 150 connections fail once in CI).
    wait_until(lambda: dispatched(bed, "10.96.0.40 . tcp . 80"), 15, "Service")
    assert servers_seen(bed, "10.96.0.40") == {p.name for p in bed.pods}
    bed.node.nft("delete", "table", "ip", "kproxy")
    # Probe the broken state from the other client, for the same reason.
    assert not bed.client2.connect("10.96.0.40", 80, timeout=0.5).ok
    kproxy.send(signal.SIGHUP)
    wait_until(lambda: dispatched(bed, "10.96.0.40 . tcp . 80"), 10, "the table restored")
    assert servers_seen(bed, "10.96.0.40") == {p.name for p in bed.pods}
    assert kproxy.stop(signal.SIGTERM) == 0
    assert "kproxy" in bed.node.nft("list", "tables").stdout
    assert servers_seen(bed, "10.96.0.40", count=150) == {p.name for p in bed.pods}


def test_service_cidrs_are_watched(bed: NetBed, api_in_node: ApiInNode) -> None:
    """A ServiceCIDR created, widened and deleted at the API server: unallocated addresses in it are dropped."""
    api = api_in_node.api
    bed.router.ip("addr", "add", "10.96.99.99/32", "dev", "lo")
    bed.router.ip("addr", "add", "10.98.99.99/32", "dev", "lo")
    bed.start_server(bed.router, "outside", tcp_ports=[80])
    client = bed.local_pods[0].netns
    api.create(service("web", cluster_ip="10.96.0.50"))
    api.create(pod_slice("web", bed.pods[:1]))
    cidr = {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": ["10.96.0.0/16"]}}
    api.create(cidr)
    kproxy = KproxyProcess(bed, api_in_node)
    wait_until(lambda: servers_seen(bed, "10.96.0.50"), 15, "the Service")
    assert client.connect("10.96.99.99", 80, timeout=0.5).error == "timeout", "unallocated, dropped"
    assert client.connect("10.98.99.99", 80).ok
    api.create({**cidr, "metadata": {"name": "extra"}, "spec": {"cidrs": ["10.98.0.0/16"]}})
    wait_until(lambda: client.connect("10.98.99.99", 80, timeout=0.3).error == "timeout", 5, "the second range")
    api.delete("ServiceCIDR", "", "kubernetes")
    wait_until(lambda: client.connect("10.96.99.99", 80, timeout=0.3).ok, 5, "the first range removed")
    assert kproxy.stop() == 0


@pytest.mark.parametrize("api_in_node", [frozenset({"ServiceCIDR"})], indirect=True, ids=["without-servicecidrs"])
def test_api_server_without_service_cidrs(bed: NetBed, api_in_node: ApiInNode) -> None:
    """An API server that does not serve ServiceCIDRs (older than 1.33): kproxy says so once and programs the rest."""
    api = api_in_node.api
    api.create(service("web", cluster_ip="10.96.0.51"))
    api.create(pod_slice("web", bed.pods[:1]))
    kproxy = KproxyProcess(bed, api_in_node)
    wait_until(lambda: servers_seen(bed, "10.96.0.51"), 15, "the Service")
    notes = [e["msg"] for e in kproxy.lines() if "ServiceCIDR" in e.get("msg", "")]
    assert len(notes) == 1 and "does not serve it (404)" in notes[0], notes
    assert kproxy.stop() == 0
