"""Element batches sent over netlink leave the kernel exactly as libnftables would."""

from __future__ import annotations

import subprocess
import uuid
from typing import Iterator

import pytest

from kproxy.compiler import compile_ruleset
from kproxy.convert import build_cluster
from kproxy.nfnetlink import BatchSocket, encodable, encode, layouts, split_rules
from kproxy.nft import NftablesBackend, NftError
from kproxy.plan import Op, Transaction, create, plan
from kproxy.ruleset import Chain, Element, Ruleset, UnsafeText
from kproxy.skeleton import skeleton_table
from tests.netbed import Netns
from tests.test_golden import NODE, SCENARIOS

pytestmark = pytest.mark.root


def _ruleset(name: str) -> Ruleset:
    objects, config = SCENARIOS[name]
    cluster, problems = build_cluster(objects, NODE.name)
    assert problems == []
    return compile_ruleset(cluster, NODE, config)


def _all_scenarios() -> Ruleset:
    """Every golden scenario's ruleset merged: every set, verdict and data shape kproxy writes."""
    result = Ruleset()
    for name in sorted(SCENARIOS):
        ruleset = _ruleset(name)
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


def _build(netns: Netns, ruleset: Ruleset, netlink: bool) -> str:
    """Build the tables piece by piece: through netlink wherever possible, or all through libnftables."""
    with netns.entered():
        backend = NftablesBackend()
        sent = 0
        for family in ("ip", "ip6"):
            for piece in create(ruleset.tables[family]):
                simple, rest = split_rules(piece) if not encodable(piece) else (piece, Transaction())
                if not netlink:
                    assert backend._run(str(piece))[0] == 0  # libnftables, for comparison
                    continue
                if rest:
                    assert backend._run(str(rest))[0] == 0
                if simple:
                    BatchSocket().send(simple)
                    sent += simple.operations
        assert plan(backend.read(), ruleset).operations == 0
        assert sent > 0 or not netlink
    return netns.nft("list", "ruleset").stdout


def test_everything_over_netlink_lists_exactly_as_through_libnftables(two_netns: tuple[Netns, Netns]) -> None:
    """Elements (verdicts, endpoint data, slots, IPv6), chains, counters and rules, with comments, as nft writes them."""
    ruleset = _all_scenarios()
    shapes = {name for table in ruleset.tables.values() for name, members in table.elements.items() if members}
    assert {"endpoints-4", "service-ips", "service-nodeports", "no-endpoint-services", "hairpin", "cluster-ips"} <= shapes
    rules = [rule for table in ruleset.tables.values() for chain in table.chains.values() for rule in chain.rules]
    assert any(r.startswith("counter name") and " goto pick-" in r for r in rules)
    assert "jump mark-for-masquerade" in rules and any(r.startswith("goto svc-") for r in rules)
    through_nft = _build(two_netns[0], ruleset, netlink=False)
    through_netlink = _build(two_netns[1], ruleset, netlink=True)
    assert through_netlink == through_nft
    assert "ip6 kproxy" in through_netlink and "endpoints-4" in through_netlink


def test_service_added_and_removed_over_netlink(two_netns: tuple[Netns, Netns]) -> None:
    """The transactions of a partial sync that adds, then removes a Service: same kernel state either way."""
    before, after = _ruleset("clusterip"), _ruleset("nodeport-cluster-policy")
    listings = []
    for netns, netlink in zip(two_netns, (False, True)):
        _build(netns, before, netlink=False)
        with netns.entered():
            backend = NftablesBackend()
            for current, desired in ((before, after), (after, before)):
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
        backend.apply(Transaction([Op("delete", "element", "ip", "endpoints-4", elements=tuple(endpoints[:1]))]))
        left = backend.read().tables["ip"].elements["endpoints-4"]
        assert set(left) == {e.key for e in endpoints[1:]}
        missing = Element("10.1.2.3 . tcp . 80 . 65536")
        bad = Transaction([
            Op("delete", "element", "ip", "endpoints-4", elements=tuple(endpoints[1:2])),
            Op("delete", "element", "ip", "endpoints-4", elements=(missing,)),
        ])
        assert encodable(bad)
        with pytest.raises(NftError) as info:
            backend.apply(bad)
        assert "delete element ip kproxy endpoints-4" in str(info.value)
        assert set(backend.read().tables["ip"].elements["endpoints-4"]) == set(left), "the batch is atomic"
        # Many refused messages at once, then a good batch on the same socket: nothing left over confuses it.
        missing_many = tuple(Element(f"10.{i // 250}.{i % 250}.1 . tcp . 80 . 65536") for i in range(20000))
        with pytest.raises(NftError):
            backend.apply(Transaction([Op("delete", "element", "ip", "endpoints-4", elements=missing_many)]))
        backend.apply(Transaction([Op("delete", "element", "ip", "endpoints-4", elements=tuple(endpoints[1:2]))]))
        assert set(backend.read().tables["ip"].elements["endpoints-4"]) == set(left) - {endpoints[1].key}


def test_what_netlink_can_send() -> None:
    """Rule shapes it does not know, base chains, sets, and interval or dynamic sets go through libnftables."""
    for family in ("ip", "ip6"):
        sets = skeleton_table(family).sets
        assert set(layouts(family)) == {n for n, d in sets.items() if not d.dynamic and not d.interval}
    element = Element("10.0.0.0/8")
    assert not encodable(Transaction([Op("add", "element", "ip", "cluster-cidrs", elements=(element,))]))
    assert not encodable(Transaction([Op("add", "map", "ip", "endpoints-4")]))
    assert not encodable(Transaction([Op("add", "rules", "ip", chains=(Chain("x", ("meta l4proto tcp drop",)),))]))
    assert not encodable(Transaction())
    for odd in (" ", 'counter name "x"goto y', "goto  y", 'counter name "x" goto y ', "goto y drop"):
        assert not encodable(Transaction([Op("add", "rules", "ip", chains=(Chain("x", (odd,)),))])), odd
    assert encodable(Transaction([Op("flush", "chain", "ip", "svc-x"), Op("delete", "counter", "ip", "conns-x")]))
    simple, rest = split_rules(Transaction([Op("add", "rules", "ip", chains=(
        Chain("a", ('counter name "conns-a" goto pick-4',)), Chain("b", ('counter name "conns-b"', "numgen random mod 2 0 drop")),
    ))]))
    assert [c.name for op in simple.ops for c in op.chains] == ["a"] and [c.name for op in rest.ops for c in op.chains] == ["b"]


def test_unsafe_comments_are_refused_as_in_nft_text() -> None:
    """The netlink path checks comments exactly as the nft text path does."""
    hostile = Element("10.0.0.1", comment='x" ; flush ruleset ; "')
    with pytest.raises(UnsafeText):
        encode(Transaction([Op("add", "element", "ip", "cluster-ips", elements=(hostile,))]))
