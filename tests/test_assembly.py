"""The assembly on its own: one family's table kept up to date one Service at a time.

The proxier hands the assembly each changed Service's compiled part
(``set_service``) and sends only what the returned ``Touched`` names; a full
compile builds the same table through the same class in key order. So the
contract tested here is: the table after any sequence of changes is the table a
fresh ``compile_ruleset`` of the final cluster gives, and every object that
changed in a step is named in that step's ``Touched``. Services are built here
as model values and compiled with ``compile_service``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.cluster.model import (
    Cluster,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Protocol,
    Service,
    ServiceKey,
    ServicePort,
)
from kproxy.nft.objects import Chain, Element, Family, ServiceRules, Table
from kproxy.nft.statements import Verdict
from kproxy.rules.assembly import BASE, Assembly, Touched
from kproxy.rules.compiler import (
    NodeInfo,
    ProxyConfig,
    base_table,
    chain_name,
    compile_ruleset,
    compile_service,
    slot,
)

NODE_IP = "192.168.50.1"
NODE = NodeInfo("node-a", "zone-a", (NODE_IP, "fd00:50::1"), (NODE_IP, "fd00:50::1"))
CONFIG = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"), service_metrics="all")
"""Every port counts, so every port has chains of its own: the assembly tracks their owners too."""
A, B, C = ServiceKey("ns/a"), ServiceKey("ns/b"), ServiceKey("ns/c")


def _svc(name: str, ip: str = "10.96.0.1", port: int = 80, node_port: int | None = None,
         external_ips: tuple[str, ...] = (), **kw: Any) -> Service:
    kind = kw.pop("type", "NodePort" if node_port else "ClusterIP")
    return Service("ns", name, kind, (ip,), (ServicePort("http", "tcp", port, node_port),), external_ips, **kw)


def _eps(service_name: str, *addresses: str, node: str = "node-a", port: int = 8080) -> EndpointSlice:
    return EndpointSlice("ns", f"{service_name}-1", service_name, 4, (EndpointPort("http", "tcp", port),),
                         tuple(Endpoint(a, node_name=node) for a in addresses))


def _rules(service: Service, *slices: EndpointSlice, family: Family = "ip") -> ServiceRules:
    rules = compile_service(service, slices, family, NODE, CONFIG)
    assert rules is not None
    return rules


def _assembly(family: Family = "ip") -> Assembly:
    return Assembly(base_table(NODE, CONFIG, family))


def _compiled(parts: dict[ServiceKey, tuple[Service, tuple[EndpointSlice, ...]]], family: Family = "ip") -> Table:
    """The table a fresh full compile of these Services gives."""
    cluster = Cluster({k: s for k, (s, _) in parts.items()},
                      {eps.key: eps for _, slices in parts.values() for eps in slices})
    failed: dict[ServiceKey, str] = {}
    table = compile_ruleset(cluster, NODE, CONFIG, failed).tables[family]
    assert failed == {}
    return table


def _content(table: Table) -> tuple[Any, ...]:
    """A table's content, without the empty member dicts that removals leave (every reader takes them as absent)."""
    return (table.family, table.comment, table.sets, table.chains,
            {name: members for name, members in table.elements.items() if members}, table.counters)


@dataclass
class _Snapshot:
    chains: dict[str, Chain]
    elements: dict[tuple[str, str], Element]
    counters: dict[str, str]

    @classmethod
    def of(cls, table: Table) -> _Snapshot:
        return cls(dict(table.chains), {(s, k): e for s, members in table.elements.items() for k, e in members.items()},
                   dict(table.counters))

    def changed(self, other: _Snapshot) -> Touched:
        """What differs from ``other``: chain names, (set, key) pairs and counter names."""
        return Touched(
            {n for n in self.chains.keys() | other.chains.keys() if self.chains.get(n) != other.chains.get(n)},
            {k for k in self.elements.keys() | other.elements.keys() if self.elements.get(k) != other.elements.get(k)},
            {n for n in self.counters.keys() | other.counters.keys() if self.counters.get(n) != other.counters.get(n)},
        )


def _set(assembly: Assembly, key: ServiceKey, rules: ServiceRules | None) -> Touched:
    """``set_service``, checking that whatever changed in the table is named in what it returns."""
    before = _Snapshot.of(assembly.table)
    touched = assembly.set_service(key, rules)
    changed = before.changed(_Snapshot.of(assembly.table))
    assert changed.chains <= touched.chains, changed.chains - touched.chains
    assert changed.elements <= touched.elements, changed.elements - touched.elements
    assert changed.counters <= touched.counters, changed.counters - touched.counters
    return touched


def _slots(table: Table, frontend: str) -> dict[str, str]:
    """The endpoint slots of one frontend: slot key -> endpoint."""
    return {k: e.value for name, members in table.elements.items() if name.startswith("endpoints-")
            for k, e in members.items() if k.startswith(frontend + " . ")}


# -- one Service's contribution ------------------------------------------------------------------


def test_adding_and_removing_a_service() -> None:
    """A Service's part goes into the table as a full compile puts it, and removing it leaves the base table."""
    svc, eps = _svc("a"), _eps("a", "10.244.0.1", "10.244.0.2")
    assembly = _assembly()
    empty = _content(assembly.table)
    assert empty == _content(_compiled({}))
    rules = _rules(svc, eps)
    touched = _set(assembly, A, rules)
    assert _content(assembly.table) == _content(_compiled({A: (svc, (eps,))}))
    assert assembly.services() == {A}
    assert assembly.part(A) is rules
    assert touched.chains == {chain_name("svc", svc, svc.ports[0])}, "the pick chains are the base table's"
    assert touched.counters == {f"conns-{chain_name('svc', svc, svc.ports[0])[4:]}"}
    assert touched.elements == assembly.names_of(A).elements
    assert ("endpoints-4", f"10.96.0.1 . tcp . 80 . {slot(2, False)}") in touched.elements
    removed = _set(assembly, A, None)
    assert _content(assembly.table) == empty
    assert assembly.services() == set() and assembly.part(A) is None
    assert removed == touched


def test_replacing_a_service_part() -> None:
    """A new part replaces the old one whole: what it no longer has goes, and both old and new names are touched."""
    svc = _svc("a")
    small, large = _eps("a", "10.244.0.1"), _eps("a", *(f"10.244.0.{i}" for i in range(1, 7)))
    assembly = _assembly()
    _set(assembly, A, _rules(svc, small))
    old_names = assembly.names_of(A)
    touched = _set(assembly, A, _rules(svc, large))
    assert _content(assembly.table) == _content(_compiled({A: (svc, (large,))}))
    assert old_names.elements <= touched.elements and assembly.names_of(A).elements <= touched.elements
    assert ("class-8", "10.96.0.1 . tcp . 80") in touched.elements and ("class-4", "10.96.0.1 . tcp . 80") in touched.elements
    _set(assembly, A, _rules(_svc("a", node_port=30080), small))  # a NodePort now, one endpoint again
    assert "10.96.0.1 . tcp . 80" not in assembly.table.elements["class-8"]
    assert _content(assembly.table) == _content(_compiled({A: (_svc("a", node_port=30080), (small,))}))


def test_untracked_changes_report_no_elements() -> None:
    """With track=False (building a whole table) the elements are not listed; chains and counters still are."""
    assembly = _assembly()
    touched = assembly.set_service(A, _rules(_svc("a"), _eps("a", "10.244.0.1")), track=False)
    assert touched.elements == set()
    assert touched.chains and touched.counters
    assert "10.96.0.1 . tcp . 80" in assembly.table.elements["service-ips"]


def test_touched_operations() -> None:
    """Touched merges, subtracts and is false only when it names nothing."""
    one = Touched({"c1"}, {("s", "k1")}, {"n1"})
    one.update(Touched({"c2"}, {("s", "k2")}, set()))
    assert one == Touched({"c1", "c2"}, {("s", "k1"), ("s", "k2")}, {"n1"})
    one.discard(Touched({"c1"}, {("s", "k1")}, {"n1"}))
    assert one == Touched({"c2"}, {("s", "k2")}, set())
    assert one and Touched(counters={"n"}) and not Touched()


def test_base_is_replaced_like_a_service() -> None:
    """set_base swaps the node and config elements (touching the old and the new ones); the Services' parts stay."""
    assembly = _assembly()
    _set(assembly, A, _rules(_svc("a"), _eps("a", "10.244.0.1")))
    moved = NodeInfo("node-a", "zone-a", ("192.168.50.2",), ("192.168.50.2",))
    touched = assembly.set_base(base_table(moved, CONFIG, "ip"))
    assert {("nodeport-ips", NODE_IP), ("nodeport-ips", "192.168.50.2")} <= touched.elements
    assert set(assembly.table.elements["nodeport-ips"]) == {"192.168.50.2"}
    assert assembly.services() == {A} and "10.96.0.1 . tcp . 80" in assembly.table.elements["service-ips"]
    assert assembly.owners(elements=[("nodeport-ips", "192.168.50.2")]) == set(), "the base is nobody's to blame"


# -- chains two parts share ------------------------------------------------------------------------

SHARED = Chain("shared-x", ((Verdict("accept"),),), "a chain two parts both contribute")


def _with_shared(rules: ServiceRules, times: int = 1) -> ServiceRules:
    return dataclasses.replace(rules, chains=rules.chains + (SHARED,) * times)


def test_shared_chains_stay_while_one_user_remains() -> None:
    """A chain two parts contribute is counted per user: a second user does not touch it, and it goes with its last."""
    assembly = _assembly()
    a = _with_shared(_rules(_svc("a"), _eps("a", "10.244.0.1")))
    b = _with_shared(_rules(_svc("b", "10.96.0.2"), _eps("b", "10.244.0.2")))
    assert "shared-x" in _set(assembly, A, a).chains
    assert "shared-x" not in _set(assembly, B, b).chains
    assert assembly.chain("shared-x") is SHARED
    assert assembly.owners(chains=["shared-x"]) == set(), "a shared chain has no owner"
    assert "shared-x" not in assembly.owned(A).chains
    touched = _set(assembly, A, None)
    assert "shared-x" not in touched.chains and assembly.chain("shared-x") is SHARED
    assert assembly.owners(chains=["shared-x"]) == {B} and "shared-x" in assembly.owned(B).chains
    assert "shared-x" in _set(assembly, B, None).chains
    assert assembly.chain("shared-x") is None


def test_a_part_holding_a_chain_twice_releases_both_uses() -> None:
    """A part with the shared chain twice holds it twice; replacing it by a part with it once keeps it; removing, not."""
    assembly = _assembly()
    _set(assembly, A, _with_shared(_rules(_svc("a"), _eps("a", "10.244.0.1")), times=2))
    _set(assembly, A, _with_shared(_rules(_svc("a"), _eps("a", "10.244.0.1"))))
    assert "shared-x" in assembly.table.chains
    _set(assembly, A, None)
    assert "shared-x" not in assembly.table.chains


# -- element keys and frontends that several Services contribute ---------------------------------


def test_a_contested_element_goes_to_the_first_service_in_key_order() -> None:
    """Two Services with one ClusterIP: the first in key order wins, whatever the order they come in; its removal
    hands the key over."""
    a, b = _svc("a"), _svc("b")  # the same ClusterIP and port
    a_eps, b_eps = _eps("a", "10.244.0.1"), _eps("b", "10.244.0.2", "10.244.0.3")
    assembly = _assembly()
    _set(assembly, B, _rules(b, b_eps))
    _set(assembly, A, _rules(a, a_eps))
    dispatch = assembly.table.elements["service-ips"]["10.96.0.1 . tcp . 80"]
    assert dispatch.value == f"goto {chain_name('svc', a, a.ports[0])}"
    assert assembly.element_owner("service-ips", "10.96.0.1 . tcp . 80") == A
    slot1 = f"10.96.0.1 . tcp . 80 . {slot(1, False)}"
    assert _slots(assembly.table, "10.96.0.1 . tcp . 80") == {slot1: "10.244.0.1 . 8080"}
    assert _content(assembly.table) == _content(_compiled({A: (a, (a_eps,)), B: (b, (b_eps,))}))
    _set(assembly, A, None)
    assert assembly.element_owner("service-ips", "10.96.0.1 . tcp . 80") == B
    assert len(_slots(assembly.table, "10.96.0.1 . tcp . 80")) == 2
    assert _content(assembly.table) == _content(_compiled({B: (b, (b_eps,))}))


def test_an_address_frontend_wins_over_a_nodeport_before_key_order() -> None:
    """An external IP equal to the node IP on another Service's NodePort: the address frontend's slots are the ones
    in the table, though that Service sorts later; when it goes the NodePort's come in, and go again when it is back."""
    frontend = f"{NODE_IP} . tcp . 30080"
    nodeport, np_eps = _svc("a", node_port=30080), _eps("a", "10.244.1.1", "10.244.1.2")
    external = _svc("b", "10.96.0.2", port=30080, external_ips=(NODE_IP,))
    ext_eps = _eps("b", "10.244.2.1", port=9090)
    assembly = _assembly()
    _set(assembly, A, _rules(nodeport, np_eps))
    assert sorted(_slots(assembly.table, frontend).values()) == ["10.244.1.1 . 8080", "10.244.1.2 . 8080"]
    touched = _set(assembly, B, _rules(external, ext_eps))
    assert _slots(assembly.table, frontend) == {f"{frontend} . {slot(1, False)}": "10.244.2.1 . 9090"}
    assert {(m, k) for m, k in touched.elements if k.startswith(frontend + " . ")} == {
        ("endpoints-4", f"{frontend} . {slot(1, False)}"), ("endpoints-4", f"{frontend} . {slot(2, False)}")}
    assert assembly.element_owner("endpoints-4", f"{frontend} . {slot(1, False)}") == B
    assert _content(assembly.table) == _content(_compiled({A: (nodeport, (np_eps,)), B: (external, (ext_eps,))}))
    _set(assembly, B, None)
    assert sorted(_slots(assembly.table, frontend).values()) == ["10.244.1.1 . 8080", "10.244.1.2 . 8080"]
    assert assembly.element_owner("endpoints-4", f"{frontend} . {slot(2, False)}") == A
    _set(assembly, B, _rules(external, ext_eps))
    assert list(_slots(assembly.table, frontend).values()) == ["10.244.2.1 . 9090"], "never A's slot 2 behind B's"


def test_the_losing_service_does_not_touch_the_frontend_it_lost() -> None:
    """A change of the Service that lost a frontend names none of that frontend's slots, and they stay the winner's."""
    frontend = f"{NODE_IP} . tcp . 30080"
    assembly = _assembly()
    _set(assembly, B, _rules(_svc("b", "10.96.0.2", port=30080, external_ips=(NODE_IP,)), _eps("b", "10.244.2.1")))
    _set(assembly, A, _rules(_svc("a", node_port=30080), _eps("a", "10.244.1.1")))
    before = _slots(assembly.table, frontend)
    touched = _set(assembly, A, _rules(_svc("a", node_port=30080), _eps("a", "10.244.1.1", "10.244.1.2")))
    assert not [k for _, k in touched.elements if k.startswith(frontend + " . ")]
    assert _slots(assembly.table, frontend) == before
    assert not [k for _, k in assembly.owned(A).elements if k.startswith(frontend + " . ")]
    assert {k for _, k in assembly.owned(B).elements if k.startswith(frontend + " . ")} == set(before)


def test_a_load_balancer_firewall_belongs_to_the_frontends_owner() -> None:
    """Two LoadBalancers on one IP and port with different source ranges: only the first one's ranges are allowed."""
    def lb(name: str, ip: str, ranges: tuple[str, ...]) -> Service:
        return _svc(name, ip, node_port=30000 + int(ip[-1]), type="LoadBalancer", load_balancer_ips=("192.0.2.10",),
                    load_balancer_source_ranges=ranges)

    a, b = lb("a", "10.96.0.1", ("203.0.113.0/24",)), lb("b", "10.96.0.2", ("198.51.100.0/24",))
    a_eps, b_eps = _eps("a", "10.244.0.1"), _eps("b", "10.244.0.2")
    assembly = _assembly()
    _set(assembly, B, _rules(b, b_eps))
    assert set(assembly.table.elements["firewall-allow"]) == {"192.0.2.10 . tcp . 80 . 198.51.100.0/24"}
    _set(assembly, A, _rules(a, a_eps))
    assert set(assembly.table.elements["firewall-allow"]) == {"192.0.2.10 . tcp . 80 . 203.0.113.0/24"}
    assert _content(assembly.table) == _content(_compiled({A: (a, (a_eps,)), B: (b, (b_eps,))}))
    _set(assembly, A, None)
    assert set(assembly.table.elements["firewall-allow"]) == {"192.0.2.10 . tcp . 80 . 198.51.100.0/24"}


def test_parts_names_and_owners_read_back() -> None:
    """part() gives the contribution as set; names_of() every name in it; owned() what the Service alone decides."""
    a, a_eps = _svc("a"), _eps("a", "10.244.0.1")
    a_rules = _rules(a, a_eps)
    assembly = _assembly()
    _set(assembly, A, a_rules)
    _set(assembly, B, _rules(_svc("b"), _eps("b", "10.244.0.1")))  # same ClusterIP, same endpoint: all contested
    assert assembly.part(A) is a_rules and assembly.part(C) is None and assembly.part(BASE) is not None
    names = assembly.names_of(A)
    assert names.chains == {c.name for c in a_rules.chains}
    assert names.counters == {n for n, _ in a_rules.counters}
    assert names.elements >= {(s, e.key) for s, e in a_rules.elements}
    assert assembly.owned(A).elements == names.elements, "A wins every key it shares with B"
    assert assembly.owned(B).elements == set()
    assert assembly.owners(elements=[("hairpin", "10.244.0.1 . 10.244.0.1")]) == {A}
    assert assembly.owners(counters=[n for n, _ in a_rules.counters]) == {A}
    assert assembly.names_of(C) == Touched() and assembly.owned(C) == Touched()


def _offered(assembly: Assembly, key: ServiceKey) -> dict[tuple[str, str], Element]:
    """Every element ``key``'s part holds, the first one of each (set, key), its frontends' slots included."""
    part = assembly.part(key)
    assert part is not None
    offered: dict[tuple[str, str], Element] = {}
    for name, element in [*part.elements, *(item for _, _, items in part.slots for item in items)]:
        offered.setdefault((name, element.key), element)
    return offered


# -- any sequence of changes equals a fresh compile ------------------------------------------------

KEYS = [ServiceKey(f"ns/{n}") for n in "abcd"]
FAMILIES: tuple[Family, ...] = ("ip", "ip6")
V4_ENDPOINTS = [f"10.244.0.{i}" for i in range(1, 7)]
V6_ENDPOINTS = [f"fd00:244::{i}" for i in range(1, 4)]


@st.composite
def _variant(draw: st.DrawFn, name: str) -> tuple[Service, tuple[EndpointSlice, ...]]:
    """One Service and its slices, from a small space where Services often collide: on ClusterIPs (contested
    elements, address frontends of equal rank), on the node IP (an external IP on another's NodePort), on
    load-balancer IPs (firewalls) and on endpoints (hairpin elements). Repeated choices are the likelier ones."""
    proto: Protocol = draw(st.sampled_from(["tcp", "tcp", "tcp", "udp"]))
    kinds: list[Literal["ClusterIP", "NodePort", "LoadBalancer"]] = ["ClusterIP", "NodePort", "LoadBalancer"]
    kind = draw(st.sampled_from(kinds))
    ips = draw(st.sampled_from([("10.96.0.1",), ("10.96.0.1", "fd00:96::1"), ("10.96.0.2",), ("fd00:96::1",)]))
    node_port = draw(st.sampled_from([30080, 30080, 30080, 30081])) if kind != "ClusterIP" else None
    lb_ips = draw(st.sampled_from([("192.0.2.10",), ("192.0.2.10", "fd00:192::10")])) if kind == "LoadBalancer" else ()
    ranges = draw(st.sampled_from([(), ("203.0.113.0/24",), ("192.168.50.0/24", "fd00:50::/64")])) if lb_ips else ()
    external_ips = draw(st.sampled_from([(), (NODE_IP,), (NODE_IP,), ("10.96.0.2",), ("198.51.100.1", "fd00:96::1")]))
    port = 30080 if NODE_IP in external_ips else draw(st.sampled_from([80, 80, 30080]))
    service = Service(
        "ns", name, kind, ips, (ServicePort("http", proto, port, node_port),),
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=ranges,
        affinity_timeout=draw(st.sampled_from([None, None, 60])),
        external_policy_local=kind != "ClusterIP" and draw(st.booleans()),
        internal_policy_local=draw(st.sampled_from([False, False, True])),
    )
    slices = []
    for family, pool, suffix in ((4, V4_ENDPOINTS, "v4"), (6, V6_ENDPOINTS, "v6")):
        chosen = draw(st.lists(st.sampled_from(pool), max_size=len(pool), unique=True))
        endpoints = tuple(Endpoint(address, ready=i > 0 or draw(st.sampled_from([True, True, False])),
                                   node_name=draw(st.sampled_from(["node-a", "node-b"])))
                          for i, address in enumerate(chosen))
        slices.append(EndpointSlice("ns", f"{name}-{suffix}", name, family,  # type: ignore[arg-type]
                                    (EndpointPort("http", proto, draw(st.sampled_from([8080, 9090]))),), endpoints))
    return service, tuple(slices)


def _step(key: ServiceKey) -> st.SearchStrategy[tuple[ServiceKey, tuple[Service, tuple[EndpointSlice, ...]] | None]]:
    """A change of one Service: a new version three times in four, its removal once."""
    variant = _variant(key.split("/")[1])
    return st.tuples(st.just(key), st.one_of(st.none(), variant, variant, variant))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(KEYS).flatmap(_step), min_size=1, max_size=12))
def test_any_sequence_of_changes_equals_a_fresh_compile(
        steps: list[tuple[ServiceKey, tuple[Service, tuple[EndpointSlice, ...]] | None]]) -> None:
    """Adding, changing and removing Services in any order leaves each family's table equal to a full compile of
    what is there at the end (and after every step), every change is named in what set_service returns, and every
    element has exactly one owner, whose part holds that very element."""
    assemblies = {family: _assembly(family) for family in FAMILIES}
    cluster: dict[ServiceKey, tuple[Service, tuple[EndpointSlice, ...]]] = {}
    for key, variant in steps:
        if variant is None:
            cluster.pop(key, None)
        else:
            cluster[key] = variant
        for family, assembly in assemblies.items():
            rules = compile_service(variant[0], variant[1], family, NODE, CONFIG) if variant is not None else None
            _set(assembly, key, rules)
            assert _content(assembly.table) == _content(_compiled(cluster, family))
            owned = [assembly.owned(k).elements for k in cluster]
            assert sum(len(o) for o in owned) == len(set().union(*owned)), "two Services own one element"
            for name, members in assembly.table.elements.items():
                for element_key, element in members.items():
                    owner = assembly.element_owner(name, element_key)
                    assert owner is not None, (name, element_key)
                    assert _offered(assembly, owner).get((name, element_key)) == element, "the owner's element"


def test_blame_finds_the_owners_of_endpoint_slots_by_their_frontends() -> None:
    """Slots are not indexed element by element (a full build adds 130k): a refused element command that holds the
    slots of two Services' frontends, and an element nobody holds, blames exactly the two, after a hand-over too."""
    frontend = f"{NODE_IP} . tcp . 30080"
    assembly = _assembly()
    _set(assembly, A, _rules(_svc("a", node_port=30080), _eps("a", "10.244.1.1", "10.244.1.2")))
    _set(assembly, C, _rules(_svc("c", "10.96.0.3"), _eps("c", "10.244.3.1")))
    refused = [("endpoints-4", f"{frontend} . {slot(2, False)}"),
               ("endpoints-4", f"10.96.0.3 . tcp . 80 . {slot(1, False)}"),
               ("endpoints-4", f"10.96.0.99 . tcp . 80 . {slot(1, False)}")]
    assert assembly.owners(elements=refused) == {A, C}
    assert assembly.element_owner(*refused[2]) is None
    _set(assembly, B, _rules(_svc("b", "10.96.0.2", port=30080, external_ips=(NODE_IP,)), _eps("b", "10.244.2.1")))
    assert assembly.owners(elements=[("endpoints-4", f"{frontend} . {slot(1, False)}")]) == {B}
    assert assembly.owners(elements=refused) == {C}, "A's slot 2 left the table with the frontend it lost"
