"""Compiler invariants: layout that loads in linear time, comments, purity, fairness."""

from __future__ import annotations

import re
from dataclasses import replace
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.cluster.convert import build_cluster
from kproxy.nft.objects import UnsafeText, comment
from kproxy.nft.statements import DnatFromMap, DnatTo, Lookup, Numgen, NumgenIs, Verdict
from kproxy.rules.compiler import PICK_CLASSES, NodeInfo, ProxyConfig, compile_ruleset, slot
from kproxy.rules.plan import render_ruleset
from kproxy.rules.skeleton import skeleton_table
from tests.harness.builders import endpoint, endpoint_slice, node, service

NODE = NodeInfo("node-a", "zone-a", ("192.168.50.1",), ("192.168.50.1",))
CONFIG = ProxyConfig(cluster_cidrs=("10.244.0.0/16",))


def _cluster(n_services: int, n_endpoints: int, **spec: Any) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for i in range(n_services):
        objects.append(service(f"svc-{i}", "ns", f"10.96.{i // 250}.{i % 250 + 1}", type="NodePort",
                               ports=[{"name": "http", "port": 80, "nodePort": 30000 + i}], **spec))
        eps = [endpoint(f"10.244.{j // 250}.{j % 250 + 1}", node="node-a" if j % 3 == 0 else "node-b")
               for j in range(i, i + n_endpoints)]
        objects.append(endpoint_slice(f"svc-{i}-x", f"svc-{i}", eps, namespace="ns"))
    return objects


def _compile(objects: list[dict[str, Any]], config: ProxyConfig = CONFIG):
    cluster, problems = build_cluster(objects, "node-a")
    assert [p for p in problems if p.reason != "conflict"] == []
    return compile_ruleset(cluster, NODE, config)


def test_set_count_is_constant() -> None:
    """Sets and maps are the skeleton's, whatever the number or kind of Services."""
    small = _compile(_cluster(2, 2, sessionAffinity="ClientIP"))
    large = _compile(_cluster(200, 5, sessionAffinity="ClientIP", annotations={"kproxy.io/rate-limit": "5/second"}))
    for family in ("ip", "ip6"):
        assert set(small.table(family).sets) == set(large.table(family).sets) == set(skeleton_table(family).sets)


def test_no_inline_anonymous_sets_or_maps() -> None:
    """No rule holds an inline set or map (they load in quadratic time)."""
    script = render_ruleset(_compile(_cluster(20, 4, sessionAffinity="ClientIP", annotations={"kproxy.io/rate-limit": "5/second"})))
    for line in script.splitlines():
        if line.startswith("add rule"):
            body = re.sub(r"update @[a-z-]+ \{[^}]*\}", "", line)
            assert "{" not in body, line


def test_every_generated_object_has_a_comment() -> None:
    """Every chain and element carries ``namespace/name:port`` (or the node / flag it came from)."""
    objects = _cluster(5, 3)
    for i, obj in enumerate(o for o in objects if o["kind"] == "Service"):
        obj["spec"]["externalIPs"] = [f"198.51.100.{i + 1}"]
    table = _compile(objects).table("ip")
    for name, chain in table.chains.items():
        assert chain.comment, name
        if name not in skeleton_table("ip").chains and not name.startswith(("pick-", "external-to-")):
            assert re.fullmatch(r"ns/svc-\d+:http", chain.comment), chain.comment
    for set_name, members in table.elements.items():
        for element in members.values():
            assert element.comment, (set_name, element)


def _own_chains(table: Any) -> list[str]:
    """The chains of Service ports: neither the skeleton's nor the shared ones."""
    return [n for n in table.chains if n not in skeleton_table("ip").chains and not n.startswith(("pick-", "external-to-"))]


def test_chain_count_is_linear() -> None:
    """A Service port that counts costs at most three chains, never one per endpoint."""
    table = _compile(_cluster(50, 10), replace(CONFIG, service_metrics="all")).table("ip")
    assert 0 < len(_own_chains(table)) <= 3 * 50


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_ports_without_a_rule_of_their_own_add_no_chain(policy: str) -> None:
    """The kernel walks every chain at each commit: ports that count nothing and have no limit or affinity are
    elements only, so the table has as many chains at 50 Services as at 1; counting, a limit and affinity each
    give a port chains of its own."""
    tables = {n: _compile(_cluster(n, 10, externalTrafficPolicy=policy)).table("ip") for n in (1, 50)}
    assert tables[1].chains.keys() == tables[50].chains.keys() and not _own_chains(tables[50])
    assert {e.value for e in tables[50].elements["service-nodeports"].values()} == {
        "goto external-to-local" if policy == "Local" else "goto external-to-cluster"}
    for notes, spec, chains in (
        ({"kproxy.io/metrics": "true"}, {}, {"svc", "ext"} | ({"local"} if policy == "Local" else set())),
        ({"kproxy.io/rate-limit": "10/second"}, {}, {"svc", "ext"} | ({"local"} if policy == "Local" else set())),
        ({}, {"sessionAffinity": "ClientIP"}, {"svc", "ext"} | ({"local"} if policy == "Local" else set())),
        ({"kproxy.io/metrics": "false"}, {}, set()),
    ):
        objects = _cluster(2, 10, externalTrafficPolicy=policy)
        objects[0]["metadata"]["annotations"] = notes
        objects[0]["spec"].update(spec)
        table = _compile(objects).table("ip")
        assert {n.split("-")[0] for n in _own_chains(table)} == chains, (notes, spec)
        assert all("/svc-0/" in n for n in _own_chains(table)), "the other Service stays elements only"
        assert any(n.startswith("conns-") for n in table.counters) == (notes.get("kproxy.io/metrics") == "true")


def test_cascade_is_uniform() -> None:
    """Beyond the largest pick chain, a numgen cascade gives every endpoint probability 1/N."""
    count = PICK_CLASSES[-1] + 1
    table = _compile(_cluster(1, count)).table("ip")
    chain = next(c for n, c in table.chains.items() if n.startswith("svc-"))
    dnat_rules = [rule for rule in chain.rules if any(isinstance(s, DnatTo) for s in rule)]
    remaining = Fraction(1)
    probabilities = []
    for rule in dnat_rules:
        moduli = [s.modulus for s in rule if isinstance(s, NumgenIs)]
        p = Fraction(1, moduli[0]) if moduli else Fraction(1)
        probabilities.append(remaining * p)
        remaining -= remaining * p
    assert probabilities == [Fraction(1, count)] * count


def _pick_probabilities(table: Any, chain_name: str, frontend: str) -> dict[str, Fraction]:
    """Walk the pick chains as the kernel does: the class sets choose the pick chain; a lookup of slot k hits with
    probability 1/k if filled."""
    result: dict[str, Fraction] = {}
    remaining = Fraction(1)
    name: str | None = chain_name
    while name is not None:
        chain, name = table.chains[name], None
        for rule in chain.rules:
            if len(rule) == 1 and isinstance(rule[0], Verdict) and rule[0].kind == "goto":
                name = rule[0].chain
                break
            if len(rule) == 2 and isinstance(rule[0], Lookup) and isinstance(rule[1], Verdict):
                if frontend in table.elements.get(rule[0].set, {}):
                    name = rule[1].chain
                    break
                continue
            if rule == (Verdict("drop"),):
                if remaining:
                    result["drop"] = remaining
                break
            (pick,) = rule
            assert isinstance(pick, DnatFromMap), rule
            assert pick.key[:3] == ("daddr", "l4proto", "dport"), rule
            numgen = pick.key[3]
            assert isinstance(numgen, Numgen), rule
            element = table.elements.get(pick.map, {}).get(f"{frontend} . {numgen.offset}")
            if element is not None:
                hit = remaining / numgen.modulus
                result[element.value] = result.get(element.value, Fraction(0)) + hit
                remaining -= hit
    if remaining and "drop" not in result:
        result["untranslated"] = remaining
    return result


def _picked_from(table: Any, frontend: str) -> str:
    """Where a ClusterIP's dispatch picks the endpoint: ``pick-by-class``, straight or after the port's own chain."""
    target = table.elements["service-ips"][frontend].value.split()[-1]
    if not target.startswith("svc-"):
        return str(target)
    svc = table.chains[target]
    assert not any(isinstance(s, (DnatTo, DnatFromMap)) for rule in svc.rules for s in rule)
    return str(svc.rules[-1][-1].chain)


@pytest.mark.parametrize("metrics", ["annotated", "all"])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 10, 16, 17, 100, 256])
def test_pick_chains_are_uniform_for_every_frontend(count: int, metrics: str) -> None:
    """Each endpoint is picked with probability exactly 1/N, from the ClusterIP and the NodePort; never the drop.

    With ``all`` the port counts in a chain of its own, then goes on to the same pick chains."""
    table = _compile(_cluster(1, count), replace(CONFIG, service_metrics=metrics)).table("ip")
    start = _picked_from(table, "10.96.0.1 . tcp . 80")
    assert start == "pick-by-class"
    assert any(n.startswith("svc-") for n in table.chains) == (metrics == "all")
    for frontend in ("10.96.0.1 . tcp . 80", "192.168.50.1 . tcp . 30000"):
        probabilities = _pick_probabilities(table, start, frontend)
        assert "drop" not in probabilities and "untranslated" not in probabilities
        assert len(probabilities) == count
        assert set(probabilities.values()) == {Fraction(1, count)}


@pytest.mark.parametrize(("before_count", "after_count"), [(10, 11), (0, 1), (1, 0), (4, 5), (8, 9), (17, 3), (0, 256), (256, 1)])
def test_endpoint_change_touches_only_elements(before_count: int, after_count: int) -> None:
    """Any change of endpoints, a Service's first and last and a change of pick class included, changes elements only.

    A chain or rule changed, or an element whose verdict jumps, makes the kernel
    check the whole table (20 ms at 10k Services): none of them may change.
    """
    before = _compile(_cluster(3, before_count)).table("ip")
    after = _compile(_cluster(3, after_count)).table("ip")
    assert before.chains == after.chains
    changed = {name for name in set(after.elements) | set(before.elements)
               if before.elements.get(name, {}) != after.elements.get(name, {})}
    data_only = {f"endpoints-{size}" for size in PICK_CLASSES} | {f"class-{size}" for size in PICK_CLASSES}
    data_only |= {"hairpin", "no-endpoint-reject", "no-endpoint-nodeport-reject"}
    assert changed and changed <= data_only, changed
    for name in ("service-ips", "service-nodeports"):
        assert before.elements.get(name) == after.elements.get(name), "no verdict element changes"
    assert all(slot(k, False) < slot(k, True) < slot(k + 1, False) for k in range(1, PICK_CLASSES[-1]))


def test_without_endpoints_the_dispatch_goes_on_untranslated() -> None:
    """A Service without endpoints keeps its chain and dispatch; its frontends are in no class, and rejected by set."""
    table = _compile(_cluster(1, 0)).table("ip")
    start = _picked_from(table, "10.96.0.1 . tcp . 80")
    for frontend in ("10.96.0.1 . tcp . 80", "192.168.50.1 . tcp . 30000"):
        assert _pick_probabilities(table, start, frontend) == {"untranslated": Fraction(1)}
    assert "10.96.0.1 . tcp . 80" in table.elements["no-endpoint-reject"]
    assert "tcp . 30000" in table.elements["no-endpoint-nodeport-reject"]


def test_compile_is_pure_and_deterministic() -> None:
    """Compiling twice, or with objects in another order, gives the same script."""
    objects = _cluster(30, 4)
    assert render_ruleset(_compile(objects)) == render_ruleset(_compile(list(reversed(objects))))


def test_duplicate_frontend_first_service_wins() -> None:
    """Two Services claiming one external IP and port: the first by name keeps it."""
    objects = [
        service("a", "ns", "10.96.0.1", externalIPs=["198.51.100.9"]),
        service("b", "ns", "10.96.0.2", externalIPs=["198.51.100.9"]),
        endpoint_slice("a-1", "a", [endpoint("10.244.1.1")], namespace="ns"),
        endpoint_slice("b-1", "b", [endpoint("10.244.1.2"), endpoint("10.244.1.3")], namespace="ns"),
    ]
    table = _compile(objects).table("ip")
    element = table.elements["service-ips"]["198.51.100.9 . tcp . 80"]
    assert element.comment == "ns/a:http"
    # and only a's endpoints stand behind that frontend: b's second slot must not leak in
    slots = {k: e for k, e in table.elements["endpoints-4"].items() if k.startswith("198.51.100.9 . ")}
    assert [e.value for e in slots.values()] == ["10.244.1.1 . 8080"]


@pytest.mark.parametrize("text", ['a"b', "a;b", "a\nb", "a{b", "a}b", "x" * 200, "a$b", "a\\b"])
def test_comment_refuses_unsafe_text(text: str) -> None:
    """No value that could end the string or start a statement is written into a comment."""
    with pytest.raises(UnsafeText):
        comment(text)


# --- property: random clusters, valid and malformed --------------------------

_octet = st.integers(min_value=1, max_value=254)
_v4 = st.builds(lambda a, b: f"10.96.{a}.{b}", _octet, _octet)
_pod = st.builds(lambda a, b: f"10.244.{a}.{b}", _octet, _octet)
_v6 = st.builds(lambda a: f"fd00:96::{a:x}", st.integers(1, 65535))
_hostile = st.sampled_from(['"; flush ruleset; "', "}", "10.0.0.1 } ; drop", "\n", "999.1.1.1", "-1", "ICMP", "a" * 70])
_name = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@st.composite
def _service_and_slice(draw: st.DrawFn, index: int) -> tuple[list[dict[str, Any]], bool]:
    name = f"s{index}-{draw(_name)}"[:40].rstrip("-")
    proto = draw(st.sampled_from(["TCP", "UDP", "SCTP"]))
    spec: dict[str, Any] = {}
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    ports = [{"name": "p", "port": draw(st.integers(1, 65535)), "protocol": proto}]
    if kind != "ClusterIP":
        spec["type"] = kind
        ports[0]["nodePort"] = draw(st.integers(30000, 32767))
        spec["externalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
    if draw(st.booleans()):
        spec["internalTrafficPolicy"] = "Local"
    if draw(st.booleans()):
        spec["externalIPs"] = [draw(_v4).replace("10.96", "198.51")]
    dual = draw(st.booleans())
    cluster_ip: Any = [draw(_v4), draw(_v6)] if dual else draw(_v4)
    if dual:
        spec["ipFamilies"] = ["IPv4", "IPv6"]
    annotations = {"kproxy.io/rate-limit": f"{draw(st.integers(1, 1000))}/second"} if draw(st.booleans()) else None
    status = None
    if kind == "LoadBalancer":
        status = {"loadBalancer": {"ingress": [{"ip": draw(_v4).replace("10.96", "192.0")}]}}
        if draw(st.booleans()):
            spec["loadBalancerSourceRanges"] = ["203.0.113.0/24"]
    svc = service(name, "ns", cluster_ip, ports=ports, annotations=annotations, status=status, **spec)
    eps = [endpoint(draw(_pod), node=draw(st.sampled_from(["node-a", "node-b"])),
                    ready=draw(st.sampled_from([True, False, None])), terminating=draw(st.sampled_from([None, True])))
           for _ in range(draw(st.integers(0, 4)))]
    eps_slice = endpoint_slice(f"{name}-x", name, eps, namespace="ns", ports=[{"name": "p", "port": 8080, "protocol": proto}])
    bad = draw(st.integers(0, 4)) == 0
    if bad:
        target = draw(st.sampled_from(["ip", "port", "name", "annotation", "endpoint"]))
        value = draw(_hostile)
        if target == "ip":
            svc["spec"]["clusterIPs"][0] = svc["spec"]["clusterIP"] = value
        elif target == "port":
            svc["spec"]["ports"][0]["port"] = value
        elif target == "name":
            svc["spec"]["ports"][0]["name"] = value
        elif target == "annotation":
            svc["metadata"]["annotations"] = {"kproxy.io/rate-limit": value}
        else:
            eps_slice["endpoints"] = [endpoint(value)]
    return [svc, eps_slice], bad


@st.composite
def _clusters(draw: st.DrawFn) -> list[tuple[list[dict[str, Any]], bool]]:
    return [draw(_service_and_slice(i)) for i in range(draw(st.integers(1, 6)))]


@pytest.mark.root
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_clusters())
def test_random_clusters_always_load(nft_check, generated) -> None:
    """Any mix of valid and malformed objects compiles to a script nft accepts, without the bad ones."""
    objects = [obj for pair, _ in generated for obj in pair]
    cluster, problems = build_cluster(objects, "node-a")
    script = render_ruleset(compile_ruleset(cluster, NODE, CONFIG))
    nft_check(script)
    assert "flush ruleset" not in script
    bad_services = {p.key for p in problems if p.kind == "Service" and not p.part}
    for key in bad_services:
        assert f'"{key}:' not in script
    for (svc, _), bad in generated:
        key = f"ns/{svc['metadata']['name']}"
        if not bad:
            assert key in cluster.services


def _frontend_targets(table: Any, frontend: str) -> set[str]:
    return {
        e.value for name, members in table.elements.items() if name.startswith("endpoints-")
        for k, e in members.items() if k.rsplit(" . ", 1)[0] == frontend
    }


def test_slots_follow_dispatch_when_an_external_ip_is_a_node_address() -> None:
    """service-ips is looked up before service-nodeports: the external IP's Service owns that address:port's slots."""
    objects = [
        service("a-np", "ns", "10.96.0.1", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]),
        endpoint_slice("a-np-1", "a-np", [endpoint("10.244.1.1"), endpoint("10.244.1.2")], namespace="ns"),
        service("b-ext", "ns", "10.96.0.2", externalIPs=["192.168.50.1"], ports=[{"name": "http", "port": 30080}]),
        endpoint_slice("b-ext-1", "b-ext", [endpoint("10.244.2.1")], namespace="ns", ports=[{"name": "http", "port": 9090}]),
    ]
    table = _compile(objects).table("ip")
    assert table.elements["service-ips"]["192.168.50.1 . tcp . 30080"].comment == "ns/b-ext:http"
    assert _frontend_targets(table, "192.168.50.1 . tcp . 30080") == {"10.244.2.1 . 9090"}
    assert _frontend_targets(table, "10.96.0.1 . tcp . 80") == {"10.244.1.1 . 8080", "10.244.1.2 . 8080"}


def test_one_service_reaching_a_frontend_through_two_ports() -> None:
    """A NodePort equal to another port's external-IP port: the address port's endpoints, whatever the port order."""
    for ports in (
        [{"name": "np", "port": 80, "nodePort": 30081}, {"name": "ext", "port": 30081}],
        [{"name": "ext", "port": 30081}, {"name": "np", "port": 80, "nodePort": 30081}],
    ):
        objects = [
            service("web", "ns", "10.96.0.1", type="NodePort", externalIPs=["192.168.50.1"], ports=ports),
            endpoint_slice("web-1", "web", [endpoint("10.244.1.1")], namespace="ns",
                           ports=[{"name": "np", "port": 1111}, {"name": "ext", "port": 2222}]),
        ]
        table = _compile(objects).table("ip")
        assert _frontend_targets(table, "192.168.50.1 . tcp . 30081") == {"10.244.1.1 . 2222"}, ports


def _firewall(table: Any) -> tuple[set[str], set[str]]:
    return set(table.elements.get("firewall-ips", {})), set(table.elements.get("firewall-allow", {}))


def test_source_ranges_per_family_with_or_without_endpoints() -> None:
    """Ranges guard only the LB IPs of their own family, and do so even while the Service has no endpoints."""
    dual_lb = service("lb", "ns", ["10.96.0.40", "fd00::40"], ipFamilies=["IPv4", "IPv6"], type="LoadBalancer",
                      loadBalancerSourceRanges=["2001:db8::/32"], ports=[{"name": "http", "port": 80, "nodePort": 30140}],
                      status={"loadBalancer": {"ingress": [{"ip": "192.0.2.40"}, {"ip": "2001:db8:1::40"}]}})
    ruleset = _compile([dual_lb])  # no EndpointSlice at all
    assert _firewall(ruleset.table("ip")) == (set(), set()), "no IPv4 range: the IPv4 LB IP is open, as upstream"
    ips, allowed = _firewall(ruleset.table("ip6"))
    assert ips == {"2001:db8:1::40 . tcp . 80"}
    assert allowed == {"2001:db8:1::40 . tcp . 80 . 2001:db8::/32"}


def test_a_range_holding_the_node_allows_the_lb_ips() -> None:
    """When a source range contains the node's primary IP, every LB IP of the family is an allowed source."""
    lb = service("lb", "ns", "10.96.0.41", type="LoadBalancer", loadBalancerSourceRanges=["192.168.50.0/24"],
                 ports=[{"name": "http", "port": 80, "nodePort": 30141}],
                 status={"loadBalancer": {"ingress": [{"ip": "192.0.2.41"}, {"ip": "192.0.2.42"}]}})
    _, allowed = _firewall(_compile([lb, endpoint_slice("lb-1", "lb", [endpoint("10.244.1.1")], namespace="ns")]).table("ip"))
    for vip in ("192.0.2.41", "192.0.2.42"):
        assert {f"{vip} . tcp . 80 . 192.168.50.0/24", f"{vip} . tcp . 80 . 192.0.2.41",
                f"{vip} . tcp . 80 . 192.0.2.42"} <= allowed
    lb["spec"]["loadBalancerSourceRanges"] = ["203.0.113.0/24"]
    _, allowed = _firewall(_compile([lb]).table("ip"))
    assert allowed == {"192.0.2.41 . tcp . 80 . 203.0.113.0/24", "192.0.2.42 . tcp . 80 . 203.0.113.0/24"}


def test_beta_source_ranges_annotation_is_ignored() -> None:
    """As upstream kube-proxy, only spec.loadBalancerSourceRanges guards the LB IP (the annotation is the cloud's)."""
    lb = service("lb", "ns", "10.96.0.43", type="LoadBalancer", ports=[{"name": "http", "port": 80, "nodePort": 30143}],
                 annotations={"service.beta.kubernetes.io/load-balancer-source-ranges": "10.0.0.0/8"},
                 status={"loadBalancer": {"ingress": [{"ip": "192.0.2.43"}]}})
    assert _firewall(_compile([lb]).table("ip")) == (set(), set())


@pytest.mark.parametrize("flag, expected", [
    pytest.param((), ["192.168.50.1"], id="primary"),
    pytest.param(("10.20.0.0/16",), ["10.20.0.5"], id="cidr-on-a-second-interface"),
    pytest.param(("0.0.0.0/0",), ["192.168.50.1", "10.20.0.5"], id="all-of-the-family"),
    pytest.param(("fd00:20::/64",), ["192.168.50.1", "10.20.0.5"], id="family-without-a-cidr-matches-all"),
])
def test_nodeport_addresses(flag: tuple[str, ...], expected: list[str]) -> None:
    """NodePort addresses as upstream: CIDRs against the interfaces, a family without its own CIDR matches all."""
    from kproxy.rules.compiler import nodeport_addresses

    node_ = NodeInfo("node-a", "zone-a", ("192.168.50.1",), ("192.168.50.1", "10.20.0.5", "127.0.0.1", "fd00:20::5"))
    assert nodeport_addresses(node_, ProxyConfig(nodeport_addresses=flag), "ip") == expected


def _lb(name: str, ranges: list[str], ip: str = "10.96.100.3", lb_ip: str = "203.0.113.9") -> dict[str, Any]:
    return service(name, "ns", ip, type="LoadBalancer", loadBalancerSourceRanges=ranges,
                   ports=[{"name": "http", "port": 80, "nodePort": 30000 + int(ip.split(".")[-1])}],
                   status={"loadBalancer": {"ingress": [{"ip": lb_ip}]}})


@pytest.mark.root
def test_overlapping_ranges_and_cidrs_load(nft_check) -> None:
    """Overlapping source ranges, cluster CIDRs and ServiceCIDRs are merged: an interval set refuses overlaps."""
    objs = [_lb("lb", ["10.0.0.0/8", "10.1.0.0/16", "192.168.50.0/24"]),
            endpoint_slice("lb-1", "lb", [endpoint("10.244.1.1")], namespace="ns"),
            {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "a"},
             "spec": {"cidrs": ["10.96.0.0/12", "10.96.0.0/16"]}}]
    cluster, _ = build_cluster(objs, "node-a")
    config = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "10.244.1.0/24"))
    table = compile_ruleset(cluster, NODE, config).table("ip")
    assert set(table.elements["firewall-allow"]) == {"203.0.113.9 . tcp . 80 . 10.0.0.0/8",
                                                      "203.0.113.9 . tcp . 80 . 192.168.50.0/24",
                                                      "203.0.113.9 . tcp . 80 . 203.0.113.9"}
    assert set(table.elements["cluster-cidrs"]) == {"10.244.0.0/16"}
    assert set(table.elements["service-cidrs"]) == {"10.96.0.0/12"}
    nft_check(render_ruleset(compile_ruleset(cluster, NODE, config)))


def test_the_winner_of_a_frontend_alone_sets_its_firewall() -> None:
    """Two Services on one LB IP and port: the loser's source ranges neither widen nor impose a firewall."""
    objs = [_lb("a", ["10.0.0.0/8"], "10.96.100.4"), _lb("b", ["172.16.0.0/12"], "10.96.100.5"),
            _lb("c", [], "10.96.100.6", "203.0.113.10"), _lb("d", ["172.16.0.0/12"], "10.96.100.7", "203.0.113.10")]
    objs += [endpoint_slice(f"{n}-1", n, [endpoint("10.244.1.1")], namespace="ns") for n in "abcd"]
    table = _compile(objs).table("ip")
    assert set(table.elements["firewall-allow"]) == {"203.0.113.9 . tcp . 80 . 10.0.0.0/8"}
    assert set(table.elements["firewall-ips"]) == {"203.0.113.9 . tcp . 80"}


def test_external_ip_on_a_node_address_and_a_node_port_is_a_named_conflict() -> None:
    """An external IP equal to a node address, on another Service's NodePort: named, with who gets it and why."""
    objs = [service("np", "ns", "10.96.100.1", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30500}]),
            service("zz", "other", "10.96.100.2", externalIPs=["192.168.50.1"], ports=[{"name": "http", "port": 30500}]),
            node("node-a", ["192.168.50.1"])]
    _, problems = build_cluster(objs, "node-a")
    conflicts = [str(p) for p in problems if p.reason == "conflict"]
    assert conflicts == ["skipping part of Service ns/np: Services other/zz and ns/np both claim 192.168.50.1 tcp/30500; "
                         "other/zz gets it (a Service IP is looked up before a NodePort), ns/np does not "
                         "(reason=conflict)"]
