"""The change tracker on its own: what each event records, and which Services it reports as changed, and when.

The proxier feeds the tracker converted objects (``set_service``, ``set_slice``, ...),
takes the changes at each sync (``take`` for a partial sync, ``all_services`` for a
full one), and records what it programmed (``synced``) or that nothing is known to be
programmed any more (``forget_synced``). These tests drive the tracker through exactly
those calls, with model values built here; the relist tests go through the proxier,
the only caller that turns a relist into tracker calls.
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.cluster.model import (
    Cluster,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Service,
    ServiceCIDR,
    ServiceKey,
    ServicePort,
    SliceKey,
)
from kproxy.cluster.tracker import Changes, ChangeTracker, parse_trigger_time
from kproxy.daemon.proxier import Proxier
from kproxy.nft.fake import FakeBackend
from kproxy.rules.compiler import ProxyConfig
from tests.harness.builders import endpoint, endpoint_slice, service

A, B, C = ServiceKey("ns/a"), ServiceKey("ns/b"), ServiceKey("ns/c")


def _svc(name: str, ip: str = "10.96.0.1", port: int = 80) -> Service:
    return Service("ns", name, "ClusterIP", (ip,), (ServicePort("http", "tcp", port),))


def _eps(name: str, service_name: str, *addresses: str, trigger: str | None = None) -> EndpointSlice:
    return EndpointSlice("ns", name, service_name, 4, (EndpointPort("http", "tcp", 8080),),
                         tuple(Endpoint(a) for a in addresses), trigger)


def _sync(tracker: ChangeTracker) -> Changes:
    """What a successful partial sync does with the tracker: take the changes, program them, record them."""
    changes = tracker.take()
    tracker.synced(changes.services)
    return changes


def _programmed(*items: Service | EndpointSlice) -> ChangeTracker:
    """A tracker holding ``items``, all of them synced (nothing pending)."""
    tracker = ChangeTracker()
    for item in items:
        if isinstance(item, Service):
            tracker.set_service(item.key, item)
        else:
            tracker.set_slice(item.key, item)
    _sync(tracker)
    assert tracker.pending() == (0, 0)
    return tracker


# -- what one event records ------------------------------------------------------------------------


def test_added_service_is_held_and_reported_once() -> None:
    """An added Service is held, counted as a service change, reported by the next take and not by the one after."""
    tracker = ChangeTracker()
    svc = _svc("a")
    tracker.set_service(A, svc)
    assert tracker.services == {A: svc}
    assert tracker.state(A) == (svc, ())
    assert tracker.pending() == (1, 0)
    assert tracker.service_changes_total == 1 and tracker.endpoint_changes_total == 0
    changes = tracker.take()
    assert changes == Changes(services={A}, service_changes=1, endpoint_changes=0, trigger_times=[])
    assert tracker.pending() == (0, 0)
    tracker.synced(changes.services)
    assert tracker.take().services == set()


def test_modified_and_deleted_service_are_reported() -> None:
    """A changed Service and a deleted one are each reported at the next take; the deleted one is no longer held."""
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"))
    tracker.set_service(A, _svc("a", port=81))
    tracker.set_service(B, None)
    assert tracker.pending() == (2, 0)
    changes = _sync(tracker)
    assert changes.services == {A, B} and changes.service_changes == 2 and changes.endpoint_changes == 0
    assert set(tracker.services) == {A}
    assert tracker.state(B) == (None, ())
    assert tracker.service_changes_total == 4


def test_slices_are_held_by_their_service_in_key_order() -> None:
    """A Service's state is the Service and its slices, sorted by slice key whatever the order they came in."""
    svc, second, first = _svc("a"), _eps("a-2", "a", "10.244.0.2"), _eps("a-1", "a", "10.244.0.1")
    tracker = ChangeTracker()
    tracker.set_service(A, svc)
    tracker.set_slice(second.key, second)
    tracker.set_slice(first.key, first)
    assert tracker.slices_of(A) == (first, second)
    assert tracker.state(A) == (svc, (first, second))
    assert tracker.pending() == (1, 1)
    changes = tracker.take()
    assert changes.services == {A} and changes.service_changes == 1 and changes.endpoint_changes == 1
    assert tracker.endpoint_changes_total == 2


def test_modified_and_deleted_slices_are_endpoint_changes() -> None:
    """Changing or deleting a slice reports its Service as an endpoint change, not a service change."""
    slice1, slice2 = _eps("a-1", "a", "10.244.0.1"), _eps("a-2", "a", "10.244.0.2")
    tracker = _programmed(_svc("a"), slice1, slice2)
    tracker.set_slice(slice1.key, _eps("a-1", "a", "10.244.0.1", "10.244.0.3"))
    tracker.set_slice(slice2.key, None)
    assert tracker.pending() == (0, 1)
    changes = _sync(tracker)
    assert changes.services == {A} and changes.service_changes == 0 and changes.endpoint_changes == 1
    assert tracker.slices_of(A) == (_eps("a-1", "a", "10.244.0.1", "10.244.0.3"),)
    assert SliceKey("ns/a-2") not in tracker.slices


def test_repeated_identical_events_change_nothing() -> None:
    """Setting a Service or a slice to an equal value (a resync, a duplicate watch event) is no change at all."""
    svc, eps = _svc("a"), _eps("a-1", "a", "10.244.0.1")
    tracker = _programmed(svc, eps)
    totals = (tracker.service_changes_total, tracker.endpoint_changes_total)
    for _ in range(3):
        tracker.set_service(A, replace(svc))  # equal, not the same object
        tracker.set_slice(eps.key, replace(eps))
    assert tracker.pending() == (0, 0)
    assert (tracker.service_changes_total, tracker.endpoint_changes_total) == totals
    assert tracker.take() == Changes(set(), 0, 0, [])


def test_deleting_unknown_objects_is_no_change() -> None:
    """Deletes of a Service, slice or ServiceCIDR the tracker never held record nothing and report nothing."""
    tracker = _programmed(_svc("a"))
    tracker.set_service(ServiceKey("ns/ghost"), None)
    tracker.set_slice(SliceKey("ns/ghost-1"), None)
    tracker.set_service_cidr("ghost", None)
    assert tracker.pending() == (0, 0)
    assert (tracker.service_changes_total, tracker.endpoint_changes_total) == (1, 0)
    assert tracker.take().services == set()
    assert tracker.known() == {A}


# -- slices that arrive first, or move ---------------------------------------------------------


def test_slice_before_its_service() -> None:
    """A slice whose Service is not there yet is held under that Service's key and reported; the Service joins it."""
    eps = _eps("a-1", "a", "10.244.0.1")
    tracker = ChangeTracker()
    tracker.set_slice(eps.key, eps)
    assert tracker.state(A) == (None, (eps,))
    assert A in tracker.known()
    changes = _sync(tracker)
    assert changes.services == {A} and changes.endpoint_changes == 1 and changes.service_changes == 0
    svc = _svc("a")
    tracker.set_service(A, svc)
    assert tracker.state(A) == (svc, (eps,))
    changes = _sync(tracker)
    assert changes.services == {A} and changes.service_changes == 1 and changes.endpoint_changes == 0


def test_slice_moving_between_services() -> None:
    """A slice relabelled to another Service leaves the first and joins the second: both are reported."""
    eps = _eps("x-1", "a", "10.244.0.1")
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"), eps)
    moved = replace(eps, service_name="b")
    tracker.set_slice(eps.key, moved)
    assert tracker.slices_of(A) == () and tracker.slices_of(B) == (moved,)
    assert tracker.slices == {eps.key: moved}
    changes = _sync(tracker)
    assert changes.services == {A, B} and changes.endpoint_changes == 2 and changes.service_changes == 0
    tracker.set_slice(eps.key, eps)  # and back
    assert tracker.slices_of(A) == (eps,) and tracker.slices_of(B) == ()
    assert _sync(tracker).services == {A, B}


def test_slice_moving_and_back_before_a_sync_is_dropped() -> None:
    """A slice that moves away and back between two syncs leaves both Services as programmed: nothing reported."""
    eps = _eps("x-1", "a", "10.244.0.1")
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"), eps)
    tracker.set_slice(eps.key, replace(eps, service_name="b"))
    tracker.set_slice(eps.key, eps)
    assert tracker.pending() == (0, 2)
    assert tracker.take() == Changes(set(), 0, 0, [])
    assert tracker.endpoint_changes_total == 3


# -- when changes are reported ---------------------------------------------------------------------


def test_changes_that_cancel_out_are_dropped() -> None:
    """A change and its reversal between two syncs are counted as events but not reported as changed Services."""
    svc, eps = _svc("a"), _eps("a-1", "a", "10.244.0.1")
    tracker = _programmed(svc, eps, _svc("b", "10.96.0.2"))
    tracker.set_service(A, _svc("a", port=81))
    tracker.set_service(A, svc)
    tracker.set_slice(eps.key, None)
    tracker.set_slice(eps.key, eps)
    tracker.set_service(B, None)
    tracker.set_service(B, _svc("b", "10.96.0.2"))
    assert tracker.pending() == (2, 1)
    assert tracker.take() == Changes(set(), 0, 0, [])
    assert tracker.pending() == (0, 0)


def test_only_the_services_that_really_changed_are_counted() -> None:
    """service_changes and endpoint_changes count the reported Services only, each once however many events it had."""
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"), _eps("a-1", "a", "10.244.0.1"))
    tracker.set_service(A, _svc("a", port=81))
    tracker.set_service(A, _svc("a", port=82))
    tracker.set_slice(SliceKey("ns/a-1"), _eps("a-1", "a", "10.244.0.9"))
    tracker.set_service(B, _svc("b", port=81))
    tracker.set_service(B, _svc("b", "10.96.0.2"))  # B back as programmed
    changes = tracker.take()
    assert changes.services == {A}
    assert (changes.service_changes, changes.endpoint_changes) == (1, 1)


def test_a_change_taken_but_not_synced_is_reported_again_after_forget_synced() -> None:
    """After a failed sync (forget_synced) nothing counts as programmed: a change that cancels out is reported."""
    svc = _svc("a")
    tracker = _programmed(svc)
    tracker.set_service(A, _svc("a", port=81))
    assert tracker.take().services == {A}
    tracker.forget_synced()  # the sync failed
    tracker.set_service(A, svc)  # back to what was programmed before the failed sync
    assert tracker.take().services == {A}


def test_synced_records_the_state_at_that_moment() -> None:
    """synced(keys) records only those keys: a Service left out of it is reported again even when it did not move."""
    tracker = ChangeTracker()
    tracker.set_service(A, _svc("a"))
    tracker.set_service(B, _svc("b", "10.96.0.2"))
    changes = tracker.take()
    tracker.synced({A})
    tracker.set_service(A, _svc("a", port=81))
    tracker.set_service(A, _svc("a"))
    tracker.set_service(B, _svc("b", port=81))
    tracker.set_service(B, _svc("b", "10.96.0.2"))
    assert changes.services == {A, B}
    assert tracker.take().services == {B}  # B was never recorded as programmed


def test_all_services_reports_every_known_service_and_clears_pending() -> None:
    """A full sync's changes name every known Service (changed or not), with the counts of the real changes."""
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"))
    tracker.set_service(C, _svc("c", "10.96.0.3"))
    changes = tracker.all_services()
    assert changes.services == {A, B, C}
    assert (changes.service_changes, changes.endpoint_changes) == (1, 0)
    assert tracker.pending() == (0, 0)


def test_known_includes_deleted_services_until_their_removal_is_synced() -> None:
    """A deleted Service stays known (its rules must be removed) until a sync records it as gone."""
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"))
    tracker.set_service(B, None)
    assert tracker.known() == {A, B}
    assert tracker.all_services().services == {A, B}
    tracker.synced({A, B})
    assert tracker.known() == {A}


def test_known_forgets_a_deleted_service_once_its_removal_is_synced() -> None:
    """A Service deleted with its slices, once its removal is synced, is neither known nor reported by a full sync."""
    eps = _eps("b-1", "b", "10.244.0.2")
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"), eps)
    tracker.set_service(B, None)
    tracker.set_slice(eps.key, None)
    assert _sync(tracker).services == {B}
    assert tracker.known() == {A}
    assert tracker.all_services().services == {A}


# -- trigger times ---------------------------------------------------------------------------------


def test_parse_trigger_time() -> None:
    """RFC 3339 with Z or an offset, with or without fractions, gives UNIX seconds; anything else gives None."""
    base = datetime.datetime(2026, 12, 1, 10, 0, tzinfo=datetime.UTC).timestamp()
    assert parse_trigger_time("2026-12-01T10:00:00Z") == base
    assert parse_trigger_time("2026-12-01T10:00:00.250Z") == base + 0.25
    assert parse_trigger_time("2026-12-01T11:00:00+01:00") == base
    assert parse_trigger_time("yesterday") is None
    assert parse_trigger_time("") is None


def test_trigger_times_of_reported_changes() -> None:
    """A slice's trigger time is reported with its Service's change once; an unchanged or unparsable one is not."""
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"))
    t1, t2 = "2026-12-01T10:00:00Z", "2026-12-01T10:00:05Z"
    tracker.set_slice(SliceKey("ns/a-1"), _eps("a-1", "a", "10.244.0.1", trigger=t1))
    tracker.set_slice(SliceKey("ns/a-1"), _eps("a-1", "a", "10.244.0.2", trigger=t1))  # same trigger time
    tracker.set_slice(SliceKey("ns/b-1"), _eps("b-1", "b", "10.244.0.3", trigger="not a time"))
    changes = _sync(tracker)
    assert changes.services == {A, B}
    assert changes.trigger_times == [parse_trigger_time(t1)]
    tracker.set_slice(SliceKey("ns/a-1"), _eps("a-1", "a", "10.244.0.1", trigger=t2))
    changes = _sync(tracker)
    assert changes.trigger_times == [parse_trigger_time(t2)]
    assert tracker.take().trigger_times == []


def test_trigger_times_of_cancelled_changes_are_dropped() -> None:
    """The trigger time of a change that cancelled out is not reported, then or at a later sync."""
    eps = _eps("a-1", "a", "10.244.0.1", trigger="2026-12-01T10:00:00Z")
    tracker = _programmed(_svc("a"), eps)
    tracker.set_slice(eps.key, _eps("a-1", "a", "10.244.0.9", trigger="2026-12-01T10:00:09Z"))
    tracker.set_slice(eps.key, eps)
    assert tracker.take() == Changes(set(), 0, 0, [])
    tracker.set_service(A, _svc("a", port=81))
    assert tracker.take().trigger_times == []



def test_trigger_times_from_before_the_start_are_not_measured() -> None:
    """As upstream's trackerStartTime: slices listed at startup carry the time of their last change, long ago;
    only a trigger time after the start is reported (at or before it: not)."""
    started = parse_trigger_time("2026-12-01T10:00:00Z")
    tracker = ChangeTracker(started=started)
    tracker.set_service(A, _svc("a"))
    tracker.set_slice(SliceKey("ns/a-1"), _eps("a-1", "a", "10.244.0.1", trigger="2026-11-02T08:00:00Z"))  # a month old
    tracker.set_slice(SliceKey("ns/a-2"), _eps("a-2", "a", "10.244.0.2", trigger="2026-12-01T10:00:00Z"))  # the start
    assert tracker.take().trigger_times == []
    tracker.set_slice(SliceKey("ns/a-1"), _eps("a-1", "a", "10.244.0.3", trigger="2026-12-01T10:00:00.5Z"))
    assert tracker.take().trigger_times == [started + 0.5]


def test_a_deleted_slice_drops_its_services_trigger_times() -> None:
    """As upstream: a deletion carries the time of the slice's last update, not of the change, so the
    Service's pending trigger times are not measured; another Service's are."""
    tracker = _programmed(_svc("a"), _svc("b", "10.96.0.2"), _eps("a-1", "a", "10.244.0.1"))
    tracker.set_slice(SliceKey("ns/a-2"), _eps("a-2", "a", "10.244.0.2", trigger="2026-12-01T10:00:01Z"))
    tracker.set_slice(SliceKey("ns/b-1"), _eps("b-1", "b", "10.244.0.3", trigger="2026-12-01T10:00:02Z"))
    tracker.set_slice(SliceKey("ns/a-1"), None)
    changes = tracker.take()
    assert changes.services == {A, B}
    assert changes.trigger_times == [parse_trigger_time("2026-12-01T10:00:02Z")]



def test_an_unusable_slice_keeps_its_services_trigger_times() -> None:
    """A slice that exists but could not be converted loses its endpoints; unlike a deletion, it does not
    take the Service's pending trigger times with it."""
    tracker = _programmed(_svc("a"), _eps("a-1", "a", "10.244.0.1"))
    tracker.set_slice(SliceKey("ns/a-2"), _eps("a-2", "a", "10.244.0.2", trigger="2026-12-01T10:00:01Z"))
    tracker.set_slice(SliceKey("ns/a-1"), None, unusable=True)
    changes = tracker.take()
    assert changes.services == {A}
    assert changes.trigger_times == [parse_trigger_time("2026-12-01T10:00:01Z")]
    assert tracker.slices_of(A) == (_eps("a-2", "a", "10.244.0.2", trigger="2026-12-01T10:00:01Z"),)


# -- node, ServiceCIDRs, snapshots -----------------------------------------------------------------


def test_service_cidrs_are_the_sorted_union_of_every_servicecidr() -> None:
    """ServiceCIDRs are held by name; their ranges are reported once each, sorted; a deleted one's go."""
    tracker = ChangeTracker()
    tracker.set_service_cidr("kubernetes", ServiceCIDR("kubernetes", ("10.96.0.0/16", "fd00:96::/112")))
    tracker.set_service_cidr("extra", ServiceCIDR("extra", ("10.100.0.0/16", "10.96.0.0/16")))
    assert tracker.service_cidr_names() == ["kubernetes", "extra"]
    assert tracker.service_cidrs() == ("10.100.0.0/16", "10.96.0.0/16", "fd00:96::/112")
    tracker.set_service_cidr("kubernetes", None)
    assert tracker.service_cidrs() == ("10.100.0.0/16", "10.96.0.0/16")
    assert tracker.pending() == (0, 0), "ServiceCIDRs are compared by the proxier, not tracked per Service"


def test_cluster_is_a_snapshot() -> None:
    """cluster() holds the Services, slices, node and ServiceCIDRs as they are, and does not follow later changes."""
    svc, eps, node = _svc("a"), _eps("a-1", "a", "10.244.0.1"), Node("node-a", ("192.168.50.1",))
    tracker = _programmed(svc, eps)
    tracker.set_node(node)
    tracker.set_service_cidr("kubernetes", ServiceCIDR("kubernetes", ("10.96.0.0/16",)))
    snapshot = tracker.cluster()
    assert snapshot == Cluster({A: svc}, {eps.key: eps}, node, ("10.96.0.0/16",))
    tracker.set_service(B, _svc("b", "10.96.0.2"))
    tracker.set_slice(eps.key, None)
    tracker.set_node(None)
    assert snapshot == Cluster({A: svc}, {eps.key: eps}, node, ("10.96.0.0/16",))
    assert tracker.node is None


# -- relists, through the proxier (the caller that turns a relist into tracker calls) --------------


def _listed_proxier() -> Proxier:
    proxier = Proxier(FakeBackend(), "node-a", ProxyConfig(), clock=lambda: 1000.0)
    proxier.on_relist("Service", [service("a", "ns", "10.96.0.1"), service("b", "ns", "10.96.0.2")])
    proxier.on_relist("EndpointSlice", [endpoint_slice("a-1", "a", [endpoint("10.244.0.1")], namespace="ns"),
                                        endpoint_slice("b-1", "b", [endpoint("10.244.0.2")], namespace="ns")])
    _sync(proxier.tracker)
    return proxier


def test_relist_of_the_same_objects_is_no_change() -> None:
    """A relist that lists what the tracker holds records no event and reports nothing."""
    proxier = _listed_proxier()
    tracker = proxier.tracker
    totals = (tracker.service_changes_total, tracker.endpoint_changes_total)
    proxier.on_relist("Service", [service("a", "ns", "10.96.0.1"), service("b", "ns", "10.96.0.2")])
    proxier.on_relist("EndpointSlice", [endpoint_slice("a-1", "a", [endpoint("10.244.0.1")], namespace="ns"),
                                        endpoint_slice("b-1", "b", [endpoint("10.244.0.2")], namespace="ns")])
    assert tracker.pending() == (0, 0)
    assert (tracker.service_changes_total, tracker.endpoint_changes_total) == totals
    assert tracker.take().services == set()


def test_relist_that_drops_objects_deletes_them() -> None:
    """Objects missing from a relist are deleted: the Service that lost its slice and the one that went are reported."""
    proxier = _listed_proxier()
    tracker = proxier.tracker
    proxier.on_relist("Service", [service("a", "ns", "10.96.0.1")])
    proxier.on_relist("EndpointSlice", [endpoint_slice("b-1", "b", [endpoint("10.244.0.2")], namespace="ns")])
    assert set(tracker.services) == {A}
    assert set(tracker.slices) == {SliceKey("ns/b-1")}
    assert tracker.state(A)[1] == () and tracker.state(B)[0] is None
    changes = tracker.take()
    assert changes.services == {A, B}
    assert (changes.service_changes, changes.endpoint_changes) == (1, 1)


# -- any sequence of events: exactly the Services that differ from what was programmed -------------

_SLICE_NAMES = ["x-1", "x-2", "y-1"]
_EVENT = st.one_of(
    st.tuples(st.just("service"), st.sampled_from([A, B, C]), st.sampled_from([None, 80, 81])),
    st.tuples(st.just("slice"), st.sampled_from(_SLICE_NAMES),
              st.none() | st.tuples(st.sampled_from("abc"), st.sampled_from(["10.244.0.1", "10.244.0.2"]))),
    st.tuples(st.just("sync"), st.sampled_from(["partial", "partial", "full", "failed"]), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENT, max_size=40))
def test_a_sync_reports_exactly_the_services_that_differ_from_what_was_programmed(events: list[Any]) -> None:
    """Whatever the events (Services and slices added, changed, deleted, slices moving between Services, syncs that
    fail), a partial sync reports exactly the Services whose state differs from what is programmed, and a full sync
    (which reads the kernel and programs everything) reports every Service that has a Service or slices, and every
    one that changed since it was programmed (unless a failed sync forgot that), so that the partial syncs after it
    are exact again."""
    tracker = ChangeTracker()
    services: dict[ServiceKey, Service] = {}
    slices: dict[SliceKey, EndpointSlice] = {}
    programmed: dict[ServiceKey, Any] = {}
    empty: Any = (None, ())

    def state(key: ServiceKey) -> Any:
        return services.get(key), tuple(sorted((e for e in slices.values() if e.service_key == key),
                                               key=lambda e: e.key))

    for kind, what, value in events:
        if kind == "service":
            service = _svc(what.split("/")[1], port=value) if value is not None else None
            if service is None:
                services.pop(what, None)
            else:
                services[what] = service
            tracker.set_service(what, service)
        elif kind == "slice":
            slice_key = SliceKey(f"ns/{what}")
            eps = _eps(what, value[0], value[1]) if value is not None else None
            if eps is None:
                slices.pop(slice_key, None)
            else:
                slices[slice_key] = eps
            tracker.set_slice(slice_key, eps)
        else:
            differ = {k for k in (A, B, C) if state(k) != programmed.get(k, empty)}
            if what == "partial":
                changes = tracker.take()
                assert changes.services == differ
            else:
                if what == "failed":  # a partial sync the kernel refused (it changed nothing), then a full one
                    assert tracker.take().services == differ
                    tracker.forget_synced()
                    differ = set()  # nothing is known to be programmed: the full sync reads the kernel
                changes = tracker.all_services()
                assert changes.services >= differ | {k for k in (A, B, C) if state(k) != empty}
            tracker.synced(changes.services)
            programmed = {k: state(k) for k in (A, B, C)} if what != "partial" else {
                **programmed, **{k: state(k) for k in changes.services}}
        for service_key in (A, B, C):
            assert tracker.state(service_key) == state(service_key)
