"""Element batches sent over netlink leave the kernel exactly as libnftables would."""

from __future__ import annotations

import subprocess
import uuid
from typing import Iterator

import pytest

from kproxy.compiler import compile_ruleset
from kproxy.convert import build_cluster
from kproxy.nfnetlink import ElementSocket, encodable, encode, layouts
from kproxy.nft import NftablesBackend, NftError
from kproxy.plan import Op, Transaction, create, plan
from kproxy.ruleset import Element, Ruleset, UnsafeText
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
    with netns.entered():
        backend = NftablesBackend()
        for family in ("ip", "ip6"):
            pieces = create(ruleset.tables[family])
            for piece in pieces[:-1]:
                backend.apply(piece)
            last = pieces[-1]
            assert encodable(last)
            if netlink:
                ElementSocket().send(last)
            else:
                assert backend._run(str(last))[0] == 0  # libnftables, for comparison
        assert plan(backend.read(), ruleset).operations == 0
    return netns.nft("list", "ruleset").stdout


def test_elements_over_netlink_list_exactly_as_through_libnftables(two_netns: tuple[Netns, Netns]) -> None:
    """Every element shape (verdicts, endpoint data, slots, comments, IPv6) is encoded as nft encodes it."""
    ruleset = _all_scenarios()
    shapes = {name for table in ruleset.tables.values() for name, members in table.elements.items() if members}
    assert {"endpoints-4", "service-ips", "service-nodeports", "no-endpoint-services", "hairpin", "cluster-ips"} <= shapes
    through_nft = _build(two_netns[0], ruleset, netlink=False)
    through_netlink = _build(two_netns[1], ruleset, netlink=True)
    assert through_netlink == through_nft
    assert "ip6 kproxy" in through_netlink and "endpoints-4" in through_netlink


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


def test_only_plain_element_transactions_are_encodable() -> None:
    """Rules, chains, flushes and interval or dynamic sets go through libnftables."""
    for family in ("ip", "ip6"):
        sets = skeleton_table(family).sets
        assert set(layouts(family)) == {n for n, d in sets.items() if not d.dynamic and not d.interval}
    element = Element("10.0.0.0/8")
    assert not encodable(Transaction([Op("add", "element", "ip", "cluster-cidrs", elements=(element,))]))
    assert not encodable(Transaction([Op("flush", "chain", "ip", "services")]))
    assert not encodable(Transaction())


def test_unsafe_comments_are_refused_as_in_nft_text() -> None:
    """The netlink path checks comments exactly as the nft text path does."""
    hostile = Element("10.0.0.1", comment='x" ; flush ruleset ; "')
    with pytest.raises(UnsafeText):
        encode(Transaction([Op("add", "element", "ip", "cluster-ips", elements=(hostile,))]))
