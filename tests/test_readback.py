"""``parse_table`` on what nft really prints: ``nft -j list table`` JSON recorded from the kernel.

The fixtures
============
``tests/data/readback/NAME.json`` holds ``{"ip": DOCUMENT, "ip6": DOCUMENT}``, each
DOCUMENT what ``nft -j list table FAMILY kproxy`` printed, one nft object a line. They
were recorded by ``test_recorded_fixture_matches_this_kernel`` (root), which for each
entry of ``RECORDINGS``

1. creates a fresh network namespace (the ``empty_netns`` fixture of tests/conftest.py:
   ``ip netns add kpt-ns-XXXXXXXX``, deleted afterwards, also on failure),
2. loads into it, with ``ip netns exec NAME nft -f -``, the script that
   ``kproxy.rules.plan.render_ruleset`` writes for the entry's cluster (every golden
   scenario of tests/harness/scenarios.py, plus a few of this file's), then the
   entry's hand-written nft commands, if any,
3. dumps ``nft -j list table ip kproxy`` and ``... ip6 kproxy``, and compares the two
   documents, ``metainfo`` aside, with the recorded file; then lists them again the way
   kproxy does (``NftablesBackend.list_json``, libnftables, in the namespace entered as
   ``Netns.entered()`` does) and compares those too.

Regenerate the files after a change of the compiler or of nft, as root::

    UPDATE_READBACK=1 ./dev test tests/test_readback.py -m root

and review the diff. They were recorded with nftables 1.0.6 (which prints neither
the table's comment nor the ``dynamic`` flag of a set) on Linux 6.18. Every other
test here runs without root: it parses the recorded files and compares the result
with what the compiler gives for the same cluster today.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kproxy.cluster.convert import build_cluster
from kproxy.nft.backend import NftablesBackend
from kproxy.nft.objects import DIGEST_PREFIX, Element, Family, Ruleset, SetDecl, Table, chain_fingerprint
from kproxy.nft.readback import ReadbackError, parse_table
from kproxy.rules.compiler import FAMILIES, ProxyConfig, compile_ruleset, slot
from kproxy.rules.plan import diff, render_ruleset
from tests.harness.builders import endpoint, endpoint_slice, node, service
from tests.harness.scenarios import CIDRS, NODE, SCENARIOS

if TYPE_CHECKING:
    from tests.harness.netbed import Netns

DATA = Path(__file__).parent / "data" / "readback"
NFT_FAMILIES: tuple[Family, ...] = tuple(FAMILIES)


def _compiled(objects: tuple[dict[str, Any], ...], config: ProxyConfig) -> Ruleset:
    cluster, problems = build_cluster([*objects, node("node-a", ["192.168.50.1", "fd00:50::1"])], "node-a")
    assert problems == []
    return compile_ruleset(cluster, NODE, config)


@dataclass(frozen=True)
class Recording:
    """A cluster whose compiled script is loaded into a fresh namespace, and nft commands run after it."""

    objects: tuple[dict[str, Any], ...]
    config: ProxyConfig = CIDRS
    extra: str = ""
    """nft commands run after the compiled script: drift, what kproxy did not write."""
    bare: bool = False
    """Load only ``add table`` for both families instead of the compiled script."""

    def compiled(self) -> Ruleset:
        return _compiled(self.objects, self.config)

    def script(self) -> str:
        if self.bare:
            return "".join(f"add table {family} kproxy\n" for family in NFT_FAMILIES)
        return render_ruleset(self.compiled())


SERVICE_CIDRS = (
    *SCENARIOS["clusterip"][0],
    {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
     "spec": {"cidrs": ["10.96.0.0/16", "10.97.0.1/32", "fd00:96::/112"]}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "extra"},
     "spec": {"cidrs": ["10.98.0.0/24", "10.98.1.0/24"]}},
)
"""ServiceCIDRs: prefixes, a full-length one (the compiler writes it as an address) and two adjacent ones (one /23)."""

MANY_ENDPOINTS = (
    service("big", "shop", ["10.96.0.90", "fd00:96::90"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
            externalTrafficPolicy="Local",
            ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]),
    endpoint_slice("big-1", "big", [endpoint(f"10.244.1.{i}", node="node-a" if i % 2 else "node-b")
                                    for i in range(1, 8)],
                   namespace="shop", ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]),
    endpoint_slice("big-2", "big", [endpoint("fd00:244:1::1")], namespace="shop", address_type="IPv6",
                   ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]),
)
"""Seven UDP endpoints under externalTrafficPolicy Local: slots in endpoints-4 and endpoints-8, cluster and local."""

FIREWALL_NODE_IN_RANGE = (
    service("lb", "shop", ["10.96.0.20", "fd00:96::20"], ipFamilies=["IPv4", "IPv6"], type="LoadBalancer",
            loadBalancerSourceRanges=["192.168.50.0/24", "10.1.0.0/16", "fd00:50::/64"],
            ports=[{"name": "https", "port": 443, "nodePort": 30443}],
            status={"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}, {"ip": "fd00:192::10"}]}}),
    endpoint_slice("lb-1", "lb", [endpoint("10.244.1.20")], namespace="shop", ports=[{"name": "https", "port": 8443}]),
)
"""Source ranges that hold the node: the load-balancer IPs are allowed sources too, as full-length prefixes (written
as addresses) inside the concatenations of an interval set."""

IPV6_SPELLING = (
    service("v6", "shop", "fd00:96:0:1:2:3:4:5", ipFamilies=["IPv6"]),
    endpoint_slice("v6-1", "v6", [endpoint("fd00:244:0:1:0:0:0:10"), endpoint("fd00:0:0:a:0:0:0:b")], namespace="shop",
                   address_type="IPv6"),
)
"""IPv6 addresses whose spelling matters: a single zero group (not shortened) and two runs of zeros (the longer one
shortened), as the compiler writes them and as nft prints them."""

GENERATED_CHAIN = "external-to-cluster"
"""A chain the compiler generates in every table (a shared one: the clusterip scenario's port has none of its own)."""
DRIFT = f"""\
add element ip kproxy hairpin {{ 10.244.9.9 . 10.244.9.9 }}
add element ip kproxy service-cidrs {{ 10.100.0.1-10.100.0.9 }}
add element ip kproxy no-endpoint-drop {{ 10.96.9.9 . tcp . 80 }}
add element ip kproxy affinity {{ 198.51.100.7 . 10.96.0.10 . tcp . 80 . 0x00000001 }}
add rule ip kproxy {GENERATED_CHAIN} counter
add chain ip kproxy stray
add chain ip kproxy stray-rules
add rule ip kproxy stray-rules counter accept comment "not kproxy's"
add counter ip kproxy stray-counter
"""
"""What kproxy did not write, on top of the clusterip scenario: elements without comments (one a range, one in a
dynamic set), a rule after a chain's digest rule, chains without a digest, a counter without a comment."""

FOREIGN_SHAPES = """\
add set ip kproxy prefixes { type ipv4_addr; flags interval; elements = { 10.0.0.0/8 comment "a", 11.0.0.1-11.0.0.9 comment "b", 12.0.0.1, 13.0.0.0/24, 13.0.1.0/24, 14.0.0.0-14.0.1.255, 14.0.2.0-14.0.2.254 } }
add set ip kproxy everything { type ipv4_addr; flags interval; elements = { 0.0.0.0/0 comment "all" } }
add set ip kproxy top { type ipv4_addr; flags interval; elements = { 255.255.255.255 comment "top" } }
add set ip kproxy open-range { type ipv4_addr; flags interval; elements = { 10.0.0.0-255.255.255.255 comment "open" } }
add set ip kproxy upper-half { type ipv4_addr; flags interval; elements = { 1.0.0.0, 128.0.0.0/1 comment "half" } }
add set ip kproxy bottom { type ipv4_addr; flags interval; elements = { 0.0.0.0, 0.0.0.2-0.0.0.3 } }
add set ip kproxy with-catchall { type ipv4_addr; flags interval; elements = { *, 10.0.0.0/8 } }
add set ip kproxy port-ranges { type inet_service; flags interval; elements = { 100-110, 1024-65535 comment "hi", 0-63, 443 } }
add set ip kproxy protocol-ranges { type inet_proto; flags interval; elements = { 6-17 comment "r", 132 } }
add set ip kproxy ranges { type ipv4_addr . inet_service; flags interval; elements = { 10.0.0.0/8 . 80-90 comment "x", 1.2.3.4 . 0-255, 10.0.0.1-10.0.0.5 . 22, 2.0.0.0/31 . 7 } }
add set ip kproxy all-ranges { type ipv4_addr . inet_service; flags interval; elements = { 0.0.0.0/0 . 0-65535 comment "every" } }
add set ip kproxy ranges3 { type inet_proto . inet_service . ipv4_addr; flags interval; elements = { tcp . 80 . 10.0.0.0/8, 17-132 . 53 . 1.1.1.1, tcp . 1-2 . 2.0.0.0-2.0.0.2 } }
add set ip kproxy marks { type mark; elements = { 0x1, 0xffffffff comment "m", 0 } }
add set ip kproxy address-marks { type ipv4_addr . mark; elements = { 1.2.3.4 . 0x10 } }
add chain ip kproxy target
add map ip kproxy verdicts { type ipv4_addr : verdict; elements = { 1.1.1.1 : accept, 1.1.1.2 : drop, 1.1.1.3 : continue, 1.1.1.4 : return, 1.1.1.5 : jump target, 1.1.1.6 comment "g" : goto target } }
add set ip kproxy catchall { type ipv4_addr; elements = { *, 1.2.3.4 } }
add map ip kproxy catchall-map { type ipv4_addr : verdict; elements = { * : drop, 1.2.3.4 : accept } }
add set ip kproxy protocols { type inet_proto; elements = { tcp, udp, sctp } }
add set ip kproxy timeouts { type ipv4_addr; flags timeout; elements = { 1.2.3.4 timeout 1h } }
add rule ip kproxy target ip daddr { 1.2.3.4, 5.6.7.8 } accept comment "an anonymous set"
add quota ip kproxy stray-quota { over 25 mbytes }
add counter ip kproxy counted { comment "with a comment" }
add set ip6 kproxy prefixes { type ipv6_addr; flags interval; elements = { fd00::/8 comment "ula", ::/127, ::ffff:1.2.3.4, 2001:db8::1-2001:db8::ff, ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff } }
add set ip6 kproxy upper-half { type ipv6_addr; flags interval; elements = { 8000::/1 } }
add set ip6 kproxy ranges { type ipv6_addr . inet_proto . inet_service . ipv6_addr; flags interval; elements = { fd00::1 . tcp . 443 . fd00:50::/64, fd00::1 . tcp . 443 . ::/0, fd00::2 . udp . 53 . fd00::1-fd00::3 } }
add set ip6 kproxy pairs { type ipv6_addr . ipv6_addr; elements = { ::1 . ::ffff:10.0.0.1, fd00:0:0:a::b . 2001:db8:0:0:1:0:0:1 } }
"""
"""Shapes kproxy never writes, in tables of their own: intervals nft prints as prefixes, ranges, single values, open
to the largest value, adjacent, with a catch-all, of ports and protocols (printed as numbers in ranges) and inside
concatenations; marks, every verdict, catch-all elements, an anonymous set, a set with timeouts, a quota. What nft
prints for them is what the netlink reader (``kproxy.nft.tabledump``) must read."""

RECORDINGS: dict[str, Recording] = {
    **{name: Recording(tuple(objects), config) for name, (objects, config) in SCENARIOS.items()},
    "service-cidrs": Recording(SERVICE_CIDRS),
    "many-endpoints": Recording(MANY_ENDPOINTS),
    "firewall-node-in-range": Recording(FIREWALL_NODE_IN_RANGE),
    "ipv6-spelling": Recording(IPV6_SPELLING),
    "empty": Recording((), bare=True),
    "drift": Recording(tuple(SCENARIOS["clusterip"][0]), extra=DRIFT),
    "foreign-shapes": Recording((), bare=True, extra=FOREIGN_SHAPES),
}
COMPILED = sorted(name for name, recording in RECORDINGS.items() if not (recording.bare or recording.extra))


def _load(name: str) -> dict[str, Any]:
    path = DATA / f"{name}.json"
    assert path.exists(), f"{path} is missing; record it with UPDATE_READBACK=1 (see the module docstring)"
    recorded: dict[str, Any] = json.loads(path.read_text())
    return recorded


def _parsed(name: str, family: Family) -> Table:
    return parse_table(_load(name)[family], family)


def _elements(table: Table) -> dict[str, dict[str, Element]]:
    """Elements by set, leaving out sets without any (a compiled table has no entry for those)."""
    return {name: members for name, members in table.elements.items() if members}


# -- recorded from the kernel: the parse equals what was compiled ----------------------------------


@pytest.mark.parametrize("family", NFT_FAMILIES)
@pytest.mark.parametrize("name", COMPILED)
def test_recorded_table_parses_to_what_was_compiled(name: str, family: Family) -> None:
    """Every set, element, counter and chain that the kernel holds for a compiled ruleset reads back as compiled:
    elements and counters equal, chain fingerprints equal to chain_fingerprint of the compiled chains."""
    compiled = RECORDINGS[name].compiled().tables[family]
    parsed = _parsed(name, family)
    assert parsed.family == family
    assert parsed.comment in ("", compiled.comment), "nft 1.0.6 prints no table comment; later releases do"
    assert _elements(parsed) == _elements(compiled)
    assert parsed.counters == compiled.counters
    assert {n: c.fingerprint for n, c in parsed.chains.items()} == {
        n: chain_fingerprint(c, family) for n, c in compiled.chains.items()}
    assert all(c.rules == () for c in parsed.chains.values())
    assert {n: (d.kind, d.dynamic, d.interval) for n, d in parsed.sets.items()} == {
        n: (d.kind, d.dynamic, d.interval) for n, d in compiled.sets.items()}
    assert not [n for n, d in parsed.sets.items() if d.dynamic and n in parsed.elements], "dynamic sets are not read"
    assert diff(parsed, compiled).operations == 0, "the planner sees nothing to do"


SHAPES: list[tuple[str, Family, str, Element]] = [
    # verdict maps keyed by concatenations, goto a chain
    ("clusterip", "ip", "service-ips", Element("10.96.0.10 . tcp . 80", "goto pick-by-class", "shop/web:http")),
    ("nodeport-cluster-policy", "ip", "service-nodeports", Element("tcp . 30080", "goto external-to-cluster", "shop/web:http")),
    ("udp-sctp-external-ip", "ip", "service-ips",
     Element("198.51.100.70 . sctp . 5060", "goto external-to-cluster", "telco/sig:sip")),
    ("service-metrics-all", "ip", "service-ips",
     Element("10.96.0.10 . tcp . 80", "goto svc-51DBE209-shop/web/tcp/http", "shop/web:http")),
    ("service-metrics-all", "ip", "service-nodeports",
     Element("tcp . 30080", "goto ext-51DBE209-shop/web/tcp/http", "shop/web:http")),
    ("metrics-annotated", "ip", "service-ips",
     Element("192.0.2.90 . tcp . 443", "goto ext-D1056DB7-shop/lb/tcp/https", "shop/lb:https")),
    # the sets of Service ports that get no endpoint: rejected, dropped
    ("no-endpoints", "ip", "no-endpoint-reject", Element("10.96.0.30 . tcp . 80", "", "jobs/idle:http")),
    ("no-endpoints", "ip", "no-endpoint-nodeport-reject", Element("tcp . 30082", "", "jobs/idle:http")),
    ("local-policy-without-local-endpoint", "ip", "no-endpoint-drop", Element("10.96.0.20 . tcp . 80", "", "shop/lb:http")),
    # the class of a frontend: how many endpoints it has
    ("clusterip", "ip", "class-4", Element("10.96.0.10 . tcp . 80", "", "shop/web:http")),
    # endpoint maps: frontend . protocol . port . slot : address . port, cluster and local slots, both families
    ("clusterip", "ip", "endpoints-4",
     Element(f"10.96.0.10 . tcp . 80 . {slot(2, False)}", "10.244.2.10 . 8080", "shop/web:http")),
    ("loadbalancer-local-policy", "ip", "endpoints-4",
     Element(f"192.0.2.10 . tcp . 443 . {slot(1, True)}", "10.244.1.20 . 8443", "shop/lb:https")),
    ("many-endpoints", "ip", "endpoints-8",
     Element(f"192.168.50.1 . udp . 30053 . {slot(7, False)}", "10.244.1.7 . 5353", "shop/big:dns")),
    ("dual-stack", "ip6", "endpoints-4",
     Element(f"fd00:96::60 . tcp . 80 . {slot(1, False)}", "fd00:244:1::10 . 8080", "shop/web:http")),
    # plain sets and concatenations
    ("clusterip", "ip", "cluster-ips", Element("10.96.0.10", "", "shop/web")),
    ("dual-stack", "ip6", "cluster-ips", Element("fd00:96::60", "", "shop/web")),
    ("clusterip", "ip", "nodeport-ips", Element("192.168.50.1", "", "node node-a")),
    ("clusterip", "ip", "hairpin", Element("10.244.2.10 . 10.244.2.10", "", "shop/web:http")),
    ("loadbalancer-local-policy", "ip", "firewall-ips", Element("192.0.2.10 . tcp . 443", "", "shop/lb:https")),
    # interval sets: prefixes, a full-length prefix read as an address, a prefix inside a concatenation
    ("clusterip", "ip", "cluster-cidrs", Element("10.244.0.0/16", "", "--cluster-cidr")),
    ("clusterip", "ip6", "cluster-cidrs", Element("fd00:244::/48", "", "--cluster-cidr")),
    ("service-cidrs", "ip", "service-cidrs", Element("10.97.0.1", "", "ServiceCIDR")),
    ("service-cidrs", "ip", "service-cidrs", Element("10.98.0.0/23", "", "ServiceCIDR")),
    ("service-cidrs", "ip6", "service-cidrs", Element("fd00:96::/112", "", "ServiceCIDR")),
    ("loadbalancer-local-policy", "ip", "firewall-allow",
     Element("192.0.2.10 . tcp . 443 . 203.0.113.0/24", "", "shop/lb:https")),
    ("firewall-node-in-range", "ip", "firewall-allow",
     Element("192.0.2.10 . tcp . 443 . 192.0.2.10", "", "shop/lb:https")),
    ("firewall-node-in-range", "ip6", "firewall-allow",
     Element("fd00:192::10 . tcp . 443 . fd00:192::10", "", "shop/lb:https")),
    # IPv6 spelled as inet_ntop spells it, in keys and in endpoint values
    ("ipv6-spelling", "ip6", "cluster-ips", Element("fd00:96:0:1:2:3:4:5", "", "shop/v6")),
    ("ipv6-spelling", "ip6", "endpoints-4",
     Element(f"fd00:96:0:1:2:3:4:5 . tcp . 80 . {slot(2, False)}", "fd00:244:0:1::10 . 8080", "shop/v6:http")),
    ("ipv6-spelling", "ip6", "hairpin", Element("fd00:0:0:a::b . fd00:0:0:a::b", "", "shop/v6:http")),
    # drift: elements nft holds without a comment, and a range
    ("drift", "ip", "hairpin", Element("10.244.9.9 . 10.244.9.9")),
    ("drift", "ip", "service-cidrs", Element("10.100.0.1-10.100.0.9")),
    ("drift", "ip", "no-endpoint-drop", Element("10.96.9.9 . tcp . 80")),
]


@pytest.mark.parametrize(("name", "family", "set_name", "element"), SHAPES,
                         ids=[f"{name}-{family}-{s}-{e.key}" for name, family, s, e in SHAPES])
def test_element_shapes(name: str, family: Family, set_name: str, element: Element) -> None:
    """Each shape of set and map element kproxy uses reads back as the text the compiler writes for it."""
    assert _parsed(name, family).elements[set_name][element.key] == element


def test_counters_read_back_with_their_comments() -> None:
    """Named counters read back by name with their comment (connections, rate-limit drops); no comment reads as ""."""
    counters = _parsed("rate-limit", "ip").counters  # not annotated: it counts its drops only
    assert sorted(counters.values()) == ["shop/api:http"]
    assert sorted(name.split("-")[0] for name in counters) == ["drops"]
    counters = _parsed("metrics-annotated", "ip").counters
    assert [(name.split("-")[0], text) for name, text in counters.items()] == [("conns", "shop/lb:https")]
    assert _parsed("drift", "ip").counters["stray-counter"] == ""


def test_chain_fingerprint_is_the_last_rules_digest_and_the_rule_count() -> None:
    """A chain's fingerprint is the digest in its last rule's comment and its number of rules."""
    document = _load("clusterip")["ip"]
    rules = [item["rule"] for item in document["nftables"] if "rule" in item and item["rule"]["chain"] == "pick-4"]
    parsed = _parsed("clusterip", "ip").chains["pick-4"]
    assert rules[-1]["comment"] == DIGEST_PREFIX + parsed.fingerprint[0]  # type: ignore[index]
    assert parsed.fingerprint == (rules[-1]["comment"].removeprefix(DIGEST_PREFIX), len(rules))
    assert all("comment" not in rule for rule in rules[:-1])


def test_an_empty_table() -> None:
    """A table without sets, chains or counters reads back as an empty Table (nft 1.0.6 prints no table comment)."""
    for family in NFT_FAMILIES:
        assert _parsed("empty", family) == Table(family=family)


def test_drift_reads_back_as_it_is_and_the_planner_repairs_exactly_it() -> None:
    """Chains without a digest read as ("", rule count): the chain with a rule after its digest, a chain kproxy never
    wrote, an empty one. Compared with the compiled table, only the drift is planned away."""
    compiled = RECORDINGS["drift"].compiled().tables["ip"]
    parsed = _parsed("drift", "ip")
    digest, count = chain_fingerprint(compiled.chains[GENERATED_CHAIN], "ip")
    assert parsed.chains[GENERATED_CHAIN].fingerprint == ("", count + 1)
    assert parsed.chains["stray"].fingerprint == ("", 0)
    assert parsed.chains["stray-rules"].fingerprint == ("", 1)
    assert digest and "affinity" not in parsed.elements and parsed.sets["affinity"].dynamic
    tx = diff(parsed, compiled)
    assert sorted({(op.verb, op.kind, op.name) for op in tx.ops if op.kind != "rules"}) == [
        ("delete", "chain", "stray"), ("delete", "chain", "stray-rules"), ("delete", "counter", "stray-counter"),
        ("delete", "element", "hairpin"), ("delete", "element", "no-endpoint-drop"),
        ("delete", "element", "service-cidrs"),
        ("flush", "chain", GENERATED_CHAIN), ("flush", "chain", "stray"), ("flush", "chain", "stray-rules")]
    assert sorted(e.key for op in tx.ops for e in op.elements) == [
        "10.100.0.1-10.100.0.9", "10.244.9.9 . 10.244.9.9", "10.96.9.9 . tcp . 80"]
    assert [c.name for op in tx.ops for c in op.chains] == [GENERATED_CHAIN]
    deferred = diff(parsed, compiled, delete_chains=False).deferred_chain_deletes
    assert deferred == [("ip", "stray"), ("ip", "stray-rules")]
    assert diff(_parsed("drift", "ip6"), RECORDINGS["drift"].compiled().tables["ip6"]).operations == 0


# -- hand-written documents: what the recorded ones cannot show ------------------------------------


def _doc(*items: dict[str, Any]) -> dict[str, Any]:
    return {"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, *items]}


def _set(name: str, elem: list[Any], kind: str = "set", **body: Any) -> dict[str, Any]:
    return {kind: {"family": "ip", "name": name, "table": "kproxy", "handle": 1, **body, "elem": elem}}


def test_table_comment_and_set_flags_are_kept() -> None:
    """A table comment (printed by nft releases after 1.0.6) is kept, and a set's flags become its flags line."""
    table = parse_table(_doc({"table": {"family": "ip", "name": "kproxy", "handle": 1, "comment": "hello"}},
                             _set("cluster-cidrs", [], flags=["interval"])), "ip")
    assert table.comment == "hello"
    assert table.sets == {"cluster-cidrs": SetDecl("set", "cluster-cidrs", ("flags interval",))}
    assert table.sets["cluster-cidrs"].interval and table.elements == {"cluster-cidrs": {}}


def test_dynamic_flag_is_restored_for_the_skeletons_dynamic_sets() -> None:
    """Sets with timeouts (the datapath's) are dynamic whether nft prints the flag (newer releases) or not (1.0.6), and
    their elements (filled by the datapath) are never read; a set without timeouts stays as printed."""
    entry = {"elem": {"val": {"concat": ["198.51.100.7", "10.96.0.10", "tcp", 80, 1]}}}
    old = parse_table(_doc(_set("affinity", [entry], flags=["timeout"]), _set("other", [], flags=["interval"])), "ip")
    new = parse_table(_doc(_set("affinity", [entry], flags=["dynamic", "timeout"])), "ip")
    assert old.sets["affinity"].dynamic and new.sets["affinity"].dynamic
    assert old.sets["affinity"].body == ("flags timeout,dynamic",)
    assert new.sets["affinity"].body == ("flags dynamic,timeout",)
    assert "affinity" not in old.elements and "affinity" not in new.elements
    assert not old.sets["other"].dynamic and old.elements["other"] == {}


def test_elements_without_an_elem_wrapper_and_ranges() -> None:
    """Elements printed bare (no comment), ranges inside concatenations and verdicts without a target all read back."""
    table = parse_table(_doc(
        _set("firewall-allow", [{"concat": ["192.0.2.10", "tcp", 443, {"range": ["10.0.0.1", "10.0.0.9"]}]}],
             flags=["interval"]),
        _set("no-endpoint-services", [[{"concat": ["10.96.0.1", "udp", 53]}, {"accept": None}],
                                      [{"elem": {"val": {"concat": ["10.96.0.2", "udp", 53]}, "comment": "x"}},
                                       {"jump": {"target": "somewhere"}}]], kind="map", map="verdict"),
    ), "ip")
    assert table.elements["firewall-allow"] == {
        "192.0.2.10 . tcp . 443 . 10.0.0.1-10.0.0.9": Element("192.0.2.10 . tcp . 443 . 10.0.0.1-10.0.0.9")}
    assert table.elements["no-endpoint-services"] == {
        "10.96.0.1 . udp . 53": Element("10.96.0.1 . udp . 53", "accept"),
        "10.96.0.2 . udp . 53": Element("10.96.0.2 . udp . 53", "jump somewhere", "x")}


def test_rules_without_a_chain_object_and_non_digest_comments() -> None:
    """A rule's chain is known even before (or without) its chain object; a last comment that is not a digest,
    or a malformed one, gives no digest."""
    rule = {"family": "ip", "table": "kproxy", "handle": 2, "expr": [{"accept": None}]}
    table = parse_table(_doc(
        {"rule": {**rule, "chain": "early", "comment": DIGEST_PREFIX + "ABC123"}},
        {"chain": {"family": "ip", "table": "kproxy", "name": "early", "handle": 1}},
        {"rule": {**rule, "chain": "other", "comment": "kproxy-rules=abc"}},
        {"rule": {**rule, "chain": "other", "comment": "hello"}},
    ), "ip")
    assert table.chains["early"].fingerprint == ("ABC123", 1)
    assert table.chains["other"].fingerprint == ("", 2)


@pytest.mark.parametrize("document", [
    {"nftables": [{"table": {}, "chain": {}}]},
    {"nftables": ["table"]},
    _doc(_set("cluster-ips", [True])),
    _doc(_set("cluster-ips", [{"elem": {"val": {"unknown": 1}}}])),
    _doc(_set("cluster-ips", [[1, 2, 3]])),
], ids=["two-kinds-in-one-object", "not-an-object", "boolean-element", "unknown-value", "list-element"])
def test_what_does_not_look_like_nft_is_refused(document: dict[str, Any]) -> None:
    """Objects and element values nft never prints raise ReadbackError (a ValueError), not a wrong table."""
    with pytest.raises(ReadbackError):
        parse_table(document, "ip")


# -- the fixtures against this kernel and nft (root) -----------------------------------------------


def _write(path: Path, recorded: dict[Family, dict[str, Any]]) -> None:
    """The two documents, one nft object a line (reviewable diffs), as valid JSON."""
    parts = []
    for family in NFT_FAMILIES:
        items = ",\n".join("  " + json.dumps(item) for item in recorded[family]["nftables"])
        parts.append(f' "{family}": {{"nftables": [\n{items}\n ]}}')
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n")


def _without_metainfo(document: dict[str, Any]) -> list[Any]:
    return [item for item in document["nftables"] if "metainfo" not in item]


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(RECORDINGS))
def test_recorded_fixture_matches_this_kernel(name: str, empty_netns: Netns) -> None:
    """Loading the fixture's ruleset into a fresh namespace and listing it, with nft and with the backend's
    libnftables, gives the recorded JSON (nft's version aside), so the fixtures cannot rot silently.
    UPDATE_READBACK=1 rewrites them instead."""
    recording = RECORDINGS[name]
    empty_netns.nft("-f", "-", input=recording.script())
    if recording.extra:
        empty_netns.nft("-f", "-", input=recording.extra)
    recorded = {family: json.loads(empty_netns.nft("-j", "list", "table", family, "kproxy").stdout)
                for family in NFT_FAMILIES}
    path = DATA / f"{name}.json"
    if os.environ.get("UPDATE_READBACK"):
        DATA.mkdir(parents=True, exist_ok=True)
        _write(path, recorded)
    stored = _load(name)
    for family in NFT_FAMILIES:
        assert _without_metainfo(recorded[family]) == _without_metainfo(stored[family]), (
            f"{path.name} ({family}) differs from what this kernel and nft print; if intended, regenerate it "
            "with UPDATE_READBACK=1 (see the module docstring)")
    with empty_netns.entered():  # what kproxy itself reads (libnftables) is what nft printed
        backend = NftablesBackend()
        for family in NFT_FAMILIES:
            document = backend.list_json(family)
            assert document is not None
            assert _without_metainfo(document) == _without_metainfo(stored[family]), family
