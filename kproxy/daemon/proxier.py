"""The sync engine: from tracked changes to kernel transactions, one sync at a time.

* The committed state (what the kernel holds) is kept in memory per family. A
  partial sync recompiles only the Services that changed, lets the assembly
  report which chains and element keys that touched, and sends the difference
  for those alone: the hot path never re-reads or re-diffs the whole table.
* A full sync recompiles everything, reads kproxy's tables back from the
  kernel, and sends the difference. It runs first (adopting whatever a previous
  run left, without flushing), hourly, after any failure, and when the node's
  labels or addresses change. Reading the kernel is what repairs drift.
* One Service never stops the others (isolation). A Service that cannot be
  converted is skipped; one that cannot be compiled, or whose rules the
  kernel refuses, is *quarantined*: it keeps what it last had in the kernel
  (nothing, if it never had anything), and everything else is programmed.
  A refused transaction is bisected by Service to find the ones responsible.
  A quarantined Service is retried when it (or the node) changes. Each
  problem is logged once per change and counted in
  ``kproxy_invalid_objects_skipped_total``.
* A transaction refused for a reason no Service explains changes nothing in
  the kernel; the next attempt is a full sync after a backoff no longer than
  the sync period.
* Chains that are no longer wanted are flushed and dereferenced first, and
  deleted at least ``CHAIN_DELETE_DELAY`` later (upstream's rule for kernels
  before 6.2).
* Side effects (UDP conntrack cleanup, metrics) happen only after a commit.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kproxy.cluster import validate
from kproxy.cluster.conflicts import FrontendIndex
from kproxy.cluster.convert import (
    InvalidObject,
    Notes,
    NotProxied,
    Problem,
    node_from_manifest,
    object_key,
    service_cidr_from_manifest,
    service_from_manifest,
    slice_from_manifest,
    summarize,
)
from kproxy.cluster.model import Cluster, EndpointSlice, Node, Service, ServiceKey, SliceKey
from kproxy.cluster.tracker import ChangeTracker
from kproxy.memory import gc_paused
from kproxy.nft.kernel import Backend, NftError
from kproxy.nft.objects import Chain, Element, Family, Op, Ruleset, ServiceRules, Table, Transaction, fit_comment
from kproxy.node.conntrack import (
    Conntrack,
    cleanup_stale_udp,
    cleanup_unanswered_tcp,
    tcp_frontends,
    udp_cleanup_targets,
)
from kproxy.rules.assembly import Assembly, Touched
from kproxy.rules.compiler import FAMILIES, NodeInfo, ProxyConfig, base_table, compile_service, node_info
from kproxy.rules.endpoints import LocalPolicyStatus, local_policy_status
from kproxy.rules.plan import create, diff

log = logging.getLogger(__name__)

CHAIN_DELETE_DELAY = 1.0
FULL_SYNC_INTERVAL = 3600.0
ISOLATION_CHUNK = 256
"""Services per transaction when a refused sync is programmed piece by piece."""
DELETED_SERVICE_REJECT = 60.0
"""For this long after a Service is deleted, its ClusterIPs stay in ``cluster-ips``:
clients that still connect to them are refused at once instead of hanging."""


class SyncObserver(Protocol):
    """Where the proxier reports what it did (metrics implement this)."""

    def sync_done(self, full: bool, seconds: float, operations: int, rules: int, elements: int) -> None: ...

    def sync_failed(self, full: bool, seconds: float) -> None: ...

    def programming_latency(self, seconds: float) -> None: ...

    def changes(self, service_changes: int, endpoint_changes: int, pending_services: int, pending_endpoints: int) -> None: ...

    def invalid_object(self, kind: str, reason: str) -> None: ...

    def conntrack_deleted(self, count: int) -> None: ...

    def unanswered_deleted(self, count: int) -> None: ...

    def no_local_endpoints(self, internal: int, external: int) -> None: ...

    def drift_repaired(self, reason: str) -> None: ...


class NullObserver:
    """Reports nowhere."""

    def sync_done(self, full: bool, seconds: float, operations: int, rules: int, elements: int) -> None:
        pass

    def sync_failed(self, full: bool, seconds: float) -> None:
        pass

    def programming_latency(self, seconds: float) -> None:
        pass

    def changes(self, service_changes: int, endpoint_changes: int, pending_services: int, pending_endpoints: int) -> None:
        pass

    def invalid_object(self, kind: str, reason: str) -> None:
        pass

    def conntrack_deleted(self, count: int) -> None:
        pass

    def unanswered_deleted(self, count: int) -> None:
        pass

    def no_local_endpoints(self, internal: int, external: int) -> None:
        pass

    def drift_repaired(self, reason: str) -> None:
        pass


class TallyObserver(NullObserver):
    """Counts what the syncs did: the operations sent, the conntrack entries removed (what ``--once`` prints)."""

    def __init__(self) -> None:
        self.operations = 0
        self.conntrack = 0
        self.untranslated = 0

    def sync_done(self, full: bool, seconds: float, operations: int, rules: int, elements: int) -> None:
        self.operations += operations

    def conntrack_deleted(self, count: int) -> None:
        self.conntrack += count

    def unanswered_deleted(self, count: int) -> None:
        self.untranslated += count


@dataclass(slots=True)
class SyncResult:
    full: bool
    operations: int
    seconds: float
    services: int


class _FullSyncNeeded(Exception):
    """A partial sync cannot settle a refusal by itself: the message says why."""


@dataclass(frozen=True, slots=True)
class Quarantine:
    """A Service kproxy could not program as it is now; it keeps what it last had in the kernel."""

    state: tuple[object, ...]
    """What it was compiled from (Service, slices, node): it is retried once this changes."""
    reason: str
    """``compile_error`` or ``kernel_refused``."""
    message: str


class Proxier:
    """Owns the tracker, the assemblies and the committed state. Thread-safe."""

    def __init__(
        self,
        backend: Backend,
        node_name: str,
        config: ProxyConfig,
        conntrack: Conntrack | None = None,
        observer: SyncObserver | None = None,
        interfaces: Callable[[], tuple[tuple[str, ...], tuple[str, ...]]] = lambda: ((), ()),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.node_name = node_name
        self.config = config
        self.conntrack = conntrack
        self.observer: SyncObserver = observer or NullObserver()
        self.interfaces = interfaces
        self.clock = clock
        self.wall_clock = wall_clock
        self.tracker = ChangeTracker(started=wall_clock())
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._synced_sources: set[str] = set()
        self.required_sources: set[str] = {"Service", "EndpointSlice", "Node"}
        """The kinds listed once before the first sync (the daemon adds ServiceCIDR)."""
        self._service_cidrs: tuple[str, ...] = ()
        """The ServiceCIDRs' ranges the committed tables drop unallocated addresses in."""
        self._assemblies: dict[Family, Assembly] | None = None
        self._committed: dict[Family, Table] = {}
        self._rule_totals: dict[Family, int] = {}
        """Rules in each committed table, kept up to date by partial syncs (counting 10k chains costs 8 ms)."""
        self._pending_deletes: dict[tuple[Family, str], float] = {}
        self._tombstones: dict[ServiceKey, tuple[tuple[str, ...], float]] = {}
        """Deleted Services: their ClusterIPs, and when to stop rejecting traffic to them."""
        self._frontends = FrontendIndex()
        self._problems: dict[tuple[str, str], dict[str, Problem]] = {}
        """(kind, key) -> the problems last reported for that object, by message: each is logged once per change."""
        self.quarantined: dict[ServiceKey, Quarantine] = {}
        self._retried: dict[ServiceKey, Quarantine] = {}
        """Quarantined Services being tried again in the current sync."""
        self._retry: set[ServiceKey] = set()
        """Quarantined Services to try again at the next sync (a Service sharing a frontend changed)."""
        self._kept: dict[ServiceKey, dict[Family, ServiceRules | None]] = {}
        """A quarantined Service's last good parts: what the kernel keeps for it (across failed syncs too)."""
        self._node_info: NodeInfo | None = None
        self._pod_cidrs_checked: tuple[str, ...] = ()
        """The Node's pod CIDRs last compared with clusterCIDR (each value is warned about once)."""
        self._needs_full = True
        self._last_full = float("-inf")
        self._first_full: list[tuple[Callable[[], None], Callable[[], None]]] | None = []
        """The callbacks bracketing the first full sync (``bracket_first_full_sync``); None once it has succeeded."""
        self._first_full_started = False
        self._built: set[Family] = set()
        """The families whose table full syncs built, or found different from what kproxy programmed (drift, a
        Node change), since the last successful sync (a failed one may have built it): the TCP attempts that went
        out untranslated meanwhile are deleted from conntrack once a full sync succeeds
        (``cleanup_unanswered_tcp``)."""
        self._sync_attempts = 0
        """Syncs begun, successful or not: what ``counter_names`` caches for (a failed sync may change the
        committed tables)."""
        self.last_sync: SyncResult | None = None
        self.last_success_wall: float | None = None
        self.oldest_pending_wall: float | None = None
        """Wall time of the oldest change not yet programmed (None when all are)."""
        self.sync_count = 0
        self._policy_report: tuple[int, list[LocalPolicyStatus]] | None = None
        """The Local-policy report and the sync it is for (``local_policy_report``)."""
        self._counter_names: tuple[int, tuple[tuple[Family, str], ...]] | None = None
        """The committed counters' names and the sync they are for (``counter_names``)."""
        self.listeners: list[Callable[[Proxier], None]] = []
        """Called (under the lock) after every successful sync."""

    # -- input from the watchers --------------------------------------------

    def _notify(self) -> None:
        if self.oldest_pending_wall is None and (self._needs_full or any(self.tracker.pending())):
            self.oldest_pending_wall = self.wall_clock()
        self.changed.notify_all()

    def _report(self, kind: str, key: str, problems: list[Problem]) -> None:
        """Log and count the problems of one object that were not reported for it before; forget fixed ones."""
        if not problems and (kind, key) not in self._problems:
            return  # the common case, without the lock (a relist converts 10k objects while a sync may run)
        with self.lock:
            before = self._problems.get((kind, key), {})
            now = {p.message: p for p in problems}
            new = [problem for message, problem in now.items() if message not in before]
            for line in summarize(new):
                log.warning("%s", line)
            for reason in sorted({problem.reason for problem in new}):
                self.observer.invalid_object(kind, reason)
            if now:
                self._problems[(kind, key)] = now
            elif before:
                del self._problems[(kind, key)]
                log.info("%s %s: no longer skipped", kind, key)

    def _convert(self, kind: str, obj: Mapping[str, Any], convert: Callable[[Mapping[str, Any], Notes], Any]) -> Any:
        """Convert one object; report what was skipped (all of it, or parts). None if it is skipped or not proxied."""
        notes: Notes = []
        value = None
        failed: tuple[str, str] | None = None
        try:
            value = convert(obj, notes)
        except NotProxied:
            pass
        except InvalidObject as exc:
            failed = (exc.reason, str(exc))
        except Exception as exc:  # conversion promises InvalidObject only; one object must never stop a relist
            failed = ("malformed", f"{type(exc).__name__}: {exc}")
        if failed is None and not notes and not self._problems:
            return value  # the common case: nothing to report, nothing reported before
        key = object_key(obj)
        problems = [Problem(kind, key, *failed)] if failed is not None else []
        problems += [Problem(kind, key, reason, message, part=True) for reason, message in notes]
        self._report(kind, key, problems)
        return value

    def _service(self, obj: Mapping[str, Any]) -> tuple[ServiceKey, Service | None]:
        """Convert a Service; None for one kproxy leaves alone or must skip."""
        service = self._convert("Service", obj, service_from_manifest)
        return (service.key if service is not None else ServiceKey(object_key(obj))), service

    def _slice(self, obj: Mapping[str, Any]) -> tuple[SliceKey, EndpointSlice | None]:
        eps = self._convert("EndpointSlice", obj, slice_from_manifest)
        return (eps.key if eps is not None else SliceKey(object_key(obj))), eps

    def _forget(self, kind: str, obj: Mapping[str, Any]) -> None:
        self._report(kind, object_key(obj), [])

    def on_service(self, event: str, obj: Mapping[str, Any]) -> None:
        if event == "DELETED":
            self._forget("Service", obj)
            key, service = ServiceKey(object_key(obj)), None
        else:
            key, service = self._service(obj)
        with self.lock:
            self._set_service(key, service)
            self._notify()

    def _set_service(self, key: ServiceKey, service: Service | None) -> None:
        """Record a Service change; a deleted Service leaves a tombstone for its ClusterIPs."""
        old = self.tracker.services.get(key)
        if service is None and old is not None:
            self._tombstones[key] = (old.cluster_ips, self.clock() + DELETED_SERVICE_REJECT)
        elif service is not None:
            self._tombstones.pop(key, None)
        if service is not old:
            sharing = self._frontends.neighbours({key}) if self.quarantined else set()
            for conflict in self._frontends.update(key, service):
                log.warning("%s", conflict)
            if self.quarantined:  # a quarantined Service sharing a frontend with this one may be freed by the change
                self._retry |= {k for k in sharing | self._frontends.neighbours({key}) if k in self.quarantined}
        self.tracker.set_service(key, service)

    def on_slice(self, event: str, obj: Mapping[str, Any]) -> None:
        if event == "DELETED":
            self._forget("EndpointSlice", obj)
            key, eps = SliceKey(object_key(obj)), None
        else:
            key, eps = self._slice(obj)
        with self.lock:
            self.tracker.set_slice(key, eps, unusable=eps is None and event != "DELETED")
            self._notify()

    def on_service_cidr(self, event: str, obj: Mapping[str, Any]) -> None:
        """A ServiceCIDR changed: the ranges where unallocated addresses are dropped (a full sync applies them)."""
        name = object_key(obj)
        cidr = None if event == "DELETED" else self._convert("ServiceCIDR", obj, service_cidr_from_manifest)
        if event == "DELETED":
            self._forget("ServiceCIDR", obj)
        with self.lock:
            self.tracker.set_service_cidr(name, cidr)
            self._notify()

    def on_node(self, event: str, obj: Mapping[str, Any]) -> None:
        node = None
        if event != "DELETED":
            node = self._convert("Node", obj, node_from_manifest)
            if node is None:
                return  # an invalid Node: keep what was known
        if node is not None:
            self._check_pod_cidrs(node)
        with self.lock:
            self.tracker.set_node(node)
            for conflict in self._frontends.set_node_addresses(node.internal_ips + node.external_ips if node else ()):
                log.warning("%s", conflict)
            self._notify()

    def _check_pod_cidrs(self, node: Node) -> None:
        """Warn, once per value, when the Node's pod CIDRs are not inside clusterCIDR.

        kproxy tells pods from other sources by clusterCIDR: with a wrong one,
        pod -> ClusterIP traffic is masqueraded (the source pod's IP is lost),
        and pods' traffic to their own load-balancer IPs is not short-circuited.
        """
        if node.pod_cidrs == self._pod_cidrs_checked:
            return
        self._pod_cidrs_checked = node.pod_cidrs
        outside = validate.outside(node.pod_cidrs, self.config.cluster_cidrs)
        if outside:
            log.warning(
                "Node %s's pod CIDR %s (spec.podCIDRs) is not inside clusterCIDR %s: traffic from this node's pods "
                "to ClusterIPs is masqueraded, so Services see the node's IP instead of the pod's, and NetworkPolicies "
                "that allow pods by podSelector deny it. Set clusterCIDR (kube-proxy's --cluster-cidr, kubeadm's "
                "networking.podSubnet) in kproxy's ConfigMap to the cluster's pod CIDRs",
                node.name, ", ".join(outside), ", ".join(self.config.cluster_cidrs))

    def on_relist(self, kind: str, objects: Iterable[Mapping[str, Any]]) -> None:
        """A full list replaces everything of one kind: objects not in it are deleted.

        ``objects`` may be an iterator over a response still arriving: each
        object is converted as it comes and dropped, and nothing is applied
        until the list is complete (an error midway changes nothing).
        Objects are converted before the lock is taken, so a relist of 10k
        objects does not stall a running sync. The cyclic GC stays paused
        throughout: a full collection in the middle would walk every object
        of the list (at 30k Services that doubled the relist's time), and
        none of what is built here forms cycles.
        """
        with gc_paused():
            self._relist(kind, objects)

    def _relist(self, kind: str, objects: Iterable[Mapping[str, Any]]) -> None:
        listed: set[str] = set()
        if kind == "Service":
            converted: list[tuple[Any, Any]] = []
            for obj in objects:
                listed.add(object_key(obj))
                converted.append(self._service(obj))
            services = dict(converted)
        elif kind == "EndpointSlice":
            converted = []
            for obj in objects:
                listed.add(object_key(obj))
                converted.append(self._slice(obj))
            slices = dict(converted)
        else:
            objects = list(objects)  # a Node, a few ServiceCIDRs
        if kind in ("Service", "EndpointSlice") and len(converted) != len(dict(converted)):
            counts: dict[str, int] = {}
            for key, _ in converted:
                counts[key] = counts.get(key, 0) + 1
            for key, count in sorted(counts.items()):
                if count > 1:
                    log.warning("%s %s is defined %d times; the last one is used", kind, key, count)
        with self.lock:
            if kind == "Service":
                for key in [k for k in self.tracker.services if k not in services]:
                    self._set_service(key, None)
                for key, service in services.items():
                    self._set_service(key, service)
            elif kind == "EndpointSlice":
                for key in [k for k in self.tracker.slices if k not in slices]:
                    self.tracker.set_slice(key, None)
                for key, eps in slices.items():
                    self.tracker.set_slice(key, eps, unusable=eps is None)
            elif kind == "Node":
                if not objects:
                    self.tracker.set_node(None)
                for obj in objects:
                    self.on_node("ADDED", obj)
            elif kind == "ServiceCIDR":
                for name in [n for n in self.tracker.service_cidr_names() if n not in {object_key(o) for o in objects}]:
                    self.tracker.set_service_cidr(name, None)
                for obj in objects:
                    self.on_service_cidr("ADDED", obj)
            if kind in ("Service", "EndpointSlice"):
                for problem_kind, key in [k for k in self._problems if k[0] == kind and k[1] not in listed]:
                    self._report(problem_kind, key, [])
            self._synced_sources.add(kind)
            self._notify()

    @property
    def ready(self) -> bool:
        """Every kind in ``required_sources`` has been listed once.

        Upstream waits for Services and EndpointSlices; kproxy also waits for
        the (possibly empty) list of its own Node, and the daemon for the
        ServiceCIDRs, so that the first sync already uses them instead of
        being redone.
        """
        with self.lock:
            return self.required_sources <= self._synced_sources

    def skipped(self) -> list[Problem]:
        """Every object (or part of one) skipped now, and every quarantined Service."""
        with self.lock:
            problems = [p for by_message in self._problems.values() for p in by_message.values()]
            problems += [Problem("Service", key, q.reason, q.message) for key, q in self.quarantined.items()]
            return sorted(problems, key=lambda p: (p.kind, p.key, p.message))

    # -- syncing -------------------------------------------------------------

    def _current_node_info(self) -> NodeInfo:
        """The node as the compiler sees it; the interfaces are read when NodePorts depend on them."""
        node = self.tracker.node
        if self.config.nodeport_addresses or node is None or not (node.internal_ips or node.external_ips):
            return node_info(self.node_name, node, self.interfaces()[1])
        return node_info(self.node_name, node)

    def request_full_sync(self) -> None:
        with self.lock:
            self._needs_full = True
            self._notify()

    def programmed_families(self) -> set[Family]:
        """The families whose table a sync has programmed (the drift watcher expects them in the kernel)."""
        with self.lock:
            return set(self._committed) if self._assemblies is not None else set()

    def bracket_first_full_sync(self, before: Callable[[], None], after: Callable[[], None]) -> None:
        """Call ``before`` as the first full sync starts and ``after`` once one has committed, each under the lock.

        Between the two, only that sync commits for this process (the drift
        watcher counts everyone else's commits there). Registered late, the
        calls come at once.
        """
        with self.lock:
            if self._first_full is None:
                before()
                after()
                return
            if self._first_full_started:
                before()
            self._first_full.append((before, after))

    def _run_first_full_callbacks(self, which: int) -> None:
        for callbacks in self._first_full or []:
            try:
                callbacks[which]()
            except Exception:  # a watcher's callback must never break syncing
                log.exception("a callback around the first full sync failed")

    def committed_by(self, pid: int | None) -> bool:
        """Whether a transaction the kernel says this process or thread committed was this engine's (its backend's)."""
        return pid is not None and pid in self.backend.committers

    def fence(self, generation: Callable[[], int], timeout: float) -> tuple[int, int] | None:
        """(the backend's commits so far, the ruleset generation), read while no sync runs; None if one ran all along.

        Every commit of this process happens under the lock, so between two
        fences the generation grows by this process's commits plus everyone
        else's.
        """
        if not self.lock.acquire(timeout=timeout):
            return None
        try:
            return self.backend.commits, generation()
        finally:
            self.lock.release()

    def has_work(self, now: float) -> bool:
        """Whether a sync now would do anything."""
        with self.lock:
            pending = self.tracker.pending()
            return (
                self._needs_full
                or any(pending)
                or any(due <= now for due in self._pending_deletes.values())
                or any(until <= now for _, until in self._tombstones.values())
                or now - self._last_full >= FULL_SYNC_INTERVAL
                or self.tracker.service_cidrs() != self._service_cidrs
            )

    def next_deadline(self) -> float | None:
        """When deferred work (chain deletes, the hourly full sync) falls due."""
        with self.lock:
            times = list(self._pending_deletes.values()) + [self._last_full + FULL_SYNC_INTERVAL]
            times += [until for _, until in self._tombstones.values()]
            return min(times)

    def sync(self) -> SyncResult:
        """One sync. Raises NftError (nothing changed in the kernel) on failure.

        The cyclic GC is paused for the sync: it allocates many small objects
        that never form cycles, and collections they trigger cost more than the
        sync itself on a large cluster.
        """
        with self.lock, gc_paused():
            self._sync_attempts += 1
            node_info = self._current_node_info()
            start = self.clock()
            full = self._needs_full or self._assemblies is None or node_info != self._node_info or (
                start - self._last_full >= FULL_SYNC_INTERVAL
            ) or self.tracker.service_cidrs() != self._service_cidrs
            changes = self.tracker.all_services() if full else self.tracker.take()
            expired = {key for key, (_, until) in self._tombstones.items() if until <= start}
            for key in expired:
                del self._tombstones[key]
            changes.services |= expired
            try:
                if not full:
                    try:
                        retry, self._retry = self._retry, set()
                        result = self._sync_partial(changes.services | retry)
                    except _FullSyncNeeded as why:
                        log.warning("sync failed: %s; a full sync follows at once", why)
                        self.observer.sync_failed(False, self.clock() - start)
                        full, start = True, self.clock()
                        changes.services |= self.tracker.known()
                if full:
                    if not self._first_full_started:
                        self._first_full_started = True
                        self._run_first_full_callbacks(0)
                    result = self._sync_full(node_info, changes.services)
            except Exception:
                self._needs_full = True
                self.tracker.forget_synced()
                self._assemblies = None
                for key, held in self._retried.items():  # not settled: they stay quarantined
                    self.quarantined.setdefault(key, held)
                self._retried.clear()
                self.observer.sync_failed(full, self.clock() - start)
                raise
            self.tracker.synced(changes.services)
            for key in changes.services | set(self._retried):
                if key not in self.quarantined and self._kept.pop(key, None) is not None:
                    log.info("Service %s is programmed again", key)
            self._retried.clear()
            self._needs_full = False
            if full:
                self._last_full = start
                if self._first_full is not None:
                    self._run_first_full_callbacks(1)
                    self._first_full = None
                self._node_info = node_info
                self._service_cidrs = self.tracker.service_cidrs()
                # The model and the tables are long-lived and acyclic: move them
                # out of the cyclic GC's sight, so later collections do not
                # scan hundreds of thousands of objects in the middle of a sync.
                gc.freeze()
            seconds = self.clock() - start
            result.seconds = seconds
            self.last_sync = result
            self.last_success_wall = self.wall_clock()
            self.sync_count += 1
            rules = sum(self._rule_totals.values())
            elements = sum(t.element_count() for t in self._committed.values())
            self.observer.sync_done(full, seconds, result.operations, rules, elements)
            now_wall = self.wall_clock()
            for trigger in changes.trigger_times:
                self.observer.programming_latency(max(0.0, now_wall - trigger))
            pending = self.tracker.pending()
            self.observer.changes(changes.service_changes, changes.endpoint_changes, *pending)
            self._cleanup_conntrack(changes.services, node_info)
            if full and self._built:
                self._cleanup_unanswered(self._built)
            self._built = set()
            self.oldest_pending_wall = None
            for listener in self.listeners:
                try:
                    listener(self)
                except Exception:  # a listener must never break syncing
                    log.exception("after-sync listener failed")
            self._notify()
            log.debug(
                "synced (%s): %d services, %d operations in %.1f ms",
                "full" if full else "partial", len(changes.services), result.operations, seconds * 1000,
                extra={"sync": "full" if full else "partial", "services": len(changes.services),
                       "operations": result.operations, "seconds": round(seconds, 6)},
            )
            return result

    # -- one Service's rules, isolated ------------------------------------------

    def _state(self, key: ServiceKey, node_info: NodeInfo) -> tuple[object, ...]:
        return (*self.tracker.state(key), node_info)

    def _quarantine(self, key: ServiceKey, node_info: NodeInfo, reason: str, message: str,
                    kept: dict[Family, ServiceRules | None]) -> bool:
        """Keep ``key`` at ``kept`` (what it last had); log it once per change. True if it was not quarantined before.

        A partial sync only compiles Services that changed, so a quarantined
        one is retried when it changes (or when a Service sharing a frontend
        with it changes); full syncs (hourly, on SIGHUP, after a failure)
        retry it too, in case the kernel refused it for a passing reason.
        """
        held = self.quarantined.get(key) or self._retried.get(key)
        if held is None or held.state != self._state(key, node_info) or held.reason != reason:
            log.warning("quarantining Service %s: %s (reason=%s); it keeps its previous rules, and is retried "
                        "when it changes; every other Service is programmed", key, message, reason)
            self.observer.invalid_object("Service", reason)
        self.quarantined[key] = Quarantine(self._state(key, node_info), reason, message)
        self._kept.setdefault(key, kept)
        return held is None

    def _contribution(
        self, key: ServiceKey, node_info: NodeInfo, last_good: Callable[[Family, ServiceKey], ServiceRules | None]
    ) -> dict[Family, ServiceRules | None]:
        """``key``'s parts of both tables: compiled, or its last good ones if it cannot be compiled."""
        held = self.quarantined.pop(key, None)
        if held is not None:  # retried: if it is refused again unchanged, that is not news (see _quarantine)
            self._retried[key] = held
            if held.state != self._state(key, node_info):
                log.info("Service %s changed: retrying it", key)
        try:
            return {family: self._compile(key, family, node_info) for family in FAMILIES}
        except Exception as exc:  # one Service must never stop the others
            kept = {family: last_good(family, key) for family in FAMILIES}
            self._quarantine(key, node_info, "compile_error", f"{type(exc).__name__}: {exc}", kept)
            return kept

    def _compile(self, key: ServiceKey, family: Family, node_info: NodeInfo) -> ServiceRules | None:
        service = self.tracker.services.get(key)
        if service is None:
            tombstone = self._tombstones.get(key)
            if tombstone is None:
                return None
            ips = [ip for ip in tombstone[0] if (":" in ip) == (family == "ip6")]
            return ServiceRules((), tuple(("cluster-ips", Element(ip, comment=fit_comment(f"{key}, deleted"))) for ip in ips))
        if not any((":" in ip) == (family == "ip6") for ip in service.cluster_ips):
            return None  # nothing in this family (compile_service would say so after reading the slices)
        return compile_service(service, self.tracker.slices_of(key), family, node_info, self.config)

    def _all_keys(self) -> list[ServiceKey]:
        """Services, and deleted Services still rejecting traffic to their ClusterIPs."""
        return sorted(set(self.tracker.services) | set(self._tombstones))

    def _due_deletes(self, now: float, desired: dict[Family, Table]) -> list[Op]:
        ops = []
        for (family, name), due in list(self._pending_deletes.items()):
            if name in desired[family].chains:
                del self._pending_deletes[(family, name)]
            elif due <= now:
                ops.append(Op("delete", "chain", family, name))
        return ops

    def _commit(self, tx: Transaction, delete_ops: list[Op], now: float) -> None:
        tx.ops.extend(delete_ops)
        self.backend.apply(tx)
        self._after_commit(tx, delete_ops, now)

    def _after_commit(self, tx: Transaction, delete_ops: list[Op], now: float) -> None:
        for op in delete_ops:
            self._pending_deletes.pop((op.family, op.name), None)
            self._committed[op.family].chains.pop(op.name, None)
        for family, name in tx.deferred_chain_deletes:
            self._pending_deletes.setdefault((family, name), now + CHAIN_DELETE_DELAY)

    def _last_good(self, previous: Mapping[Family, Assembly] | None) -> Callable[[Family, ServiceKey], ServiceRules | None]:
        """What a Service had in the kernel before this sync: kept while quarantined, else its part in ``previous``."""

        def last_good(family: Family, key: ServiceKey) -> ServiceRules | None:
            kept = self._kept.get(key)
            if kept is not None:
                return kept[family]
            return previous[family].part(key) if previous is not None else None

        return last_good

    def _sync_full(self, node_info: NodeInfo, keys: set[ServiceKey]) -> SyncResult:
        """Compile everything, read the kernel, send the difference (or build missing tables in pieces).

        If the kernel refuses, start again from what it holds and program it
        piece by piece, quarantining the Services it refuses (``_isolate``).
        """
        current = self.backend.read()
        last_good = self._last_good(self._assemblies)
        assemblies = {family: Assembly(base_table(node_info, self.config, family, self.tracker.service_cidrs()))
                      for family in FAMILIES}
        for key in self._all_keys():
            for family, rules in self._contribution(key, node_info, last_good).items():
                assemblies[family].set_service(key, rules, track=False)
        self._assemblies = assemblies
        desired = {family: a.table for family, a in assemblies.items()}
        operations = 0
        refusal: NftError | None = None
        missing = [a for family, a in assemblies.items() if family not in current.tables]
        self._built |= {a.family for a in missing}
        if missing:
            try:
                operations += self._create_tables(missing)
                current.tables.update({a.family: _snapshot(a.table) for a in missing})
            except NftError as exc:
                # Without its traceback: kept past the except block, it would hold this frame (and the
                # whole desired table) in a cycle, which the gc.freeze() after the sync would keep for good.
                refusal = exc.with_traceback(None)
                current = self._skeleton_tables(node_info)
        now = self.clock()
        delete_ops = self._due_deletes(now, desired)  # chains read back that are pending deletion keep their due time
        if refusal is None:
            tx = Transaction()
            repaired: set[Family] = set()
            for family, table in current.tables.items():
                if all(a.family != family for a in missing):
                    difference = diff(table, desired[family], delete_chains=False)
                    if difference:
                        repaired.add(family)
                    tx.extend(difference)
            try:
                self._commit(tx, delete_ops, now)
                self._built |= repaired
                operations += tx.operations
            except NftError as exc:
                refusal = exc.with_traceback(None)  # see above
        if refusal is None:
            self._committed = {family: _snapshot(table) for family, table in desired.items()}
        else:
            # Start from what the kernel holds, and program it piece by piece.
            self._committed = dict(current.tables)
            base = {family: _everything(self._committed[family], a.table) for family, a in assemblies.items()}
            operations += self._isolate(node_info, sorted(set(self._all_keys()) & keys), base, delete_ops,
                                        last_good, refusal)
        for family, name in self._pending_deletes:
            self._committed[family].chains.setdefault(name, Chain(name, ()))
        self._rule_totals = {family: table.rule_count() for family, table in self._committed.items()}
        return SyncResult(True, operations, 0.0, len(keys))

    def _skeleton_tables(self, node_info: NodeInfo) -> Ruleset:
        """After a refused table build: what the kernel holds, with at least the skeleton of every family.

        A family whose table did not land gets the skeleton alone (no Service
        in it); if the kernel refuses even that, no Service is to blame.
        """
        current = self.backend.read()
        for family in FAMILIES:
            if family not in current.tables:
                skeleton = Assembly(base_table(node_info, self.config, family, self.tracker.service_cidrs())).table
                self.backend.apply_in_order(create(skeleton))  # the shared chains too: the snapshot has them
                current.tables[family] = _snapshot(skeleton)
        return current

    def _create_tables(self, assemblies: list[Assembly]) -> int:
        """Build the tables of families that have none on the node, in the pieces of ``plan.create``.

        Until a family's last piece lands no packet reaches its Service chains.
        Every skeleton goes first, while libnftables (which reads the whole
        ruleset before each command) still finds little in the kernel; then
        the backend gets all the pieces at once, so it can encode the next
        while the kernel takes in the previous. If the kernel refuses a piece,
        what landed is read back and the rest is programmed piece by piece
        (``_isolate``), in the same sync.
        """
        built = [create(assembly.table) for assembly in assemblies]
        pieces = [table[0] for table in built] + [piece for table in built for piece in table[1:]]
        self.backend.apply_in_order(pieces)
        return sum(piece.operations for piece in pieces)

    def _sync_partial(self, keys: set[ServiceKey]) -> SyncResult:
        """Program the Services in ``keys``: the difference for what they touched, in one transaction.

        If the kernel refuses it, the Services are programmed piece by piece
        against what the kernel holds (``_isolate``), and the ones it refuses
        are quarantined. A Service refused for the first time, or a refusal
        no Service explains, may be drift rather than a bad Service: then a
        full sync follows at once (``_FullSyncNeeded``), which reads the
        kernel back before it blames anyone.
        """
        assert self._assemblies is not None and self._node_info is not None
        node_info = self._node_info
        previous: dict[Family, dict[ServiceKey, ServiceRules | None]] = {family: {} for family in FAMILIES}

        def last_good(family: Family, key: ServiceKey) -> ServiceRules | None:
            return previous[family][key]

        touched = {family: Touched() for family in FAMILIES}
        for key in sorted(keys):
            for family, assembly in self._assemblies.items():
                previous[family][key] = assembly.part(key)
            for family, rules in self._contribution(key, node_info, last_good).items():
                touched[family].update(self._assemblies[family].set_service(key, rules))
        now = self.clock()
        desired = {family: a.table for family, a in self._assemblies.items()}
        delete_ops = self._due_deletes(now, desired)
        tx = self._transaction(touched)
        before = self._rules_in(touched)
        try:
            self._commit(tx, delete_ops, now)
        except NftError as refusal:
            known = set(self.quarantined) | set(self._retried)
            base = {family: Touched(set(t.chains), set(t.elements), set(t.counters)) for family, t in touched.items()}
            try:
                operations = self._isolate(node_info, sorted(keys), base, delete_ops, last_good, refusal)
            except NftError:
                raise _FullSyncNeeded(f"the kernel refused a partial sync ({refusal})") from None
            self._rule_totals = {family: table.rule_count() for family, table in self._committed.items()}
            fresh = set(self.quarantined) - known
            if fresh:
                raise _FullSyncNeeded(f"the kernel refused {', '.join(sorted(fresh))}, which were not quarantined "
                                      "before; reading the kernel back to rule out drift") from None
            return SyncResult(False, operations, 0.0, len(keys))
        self._record(touched)
        for family, count in self._rules_in(touched).items():
            self._rule_totals[family] = self._rule_totals.get(family, 0) + count - before[family]
        return SyncResult(False, tx.operations, 0.0, len(keys))

    # -- pieces of a sync ---------------------------------------------------------

    def _transaction(self, touched: dict[Family, Touched]) -> Transaction:
        """The difference between the committed tables and the desired ones, for ``touched`` only."""
        assert self._assemblies is not None
        tx = Transaction()
        for family, assembly in self._assemblies.items():
            t = touched.get(family)
            if t:
                tx.extend(diff(self._committed[family], assembly.table, False, t.chains, t.elements, t.counters))
        return tx

    def _record(self, touched: dict[Family, Touched]) -> None:
        """The kernel now holds ``touched`` as desired: update the committed tables."""
        assert self._assemblies is not None
        for family, assembly in self._assemblies.items():
            t = touched.get(family)
            if t is None:
                continue
            _apply_touched(self._committed[family], assembly.table, t)
            for (fam, name) in self._pending_deletes:
                if fam == family and name not in assembly.table.chains:
                    self._committed[family].chains.setdefault(name, Chain(name, ()))

    def _rules_in(self, touched: dict[Family, Touched]) -> dict[Family, int]:
        return {
            family: sum(len(self._committed[family].chains[n].rules) for n in t.chains if n in self._committed[family].chains)
            for family, t in touched.items() if family in self._committed
        }

    def _apply_group(self, touched: dict[Family, Touched], delete_ops: Sequence[Op] = ()) -> int:
        """Send the difference for ``touched`` (and due chain deletes) as one transaction; raises NftError."""
        tx = self._transaction(touched)
        self._commit(tx, list(delete_ops), self.clock())
        self._record(touched)
        return tx.operations

    def _owned(self, keys: Iterable[ServiceKey]) -> dict[Family, Touched]:
        assert self._assemblies is not None
        return {family: _union(a.owned(k) for k in keys) for family, a in self._assemblies.items()}

    def _blame(self, refusal: NftError, group: list[ServiceKey]) -> list[ServiceKey]:
        """The Services of ``group`` that own what the refused command touched (all of them if it is not known)."""
        op = refusal.op
        if op is None or self._assemblies is None:
            return group
        assembly = self._assemblies[op.family]
        if op.kind == "element":
            owners = assembly.owners(elements=[(op.name, e.key) for e in op.elements])
        elif op.kind == "rules":
            owners = assembly.owners(chains=[c.name for c in op.chains])
        elif op.kind == "chain":
            owners = assembly.owners(chains=[op.name])
        elif op.kind == "counter":
            owners = assembly.owners(counters=[op.name])
        else:
            owners = set()
        suspects = [k for k in group if k in owners]
        return suspects or group

    def _isolate(
        self,
        node_info: NodeInfo,
        keys: list[ServiceKey],
        touched: dict[Family, Touched],
        delete_ops: list[Op],
        last_good: Callable[[Family, ServiceKey], ServiceRules | None],
        refusal: NftError,
    ) -> int:
        """The kernel refused a sync's transaction: find the Services responsible and program everything else.

        ``touched`` is everything the refused transaction compared. What none
        of ``keys`` owns (the skeleton, shared pick chains, objects nobody
        contributes any more, due chain deletes) goes first; if the kernel
        refuses that, or refuses even a transaction that changes nothing, no
        Service is to blame and NftError is raised. Then the Services go in
        chunks of ``ISOLATION_CHUNK``, each a transaction: a chunk the kernel
        takes is recorded; for a chunk it refuses, the command it refused
        names the suspects (the owners of what that command touched; the
        whole chunk when the backend cannot say), which are halved until one
        is left. That one is quarantined: its part goes back to its last good
        one, which the kernel still holds. With netlink's answer, one or two
        transactions per Service refused.
        """
        assert self._assemblies is not None
        log.warning("the kernel refused a sync (%s); finding the Services responsible", refusal)
        owned = self._owned(keys)
        for family, t in touched.items():
            t.discard(owned[family])
        operations = self._apply_group(touched, delete_ops)
        try:
            self.backend.apply(_probe(self._committed))
        except NftError:
            raise refusal from None  # the kernel takes nothing at all: no Service is to blame
        groups = [keys[i:i + ISOLATION_CHUNK] for i in range(0, len(keys), ISOLATION_CHUNK)]
        deferred: list[dict[Family, Touched]] = []
        while groups:
            group = groups.pop(0)
            try:
                operations += self._apply_group(self._owned(group))
                continue
            except NftError as exc:
                suspects = self._blame(exc, group)
                if len(suspects) > 1:
                    half = len(suspects) // 2
                    others = [k for k in group if k not in suspects]
                    groups[:0] = [part for part in (suspects[:half], suspects[half:], others) if part]
                    continue
                key = suspects[0]
                error = str(exc)  # not the exception: its traceback would hold this frame in a cycle
            before = self._owned([key])
            self._quarantine(key, node_info, "kernel_refused", error, {f: last_good(f, key) for f in FAMILIES})
            back = {family: self._assemblies[family].set_service(key, last_good(family, key)) for family in FAMILIES}
            for family in FAMILIES:
                back[family].update(before[family])
            rest = [k for k in group if k != key]
            if rest:
                groups.insert(0, rest)
            try:
                operations += self._apply_group(back)
            except NftError:
                # An element several Services contribute now goes to the next of them, which
                # may be refused too and is not tested yet: try again once every group is done.
                deferred.append(back)
        if deferred:
            operations += self._apply_group({family: _union(d[family] for d in deferred) for family in FAMILIES})
        return operations

    def delete_dereferenced_chains(self) -> int:
        """Delete now the chains a sync dereferenced, without the usual delay (``kproxy --once``)."""
        with self.lock:
            if not self._pending_deletes:
                return 0
            ops = [Op("delete", "chain", family, name) for family, name in sorted(self._pending_deletes)]
            self._commit(Transaction(), ops, self.clock())
            return len(ops)

    def _cleanup_conntrack(self, keys: set[ServiceKey], node_info: NodeInfo) -> None:
        if self.conntrack is None or not keys:
            return
        services = {k: s for k in keys if (s := self.tracker.services.get(k)) and any(p.protocol == "udp" for p in s.ports)}
        if not services:
            return
        slices = {eps.key: eps for key in services for eps in self.tracker.slices_of(key)}
        targets = udp_cleanup_targets(Cluster(services, slices, self.tracker.node), node_info, self.config)
        try:
            deleted = cleanup_stale_udp(self.conntrack, targets)
        except Exception as exc:  # (pyroute2 raises its own decoding errors too) the sync has succeeded: never fail it
            log.warning("conntrack cleanup failed; stale UDP entries may remain until they time out: %s", exc)
            return
        if deleted:
            self.observer.conntrack_deleted(deleted)

    def _cleanup_unanswered(self, families: set[Family]) -> None:
        """After building or repairing ``families``' tables: delete the TCP attempts that went to a frontend
        untranslated before (see kproxy.node.conntrack), so that their retransmissions are DNATed."""
        if self.conntrack is None:
            return
        # Every Service's, quarantined ones too: an untranslated attempt to a Service is never answered by it.
        services = list(self.tracker.services.values())
        frontends = {FAMILIES[family]: tcp_frontends(services, FAMILIES[family]) for family in sorted(families)}
        try:
            deleted = cleanup_unanswered_tcp(self.conntrack, frontends)
        except Exception as exc:  # (pyroute2 raises its own decoding errors too) the sync has succeeded: never fail it
            log.warning("conntrack cleanup failed; TCP attempts left untranslated while kproxy's table was missing "
                        "stay until they time out: %s", exc)
            return
        if deleted:
            self.observer.unanswered_deleted(deleted)

    # -- inspection -----------------------------------------------------------

    def local_policy_report(self, timeout: float | None = None) -> list[LocalPolicyStatus] | None:
        """Every Service with a Local traffic policy, and its local endpoints (IPv4 and IPv6 together), as of the
        last sync (upstream computes its no-local-endpoints metric in its sync, too).

        Computed once per sync: the health servers read it after each one, and
        scrapes in between get the same (at 10k Services it took a fifth of a
        scrape). None if a sync holds the state for longer than ``timeout``
        seconds (a scrape answers with what it had rather than wait).
        """
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            if self._policy_report is None or self._policy_report[0] != self.sync_count:
                zone = self.tracker.node.zone if self.tracker.node else ""
                services = self.tracker.services
                report = [
                    local_policy_status(services[key], self.tracker.slices_of(key), self.node_name, zone)
                    for key in sorted(k for k, s in services.items() if s.internal_policy_local or s.external_policy_local)
                ]
                self._policy_report = (self.sync_count, report)
            return list(self._policy_report[1])
        finally:
            self.lock.release()

    def counter_names(self, timeout: float | None = None) -> tuple[tuple[Family, str], ...] | None:
        """(family, name) of every named counter the committed tables hold, computed once per sync; None before
        the first sync has succeeded (the kernel may hold a previous process's tables), or if a sync holds the
        state for longer than ``timeout`` seconds."""
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            if self.sync_count == 0:
                return None
            if self._counter_names is None or self._counter_names[0] != self._sync_attempts:
                names = tuple((family, name) for family, table in self._committed.items() for name in table.counters)
                self._counter_names = (self._sync_attempts, names)
            return self._counter_names[1]
        finally:
            self.lock.release()

    def metrics_services(self, timeout: float | None = None) -> frozenset[str] | None:
        """``namespace/name`` of the Services annotated ``kproxy.io/metrics: "true"``; None if a sync held the
        state for longer than ``timeout`` seconds."""
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            return frozenset(key for key, service in self.tracker.services.items() if service.metrics)
        finally:
            self.lock.release()

    def node_eligible(self) -> bool:
        """Whether this node's Node object is known and not being deleted (load balancers should send here)."""
        node = self.tracker.node
        return node is not None and not node.being_deleted

    def committed(self) -> dict[Family, Table]:
        with self.lock:
            return {family: _snapshot(table) for family, table in self._committed.items()}

    def cluster(self) -> Cluster:
        with self.lock:
            return self.tracker.cluster()


def _snapshot(table: Table) -> Table:
    return Table(
        family=table.family,
        comment=table.comment,
        sets=dict(table.sets),
        chains=dict(table.chains),
        elements={name: dict(members) for name, members in table.elements.items()},
        counters=dict(table.counters),
    )


PROBE_ADDRESS = {"ip": "0.0.0.0", "ip6": "::"}
"""Never a ClusterIP (conversion refuses unspecified addresses)."""


def _probe(tables: Mapping[Family, Table]) -> Transaction:
    """A transaction that changes nothing, yet is sent to the kernel: it adds and deletes one element."""
    tx = Transaction()
    for family, table in tables.items():
        element = Element(PROBE_ADDRESS[family], comment="kproxy probe")
        decl = table.sets.get("cluster-ips")
        tx.add(Op("add", "element", family, "cluster-ips", set_decl=decl, elements=(element,)))
        tx.add(Op("delete", "element", family, "cluster-ips", set_decl=decl, elements=(element,)))
    return tx


def _union(parts: Iterable[Touched]) -> Touched:
    total = Touched()
    for part in parts:
        total.update(part)
    return total


def _everything(current: Table, desired: Table) -> Touched:
    """Every name either table holds: what a full diff compares."""
    return Touched(
        chains=set(current.chains) | set(desired.chains),
        elements={(name, key) for table in (current, desired) for name, members in table.elements.items()
                  for key in members},
        counters=set(current.counters) | set(desired.counters),
    )


def _apply_touched(committed: Table, desired: Table, touched: Touched) -> None:
    for name in touched.chains:
        chain = desired.chains.get(name)
        if chain is None:
            committed.chains.pop(name, None)
        else:
            committed.chains[name] = chain
    for set_name, key in touched.elements:
        element = desired.elements.get(set_name, {}).get(key)
        members = committed.elements.setdefault(set_name, {})
        if element is None:
            members.pop(key, None)
        else:
            members[key] = element
    for name in touched.counters:
        if name in desired.counters:
            committed.counters[name] = desired.counters[name]
        else:
            committed.counters.pop(name, None)
    for name, decl in desired.sets.items():
        committed.sets.setdefault(name, decl)
