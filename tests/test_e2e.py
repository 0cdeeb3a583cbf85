"""End to end: kproxy on every node of a 3-node, 2-zone cluster in network namespaces, real connections across nodes.

Modelled on the Kubernetes e2e ``[sig-network] Services`` tests.  One cluster
(``tests/harness/cluster.py``: node-1 and node-3 in zone-a, node-2 in zone-b;
pods web-1a, web-1b on node-1, web-2a, web-2b on node-2, web-3a, web-3b on
node-3, and a client pod per node; one kproxy daemon per node started as
daemonset.yaml starts it) is shared by the module; every test creates its own
Services (fresh ClusterIPs and NodePorts) and pods, and the ``c`` fixture
removes them and restores the pods' labels and conditions afterwards.

Each test prints the connections it made and where they landed (``pod@node xN``,
and the source address the pod saw): ``./dev test tests/test_e2e.py -s`` (or
``-rP``) shows them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.harness.cluster import CLIENT_IP4, CLIENT_IP6, Cluster, Deployment, Node, Pod, wait_until
from tests.harness.netbed import Results, TrafficLoop, require_root

pytestmark = [pytest.mark.root, pytest.mark.slow]

EVERY_POD = 120
"""Connections for a check that each of the 6 web pods answers: with random picks, 60 missed one with probability
1e-4 per check (27 checks), 120 with 2e-9."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """3 nodes, 2 zones, 2 web pods and a client pod per node, kproxy on every node (about 7 s to build)."""
    require_root()
    t0 = time.monotonic()
    built = Cluster(nodes=3, zones=2, pods_per_node=2, workdir=tmp_path_factory.mktemp("e2e-cluster")).build()
    print(f"\ncluster {built.suffix} built in {time.monotonic() - t0:.1f}s; logs in {built.workdir}/logs")
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def c(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The shared cluster, reset after the test (and the kproxy logs printed if it failed)."""
    mark = cluster.checkpoint()
    failed_before = request.session.testsfailed
    print()
    yield cluster
    if request.session.testsfailed > failed_before:
        print(cluster.kproxy_logs(40))
    cluster.reset(mark)


def show(c: Cluster, label: str, results: Results) -> Results:
    print(f"  {label}: {c.describe(results)}")
    return results


def names(pods: list[Pod]) -> set[str]:
    return {p.name for p in pods}


def loop_line(c: Cluster, label: str, loop: TrafficLoop) -> str:
    s = loop.summary
    assert s is not None
    landed = ", ".join(f"{c.where(k)} x{v}" for k, v in sorted(s.by_server.items()))
    return f"  {label}: {s.total} conns, {s.failed} failed {s.by_error or ''} -> {landed}"


# ----------------------------------------------------------------------------- ClusterIP and NodePort


def test_clusterip_from_pods_on_every_node(c: Cluster) -> None:
    """[sig-network] Services should serve multiport endpoints from pods: a ClusterIP (TCP and UDP) reaches the
    pods of every node from a pod on every node, without rewriting the pod's source address."""
    c.create_service("clusterip")
    c.settle()
    ip, web = c.cluster_ip("clusterip"), names(c.app_pods())
    for node in c.nodes:
        client = c.clients[node.name]
        tcp = show(c, f"{client.name}@{node.name} -> {ip}:80/tcp", client.connect_many(ip, 80, EVERY_POD))
        assert tcp.all_ok and tcp.servers == web, tcp.summary()
        assert tcp.peers == {client.ip4}, "pod-to-pod traffic keeps the pod's address"
        udp = show(c, f"{client.name}@{node.name} -> {ip}:53/udp", client.connect_many(ip, 53, EVERY_POD, proto="udp"))
        assert udp.all_ok and udp.servers == web, udp.summary()
        host = show(c, f"{node.name} (host network) -> {ip}:80/tcp", node.netns.connect_many(ip, 80, 30))
        assert host.all_ok, host.summary()


def test_nodeport_from_outside_via_every_node(c: Cluster) -> None:
    """[sig-network] Services should be able to create a functioning NodePort service: the external client reaches
    the pods of every node through the NodePort of every node (TCP and UDP), masqueraded (externalTrafficPolicy
    Cluster); the load balancer health-checks kproxy's /healthz and sends to every node."""
    c.create_service("nodeport", type="NodePort")
    c.settle()
    web, tcp_port, udp_port = names(c.app_pods()), c.node_port("nodeport"), c.node_port("nodeport", "dns")
    for node in c.nodes:
        tcp = show(c, f"client -> {node.name} {node.ip4}:{tcp_port}/tcp", c.client.connect_many(node.ip4, tcp_port, EVERY_POD))
        assert tcp.all_ok and tcp.servers == web, tcp.summary()
        assert tcp.peers <= {node.ip4, node.gw4}, "externalTrafficPolicy Cluster masquerades to the node"
        udp = show(c, f"client -> {node.name} {node.ip4}:{udp_port}/udp",
                   c.client.connect_many(node.ip4, udp_port, EVERY_POD, proto="udp"))
        assert udp.all_ok and udp.servers == web, udp.summary()
    lb = c.load_balancer("nodeport").send(60)
    print(f"  LB health (kproxy /healthz): {lb.health}")
    for node, results in lb.per_node.items():
        show(c, f"LB via {node}", results)
    assert lb.backends == [n.name for n in c.nodes] and lb.results.all_ok, lb.results.summary()


# ----------------------------------------------------------------------------- traffic policies


def test_external_traffic_policy_local(c: Cluster) -> None:
    """[sig-network] Services should work for type=LoadBalancer with externalTrafficPolicy Local: the client's
    address is kept, only nodes with local endpoints pass the health check, and the LB sends only to those."""
    local = [c.pod("web-1a"), c.pod("web-2a"), c.pod("web-2b")]  # node-3 has none
    for pod in local:
        c.set_pod(pod, labels={**pod.labels, "etp": "local"})
    c.create_service("etp-local", selector={"app": "web", "etp": "local"}, type="LoadBalancer",
                     externalTrafficPolicy="Local", ipFamilyPolicy="PreferDualStack")
    c.settle()
    lb = c.load_balancer("etp-local")
    expected = {"node-1": 200, "node-2": 200, "node-3": 503}
    wait_until(lambda: lb.health() == expected, 10, f"health checks {expected}")
    for node in c.nodes:
        status, body = lb.check(node)
        print(f"  health check {node.name}:{c.service('etp-local')['spec']['healthCheckNodePort']} -> {status} "
              f"{' '.join(body.split())}")
    sent = lb.send(60)
    for node, results in sent.per_node.items():
        show(c, f"LB via {node}", results)
    assert set(sent.per_node) == {"node-1", "node-2"}
    assert sent.results.all_ok, sent.results.summary()
    assert sent.per_node["node-1"].servers == {"web-1a"}
    assert sent.per_node["node-2"].servers == {"web-2a", "web-2b"}
    assert sent.results.peers == {CLIENT_IP4}, "externalTrafficPolicy Local keeps the client's address"
    node3 = c.node("node-3")
    dropped = show(c, "client -> node-3 directly (no local endpoint)",
                   c.client.connect_many(node3.ip4, c.node_port("etp-local"), 3, timeout=1.0))
    assert dropped.by_error == {"timeout": 3}, "a node without local endpoints drops external traffic"
    from_pod = show(c, "client-3@node-3 -> its own node's NodePort (in-cluster source: Cluster policy)",
                    c.clients["node-3"].connect_many(node3.ip4, c.node_port("etp-local"), 60))
    assert from_pod.all_ok and from_pod.servers == names(local), from_pod.summary()
    from_host = show(c, "node-3 (host network) -> its own NodePort (local source: Cluster policy)",
                     node3.netns.connect_many(node3.ip4, c.node_port("etp-local"), 60))
    assert from_host.all_ok and from_host.servers == names(local), from_host.summary()

    print("  web-3a joins, web-1a leaves:")
    c.set_pod("web-3a", labels={**c.pod("web-3a").labels, "etp": "local"})
    c.set_pod("web-1a", labels={"app": "web"})
    c.settle()
    expected = {"node-1": 503, "node-2": 200, "node-3": 200}
    wait_until(lambda: lb.health() == expected, 10, f"health checks {expected}")
    sent = lb.send(60)
    print(f"  LB health: {sent.health}")
    for node, results in sent.per_node.items():
        show(c, f"LB via {node}", results)
    assert set(sent.per_node) == {"node-2", "node-3"} and sent.results.all_ok, sent.results.summary()
    assert sent.per_node["node-3"].servers == {"web-3a"} and sent.results.peers == {CLIENT_IP4}
    sent6 = lb.send(40, family=6)
    print(f"  over IPv6: LB health {sent6.health}")
    for node, results in sent6.per_node.items():
        show(c, f"LB via {node} (IPv6)", results)
    assert set(sent6.per_node) == {"node-2", "node-3"} and sent6.results.all_ok, sent6.results.summary()
    assert sent6.results.peers == {CLIENT_IP6}


def test_external_traffic_policy_local_health_counts_pods_in_dual_stack(c: Cluster) -> None:
    """A dual-stack externalTrafficPolicy Local Service: each node's health check reports its local pods, as
    kube-proxy does per IP family (1 on node-1, 2 on node-2, 0 on node-3), over IPv4 and over IPv6."""
    for name in ("web-1a", "web-2a", "web-2b"):
        c.set_pod(name, labels={**c.pod(name).labels, "count": "me"})
    c.create_service("etp-count", selector={"app": "web", "count": "me"}, type="LoadBalancer",
                     externalTrafficPolicy="Local", ipFamilyPolicy="RequireDualStack")
    c.settle()
    lb = c.load_balancer("etp-count")
    wait_until(lambda: lb.health() == {"node-1": 200, "node-2": 200, "node-3": 503}, 10, "health checks")
    counts = {}
    for family in (4, 6):
        for node in c.nodes:
            status, body = lb.check(node, family)
            counts[(node.name, family)] = json.loads(body)["localEndpoints"]
            print(f"  health check {node.name} over IPv{family} -> {status} {' '.join(body.split())}")
    assert counts == {(n, f): {"node-1": 1, "node-2": 2, "node-3": 0}[n] for n in ("node-1", "node-2", "node-3")
                      for f in (4, 6)}, counts


def test_internal_traffic_policy_local(c: Cluster) -> None:
    """[sig-network] Services should respect internalTrafficPolicy=Local: pods reach only endpoints on their own
    node, a node without one drops; external traffic (Cluster policy) still reaches every endpoint."""
    chosen = [c.pod("web-1a"), c.pod("web-1b"), c.pod("web-2a")]  # node-3 has none
    for pod in chosen:
        c.set_pod(pod, labels={**pod.labels, "itp": "local"})
    c.create_service("itp-local", selector={"app": "web", "itp": "local"}, type="NodePort",
                     internalTrafficPolicy="Local")
    c.settle()
    ip = c.cluster_ip("itp-local")
    expect = {"node-1": {"web-1a", "web-1b"}, "node-2": {"web-2a"}}
    for node in c.nodes:
        client = c.clients[node.name]
        if node.name in expect:
            r = show(c, f"{client.name}@{node.name} -> {ip}:80", client.connect_many(ip, 80, 40))
            assert r.all_ok and r.servers == expect[node.name], r.summary()
        else:
            r = show(c, f"{client.name}@{node.name} -> {ip}:80 (no local endpoint)",
                     client.connect_many(ip, 80, 3, timeout=1.0))
            assert r.by_error == {"timeout": 3}, "no local endpoint: internal traffic is dropped"
    node3 = c.node("node-3")
    ext = show(c, f"client -> node-3 {node3.ip4}:{c.node_port('itp-local')} (external: Cluster policy)",
               c.client.connect_many(node3.ip4, c.node_port("itp-local"), 40))
    assert ext.all_ok and ext.servers == names(chosen), ext.summary()


def test_prefer_close(c: Cluster) -> None:
    """[sig-network] Traffic Distribution should route traffic to an endpoint in the same zone when using
    PreferClose: clients in zone-a reach only zone-a endpoints, zone-b only zone-b; a zone whose endpoints are
    not ready falls back to all; without the hints every client reaches every endpoint."""
    c.create_service("close", trafficDistribution="PreferClose")
    c.settle()
    ip = c.cluster_ip("close")
    hints = {ep["targetRef"]["name"]: ep["hints"]["forZones"][0]["name"]
             for s in c.endpoints.slices("close") for ep in s["endpoints"]}
    print(f"  hints from the EndpointSlice controller: {hints}")
    by_zone = {z: {p.name for p in c.app_pods() if p.zone == z} for z in c.zones}

    def reach(expected: dict[str, set[str]], phase: str) -> None:
        print(f"  {phase}:")
        for node in c.nodes:
            client = c.clients[node.name]
            r = show(c, f"{client.name}@{node.name} ({node.zone}) -> {ip}:80", client.connect_many(ip, 80, EVERY_POD))
            assert r.all_ok and r.servers == expected[node.name], r.summary()

    reach({n.name: by_zone[n.zone] for n in c.nodes}, "hints for every zone")

    for name in by_zone["zone-b"]:
        c.set_pod(name, ready=False)
    c.settle()
    reach({n.name: by_zone["zone-a"] for n in c.nodes}, "zone-b's pods not ready: zone-b falls back to all ready ones")
    for name in by_zone["zone-b"]:
        c.set_pod(name, ready=True)

    c.update_service("close", trafficDistribution=None)
    assert all("hints" not in ep for s in c.endpoints.slices("close") for ep in s["endpoints"])
    c.settle()
    reach({n.name: names(c.app_pods()) for n in c.nodes}, "trafficDistribution removed, so are the hints")


def test_session_affinity(c: Cluster) -> None:
    """[sig-network] Services should have session affinity work for NodePort and ClusterIP services: every
    connection of a client lands on one endpoint (per node: affinity lives in each node's kproxy)."""
    c.create_service("sticky", type="NodePort", sessionAffinity="ClientIP")
    c.settle()
    ip, port = c.cluster_ip("sticky"), c.node_port("sticky")
    for node in c.nodes:
        client = c.clients[node.name]
        r = show(c, f"{client.name}@{node.name} -> {ip}:80", client.connect_many(ip, 80, 30, parallel=1))
        assert r.all_ok and len(r.servers) == 1, r.summary()
        r = show(c, f"client -> {node.name} {node.ip4}:{port}", c.client.connect_many(node.ip4, port, 30, parallel=1))
        assert r.all_ok and len(r.servers) == 1, r.summary()


def test_hairpin(c: Cluster) -> None:
    """[sig-network] Services should allow pods to hairpin back to themselves through services: through the
    ClusterIP, its own node's NodePort and another node's NodePort; masqueraded so the reply comes back."""
    pod = c.pod("web-1a")
    c.set_pod(pod, labels={**pod.labels, "hairpin": "yes"})
    c.create_service("hairpin", selector={"hairpin": "yes"}, type="NodePort")
    c.settle()
    port = c.node_port("hairpin")
    for label, dst, dport in ((f"ClusterIP {c.cluster_ip('hairpin')}:80", c.cluster_ip("hairpin"), 80),
                              (f"own node-1 {c.node('node-1').ip4}:{port}", c.node("node-1").ip4, port),
                              (f"node-2 {c.node('node-2').ip4}:{port}", c.node("node-2").ip4, port)):
        r = show(c, f"web-1a@node-1 -> {label}", pod.connect_many(dst, dport, 20))
        assert r.all_ok and r.servers == {"web-1a"}, r.summary()
        assert pod.ip4 not in r.peers, "a hairpinned connection is masqueraded"


# ----------------------------------------------------------------------------- endpoints coming and going


def test_scale_to_zero_and_back(c: Cluster) -> None:
    """[sig-network] Services should be rejected when no endpoints exist, and served again: 3 pods, then all
    terminating (still served: the terminating fallback), then none (refused at once from every pod and via
    every NodePort), then 3 new pods (served)."""
    dep = Deployment(c, "scale", 3)
    c.create_service("scale", selector={"app": "scale"}, type="NodePort")
    c.settle()
    ip, port = c.cluster_ip("scale"), c.node_port("scale")

    # 40 connections: each of 3 equally likely pods is missed with probability (2/3)^40 ~ 1e-7 (20 left 3e-4 per
    # check, and one of the 18 checks missed a pod in a full run)
    def everywhere(phase: str, count: int = 40, timeout: float = 2.5) -> list[Results]:
        print(f"  {phase}:")
        out = []
        for node in c.nodes:
            client = c.clients[node.name]
            out.append(show(c, f"{client.name}@{node.name} -> {ip}:80",
                            client.connect_many(ip, 80, count, timeout=timeout)))
            out.append(show(c, f"client -> {node.name}:{port}",
                            c.client.connect_many(node.ip4, port, count, timeout=timeout)))
        return out

    for r in everywhere("3 pods"):
        assert r.all_ok and r.servers == names(dep.pods), r.summary()
    for pod in dep.pods:
        c.set_pod(pod, terminating=True)
    c.settle()
    for r in everywhere("all 3 terminating (serving)"):
        assert r.all_ok and r.servers == names(dep.pods), r.summary()
    c.delete_pods(dep.pods)
    dep.pods = []
    c.settle()
    for r in everywhere("scaled to 0", count=5, timeout=1.0):
        assert r.by_error == {"refused": 5}, r.summary()
        assert max(x.elapsed for x in r) < 0.5, "refused at once, not after a timeout"
    # (an ICMP port unreachable each: the kernel sends at most 6 in a burst to one host, so another client)
    udp = show(c, f"web-2a@node-2 -> {ip}:53/udp", c.pod("web-2a").connect_many(ip, 53, 3, proto="udp"))
    assert udp.by_error == {"refused": 3}, udp.summary()
    dep.scale(3)
    c.settle()
    for r in everywhere("scaled back to 3"):
        assert r.all_ok and r.servers == names(dep.pods), r.summary()


def test_udp_flow_moves_when_its_pod_goes(c: Cluster) -> None:
    """[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles for a ClusterIP and a
    NodePort service: one long-lived UDP 5-tuple, its pod deleted; kproxy clears the stale
    conntrack entry and the same flow is answered by another pod within seconds."""
    dep = Deployment(c, "udp", 3)
    c.create_service("udp", selector={"app": "udp"}, type="NodePort")
    c.settle()
    ip, port, node1 = c.cluster_ip("udp"), c.node_port("udp", "dns"), c.node("node-1")
    for label, src, dst, dport in ((f"client-1@node-1 -> {ip}:53", c.clients["node-1"].netns, ip, 53),
                                   (f"client -> node-1 {node1.ip4}:{port}", c.client, node1.ip4, port)):
        with src.start_udp_flow(dst, dport, interval_ms=100) as flow:
            first = flow.wait_for(lambda r: r.ok, 5)
            victim = c.pod(first.server)
            t0 = time.monotonic()
            c.delete_pods([victim])
            dep.pods.remove(victim)
            moved = flow.wait_for(lambda r: r.ok and r.server != victim.name, 10)
            took = time.monotonic() - t0
        print(f"  {label}: one UDP flow (source port {flow.local_port}) answered by {c.where(first.server)}; "
              f"that pod deleted; the same flow answered by {c.where(moved.server)} {took:.1f}s later")
        assert took < 8, "stale conntrack entries of a removed UDP endpoint are cleared"
        dep.scale(3)
        c.settle()


def test_rolling_update_no_failed_connection(c: Cluster) -> None:
    """[sig-apps] Deployment RollingUpdate under Service traffic: pods replaced one by one (a new pod ready first,
    the old one terminating while it drains, then gone); clients on every node and through every NodePort, one
    new connection every 25 ms each (no keep-alive), see no failed connection."""
    dep = Deployment(c, "roll", 3)
    first = names(dep.pods)
    c.create_service("roll", selector={"app": "roll"}, type="NodePort")
    c.settle()
    ip, port = c.cluster_ip("roll"), c.node_port("roll")
    loops = {f"{c.clients[n.name].name}@{n.name} -> {ip}:80": c.clients[n.name].netns.start_loop(
        ip, 80, interval_ms=25, timeout=3.0) for n in c.nodes}
    loops |= {f"client -> {n.name}:{port}": c.client.start_loop(n.ip4, port, interval_ms=25, timeout=3.0)
              for n in c.nodes}
    try:
        for loop in loops.values():
            loop.wait_ok(10)
        t0 = time.monotonic()
        dep.rolling_update(on_step=lambda step: print(f"  {time.monotonic() - t0:5.1f}s {step}"))
        c.settle()
        for loop in loops.values():
            loop.wait_more_ok(10)
    finally:
        for loop in loops.values():
            loop.stop()
    for label, loop in loops.items():
        print(loop_line(c, label, loop))
    for label, loop in loops.items():
        s = loop.summary
        assert s is not None and s.failed == 0, f"{label}: {s}"
        assert set(s.by_server) & first and set(s.by_server) & names(dep.pods), f"{label}: old and new pods served"


def syncs_of(nodes: list[Node]) -> dict[str, float]:
    """kproxy_syncs_total of each node's kproxy, from its /metrics."""
    return {n.name: (n.kproxy.metric("kproxy_syncs_total") or 0.0) if n.kproxy else 0.0 for n in nodes}


def test_kproxy_killed_and_restarted(c: Cluster) -> None:
    """A node's kproxy killed (kill -9) and restarted: its rules stay and keep serving, the other nodes follow a
    change meanwhile and see nothing; the restarted kproxy catches up.  No connection fails anywhere."""
    c.create_service("steady", type="NodePort")
    c.settle()
    ip, port = c.cluster_ip("steady"), c.node_port("steady")
    node2 = c.node("node-2")
    others = [n for n in c.nodes if n is not node2]
    pids = {n.name: n.kproxy.pid for n in c.nodes}  # type: ignore[union-attr]
    loops = {f"{c.clients[n.name].name}@{n.name} -> {ip}:80": c.clients[n.name].netns.start_loop(
        ip, 80, interval_ms=25, timeout=3.0) for n in c.nodes}
    loops |= {f"client -> {n.name}:{port}": c.client.start_loop(n.ip4, port, interval_ms=25, timeout=3.0)
              for n in c.nodes}
    try:
        for loop in loops.values():
            loop.wait_ok(10)
        syncs = syncs_of(others)
        node2.kproxy.kill()  # type: ignore[union-attr]
        print(f"  killed kproxy on node-2 (pid {pids['node-2']}); LB health now {c.load_balancer('steady').health()}")
        assert c.load_balancer("steady").health()["node-2"] == 0, "a dead kproxy fails the LB's health check"
        extra = c.add_pod("node-3", "web-extra", {"app": "web"})
        c.settle()  # the nodes whose kproxy runs
        for node in others:
            r = show(c, f"{c.clients[node.name].name}@{node.name} -> {ip}:80 while node-2's kproxy is down",
                     c.clients[node.name].connect_many(ip, 80, 150))
            assert r.all_ok and extra.name in r.servers, r.summary()
        stale = show(c, f"client-2@node-2 -> {ip}:80 while its kproxy is down (rules left in the kernel)",
                     c.clients["node-2"].connect_many(ip, 80, 60))
        assert stale.all_ok and extra.name not in stale.servers, stale.summary()
        assert node2.kproxy.pending_operations() > 0  # type: ignore[union-attr]

        def grown() -> dict[str, float] | None:
            now = syncs_of(others)
            return now if all(now[k] > v for k, v in syncs.items()) else None

        after = wait_until(grown, 5, "the other nodes' kproxy_syncs_total to grow (/metrics is shared for 1 s)")
        print(f"  kproxy_syncs_total of the other nodes: before the kill {syncs}, after the change {after}")
        c.start_kproxy([node2])
        c.settle()
        print(f"  restarted kproxy on node-2 (pid {node2.kproxy.pid}); "  # type: ignore[union-attr]
              f"LB health {c.load_balancer('steady').health()}")
        caught_up = show(c, f"client-2@node-2 -> {ip}:80 after the restart", c.clients["node-2"].connect_many(ip, 80, 150))
        assert caught_up.all_ok and extra.name in caught_up.servers, caught_up.summary()
        for loop in loops.values():
            loop.wait_more_ok(5)
    finally:
        for loop in loops.values():
            loop.stop()
    for label, loop in loops.items():
        print(loop_line(c, label, loop))
    for label, loop in loops.items():
        assert loop.summary is not None and loop.summary.failed == 0, f"{label}: {loop.summary}"
    assert all(n.kproxy.pid == pids[n.name] for n in others), "the other nodes' kproxy kept running"  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- dual-stack


def test_dual_stack(c: Cluster) -> None:
    """[sig-network] [Feature:IPv6DualStack] should be able to reach pod on ipv4 and ipv6 ip / should create a
    dual-stack NodePort service: both ClusterIPs from pods on every node, the IPv6 NodePort from outside via
    every node, one EndpointSlice per family."""
    c.create_service("dual", type="NodePort", ipFamilyPolicy="RequireDualStack")
    c.settle()
    families = sorted(s["addressType"] for s in c.endpoints.slices("dual"))
    print(f"  ClusterIPs {c.service('dual')['spec']['clusterIPs']}, EndpointSlices {families}")
    assert families == ["IPv4", "IPv6"]
    web, port = names(c.app_pods()), c.node_port("dual")
    for node in c.nodes:
        client = c.clients[node.name]
        for family in (4, 6):
            ip = c.cluster_ip("dual", family)
            r = show(c, f"{client.name}@{node.name} -> [{ip}]:80", client.connect_many(ip, 80, EVERY_POD))
            assert r.all_ok and r.servers == web and r.peers == {client.ip(family)}, r.summary()
        ip6 = c.cluster_ip("dual", 6)
        udp = show(c, f"{client.name}@{node.name} -> [{ip6}]:53/udp", client.connect_many(ip6, 53, EVERY_POD, proto="udp"))
        assert udp.all_ok and udp.servers == web, udp.summary()
        ext = show(c, f"client {CLIENT_IP6} -> {node.name} [{node.ip6}]:{port}", c.client.connect_many(node.ip6, port, EVERY_POD))
        assert ext.all_ok and ext.servers == web, ext.summary()
        assert ext.peers <= {node.ip6, node.gw6}, "masqueraded to the node (externalTrafficPolicy Cluster)"
