"""``explain`` over the fake backend: the compiler's decisions, the tables it holds, and a kernel that is behind."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kproxy.cluster.convert import build_cluster
from kproxy.daemon.inspect import KernelTables
from kproxy.nft.fake import FakeBackend
from kproxy.nft.objects import Chain, Op, Transaction
from kproxy.rules.compiler import NodeInfo, ProxyConfig, compile_ruleset
from kproxy.rules.explain import Packet, explain
from kproxy.rules.plan import plan
from tests.harness.builders import endpoint, endpoint_slice, service

NODE = NodeInfo("node-a", "zone-a", ("192.168.50.1",), ("192.168.50.1",))
CONFIG = ProxyConfig(cluster_cidrs=("10.244.0.0/16",))
POD, CLIENT = "10.244.1.50", "198.51.100.7"


def _objects() -> list[dict[str, Any]]:
    both_local = dict(type="NodePort", externalTrafficPolicy="Local", internalTrafficPolicy="Local",
                      ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    return [
        service("web", cluster_ip="10.96.0.10"),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.10"), endpoint("10.244.2.10", node="node-b")]),
        service("both-local", cluster_ip="10.96.0.11", **both_local),
        endpoint_slice("both-local-1", "both-local", [endpoint("10.244.1.11"), endpoint("10.244.2.11", node="node-b")]),
        service("sticky", cluster_ip="10.96.0.12", sessionAffinity="ClientIP"),
        endpoint_slice("sticky-1", "sticky", [endpoint("10.244.1.12"), endpoint("10.244.2.12", node="node-b")]),
        service("remote-only", cluster_ip="10.96.0.13", type="NodePort", externalTrafficPolicy="Local",
                ports=[{"name": "http", "port": 80, "nodePort": 30013}]),
        endpoint_slice("remote-only-1", "remote-only", [endpoint("10.244.2.13", node="node-b")]),
    ]


def _programmed(objects: list[dict[str, Any]]) -> tuple[Any, FakeBackend]:
    cluster, problems = build_cluster(objects, NODE.name)
    assert problems == []
    fake = FakeBackend()
    fake.apply(plan(fake.read(), compile_ruleset(cluster, NODE, CONFIG)))
    return cluster, fake


def _explain(cluster: Any, fake: FakeBackend, source: str, destination: str, port: int) -> str:
    return "\n".join(explain(Packet(source, destination, port), cluster, NODE, CONFIG, KernelTables(fake)))  # type: ignore[arg-type]


def test_cluster_ip_lists_the_endpoints_the_kernel_picks_from() -> None:
    cluster, fake = _programmed(_objects())
    text = _explain(cluster, fake, POD, "10.96.0.10", 80)
    assert "service: default/web port http (tcp 80), type ClusterIP" in text
    assert "kernel: chain pick-by-class: 2 endpoint(s)" in text  # the shared chains: the port counts nothing
    assert "10.244.1.10:8080  node node-a" in text and "10.244.2.10:8080  node node-b" in text
    assert "behind" not in text


def test_external_local_short_circuit_goes_to_the_cluster_endpoints_whatever_the_internal_policy() -> None:
    """A pod reaching an eTP=Local NodePort is sent to every endpoint, as the compiler does, even with iTP=Local."""
    cluster, fake = _programmed(_objects())
    text = _explain(cluster, fake, POD, "192.168.50.1", 30080)
    assert "short-circuited to the cluster endpoints, client IP kept" in text
    assert "2 endpoint(s)" in text and "10.244.2.11:8080" in text
    outside = _explain(cluster, fake, CLIENT, "192.168.50.1", 30080)
    assert "this node's endpoints only" in outside and "1 endpoint(s)" in outside and "10.244.2.11" not in outside


def test_no_local_endpoint_is_a_drop_for_outside_sources() -> None:
    cluster, fake = _programmed(_objects())
    text = _explain(cluster, fake, CLIENT, "192.168.50.1", 30013)
    assert "no endpoint; the packet goes on untranslated" in text
    assert "kernel: no-endpoint-nodeport-drop has tcp . 30013" in text and ": dropped" in text
    assert "uses a Local policy and this node (node-a) has no endpoint of it" in text


def test_affinity_chain_endpoints_come_from_the_compiled_rules() -> None:
    cluster, fake = _programmed(_objects())
    text = _explain(cluster, fake, POD, "10.96.0.12", 80)
    assert "2 endpoint(s)" in text and "affinity: ClientIP" in text and "behind" not in text


def test_a_service_without_endpoints_is_explained_as_rejected() -> None:
    """The dispatch still goes to the Service's chain; the no-endpoint set says the packet is rejected, and why."""
    objects = _objects() + [service("idle", cluster_ip="10.96.0.14")]
    cluster, fake = _programmed(objects)
    text = _explain(cluster, fake, POD, "10.96.0.14", 80)
    assert "kernel: no-endpoint-reject has 10.96.0.14 . tcp . 80" in text and "rejected" in text
    assert "has 0 endpoint(s), none ready or serving" in text


def test_a_kernel_behind_the_model_is_named() -> None:
    """Endpoints the model has and the kernel does not, and a chain the kernel holds otherwise, read as a pending sync."""
    objects = _objects()
    cluster, fake = _programmed(objects)
    grown = objects[:1] + [endpoint_slice("web-1", "web", [endpoint("10.244.1.10"), endpoint("10.244.2.10", node="node-b"),
                                                           endpoint("10.244.3.10", node="node-c")])] + objects[2:]
    newer, _ = build_cluster(grown, NODE.name)
    text = _explain(newer, fake, POD, "10.96.0.10", 80)
    assert "the model selects 3 endpoint(s); the kernel is behind" in text
    sticky = next(name for name in fake.tables["ip"].chains if name.startswith("svc-") and "sticky" in name)
    fake.apply(Transaction([Op("flush", "chain", "ip", sticky),
                            Op("add", "rules", "ip", chains=(Chain(sticky, tuple(fake.chain_rules("ip", sticky)[:1])),))]))
    changed = _explain(cluster, fake, POD, "10.96.0.12", 80)
    assert f"kernel: chain {sticky} differs from what the model compiles" in changed


def test_limits_are_explained_with_the_allowlist() -> None:
    """Issue 19: every limit of the Service, and whether this client is exempt (kproxy.io/limit-allowlist)."""
    limits = {"kproxy.io/rate-limit-total": "50/second", "kproxy.io/limit-connections": "3",
              "kproxy.io/bandwidth-limit": "1 mbytes/second", "kproxy.io/bandwidth-limit-burst": "128 kbytes",
              "kproxy.io/limit-allowlist": "10.244.0.0/16"}
    cluster, fake = _programmed([service("limited", cluster_ip="10.96.0.14", annotations=limits),
                                 endpoint_slice("limited-1", "limited", [endpoint("10.244.1.14")])])
    outside = _explain(cluster, fake, CLIENT, "10.96.0.14", 80)
    assert "rate limit: none" in outside
    assert "total rate limit: 50/second new connections from all clients together (burst 5)" in outside
    assert "connection limit: 3 concurrent connections per client" in outside
    assert "bandwidth limit: 1 mbytes/second per client in each direction, burst 128 kbytes" in outside
    assert "policing, not queueing" in outside
    assert "limit allowlist: 10.244.0.0/16: source not in it, limited" in outside and "allowlisted" not in outside
    inside = _explain(cluster, fake, POD, "10.96.0.14", 80)
    assert inside.count("(not for this client: allowlisted by 10.244.0.0/16)") == 3
    assert "source in 10.244.0.0/16, exempt from every limit" in inside
    plain = _explain(*_programmed(_objects()), POD, "10.96.0.10", 80)
    assert "rate limit: none" in plain and "limit allowlist" not in plain and "connection limit" not in plain


def test_explain_follows_the_layout_the_daemon_chose() -> None:
    """``--service-metrics`` is a daemon flag its config file lacks: explain reads from the dispatch element whether a
    port has chains of its own (the daemon counts it) or goes to the shared chains, and explains either."""
    objects = [service("web", cluster_ip="10.96.0.10"),
               endpoint_slice("web-1", "web", [endpoint("10.244.1.10"), endpoint("10.244.2.10", node="node-b")]),
               service("watched", cluster_ip="10.96.0.11", annotations={"kproxy.io/metrics": "true"}),
               endpoint_slice("watched-1", "watched", [endpoint("10.244.1.11")])]
    cluster, problems = build_cluster(objects, NODE.name)
    assert problems == []
    for daemon, address, chain, count in (("all", "10.96.0.10", "svc-", 2), ("none", "10.96.0.11", "pick-by-class", 1)):
        fake = FakeBackend()
        fake.apply(plan(fake.read(), compile_ruleset(cluster, NODE, replace(CONFIG, service_metrics=daemon))))
        text = _explain(cluster, fake, "10.244.1.50", address, 80)
        assert f"kernel: chain {chain}" in text and f"{count} endpoint(s)" in text, text
        assert "behind" not in text and "missing" not in text, text
