"""The sync engine against the fake backend: partial syncs, failures, drift, deferred deletes."""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from kproxy.daemon.proxier import CHAIN_DELETE_DELAY, DELETED_SERVICE_REJECT, NullObserver, Proxier
from kproxy.daemon.runner import SyncRunner
from kproxy.nft.fake import FakeBackend
from kproxy.nft.kernel import NftError
from kproxy.nft.objects import Transaction
from kproxy.node.conntrack import FakeConntrack, FlowEntry
from kproxy.rules.compiler import ProxyConfig, compile_ruleset, node_info
from kproxy.rules.plan import plan
from tests.harness.builders import endpoint, endpoint_slice, node, service

CONFIG = ProxyConfig(cluster_cidrs=("10.244.0.0/16",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _svc(i: int, **spec: Any) -> dict[str, Any]:
    """Service ``ns/s{i}``; s3 counts its new connections (``kproxy.io/metrics``), so it has chains of its own
    among Services that have none."""
    annotations = {"kproxy.io/metrics": "true"} if i == 3 else None
    return service(f"s{i}", "ns", f"10.96.0.{i + 1}", annotations=annotations, **spec)


def _slice(i: int, n: int = 2, **kw: Any) -> dict[str, Any]:
    return endpoint_slice(f"s{i}-x", f"s{i}", [endpoint(f"10.244.{i}.{j + 1}") for j in range(n)], namespace="ns", **kw)


def _proxier(services: int = 5, **kw: Any) -> tuple[Proxier, FakeBackend, Clock]:
    backend, clock = FakeBackend(), Clock()
    proxier = Proxier(backend, "node-a", CONFIG, clock=clock, **kw)
    proxier.on_relist("Node", [node("node-a")])
    proxier.on_relist("Service", [_svc(i) for i in range(services)])
    proxier.on_relist("EndpointSlice", [_slice(i) for i in range(services)])
    return proxier, backend, clock


def _expected(proxier: Proxier):  # type: ignore[no-untyped-def]
    cluster = proxier.cluster()
    return compile_ruleset(cluster, node_info("node-a", cluster.node), CONFIG)


def test_first_sync_is_full_and_matches_a_full_compile() -> None:
    """The first sync programs exactly what compiling the whole cluster gives."""
    proxier, backend, _ = _proxier()
    assert proxier.ready
    result = proxier.sync()
    assert result.full and result.operations > 0
    assert plan(backend.read(), _expected(proxier)).operations == 0


def test_the_first_full_sync_is_bracketed_for_the_drift_watcher() -> None:
    """``before`` as the first full sync starts, ``after`` once it has committed, both under the lock and only once;
    a late registration is called at once."""
    proxier, backend, _ = _proxier()
    calls: list[tuple[str, int, bool]] = []

    def record(what: str) -> Callable[[], None]:
        return lambda: calls.append((what, backend.commits, proxier.lock._is_owned()))  # type: ignore[attr-defined]

    proxier.bracket_first_full_sync(record("before"), record("after"))
    proxier.sync()
    assert calls == [("before", 0, True), ("after", backend.commits, True)] and backend.commits > 0
    proxier.on_slice("MODIFIED", _slice(1, 5))
    proxier.request_full_sync()
    proxier.sync()
    assert len(calls) == 2, "only the first full sync"
    late: list[tuple[str, int, bool]] = []
    proxier.bracket_first_full_sync(lambda: late.append(("before", 0, True)), lambda: late.append(("after", 0, True)))
    assert late == [("before", 0, True), ("after", 0, True)]


def test_one_endpoint_change_is_a_minimal_partial_sync() -> None:
    """Adding one endpoint adds its slot in the endpoints map and its hairpin element; no rule changes."""
    proxier, backend, _ = _proxier(50)
    proxier.sync()
    proxier.on_slice("MODIFIED", _slice(7, 3))
    result = proxier.sync()
    assert not result.full
    ops = backend.last.ops
    assert not [op for op in ops if op.kind in ("chain", "rule", "rules")]
    assert result.operations == 2
    added = sorted((op.verb, op.name, e.key, e.value) for op in ops if op.kind == "element" for e in op.elements)
    assert [(verb, name) for verb, name, _, _ in added] == [("add", "endpoints-4"), ("add", "hairpin")]
    assert added[0][2].endswith(f" . {3 << 16}") and added[0][3] == "10.244.7.3 . 8080"
    assert plan(backend.read(), _expected(proxier)).operations == 0


def test_changes_that_cancel_out_cost_nothing() -> None:
    """A change and its reversal between two syncs send no transaction."""
    proxier, backend, _ = _proxier()
    proxier.sync()
    count = len(backend.transactions)
    proxier.on_slice("MODIFIED", _slice(1, 4))
    proxier.on_slice("MODIFIED", _slice(1, 2))
    proxier.on_service("DELETED", _svc(2))
    proxier.on_service("ADDED", _svc(2))
    result = proxier.sync()
    assert result.operations == 0 and len(backend.transactions) == count


def test_service_removal_defers_chain_deletion() -> None:
    """A deleted Service's chains are flushed and dereferenced now, deleted a second later."""
    proxier, backend, clock = _proxier()
    proxier.sync()
    proxier.on_service("DELETED", _svc(3))
    proxier.sync()
    leftovers = [n for n in backend.tables["ip"].chains if "ns/s3/" in n]
    assert leftovers and all(not backend.chain_rules("ip", n) for n in leftovers)
    assert "10.96.0.4 . tcp . 80" not in backend.elements("ip", "service-ips")
    assert not proxier.has_work(clock.now)
    clock.now += CHAIN_DELETE_DELAY
    assert proxier.has_work(clock.now)
    proxier.sync()
    assert not [n for n in backend.tables["ip"].chains if "ns/s3/" in n]
    # The deleted Service's ClusterIP is still rejected for a while, then forgotten.
    assert backend.elements("ip", "cluster-ips")["10.96.0.4"].comment == "ns/s3, deleted"
    clock.now += DELETED_SERVICE_REJECT
    assert proxier.has_work(clock.now)
    proxier.sync()
    assert "10.96.0.4" not in backend.elements("ip", "cluster-ips")
    assert plan(backend.read(), _expected(proxier)).operations == 0


def test_service_back_before_its_chain_is_deleted() -> None:
    """A Service deleted and re-created within the delay reuses its flushed chain."""
    proxier, backend, clock = _proxier()
    proxier.sync()
    proxier.on_service("DELETED", _svc(3))
    proxier.sync()
    proxier.on_service("ADDED", _svc(3))
    proxier.sync()
    clock.now += 2 * CHAIN_DELETE_DELAY
    proxier.sync()
    assert plan(backend.read(), _expected(proxier)).operations == 0


class RefusingBackend(FakeBackend):
    """The fake kernel, refusing every transaction for which ``refuse(op text)`` holds for one of its commands."""

    def __init__(self, refuse: Callable[[str], bool] = lambda text: False) -> None:
        super().__init__()
        self.refuse = refuse
        self.refused = 0

    def apply(self, tx: Transaction) -> None:
        if any(self.refuse(op.render()) for op in tx.ops):
            self.refused += 1
            raise NftError("Invalid argument", "injected refusal")
        super().apply(tx)


def _proxier_on(backend: FakeBackend, services: int = 5, **kw: Any) -> tuple[Proxier, Clock]:
    clock = Clock()
    proxier = Proxier(backend, "node-a", CONFIG, clock=clock, **kw)
    proxier.on_relist("Node", [node("node-a")])
    proxier.on_relist("Service", [_svc(i) for i in range(services)])
    proxier.on_relist("EndpointSlice", [_slice(i) for i in range(services)])
    return proxier, clock


def test_refusal_no_service_explains_fails_the_sync_and_changes_nothing() -> None:
    """A kernel refusing everything: the sync fails, the kernel is unchanged, and the next sync converges."""
    backend = RefusingBackend()
    proxier, _ = _proxier_on(backend)
    proxier.sync()
    before = backend.read()
    proxier.on_slice("MODIFIED", _slice(1, 5))
    backend.refuse = lambda text: True
    with pytest.raises(NftError):
        proxier.sync()
    assert {n: c.fingerprint for n, c in backend.read().tables["ip"].chains.items()} == {
        n: c.fingerprint for n, c in before.tables["ip"].chains.items()
    }
    assert backend.read().tables["ip"].elements == before.tables["ip"].elements
    assert not proxier.quarantined, "no Service is blamed for a refusal of everything"
    backend.refuse = lambda text: False
    assert proxier.sync().full
    assert plan(backend.read(), _expected(proxier)).operations == 0


def test_one_passing_refusal_is_retried_in_the_same_sync() -> None:
    """A partial sync the kernel refuses once is tried again piece by piece in the same sync; nothing is quarantined."""
    proxier, backend, _ = _proxier()
    proxier.sync()
    proxier.on_slice("MODIFIED", _slice(1, 5))
    backend.fail_next = NftError("Device or resource busy", "add rule ...")
    assert not proxier.sync().full
    assert not proxier.quarantined
    assert plan(backend.read(), _expected(proxier)).operations == 0


def test_failed_sync_reports_its_duration() -> None:
    """A failed sync is counted with the time it took, as upstream's sync latency counts every attempt."""
    failures: list[tuple[bool, float]] = []

    class Observer(NullObserver):
        def sync_failed(self, full: bool, seconds: float) -> None:
            failures.append((full, seconds))

    backend = RefusingBackend()
    proxier, clock = _proxier_on(backend, observer=Observer())
    proxier.sync()
    proxier.on_slice("MODIFIED", _slice(1, 5))

    def slow_refusal(text: str) -> bool:
        clock.now += 0.5
        return True

    backend.refuse = slow_refusal
    with pytest.raises(NftError):
        proxier.sync()
    # the partial attempt (its transaction, then a probe), then the full one it escalated to (the same)
    assert failures == [(False, 1.0), (True, 1.0)]


def test_drift_repaired_by_full_sync() -> None:
    """A table deleted by hand breaks the next partial sync; the full sync that follows at once restores it."""
    proxier, backend, _ = _proxier()
    proxier.sync()
    backend.delete_tables()
    proxier.on_slice("MODIFIED", _slice(0, 3))
    assert proxier.sync().full
    assert not proxier.quarantined
    assert plan(backend.read(), _expected(proxier)).operations == 0


def test_kernel_refusing_one_service_quarantines_it_alone() -> None:
    """The kernel refuses whatever names ns/s2: s2 keeps its old rules, every other change lands, s2 is retried when it changes."""
    seen: list[tuple[str, str]] = []

    class Observer(NullObserver):
        def invalid_object(self, kind: str, reason: str) -> None:
            seen.append((kind, reason))

    backend = RefusingBackend()
    proxier, _ = _proxier_on(backend, services=8, observer=Observer())
    proxier.sync()
    old_s2 = {k: e for k, e in backend.elements("ip", "endpoints-4").items() if k.startswith("10.96.0.3 ")}
    backend.refuse = lambda text: "ns/s2:" in text
    for i in (1, 2, 6):
        proxier.on_slice("MODIFIED", _slice(i, 3))
    proxier.on_service("ADDED", _svc(9))
    proxier.on_slice("ADDED", _slice(9, 2))
    proxier.sync()
    assert set(proxier.quarantined) == {"ns/s2"}
    assert seen == [("Service", "kernel_refused")]
    ep4 = backend.elements("ip", "endpoints-4")
    assert {k: e for k, e in ep4.items() if k.startswith("10.96.0.3 ")} == old_s2, "s2 keeps its previous endpoints"
    for i in (1, 6):
        assert sum(k.startswith(f"10.96.0.{i + 1} ") for k in ep4) == 3, f"s{i} got its third endpoint"
    assert "10.96.0.10 . tcp . 80" in backend.elements("ip", "service-ips"), "the new Service is programmed"
    assert any(p.key == "ns/s2" and p.reason == "kernel_refused" for p in proxier.skipped())

    proxier.on_slice("MODIFIED", _slice(4, 1))  # another change: s2 is not retried, and not logged again
    refused = backend.refused
    proxier.sync()
    assert backend.refused == refused and seen == [("Service", "kernel_refused")]

    backend.refuse = lambda text: False
    proxier.on_slice("MODIFIED", _slice(2, 4))  # s2 changes: retried, and it lands
    proxier.sync()
    assert not proxier.quarantined
    assert plan(backend.read(), _expected(proxier)).operations == 0


def test_kernel_refusing_one_service_at_a_full_sync() -> None:
    """At startup (a full sync against an existing table) a refused Service is found by bisection; the rest lands."""
    backend = RefusingBackend()
    proxier, _ = _proxier_on(backend, services=6)
    proxier.sync()
    backend.refuse = lambda text: "ns/s4:" in text
    restarted, _ = _proxier_on(backend, services=6)
    restarted.on_slice("MODIFIED", _slice(4, 3))
    restarted.on_slice("MODIFIED", _slice(0, 3))
    restarted.sync()
    assert set(restarted.quarantined) == {"ns/s4"}
    assert sum(k.startswith("10.96.0.1 ") for k in backend.elements("ip", "endpoints-4")) == 3


def test_a_refused_full_sync_leaves_no_frame_for_the_freeze_to_keep() -> None:
    """The refusal of a full sync is kept without its traceback: with it, the sync's frame (and its whole desired
    table) stayed in a reference cycle, which the gc.freeze() after every full sync kept for good."""
    import gc
    import types

    backend = RefusingBackend()
    proxier, _ = _proxier_on(backend, services=6)
    proxier.sync()
    backend.refuse = lambda text: "ns/s4:" in text
    restarted, _ = _proxier_on(backend, services=6)
    restarted.on_slice("MODIFIED", _slice(4, 3))
    restarted.sync()
    assert set(restarted.quarantined) == {"ns/s4"}
    gc.unfreeze()  # what the proxier froze comes back into view (nothing else in this process relies on it)
    gc.collect()  # garbage from earlier tests goes; what the live proxier still reaches stays
    left = [o for o in gc.get_objects() if isinstance(o, types.FrameType) and o.f_locals.get("self") is restarted]
    assert left == []


def test_compile_error_quarantines_one_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Service the compiler chokes on is quarantined; the others are programmed."""
    import kproxy.daemon.proxier as proxier_module

    real = proxier_module.compile_service

    def flaky(service: Any, *args: Any) -> Any:
        if service.name == "s3":
            raise RuntimeError("boom")
        return real(service, *args)

    monkeypatch.setattr(proxier_module, "compile_service", flaky)
    proxier, backend, _ = _proxier()
    proxier.sync()
    assert set(proxier.quarantined) == {"ns/s3"} and proxier.quarantined["ns/s3"].reason == "compile_error"
    assert "10.96.0.4 . tcp . 80" not in backend.elements("ip", "service-ips")
    assert "10.96.0.5 . tcp . 80" in backend.elements("ip", "service-ips")


def test_problems_are_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    """The same bad Service seen again (a relist, a status update) is not logged again; a new problem is; a fix is noted."""
    proxier, _, _ = _proxier()
    bad = _svc(7, externalIPs=["127.0.0.1"])
    with caplog.at_level("WARNING", logger="kproxy.daemon.proxier"):
        proxier.on_service("ADDED", bad)
        proxier.on_service("MODIFIED", bad)
        proxier.on_relist("Service", [_svc(i) for i in range(5)] + [bad])
    assert sum("ns/s7" in r.getMessage() for r in caplog.records) == 1, caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="kproxy.daemon.proxier"):
        proxier.on_service("MODIFIED", _svc(7))
    assert "no longer skipped" in caplog.text
    assert not proxier.skipped()


def test_conflicting_services_are_named_once(caplog: pytest.LogCaptureFixture) -> None:
    """Two Services on one external IP:port: one warning naming both and the winner, not repeated on updates."""
    proxier, _, _ = _proxier()
    with caplog.at_level("WARNING", logger="kproxy.daemon.proxier"):
        proxier.on_service("ADDED", service("x", "ns", "10.96.1.1", externalIPs=["198.51.100.7"]))
        proxier.on_service("ADDED", service("y", "ns", "10.96.1.2", externalIPs=["198.51.100.7"]))
        proxier.on_service("MODIFIED", service("y", "ns", "10.96.1.2", externalIPs=["198.51.100.7"], labels={"a": "b"}))
    lines = [r.getMessage() for r in caplog.records if "both claim" in r.getMessage()]
    assert lines == ["Services ns/x and ns/y both claim 198.51.100.7 tcp/80; ns/x gets it (the first by namespace/name), "
                     "ns/y does not"]


def test_pod_cidrs_outside_cluster_cidr_are_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    """A Node whose podCIDRs clusterCIDR does not cover: one warning naming both, again only when they change."""
    proxier, _, _ = _proxier()
    with caplog.at_level("WARNING", logger="kproxy.daemon.proxier"):
        proxier.on_node("MODIFIED", node("node-a", pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"]))
    assert not caplog.records, caplog.text  # inside 10.244.0.0/16; no IPv6 clusterCIDR to compare with
    with caplog.at_level("WARNING", logger="kproxy.daemon.proxier"):
        proxier.on_node("MODIFIED", node("node-a", pod_cidrs=["192.168.7.0/24"]))
        proxier.on_relist("Node", [node("node-a", pod_cidrs=["192.168.7.0/24"])])
        proxier.on_node("MODIFIED", node("node-a", zone="zone-b", pod_cidrs=["192.168.7.0/24"]))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, caplog.text
    assert "192.168.7.0/24" in lines[0] and "clusterCIDR 10.244.0.0/16" in lines[0] and "node-a" in lines[0]


def test_outside() -> None:
    from kproxy.cluster.validate import outside
    assert outside(["10.244.1.0/24", "10.0.0.0/8", "10.245.0.0/24"], ["10.244.0.0/16"]) == [
        "10.0.0.0/8", "10.245.0.0/24"]
    assert outside(["fd00::/64"], ["10.0.0.0/8"]) == []
    assert outside(["fd00::/64", "10.1.0.0/24"], ["10.0.0.0/8", "fd00::/48"]) == []
    assert outside(["10.1.0.0/24"], []) == []


def test_node_zone_change_forces_full_sync() -> None:
    """A change of the node's labels (its zone) is picked up by a full sync."""
    proxier, _, _ = _proxier()
    proxier.sync()
    proxier.on_node("MODIFIED", node("node-a", zone="zone-b"))
    assert proxier.sync().full


def test_invalid_objects_are_skipped_and_counted() -> None:
    """A bad Service is skipped with a warning and reported to the observer; others still sync."""
    seen: list[tuple[str, str]] = []

    class Observer:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return lambda *a, **k: None

        def invalid_object(self, kind: str, reason: str) -> None:
            seen.append((kind, reason))

    proxier, backend, _ = _proxier(observer=Observer())
    proxier.on_service("ADDED", service("bad", "ns", "10.96.9.999"))
    proxier.sync()
    assert seen == [("Service", "invalid_ip")]
    assert "10.96.0.1 . tcp . 80" in backend.elements("ip", "service-ips")


def test_udp_conntrack_cleaned_after_endpoint_change() -> None:
    """After a sync that replaced a UDP endpoint, its stale conntrack entry is deleted."""
    udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    stale = FlowEntry(4, 17, "10.244.9.9", "10.96.0.1", 40000, 53, "10.244.0.1", 53)
    current = FlowEntry(4, 17, "10.244.9.8", "10.96.0.1", 40001, 53, "10.244.0.2", 53)
    conntrack = FakeConntrack([stale, current])
    proxier, _, _ = _proxier(1, conntrack=conntrack)
    proxier.on_service("MODIFIED", _svc(0, ports=udp))
    proxier.on_slice("MODIFIED", endpoint_slice("s0-x", "s0", [endpoint("10.244.0.2")], namespace="ns",
                                                ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    proxier.sync()
    assert conntrack.deleted == [stale]


def test_runner_waits_for_both_lists_then_syncs() -> None:
    """Nothing is programmed before Services, EndpointSlices (and the Node) are listed; then it syncs at once."""
    backend = FakeBackend()
    proxier = Proxier(backend, "node-a", CONFIG)
    stop = threading.Event()
    runner = SyncRunner(proxier, 0.0, 30.0, stop)
    runner.start()
    try:
        proxier.on_relist("Node", [])
        proxier.on_relist("Service", [_svc(0)])
        with proxier.lock:
            assert not proxier.changed.wait_for(lambda: proxier.sync_count > 0, timeout=0.3)
        assert backend.transactions == []
        proxier.on_relist("EndpointSlice", [_slice(0)])
        with proxier.lock:
            assert proxier.changed.wait_for(lambda: proxier.sync_count > 0, timeout=5)
    finally:
        stop.set()
        runner.wake()
        runner.join(5)
    assert backend.transactions


def test_rule_and_element_gauges_follow_partial_syncs() -> None:
    """The rule count reported after partial syncs (kept incrementally) equals a recount of the tables."""

    reported: list[tuple[int, int]] = []

    class Observer(NullObserver):
        def sync_done(self, full: bool, seconds: float, operations: int, rules: int, elements: int) -> None:
            reported.append((rules, elements))

    proxier, backend, _ = _proxier(observer=Observer())
    proxier.sync()
    proxier.on_service("ADDED", _svc(42, sessionAffinity="ClientIP"))
    proxier.on_slice("ADDED", _slice(42, 3))
    proxier.sync()
    proxier.on_slice("MODIFIED", _slice(42, 4))
    proxier.sync()
    proxier.on_service("DELETED", _svc(1))
    proxier.sync()
    tables = backend.read().tables.values()  # read-back chains carry (digest, rule count)
    rules = sum(c.fingerprint[1] if c.fingerprint else len(c.rules) for t in tables for c in t.chains.values())
    assert reported[-1] == (rules, sum(t.element_count() for t in tables))
    assert len({r for r, _ in reported}) >= 3, reported


def test_contested_element_keys_follow_the_first_service_through_partial_syncs() -> None:
    """Two Services with the same ClusterIP: the first in key order owns it; removing it hands it over."""
    proxier, backend, _ = _proxier(3)
    twin = service("a-twin", "ns", "10.96.0.2")  # s1's ClusterIP; "ns/a-twin" sorts before "ns/s1"
    proxier.on_service("ADDED", twin)
    proxier.on_slice("ADDED", endpoint_slice("a-twin-x", "a-twin", [endpoint("10.244.9.9")], namespace="ns"))
    proxier.sync()
    for step in ("twin owns it", "s1 takes over", "twin again"):
        # (cluster-ips keeps a deleted Service's IP for a while, and chains are deleted later: compare the maps)
        expected, actual = _expected(proxier).tables["ip"], backend.tables["ip"]
        for name in ("service-ips", "endpoints-4"):
            assert actual.elements[name] == expected.elements[name], (step, name)
        owner = backend.tables["ip"].elements["service-ips"]["10.96.0.2 . tcp . 80"]
        assert ("a-twin" in owner.comment) == (step != "s1 takes over"), (step, owner)
        slots = {k for k in actual.elements["endpoints-4"] if k.startswith("10.96.0.2 . tcp . 80 . ")}
        assert len(slots) == (2 if step == "s1 takes over" else 1), (step, slots)  # never s1's slot 2 behind the twin
        if step == "twin owns it":
            proxier.on_service("DELETED", twin)
        elif step == "s1 takes over":
            proxier.on_service("ADDED", twin)
        result = proxier.sync()
        assert not result.full


def test_partial_syncs_give_frontend_slots_to_the_service_dispatch_reaches() -> None:
    """An external IP equal to the node address on another Service's NodePort: partial syncs agree with a full compile."""
    np_service = service("a-np", "ns", "10.96.0.100", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    np_slice = endpoint_slice("a-np-1", "a-np", [endpoint("10.244.1.1"), endpoint("10.244.1.2")], namespace="ns")
    ext_service = service("b-ext", "ns", "10.96.0.101", externalIPs=["192.168.50.1"], ports=[{"name": "http", "port": 30080}])
    ext_slice = endpoint_slice("b-ext-1", "b-ext", [endpoint("10.244.2.1")], namespace="ns",
                               ports=[{"name": "http", "port": 9090}])
    for order in ((np_service, np_slice, ext_service, ext_slice), (ext_service, ext_slice, np_service, np_slice)):
        proxier, backend, _ = _proxier(1)
        proxier.sync()
        for obj in order:
            (proxier.on_service if obj["kind"] == "Service" else proxier.on_slice)("ADDED", obj)
            assert not proxier.sync().full
            expected, actual = _expected(proxier).tables["ip"], backend.tables["ip"]
            for name in expected.elements:
                if name.startswith("endpoints-"):
                    assert actual.elements.get(name, {}) == expected.elements[name], (order[0]["metadata"]["name"], name)
        slots = [e.value for n, m in backend.tables["ip"].elements.items() if n.startswith("endpoints-")
                 for k, e in m.items() if k.startswith("192.168.50.1 . tcp . 30080 . ")]
        assert slots == ["10.244.2.1 . 9090"]
        proxier.on_service("DELETED", ext_service)
        proxier.sync()
        slots = [e.value for n, m in backend.tables["ip"].elements.items() if n.startswith("endpoints-")
                 for k, e in m.items() if k.startswith("192.168.50.1 . tcp . 30080 . ")]
        assert sorted(slots) == ["10.244.1.1 . 8080", "10.244.1.2 . 8080"]


def test_refused_services_sharing_an_element_with_good_ones() -> None:
    """Two refused Services and a good one share an element (one endpoint's hairpin): the good one keeps it, both are quarantined."""
    backend = RefusingBackend(lambda text: "ns/refused-" in text)
    proxier = Proxier(backend, "node-a", CONFIG, clock=Clock())
    shared = [endpoint("10.244.1.1")]
    proxier.on_relist("Node", [node("node-a")])
    proxier.on_relist("Service", [service("refused-a", "ns", "10.96.0.60"), service("steady", "ns", "10.96.0.61")])
    proxier.on_relist("EndpointSlice", [endpoint_slice("refused-a-x", "refused-a", shared, namespace="ns"),
                                        endpoint_slice("steady-x", "steady", shared, namespace="ns")])
    proxier.sync()
    proxier.on_service("ADDED", service("refused-b", "ns", "10.96.0.62"))
    proxier.on_slice("ADDED", endpoint_slice("refused-b-x", "refused-b", shared, namespace="ns"))
    proxier.sync()
    assert set(proxier.quarantined) == {"ns/refused-a", "ns/refused-b"}
    assert backend.elements("ip", "hairpin")["10.244.1.1 . 10.244.1.1"].comment == "ns/steady:http"
    assert "10.96.0.61 . tcp . 80" in backend.elements("ip", "service-ips")


def _on(backend: FakeBackend, services: list[dict[str, Any]], slices: list[dict[str, Any]], **kw: Any) -> Proxier:
    proxier = Proxier(backend, "node-a", CONFIG, clock=Clock(), **kw)
    proxier.on_relist("Node", [node("node-a")])
    proxier.on_relist("Service", services)
    proxier.on_relist("EndpointSlice", slices)
    return proxier


def _endpoints_of(backend: FakeBackend, cluster_ip: str) -> dict[str, Any]:
    return {k: e for name in backend.tables["ip"].elements if name.startswith("endpoints-")
            for k, e in backend.elements("ip", name).items() if k.startswith(cluster_ip + " ")}


def test_quarantined_service_keeps_its_rules_after_a_failed_sync() -> None:
    """A sync failing for another reason does not make a quarantined Service lose the rules it keeps."""
    backend = RefusingBackend()
    proxier = _on(backend, [_svc(i) for i in range(5)], [_slice(i) for i in range(5)])
    proxier.sync()
    before = _endpoints_of(backend, "10.96.0.3")
    backend.refuse = lambda text: "10.244.2.3" in text  # s2's new endpoint
    proxier.on_slice("MODIFIED", _slice(2, 3))
    proxier.sync()
    assert set(proxier.quarantined) == {"ns/s2"} and _endpoints_of(backend, "10.96.0.3") == before
    backend.refuse = lambda text: True
    proxier.on_slice("MODIFIED", _slice(4, 3))
    with pytest.raises(NftError):
        proxier.sync()
    backend.refuse = lambda text: "10.244.2.3" in text
    proxier.sync()
    assert _endpoints_of(backend, "10.96.0.3") == before, "s2 still has what it had"
    assert set(proxier.quarantined) == {"ns/s2"}


def test_a_frontend_won_by_rank_does_not_blame_the_service_that_lost_it() -> None:
    """s2's external IP is the node IP on s1's NodePort (s2 owns the frontend): only s2 is quarantined."""
    backend = RefusingBackend()
    services = [_svc(0), _svc(1, type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30000}]),
                _svc(2, externalIPs=["192.168.50.1"], ports=[{"name": "http", "port": 30000}]), _svc(3)]
    proxier = _on(backend, services, [_slice(0), _slice(1, 4), _slice(2), _slice(3)])
    proxier.sync()
    backend.refuse = lambda text: "10.244.2.3" in text
    proxier.on_slice("MODIFIED", _slice(2, 3))
    proxier.sync()
    assert set(proxier.quarantined) == {"ns/s2"}


def test_a_refused_service_changing_again_does_not_cost_full_syncs() -> None:
    """The first refusal of a Service is confirmed by a full sync; later changes of it stay partial syncs."""
    backend = RefusingBackend()
    proxier = _on(backend, [_svc(i) for i in range(20)], [_slice(i) for i in range(20)])
    proxier.sync()
    backend.refuse = lambda text: "ns/s7:" in text and "10.244.7." in text
    proxier.on_slice("MODIFIED", _slice(7, 3))
    assert proxier.sync().full, "a first refusal is confirmed against the kernel read back"
    for n in (4, 5, 6):
        proxier.on_slice("MODIFIED", _slice(7, n))
        proxier.on_slice("MODIFIED", _slice(n, n))
        assert not proxier.sync().full
        assert set(proxier.quarantined) == {"ns/s7"}
        assert len(_endpoints_of(backend, f"10.96.0.{n + 1}")) == n, "the other change lands"


def test_netlink_names_the_refused_command_so_no_bisection_is_needed() -> None:
    """With the refused command known (as netlink reports it), one refused Service costs one or two transactions."""
    backend = FakeBackend()
    proxier = _on(backend, [_svc(i) for i in range(40)], [_slice(i) for i in range(40)])
    proxier.sync()
    real_apply = backend.apply
    attempts: list[Transaction] = []

    def refuse_s13(tx: Transaction) -> None:
        """The kernel refuses s13's frontend joining the class of 8, naming the message (its element) it refused."""
        attempts.append(tx)
        for op in tx.ops:
            if op.kind == "element" and op.verb == "add" and op.name == "class-8":
                for element in op.elements:
                    if element.comment.startswith("ns/s13:"):
                        raise NftError("Invalid argument", op.render(), op=replace(op, elements=(element,)))
        real_apply(tx)

    backend.apply = refuse_s13  # type: ignore[method-assign]
    proxier.on_slice("MODIFIED", _slice(13, 5))
    proxier.sync()  # the first refusal of s13, confirmed by a full sync
    assert set(proxier.quarantined) == {"ns/s13"}
    attempts.clear()
    for i in range(40):
        proxier.on_slice("MODIFIED", _slice(i, 4 if i != 13 else 6))
    assert not proxier.sync().full
    assert set(proxier.quarantined) == {"ns/s13"}
    # the sync's transaction, the probe, the chunk (refused), the chunk without s13, s13 put back, the rest settled
    assert len([tx for tx in attempts if tx]) <= 6, [[(o.verb, o.kind, o.name, len(o.elements)) for o in tx.ops] for tx in attempts]
    assert all(len(_endpoints_of(backend, f"10.96.0.{i + 1}")) == 4 for i in range(40) if i != 13)


def test_a_quarantined_service_is_retried_when_the_service_it_collided_with_goes() -> None:
    """b is refused because of what it shares with a; when a is deleted, b is retried at once, not at the next full sync."""
    backend = RefusingBackend()
    a = service("a", "ns", "10.96.1.1", externalIPs=["198.51.100.1"])
    b = service("b", "ns", "10.96.1.2", externalIPs=["198.51.100.1"])
    proxier = _on(backend, [a, b], [endpoint_slice("a-1", "a", [endpoint("10.244.1.1")], namespace="ns"),
                                    endpoint_slice("b-1", "b", [endpoint("10.244.1.2")], namespace="ns")])
    backend.refuse = lambda text: "ns/b:" in text
    proxier.sync()
    assert set(proxier.quarantined) == {"ns/b"}
    backend.refuse = lambda text: False
    proxier.on_service("DELETED", a)
    assert not proxier.sync().full
    assert not proxier.quarantined
    assert backend.elements("ip", "service-ips")["198.51.100.1 . tcp . 80"].comment == "ns/b:http"


def test_legal_slices_proxies_ignore_are_not_counted_invalid() -> None:
    """FQDN slices and slices without a Service label are legal and ignored, not skipped as invalid."""
    seen: list[tuple[str, str]] = []

    class Observer(NullObserver):
        def invalid_object(self, kind: str, reason: str) -> None:
            seen.append((kind, reason))

    proxier = Proxier(FakeBackend(), "node-a", CONFIG, observer=Observer())
    fqdn = endpoint_slice("ext-1", "ext", [{"addresses": ["example.com"]}], namespace="ns", address_type="FQDN")
    unlabeled = endpoint_slice("custom-1", "x", [endpoint("10.244.1.1")], namespace="ns")
    del unlabeled["metadata"]["labels"]
    proxier.on_relist("EndpointSlice", [fqdn, unlabeled])
    assert seen == [] and not proxier.skipped()


def test_many_problems_of_one_object_are_summarized(caplog: pytest.LogCaptureFixture) -> None:
    """A slice with 1000 bad endpoints gives a few lines and one count, not 1000."""
    seen: list[tuple[str, str]] = []

    class Observer(NullObserver):
        def invalid_object(self, kind: str, reason: str) -> None:
            seen.append((kind, reason))

    proxier = Proxier(FakeBackend(), "node-a", CONFIG, observer=Observer())
    bad = endpoint_slice("big-1", "big", [endpoint(f"127.0.{i // 250}.{i % 250 + 1}") for i in range(1000)], namespace="ns")
    with caplog.at_level("WARNING", logger="kproxy.daemon.proxier"):
        proxier.on_slice("ADDED", bad)
    assert len(caplog.records) == 4 and "997 more problems" in caplog.records[-1].getMessage()
    assert seen == [("EndpointSlice", "invalid_ip")]


@pytest.mark.parametrize("counts", [(3, 0, 1), (1, 5, 4, 9, 17, 3), (0, 200, 1)])
def test_endpoint_changes_send_elements_only(counts: tuple[int, ...]) -> None:
    """A Service's first and last endpoint, and changes of pick class, are sent as elements without verdicts only.

    A chain, a rule, or an element whose verdict jumps makes the kernel check
    the whole table (O(table) per change); none of them is sent.
    """
    proxier, backend, _ = _proxier()
    proxier.sync()
    for count in counts:
        before = len(backend.transactions)
        proxier.on_slice("MODIFIED", _slice(2, count))
        result = proxier.sync()
        assert not result.full
        sent = [op for tx in backend.transactions[before:] for op in tx.ops]
        assert sent and all(op.kind == "element" for op in sent), [(o.verb, o.kind, o.name) for o in sent]
        assert not {op.name for op in sent} & {"service-ips", "service-nodeports"}, "no verdict element changes"
        assert len(_endpoints_of(backend, "10.96.0.3")) == count


TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
STARTED = datetime.datetime(2026, 12, 1, 10, 0, tzinfo=datetime.UTC).timestamp()


def _latency_proxier() -> tuple[Proxier, Clock, list[float]]:
    """A proxier started at STARTED (its wall clock, returned) and the programming latencies it observes."""
    latencies: list[float] = []

    class Observer(NullObserver):
        def programming_latency(self, seconds: float) -> None:
            latencies.append(seconds)

    wall = Clock()
    wall.now = STARTED
    proxier = Proxier(FakeBackend(), "node-a", CONFIG, clock=Clock(), wall_clock=wall, observer=Observer())
    proxier.on_relist("Node", [node("node-a")])
    return proxier, wall, latencies


def test_programming_latency_is_measured_only_for_changes_after_the_start() -> None:
    """Slices listed at startup carry the time of their last change (a day ago here): the first sync
    observes no programming latency; a change stamped after the start is observed once, from its stamp."""
    proxier, wall, latencies = _latency_proxier()
    proxier.on_relist("Service", [_svc(i) for i in range(3)])
    proxier.on_relist("EndpointSlice", [_slice(i, annotations={TRIGGER_TIME: "2026-11-30T10:00:00Z"}) for i in range(3)])
    assert proxier.sync().full
    assert latencies == []
    wall.now = STARTED + 10.0
    stamp = "2026-12-01T10:00:08.500Z"  # 8.5 s after the start, 1.5 s before the sync
    proxier.on_slice("MODIFIED", _slice(1, 3, annotations={TRIGGER_TIME: stamp}))
    proxier.sync()
    assert latencies == [pytest.approx(1.5)]


def test_an_invalid_slice_update_keeps_the_programming_latency_of_others() -> None:
    """A slice update the proxy cannot use is not a deletion: another slice's pending change of the same
    Service is still observed."""
    proxier, wall, latencies = _latency_proxier()
    proxier.on_relist("Service", [_svc(1)])
    proxier.on_relist("EndpointSlice", [_slice(1)])
    proxier.sync()
    wall.now = STARTED + 10.0
    second = endpoint_slice("s1-y", "s1", [endpoint("10.244.1.9")], namespace="ns",
                            annotations={TRIGGER_TIME: "2026-12-01T10:00:08Z"})
    proxier.on_slice("ADDED", second)
    broken = _slice(1)
    broken["addressType"] = "IPv5"
    proxier.on_slice("MODIFIED", broken)
    proxier.sync()
    assert latencies == [pytest.approx(2.0)]


def test_untranslated_tcp_attempts_are_deleted_after_a_full_sync_that_built_the_table() -> None:
    """A TCP attempt to a ClusterIP that went out untranslated before the table existed (never answered, its reply
    would come from the ClusterIP itself) is deleted after the sync that built the table; one to a port that is not
    a Service's, and later full syncs over the existing table, are left alone. Without the deletion the client's
    retransmissions keep joining that entry and are never DNATed."""
    untranslated = FlowEntry(4, 6, "10.244.9.9", "10.96.0.1", 40000, 80, "10.96.0.1", 80)
    other_port = FlowEntry(4, 6, "10.244.9.9", "10.96.0.1", 40001, 81, "10.96.0.1", 81)
    deleted: list[int] = []

    class Observer(NullObserver):
        def unanswered_deleted(self, count: int) -> None:
            deleted.append(count)

    conntrack = FakeConntrack(unanswered=[untranslated, other_port])
    proxier, _, _ = _proxier(2, conntrack=conntrack, observer=Observer())
    proxier.sync()
    assert conntrack.deleted == [untranslated]
    assert conntrack.listed_unanswered == [4], "IPv4-only Services: IPv6 has no frontend to list entries for"
    assert deleted == [1]

    conntrack.listed_unanswered.clear()
    proxier.request_full_sync()
    proxier.sync()
    assert proxier.last_sync is not None and proxier.last_sync.full
    assert conntrack.listed_unanswered == [], "the table was there: nothing went out untranslated"


def test_untranslated_tcp_attempts_are_deleted_after_a_full_sync_that_repaired_the_table() -> None:
    """A repair over a table that is still there (another program deleted a dispatch element, or flushed it) is
    followed by the cleanup too: attempts made meanwhile went out untranslated as well."""
    untranslated = FlowEntry(4, 6, "10.244.9.9", "10.96.0.2", 40000, 80, "10.96.0.2", 80)
    conntrack = FakeConntrack()
    proxier, backend, _ = _proxier(2, conntrack=conntrack)
    proxier.sync()
    conntrack.unanswered.append(untranslated)
    conntrack.entries.append(untranslated)
    conntrack.listed_unanswered.clear()
    element = next(iter(backend.tables["ip"].elements["service-ips"]))
    del backend.tables["ip"].elements["service-ips"][element]  # another program's doing
    proxier.request_full_sync()
    proxier.sync()
    assert conntrack.listed_unanswered == [4]
    assert conntrack.deleted == [untranslated]


def test_a_conntrack_cleanup_that_raises_does_not_fail_the_sync(caplog: pytest.LogCaptureFixture) -> None:
    """The kernel is programmed when the cleanups run: whatever they raise (pyroute2 has its own decoding errors)
    is logged, and the sync counts as done."""

    class Broken(FakeConntrack):
        def list_unanswered_tcp(self, family: int) -> list[FlowEntry]:  # type: ignore[override]
            raise ValueError("a message pyroute2 cannot decode")

    proxier, _, _ = _proxier(2, conntrack=Broken())
    with caplog.at_level("WARNING"):
        proxier.sync()
    assert proxier.sync_count == 1
    assert "TCP attempts left untranslated" in caplog.text


def test_an_empty_chain_of_a_ports_own_converges() -> None:
    """A sticky eTP=Local port without a local endpoint, counting nothing, has an empty ``local-`` chain: it reads
    back as it was compiled, so a full sync after the first sends nothing (it used to flush it every time)."""
    backend = FakeBackend()
    proxier = Proxier(backend, "node-a", CONFIG)
    proxier.on_relist("Node", [node("node-a", addresses=["192.0.2.1"])])
    proxier.on_relist("Service", [service("sticky", "ns", "10.96.0.12", sessionAffinity="ClientIP", type="LoadBalancer",
                                          externalTrafficPolicy="Local",
                                          ports=[{"name": "http", "port": 80, "nodePort": 30080}])])
    proxier.on_relist("EndpointSlice", [endpoint_slice("sticky-1", "sticky", [endpoint("10.244.2.12", node="node-b")],
                                                       namespace="ns", ports=[{"name": "http", "port": 8080}])])
    proxier.sync()
    assert [n for n, c in backend.tables["ip"].chains.items() if n.startswith("local-") and not c.rules]
    for _ in range(2):
        proxier.request_full_sync()
        result = proxier.sync()
        assert result.full and result.operations == 0


def test_a_refused_first_build_still_creates_the_shared_chains() -> None:
    """The first piece of a table's build refused: the skeleton put in its place has the shared chains too, so the
    next sync's dispatch elements, which go to them, land and no Service is quarantined."""
    backend = FakeBackend()
    proxier = Proxier(backend, "node-a", CONFIG)
    proxier.on_relist("Node", [node("node-a")])
    proxier.on_relist("Service", [_svc(i) for i in range(3)])
    proxier.on_relist("EndpointSlice", [_slice(i) for i in range(3)])
    backend.fail_next = NftError("Invalid argument (the first piece refused)")
    with contextlib.suppress(NftError):
        proxier.sync()
    assert {"pick-by-class", "external-to-cluster", "external-to-local"} <= set(backend.tables["ip"].chains)
    assert not proxier.quarantined
    proxier.sync()
    assert not proxier.quarantined
    assert plan(backend.read(), _expected(proxier)).operations == 0
