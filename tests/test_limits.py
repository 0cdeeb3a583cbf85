"""Issue 19's limits with real packets in the network-namespace test bed.

Each test programs the bed's node in-process (``tests/harness/program.py``) for
a Service with limits and sends TCP and UDP from the bed's clients: concurrent
connections (``kproxy.io/limit-connections``), the aggregate rate of new
connections (``kproxy.io/rate-limit-total``), per-client bandwidth
(``kproxy.io/bandwidth-limit``) and the allowlist (``kproxy.io/limit-allowlist``).
The drop counters are read as the metrics endpoint reads them
(``ProxierCollector`` over the node's nft counters) and ``explain`` is asked
about the same clients, so both are checked against what the packets saw.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kproxy.cluster.convert import build_cluster
from kproxy.daemon.inspect import KernelTables
from kproxy.nft.backend import NftablesBackend
from kproxy.observe.metrics import ProxierCollector
from kproxy.rules.compiler import NodeInfo
from kproxy.rules.explain import Packet, explain
from tests.harness import bulk
from tests.harness.builders import endpoint_slice, service
from tests.harness.netbed import PYTHON, NetBed, Netns
from tests.harness.program import CONFIG, node_manifest, pod_endpoint, program

pytestmark = pytest.mark.root

BULK = bulk.__file__
MB = 1024 * 1024
"""nft's mbyte."""


@pytest.fixture
def bed(netbed: NetBed) -> NetBed:
    """The bed with, in every remote pod, trafficd (TCP 8080, UDP 5353) and the bulk servers (hold 9000,
    source 9001, sink 9002)."""
    netbed.start_servers(tcp_ports=[8080], udp_ports=[5353])
    for pod in netbed.remote_pods:
        proc = pod.netns.popen(PYTHON, "-u", BULK, "serve", "--name", pod.name, "--hold", "9000", "--source", "9001",
                               "--sink", "9002")
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"READY"
    return netbed


def _ports(*specs: tuple[str, int, int, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Service ports, EndpointSlice ports) for (name, port, target port, protocol) each."""
    return ([{"name": n, "port": p, "protocol": proto} for n, p, _, proto in specs],
            [{"name": n, "port": t, "protocol": proto} for n, _, t, proto in specs])


def _limited(bed: NetBed, name: str, cluster_ip: str, annotations: dict[str, str],
             *specs: tuple[str, int, int, str]) -> list[dict[str, Any]]:
    ports, targets = _ports(*specs)
    objects = [service(name, cluster_ip=cluster_ip, annotations=annotations, ports=ports),
               endpoint_slice(f"{name}-1", name, [pod_endpoint(p) for p in bed.remote_pods], ports=targets)]
    program(bed, objects)
    return objects


class _NoProxier:
    """What the collector asks the proxier: nothing here (no Local policy, no Service opted in)."""

    oldest_pending_wall = None

    def local_policy_report(self, timeout: float | None = None) -> list[Any]:
        return []

    def metrics_services(self, timeout: float | None = None) -> frozenset[str]:
        return frozenset()


def limit_drops(bed: NetBed, service_name: str) -> dict[str, int]:
    """``kproxy_limit_drops_total`` of the Service's IPv4 series by reason, as /metrics exports them."""

    def read() -> Any:
        with bed.node.entered():
            return NftablesBackend().read_counters()

    text = ProxierCollector(_NoProxier(), read).exposition()  # type: ignore[arg-type]
    found = {}
    for line in text.splitlines():
        match = re.match(r'kproxy_limit_drops_total\{(.*)\} (\d+)$', line)
        if match and f'service="{service_name}"' in match.group(1) and 'ip_family="IPv4"' in match.group(1):
            reason = re.search(r'reason="([a-z_]+)"', match.group(1))
            assert reason is not None
            found[reason.group(1)] = found.get(reason.group(1), 0) + int(match.group(2))
    return found


def explained(bed: NetBed, objects: list[dict[str, Any]], source: str, destination: str, port: int,
              protocol: str = "tcp") -> str:
    cluster, problems = build_cluster([*objects, node_manifest(bed)], bed.node_name)
    assert problems == []
    info = NodeInfo(bed.node_name, bed.zone, (bed.node_ip4, bed.node_ip6), (bed.node_ip4, bed.node_ip6))
    with bed.node.entered():
        lines = explain(Packet(source, destination, port, protocol), cluster, info, CONFIG, KernelTables(NftablesBackend()))
    return "\n".join(lines)


def _in(netns: Netns, work: Callable[[], Any]) -> Any:
    with netns.entered():
        return work()


def _parallel(*jobs: Callable[[], Any]) -> list[Any]:
    """Run the jobs in threads at the same time; their results in order (an exception is raised here)."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int, job: Callable[[], Any]) -> None:
        try:
            results[i] = job()
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results



@contextlib.contextmanager
def held(sockets: list[Any]) -> Iterator[list[Any]]:
    try:
        yield sockets
    finally:
        for s in sockets:
            if s is not None:
                s.close()


# -- concurrent connections ------------------------------------------------------------------------


def test_connection_limit_tcp(bed: NetBed) -> None:
    """limit-connections 3: a client holding 3 has its 4th dropped; a second client holds its own 3 at the same
    time; when one closes, the next is accepted. The drops are counted, and explain names the limit."""
    objects = _limited(bed, "conns", "10.96.0.40", {"kproxy.io/limit-connections": "3"}, ("hold", 80, 9000, "TCP"))
    hold = lambda: bulk.hold("10.96.0.40", 80, timeout=1.0)  # noqa: E731
    first = _in(bed.client, lambda: [hold() for _ in range(4)])
    with held(first):
        assert [s is not None for s in first] == [True, True, True, False]
        second = _in(bed.client2, lambda: [hold() for _ in range(4)])
        with held(second):
            assert [s is not None for s in second] == [True, True, True, False]
            first[0].close()
            time.sleep(0.2)  # the FIN exchange: conntrack leaves ESTABLISHED, the count no longer holds it
            # (room for one SYN retransmission, in case the FIN exchange took longer than the pause)
            first[0] = _in(bed.client, lambda: bulk.hold("10.96.0.40", 80, timeout=2.5))
            assert first[0] is not None, "a closed connection makes room for the next"
            assert _in(bed.client, hold) is None, "and no more"
    drops = limit_drops(bed, "conns")
    assert drops.get("connections", 0) >= 3 and set(drops) == {"connections"}, drops
    text = explained(bed, objects, bed.client_ip4, "10.96.0.40", 80)
    assert "connection limit: 3 concurrent connections per client" in text and "allowlisted" not in text


def test_connection_limit_udp(bed: NetBed) -> None:
    """limit-connections 3 for UDP: a flow counts while conntrack holds it. A 4th flow gets no answer while the
    client keeps 3 alive, a second client has its own 3, and the 4th is answered once one flow has expired."""
    bed.node.sysctl({"net.netfilter.nf_conntrack_udp_timeout": 2, "net.netfilter.nf_conntrack_udp_timeout_stream": 2})
    _limited(bed, "flows", "10.96.0.43", {"kproxy.io/limit-connections": "3"}, ("dns", 53, 5353, "UDP"))
    flows = [bed.client.start_udp_flow("10.96.0.43", 53, interval_ms=200) for _ in range(3)]
    for flow in flows:
        flow.wait_for(lambda r: r.ok, timeout=5)
    fourth = bed.client.start_udp_flow("10.96.0.43", 53, interval_ms=200)
    others = [bed.client2.start_udp_flow("10.96.0.43", 53, interval_ms=200) for _ in range(3)]
    for flow in others:
        flow.wait_for(lambda r: r.ok, timeout=5)
    time.sleep(1.5)
    assert fourth.results and not any(r.ok for r in fourth.results), "a 4th flow of the same client is dropped"
    flows[0].stop()
    fourth.wait_for(lambda r: r.ok, timeout=8)  # flow 1's conntrack entry expires after 2 s
    for flow in (*flows[1:], fourth, *others):
        flow.stop()
    assert limit_drops(bed, "flows").get("connections", 0) >= sum(not r.ok for r in fourth.results) > 0


# -- the aggregate rate --------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_total_rate_limit_is_shared_by_all_clients(bed: NetBed, proto: str) -> None:
    """rate-limit-total 50/second: ten clients each opening 20 connections a second for 5 s get about 50 a
    second accepted in total (within 20 %); the refused ones are the counted drops."""
    port, target = (80, 8080) if proto == "tcp" else (53, 5353)
    _limited(bed, "total", "10.96.0.41", {"kproxy.io/rate-limit-total": "50/second"},
             ("p", port, target, proto.upper()))
    sources = [f"192.168.50.{110 + i}" for i in range(10)]
    bed.client.ip_batch([f"addr add {a}/24 dev eth0" for a in sources])

    def client(source: str) -> Callable[[], Any]:
        return lambda: bed.client.connect_many("10.96.0.41", port, 100, proto, timeout=0.9, rate=20, src=source)

    results = [r for batch in _parallel(*(client(a) for a in sources)) for r in batch]
    assert len(results) == 1000
    window = max(r.t for r in results) - min(r.t for r in results) + 1 / 20
    accepted = sum(r.ok for r in results)
    rate = accepted / window
    print(f"rate-limit-total {proto}: {accepted} of 1000 accepted in {window:.2f} s: {rate:.1f}/s")
    assert abs(rate - 50) <= 0.2 * 50, (accepted, window, rate)
    assert {r.error for r in results if not r.ok} == {"timeout"}
    refused = len(results) - accepted
    drops = limit_drops(bed, "total")["rate_limit_total"]
    assert refused <= drops <= (refused if proto == "udp" else 2 * refused), (refused, drops)


# -- bandwidth ---------------------------------------------------------------------------------------


def test_bandwidth_limit_polices_each_client_and_direction(bed: NetBed) -> None:
    """bandwidth-limit 1 mbytes/second: a bulk download and an upload each measure within 20 % of the cap, timed
    after the first 2 MB (the bucket starts full); a second client downloading at the same time gets its own."""
    objects = _limited(bed, "bw", "10.96.0.42", {"kproxy.io/bandwidth-limit": "1 mbytes/second"},
                       ("down", 81, 9001, "TCP"), ("up", 82, 9002, "TCP"))
    total = 6 * MB
    down = _in(bed.client, lambda: bulk.download("10.96.0.42", 81, total))
    up = _in(bed.client2, lambda: bulk.upload("10.96.0.42", 82, total))
    both = _parallel(lambda: _in(bed.client, lambda: bulk.download("10.96.0.42", 81, total)),
                     lambda: _in(bed.client2, lambda: bulk.download("10.96.0.42", 81, total)))
    print(f"bandwidth: download {down / MB:.3f}, upload {up / MB:.3f}, two at once {both[0] / MB:.3f} and "
          f"{both[1] / MB:.3f} mbytes/second")
    for what, rate in (("download", down), ("upload", up), ("first of two", both[0]), ("second of two", both[1])):
        assert abs(rate - MB) <= 0.2 * MB, (what, rate)
    assert limit_drops(bed, "bw").get("bandwidth", 0) > 0
    text = explained(bed, objects, bed.client_ip4, "10.96.0.42", 81)
    assert "bandwidth limit: 1 mbytes/second per client in each direction" in text


# -- the allowlist -------------------------------------------------------------------------------


def test_allowlisted_client_skips_every_limit_at_once(bed: NetBed) -> None:
    """With every limit at its tightest, a client in limit-allowlist holds many connections, opens many more
    and downloads far above the bandwidth cap; a client outside it is refused its second connection."""
    limits = {"kproxy.io/limit-connections": "1", "kproxy.io/rate-limit": "1/minute", "kproxy.io/rate-limit-burst": "1",
              "kproxy.io/rate-limit-total": "1/minute", "kproxy.io/rate-limit-total-burst": "1",
              "kproxy.io/bandwidth-limit": "100 kbytes/second",
              "kproxy.io/limit-allowlist": f"{bed.client2_ip4}/32, 10.99.0.0/16"}
    objects = _limited(bed, "strict", "10.96.0.44", limits, ("hold", 80, 9000, "TCP"), ("down", 81, 9001, "TCP"),
                       ("dns", 53, 5353, "UDP"))
    inside = _in(bed.client2, lambda: [bulk.hold("10.96.0.44", 80) for _ in range(5)])
    with held(inside):
        assert all(s is not None for s in inside)
        quick = bed.client2.connect_many("10.96.0.44", 53, 20, "udp", timeout=1.0)
        assert quick.all_ok, quick.summary()
        rate = _in(bed.client2, lambda: bulk.download("10.96.0.44", 81, 4 * MB, skip=MB))
        print(f"allowlisted download: {rate / MB:.1f} mbytes/second under a 100 kbytes/second limit")
        assert rate > 10 * 100 * 1024, rate
        before = limit_drops(bed, "strict")
        assert set(before) == {"connections", "rate_limit", "rate_limit_total", "bandwidth"}
        assert not any(before.values()), "nothing of the allowlisted client was dropped"
        outside = _in(bed.client, lambda: [bulk.hold("10.96.0.44", 80) for _ in range(2)])
        with held(outside):
            assert [s is not None for s in outside] == [True, False]
    assert sum(limit_drops(bed, "strict").values()) > 0
    text = explained(bed, objects, bed.client2_ip4, "10.96.0.44", 80)
    assert f"source in {bed.client2_ip4}/32, exempt from every limit" in text
    assert text.count("(not for this client: allowlisted") == 4
    text = explained(bed, objects, bed.client_ip4, "10.96.0.44", 80)
    assert "source not in it, limited" in text and "allowlisted by" not in text


# -- the bandwidth hooks come and go with partial syncs -----------------------------------------------


def test_bandwidth_hooks_exist_only_while_a_service_has_a_limit(bed: NetBed) -> None:
    """The daemon's partial syncs add the bandwidth base chains with the first Service that has a bandwidth
    limit, keep them while another has one, and delete them after the last one; the traffic is policed
    meanwhile, and a full compile agrees with what the partial syncs left."""
    from kproxy.daemon.proxier import CHAIN_DELETE_DELAY, Proxier
    from kproxy.rules.compiler import compile_ruleset, node_info
    from kproxy.rules.plan import plan

    now = [1000.0]
    with bed.node.entered():
        proxier = Proxier(NftablesBackend(), bed.node_name, CONFIG, clock=lambda: now[0])
    ports, targets = _ports(("down", 81, 9001, "TCP"))

    def objects(name: str, ip: str, limited: bool) -> list[dict[str, Any]]:
        annotations = {"kproxy.io/bandwidth-limit": "1 mbytes/second"} if limited else {}
        return [service(name, cluster_ip=ip, annotations=annotations, ports=ports),
                endpoint_slice(f"{name}-1", name, [pod_endpoint(p) for p in bed.remote_pods], ports=targets)]

    def sync() -> tuple[bool, set[str]]:
        with bed.node.entered():
            result = proxier.sync()
        chains = bed.node.nft("list", "chains", "ip").stdout
        return result.full, {name for name in ("bandwidth-prerouting", "bandwidth-output") if f"chain {name} " in chains}

    proxier.on_relist("Node", [node_manifest(bed)])
    plain, first, second = objects("plain", "10.96.0.45", False), objects("bw1", "10.96.0.46", True), objects("bw2", "10.96.0.47", True)
    proxier.on_relist("Service", [plain[0]])
    proxier.on_relist("EndpointSlice", [plain[1]])
    assert sync() == (True, set())
    proxier.on_service("ADDED", first[0])
    proxier.on_slice("ADDED", first[1])
    assert sync() == (False, {"bandwidth-prerouting", "bandwidth-output"})
    rate = _in(bed.client, lambda: bulk.download("10.96.0.46", 81, 4 * MB))
    assert abs(rate - MB) <= 0.2 * MB, rate
    proxier.on_service("ADDED", second[0])
    proxier.on_slice("ADDED", second[1])
    assert sync() == (False, {"bandwidth-prerouting", "bandwidth-output"})
    proxier.on_service("DELETED", first[0])
    assert sync() == (False, {"bandwidth-prerouting", "bandwidth-output"})
    proxier.on_service("DELETED", second[0])
    assert sync()[0] is False
    assert "vmap" not in bed.node.nft("list", "chain", "ip", "kproxy", "bandwidth-prerouting").stdout, "flushed at once"
    now[0] += CHAIN_DELETE_DELAY + 1
    assert sync() == (False, set())
    assert _in(bed.client, lambda: bulk.download("10.96.0.45", 81, 4 * MB)) > 5 * MB, "no limit is left"
    cluster = proxier.cluster()
    with bed.node.entered():
        left = plan(NftablesBackend().read(), compile_ruleset(cluster, node_info(bed.node_name, cluster.node), CONFIG))
    # All but the deleted Services' ClusterIPs, which stay rejected for 60 s (rules/README.md).
    assert [(op.verb, op.name) for op in left.ops] == [("delete", "cluster-ips")]
