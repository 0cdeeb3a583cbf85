"""Batches sent over netlink leave the kernel exactly as libnftables would, expression by expression."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.cluster.convert import build_cluster
from kproxy.nft.backend import NftablesBackend, split
from kproxy.nft.expressions import NotEncodable, encode_rule
from kproxy.nft.kernel import NftError
from kproxy.nft.netlink import BatchSocket, encodable, encode, layout_of
from kproxy.nft.objects import Chain, Element, Family, Op, Ruleset, Transaction, UnsafeText
from kproxy.nft.statements import (
    Const,
    Counter,
    DnatFromMap,
    DnatTo,
    Limit,
    Lookup,
    Masquerade,
    MatchPrefix,
    MatchProtocol,
    NewConnection,
    Numgen,
    NumgenIs,
    Reject,
    Rule,
    SetUpdate,
    Verdict,
    VerdictMap,
    render_rule,
)
from kproxy.rules.compiler import ProxyConfig, compile_ruleset
from kproxy.rules.plan import create, plan, render_ruleset
from kproxy.rules.skeleton import skeleton_table
from tests.harness.builders import endpoint, endpoint_slice, service
from tests.harness.netbed import Netns
from tests.harness.scenarios import NODE, SCENARIOS

# Rule shapes the golden scenarios do not have: a cascade for more endpoints than
# the largest pick chain, affinity and rate limits in IPv6, and cluster CIDRs
# that are not whole bytes (a masked match instead of a shorter load).
EXTRA_SHAPES: tuple[list[dict[str, Any]], ProxyConfig] = (
    [
        service("big", "shop", "10.96.0.80"),
        endpoint_slice("big-1", "big", [endpoint(f"10.244.{3 + i // 200}.{i % 200 + 1}") for i in range(300)], namespace="shop"),
        service("sticky6", "shop", ["10.96.0.81", "fd00:96::81"], ipFamilies=["IPv4", "IPv6"], sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}, annotations={"kproxy.io/rate-limit": "10/second"},
                ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
        endpoint_slice("sticky6-1", "sticky6", [endpoint("10.244.1.81"), endpoint("10.244.2.81", node="node-b")],
                       namespace="shop", ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]),
        endpoint_slice("sticky6-6", "sticky6", [endpoint("fd00:244:1::81"), endpoint("fd00:244:2::81", node="node-b")],
                       namespace="shop", address_type="IPv6", ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]),
        service("local6", "shop", ["10.96.0.82", "fd00:96::82"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                externalTrafficPolicy="Local", ports=[{"name": "http", "port": 80, "nodePort": 30082, "protocol": "TCP"}]),
        endpoint_slice("local6-1", "local6", [endpoint("10.244.1.82")], namespace="shop"),
        endpoint_slice("local6-6", "local6", [endpoint("fd00:244:1::82")], namespace="shop", address_type="IPv6"),
    ],
    ProxyConfig(cluster_cidrs=("172.16.0.0/13", "fd01:244::/57")),
)

pytestmark = pytest.mark.root


def _elements(verb: str, family: Family, name: str, elements: tuple[Element, ...]) -> Op:
    """An element command on one of the skeleton's sets, with its declaration (which says how to encode it)."""
    return Op(verb, "element", family, name, set_decl=skeleton_table(family).sets[name], elements=elements)  # type: ignore[arg-type]


def _encodes(rule: Rule, family: Family) -> bool:
    try:
        encode_rule(rule, family)
    except NotEncodable:
        return False
    return True


def _ruleset(name: str) -> Ruleset:
    return _compiled(*SCENARIOS[name])


def _compiled(objects: list[dict[str, Any]], config: ProxyConfig) -> Ruleset:
    cluster, problems = build_cluster(objects, NODE.name)
    assert problems == []
    return compile_ruleset(cluster, NODE, config)


def _all_scenarios() -> Ruleset:
    """Every golden scenario's ruleset merged, and the extra shapes: every set, verdict, data and rule shape kproxy writes."""
    result = Ruleset()
    for ruleset in [_ruleset(name) for name in sorted(SCENARIOS)] + [_compiled(*EXTRA_SHAPES)]:
        for family, table in ruleset.tables.items():
            into = result.tables.setdefault(family, table)
            if into is table:
                continue
            into.chains.update(table.chains)
            into.counters.update(table.counters)
            for set_name, members in table.elements.items():
                for element in members.values():
                    into.add_element(set_name, element)
    return result


@pytest.fixture
def two_netns(empty_netns: Netns) -> Iterator[tuple[Netns, Netns]]:
    """Two fresh network namespaces, deleted afterwards."""
    name = f"kpt-ns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield empty_netns, Netns(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


_HANDLES = re.compile(r"^((?:ip|ip6) kproxy \S+)(?: \d+)+$", re.MULTILINE)


def _by_chain(expressions: str) -> dict[str, list[str]]:
    """``nft --debug=netlink`` output as {object: [its rules' expressions in order]} (elements sorted).

    Interval sets are left out: libnftables fills them in both builds, and
    their internal end markers depend on how the batch was cut (their
    listings are compared).
    """
    interval = {f"{family} kproxy @{name}" for family in ("ip", "ip6") for name, decl in skeleton_table(family).sets.items() if decl.interval}
    objects: dict[str, list[str]] = {}
    header, body = "", []
    for line in expressions.split("\ntable ", 1)[0].splitlines() + ["end"]:  # the listing after the dump is compared apart
        if line and not line[0].isspace():
            if header and header not in interval:
                objects.setdefault(header, []).append("\n".join(sorted(body) if "@" in header else body))
            header, body = _HANDLES.sub(r"\1", line), []
        elif line.strip():
            body.append(line)
    return objects


def _blocks(listing: str) -> list[str]:
    """``nft list ruleset`` as its blocks (sets, chains), sorted: chains created in another order list in another order."""
    return sorted(block.strip() for block in listing.split("\n\n"))


def _build(netns: Netns, ruleset: Ruleset, netlink: bool) -> tuple[list[str], dict[str, list[str]]]:
    """Build the tables piece by piece through netlink wherever possible, or as one nft script.

    Returns ``nft list ruleset``, and the kernel's expressions of every rule
    (``nft --debug=netlink``, without rule handles, which follow the order
    of creation).
    """
    with netns.entered():
        backend = NftablesBackend()
        if netlink:
            sent = 0
            for family in ("ip", "ip6"):
                for piece in create(ruleset.tables[family]):
                    if not piece:
                        continue
                    if not encodable(piece):  # the skeleton
                        assert backend._run(str(piece))[0] == 0
                        continue
                    BatchSocket().send(piece)
                    sent += piece.operations
            assert sent > 0
        else:
            rc, _, err = backend._run(render_ruleset(ruleset))  # libnftables, in one batch, for comparison
            assert rc == 0, err
        assert plan(backend.read(), ruleset).operations == 0
    expressions = netns.nft("--debug=netlink", "list", "ruleset").stdout
    return _blocks(netns.nft("list", "ruleset").stdout), _by_chain(expressions)


def test_everything_over_netlink_lists_exactly_as_through_libnftables(two_netns: tuple[Netns, Netns]) -> None:
    """Elements, chains, counters and every rule shape of the Service and pick chains, in both families, as nft writes them."""
    ruleset = _all_scenarios()
    shapes = {name for table in ruleset.tables.values() for name, members in table.elements.items() if members}
    assert {"endpoints-4", "service-ips", "service-nodeports", "no-endpoint-reject", "class-4", "hairpin", "cluster-ips"} <= shapes
    service_rules = {  # the rules of every chain the compiler generates (Service, pick and bw- chains; not the base chains)
        family: [rule for name, chain in table.chains.items() if name not in skeleton_table(family).chains and not chain.base
                 for rule in chain.rules]
        for family, table in ruleset.tables.items()
    }
    for family, rules in service_rules.items():
        assert rules and all(_encodes(rule, family) for rule in rules), [r for r in rules if not _encodes(r, family)]
        texts = [render_rule(rule, family) for rule in rules]
        for needle in ("goto pick-", "map @endpoints-4", "update @affinity", "limit rate over", "numgen random mod 299 0",
                       "fib saddr type local", f"{family} saddr ", "dnat to ", "ct count over 3", "!= @limit-allow",
                       "ct direction limit rate over 1 mbytes/second burst 128 kbytes"):
            if family == "ip6" and needle == "numgen random mod 299 0":
                continue
            assert any(needle in text for text in texts), (family, needle)
    through_nft = _build(two_netns[0], ruleset, netlink=False)
    through_netlink = _build(two_netns[1], ruleset, netlink=True)
    assert through_netlink[0] == through_nft[0]
    differing = {key for key in set(through_netlink[1]) | set(through_nft[1]) if through_netlink[1].get(key) != through_nft[1].get(key)}
    assert not differing, {key: (through_nft[1].get(key), through_netlink[1].get(key)) for key in sorted(differing)[:3]}
    picks = through_netlink[1]["ip6 kproxy pick-4"] + through_netlink[1]["ip kproxy pick-4"]
    assert len(picks) == 10 and all("lookup reg 1 set endpoints-4 dreg 1" in rule for rule in picks[:4])
    assert not any("cmp eq" in rule for rule in picks), "a pick rule is for every protocol"


# Shapes at the edges, in a ruleset of their own (their cluster CIDRs would overlap the others'):
# CIDRs of length 0, an IPv6 CIDR starting with "::", a rate limit per minute with a burst,
# and an IPv6 SCTP cascade.
EDGE_SHAPES: tuple[list[dict[str, Any]], ProxyConfig] = (
    [
        service("edge", "shop", ["10.96.0.90", "fd00:96::90"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                externalTrafficPolicy="Local", annotations={"kproxy.io/rate-limit": "30/minute", "kproxy.io/rate-limit-burst": "7"},
                ports=[{"name": "sig", "port": 5060, "nodePort": 30090, "protocol": "SCTP"}]),
        endpoint_slice("edge-1", "edge", [endpoint("10.244.1.90")], namespace="shop",
                       ports=[{"name": "sig", "port": 5060, "protocol": "SCTP"}]),
        endpoint_slice("edge-6", "edge", [endpoint(f"fd00:244:1::{i + 1:x}") for i in range(260)], namespace="shop",
                       address_type="IPv6", ports=[{"name": "sig", "port": 5060, "protocol": "SCTP"}]),
    ],
    ProxyConfig(cluster_cidrs=("0.0.0.0/0", "::/0")),
)


def test_edge_shapes_over_netlink_list_exactly_as_through_libnftables(two_netns: tuple[Netns, Netns]) -> None:
    """Zero-length and "::" CIDRs, a per-minute limit with a burst, an IPv6 SCTP cascade: as nft writes them."""
    ruleset = _compiled(*EDGE_SHAPES)
    rules = [render_rule(rule, table.family) for table in ruleset.tables.values() for name, chain in table.chains.items()
             if name not in skeleton_table(table.family).chains for rule in chain.rules]
    for needle in ("ip saddr 0.0.0.0/0 ", "ip6 saddr ::/0 ", "limit rate over 30/minute burst 7 packets",
                   "meta l4proto sctp numgen random mod 260 0 dnat to [fd00:244:1::1]:5060"):
        assert any(needle in rule for rule in rules), needle
    through_nft = _build(two_netns[0], ruleset, netlink=False)
    through_netlink = _build(two_netns[1], ruleset, netlink=True)
    assert through_netlink[0] == through_nft[0]
    differing = {key for key in set(through_netlink[1]) | set(through_nft[1]) if through_netlink[1].get(key) != through_nft[1].get(key)}
    assert not differing, {key: (through_nft[1].get(key), through_netlink[1].get(key)) for key in sorted(differing)[:3]}


def test_service_added_and_removed_over_netlink(two_netns: tuple[Netns, Netns]) -> None:
    """The transactions of a partial sync that adds, then removes a Service: same kernel state either way."""
    before, after = _ruleset("clusterip"), _ruleset("service-metrics-all")  # the second has the port's own chains
    listings = []
    for netns, netlink in zip(two_netns, (False, True), strict=False):
        _build(netns, before, netlink=False)
        with netns.entered():
            backend = NftablesBackend()
            for _current, desired in ((before, after), (after, before)):
                tx = plan(backend.read(), desired)
                kinds = {(op.verb, op.kind) for op in tx.ops}
                assert kinds & {("add", "rules"), ("flush", "chain"), ("delete", "chain")}, kinds
                if netlink:
                    assert encodable(tx), [op.render() for op in tx.ops if not encodable(Transaction([op]))]
                    BatchSocket().send(tx)
                else:
                    assert backend._run(str(tx))[0] == 0
                assert plan(backend.read(), desired).operations == 0
        listings.append(netns.nft("list", "ruleset").stdout)
    assert listings[0] == listings[1]


def test_deletes_and_refusals(empty_netns: Netns) -> None:
    """Deleting works; a refused batch raises NftError naming the command and changes nothing."""
    ruleset = _ruleset("nodeport-cluster-policy")
    table = ruleset.tables["ip"]
    with empty_netns.entered():
        backend = NftablesBackend()
        for piece in create(table):
            backend.apply(piece)
        endpoints = list(table.elements["endpoints-4"].values())
        backend.apply(Transaction([_elements("delete", "ip", "endpoints-4", tuple(endpoints[:1]))]))
        left = backend.read().tables["ip"].elements["endpoints-4"]
        assert set(left) == {e.key for e in endpoints[1:]}
        missing = Element("10.1.2.3 . tcp . 80 . 65536")
        bad = Transaction([
            _elements("delete", "ip", "endpoints-4", tuple(endpoints[1:2])),
            _elements("delete", "ip", "endpoints-4", (missing,)),
        ])
        assert encodable(bad)
        with pytest.raises(NftError) as info:
            backend.apply(bad)
        assert "delete element ip kproxy endpoints-4" in str(info.value)
        assert set(backend.read().tables["ip"].elements["endpoints-4"]) == set(left), "the batch is atomic"
        # Many refused messages at once, then a good batch on the same socket: nothing left over confuses it.
        missing_many = tuple(Element(f"10.{i // 250}.{i % 250}.1 . tcp . 80 . 65536") for i in range(20000))
        with pytest.raises(NftError):
            backend.apply(Transaction([_elements("delete", "ip", "endpoints-4", missing_many)]))
        backend.apply(Transaction([_elements("delete", "ip", "endpoints-4", tuple(endpoints[1:2]))]))
        assert set(backend.read().tables["ip"].elements["endpoints-4"]) == set(left) - {endpoints[1].key}


def test_what_netlink_can_send() -> None:
    """The skeleton's statements, base chains, set declarations and interval sets go through libnftables; values out of range nowhere."""
    for family in ("ip", "ip6"):
        sets = skeleton_table(family).sets
        assert {n for n, d in sets.items() if layout_of(d)} == {n for n, d in sets.items() if not d.dynamic and not d.interval}
    element = Element("10.0.0.0/8")
    assert not encodable(Transaction([_elements("add", "ip", "cluster-cidrs", (element,))]))
    assert not encodable(Transaction([Op("add", "map", "ip", "endpoints-4", set_decl=skeleton_table("ip").sets["endpoints-4"])]))
    assert not encodable(Transaction())
    skeletons: list[Rule] = [
        (VerdictMap(("daddr", "l4proto", "dport"), "service-ips"),),
        (Masquerade(),),
        (Reject(),),
    ]
    out_of_range: list[Rule] = [
        (MatchProtocol("tcp"), DnatTo("10.0.0.1", 65536)),
        (MatchProtocol("tcp"), DnatTo("fd00::1", 80)),
        (MatchPrefix("saddr", "10.0.0.1/8"), Verdict("drop")),
        (MatchPrefix("saddr", "fd00::/8"), Verdict("drop")),
        (NumgenIs(1 << 32), Verdict("drop")),
        (SetUpdate("affinity", ("saddr", Const("10.0.0.1", "addr"), "l4proto", "dport"), timeout=None),),
        (SetUpdate("meter", ("saddr", Const("fd00::1", "addr")), limit=Limit(5, "second")),),
        (DnatFromMap(("daddr", "l4proto", "dport", Numgen(0)), "endpoints-4"),),
        (Verdict("goto", "y"), Verdict("drop")),
        (MatchProtocol("tcp"), Verdict("accept"), Counter("x")),
        (DnatTo("10.0.0.1", 80),),
    ]
    for odd in skeletons + out_of_range:
        assert not encodable(Transaction([Op("add", "rules", "ip", chains=(Chain("x", (odd,)),))])), odd
    fine: list[Rule] = [
        (Lookup(("daddr",), "cluster-ips", negate=True), Verdict("drop")),
        (MatchProtocol("tcp"), Verdict("drop")),
        (MatchPrefix("saddr", "10.0.0.0/9"), Verdict("drop")),
        (MatchProtocol("udp"), DnatTo("10.0.0.1", 80)),
        (NumgenIs(2), Verdict("drop")),
        (NewConnection(), SetUpdate("rate-limit-meter", ("saddr", Const("10.96.0.1", "addr"), Const("6", "proto"), Const("80", "port")),
                                    limit=Limit(5, "second")), Verdict("drop")),
    ]
    for rule in fine:
        assert encodable(Transaction([Op("add", "rules", "ip", chains=(Chain("x", (rule,)),))])), rule
    assert encodable(Transaction([Op("flush", "chain", "ip", "svc-x"), Op("delete", "counter", "ip", "conns-x")]))


def test_unsafe_comments_are_refused_as_in_nft_text() -> None:
    """The netlink path checks comments exactly as the nft text path does."""
    hostile = Element("10.0.0.1", comment='x" ; flush ruleset ; "')
    with pytest.raises(UnsafeText):
        encode(Transaction([_elements("add", "ip", "cluster-ips", (hostile,))]))


def test_a_transaction_changing_the_skeleton_and_adding_a_service(empty_netns: Netns) -> None:
    """The skeleton's part (an interval set changes) goes through libnftables, the Service's chains over netlink after it.

    Pick rules are never sent as text: nft 1.0.6 refuses a rule that reads an
    existing map whose data is ``ip daddr . th dport`` ("conflicting
    protocols"), and they are sent once the maps exist (``plan.create``).
    """
    before = _compiled([], ProxyConfig(cluster_cidrs=("10.244.0.0/16",)))
    after = _compiled(*SCENARIOS["udp-sctp-external-ip"][:1], ProxyConfig(cluster_cidrs=("10.240.0.0/12",),
                                                                          service_metrics="all"))
    with empty_netns.entered():
        backend = NftablesBackend()
        for piece in create(before.tables["ip"]):
            backend.apply(piece)
        tx = plan(backend.read(), Ruleset({"ip": after.tables["ip"]}))
        skeleton, rest = split(tx)
        assert [op.name for op in skeleton.ops if op.kind == "element"] == ["cluster-cidrs", "cluster-cidrs"]
        assert any(c.name.startswith("svc-") for op in rest.ops for c in op.chains) and encodable(rest)
        backend.apply(tx)
        assert plan(backend.read(), Ruleset({"ip": after.tables["ip"]})).operations == 0
        assert "cmp eq" not in empty_netns.nft("--debug=netlink", "list", "chain", "ip", "kproxy", "pick-4").stdout
        pick_rule = render_rule(after.tables["ip"].chains["pick-4"].rules[0], "ip")
        assert backend._run(f"add rule ip kproxy pick-4 {pick_rule}")[0] != 0, "nft 1.0.6 refuses a pick rule as text"


def test_apply_in_order_stops_at_the_first_refused_piece(empty_netns: Netns) -> None:
    """Pieces land in order (netlink and libnftables ones alike); after a refused one nothing more is sent."""
    table = _ruleset("nodeport-cluster-policy").tables["ip"]
    pieces = create(table)
    assert not encodable(pieces[0]) and all(encodable(p) for p in pieces[1:] if p)
    endpoints = list(table.elements["endpoints-4"].values())
    refused = Transaction([_elements("delete", "ip", "endpoints-4", (Element("10.1.2.3 . tcp . 80 . 65536"),))])
    after = Transaction([_elements("delete", "ip", "endpoints-4", tuple(endpoints[:1]))])
    with empty_netns.entered():
        backend = NftablesBackend()
        with pytest.raises(NftError) as info:
            backend.apply_in_order([*pieces, refused, after])
        assert "delete element ip kproxy endpoints-4" in str(info.value)
        assert plan(backend.read(), Ruleset({"ip": table})).operations == 0, "every piece before landed, the one after did not"


def test_split_keeps_the_order_of_each_part() -> None:
    """Declarations go to libnftables, first; a rule reading a map declared in the same transaction follows it over netlink."""
    pick = Chain("pick-4", ((DnatFromMap(("daddr", "l4proto", "dport", Numgen(1, 65536)), "endpoints-4"),),))
    tx = Transaction([
        Op("add", "map", "ip6", "endpoints-4", set_decl=skeleton_table("ip6").sets["endpoints-4"]),
        Op("flush", "chain", "ip", "pick-4"),
        Op("add", "rules", "ip", chains=(pick,)),
    ])
    skeleton, rest = split(tx)
    assert [(op.kind, op.family) for op in skeleton.ops] == [("map", "ip6")]
    assert [(op.verb, op.kind, op.family) for op in rest.ops] == [("flush", "chain", "ip"), ("add", "rules", "ip")]
    assert encodable(rest)
