"""The sync engine: from tracked changes to kernel transactions, one sync at a time.

* The committed state (what the kernel holds) is kept in memory per family. A
  partial sync recompiles only the Services that changed, lets the assembly
  report which chains and element keys that touched, and sends the difference
  for those alone: the hot path never re-reads or re-diffs the whole table.
* A full sync recompiles everything, reads kproxy's tables back from the
  kernel, and sends the difference. It runs first (adopting whatever a previous
  run left, without flushing), hourly, after any failure, and when the node's
  labels or addresses change. Reading the kernel is what repairs drift.
* A failed transaction changes nothing in the kernel. The Services it carried
  stay dirty, and the next attempt is a full sync after a backoff.
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
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from kproxy.assembly import Assembly, Touched
from kproxy.compiler import (
    FAMILIES,
    NodeInfo,
    ProxyConfig,
    ServiceRules,
    base_table,
    compile_service,
    node_info,
)
from kproxy.conntrack import Conntrack, cleanup_stale_udp, udp_cleanup_targets
from kproxy.convert import (
    InvalidObject,
    NotProxied,
    gc_paused,
    node_from_manifest,
    object_key,
    service_from_manifest,
    slice_from_manifest,
)
from kproxy.endpoints import port_endpoints, select
from kproxy.model import Cluster, EndpointSlice, Service, ServiceKey, SliceKey
from kproxy.nft import Backend
from kproxy.plan import Op, Transaction, create, diff
from kproxy.ruleset import Chain, Element, Family, Table
from kproxy.tracker import ChangeTracker

log = logging.getLogger(__name__)

CHAIN_DELETE_DELAY = 1.0
FULL_SYNC_INTERVAL = 3600.0
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

    def no_local_endpoints(self, internal: int, external: int) -> None: ...


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

    def no_local_endpoints(self, internal: int, external: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class LocalPolicyStatus:
    """A Service with a Local traffic policy, as this node serves it."""

    namespace: str
    name: str
    internal_local: bool
    external_local: bool
    local_endpoints: int
    """Distinct local endpoint addresses in use (ready ones, or serving-terminating as a fallback)."""
    local_ready_endpoints: int
    """Distinct local endpoint addresses that are ready (what health checks report, as upstream)."""
    has_endpoints: bool
    """Whether it has usable endpoints anywhere."""
    health_check_node_port: int | None


@dataclass(slots=True)
class SyncResult:
    full: bool
    operations: int
    seconds: float
    services: int


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
        self.tracker = ChangeTracker()
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._synced_sources: set[str] = set()
        self._assemblies: dict[Family, Assembly] | None = None
        self._committed: dict[Family, Table] = {}
        self._rule_totals: dict[Family, int] = {}
        """Rules in each committed table, kept up to date by partial syncs (counting 10k chains costs 8 ms)."""
        self._pending_deletes: dict[tuple[Family, str], float] = {}
        self._tombstones: dict[ServiceKey, tuple[tuple[str, ...], float]] = {}
        """Deleted Services: their ClusterIPs, and when to stop rejecting traffic to them."""
        self._node_info: NodeInfo | None = None
        self._needs_full = True
        self._last_full = float("-inf")
        self.last_sync: SyncResult | None = None
        self.last_success_wall: float | None = None
        self.oldest_pending_wall: float | None = None
        """Wall time of the oldest change not yet programmed (None when all are)."""
        self.sync_count = 0
        self.listeners: list[Callable[["Proxier"], None]] = []
        """Called (under the lock) after every successful sync."""

    # -- input from the watchers --------------------------------------------

    def _notify(self) -> None:
        if self.oldest_pending_wall is None and (self._needs_full or any(self.tracker.pending())):
            self.oldest_pending_wall = self.wall_clock()
        self.changed.notify_all()

    def _service(self, obj: Mapping[str, Any]) -> tuple[ServiceKey, Service | None]:
        """Convert a Service; None for one kproxy leaves alone or must skip."""
        key = ServiceKey(object_key(obj))
        try:
            service = service_from_manifest(obj)
            return service.key, service
        except NotProxied:
            return key, None
        except InvalidObject as exc:
            log.warning("skipping Service %s: %s (reason=%s)", key, exc, exc.reason)
            self.observer.invalid_object("Service", exc.reason)
            return key, None

    def _slice(self, obj: Mapping[str, Any]) -> tuple[SliceKey, EndpointSlice | None]:
        key = SliceKey(object_key(obj))
        try:
            return key, slice_from_manifest(obj)
        except InvalidObject as exc:
            log.warning("skipping EndpointSlice %s: %s (reason=%s)", key, exc, exc.reason)
            self.observer.invalid_object("EndpointSlice", exc.reason)
            return key, None

    def on_service(self, event: str, obj: Mapping[str, Any]) -> None:
        key, service = (ServiceKey(object_key(obj)), None) if event == "DELETED" else self._service(obj)
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
        self.tracker.set_service(key, service)

    def on_slice(self, event: str, obj: Mapping[str, Any]) -> None:
        key, eps = (SliceKey(object_key(obj)), None) if event == "DELETED" else self._slice(obj)
        with self.lock:
            self.tracker.set_slice(key, eps)
            self._notify()

    def on_node(self, event: str, obj: Mapping[str, Any]) -> None:
        node = None
        if event != "DELETED":
            try:
                node = node_from_manifest(obj)
            except InvalidObject as exc:
                log.warning("ignoring Node %s: %s (reason=%s)", object_key(obj), exc, exc.reason)
                self.observer.invalid_object("Node", exc.reason)
                return
        with self.lock:
            self.tracker.set_node(node)
            self._notify()

    def on_relist(self, kind: str, objects: list[Mapping[str, Any]]) -> None:
        """A full list replaces everything of one kind: objects not in it are deleted.

        Objects are converted before the lock is taken, so a relist of 10k
        objects does not stall a running sync. The cyclic GC stays paused
        throughout: a full collection in the middle would walk every object
        of the list (at 30k Services that doubled the relist's time), and
        none of what is built here forms cycles.
        """
        with gc_paused():
            self._relist(kind, objects)

    def _relist(self, kind: str, objects: list[Mapping[str, Any]]) -> None:
        if kind == "Service":
            services = dict(self._service(obj) for obj in objects)
        elif kind == "EndpointSlice":
            slices = dict(self._slice(obj) for obj in objects)
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
                    self.tracker.set_slice(key, eps)
            elif kind == "Node":
                if not objects:
                    self.tracker.set_node(None)
                for obj in objects:
                    self.on_node("ADDED", obj)
            self._synced_sources.add(kind)
            self._notify()

    @property
    def ready(self) -> bool:
        """Services, EndpointSlices and this Node have been listed once.

        Upstream waits for Services and EndpointSlices; kproxy also waits for
        the (possibly empty) list of its own Node, so that the first sync
        already uses the Node's addresses and zone instead of being redone.
        """
        with self.lock:
            return {"Service", "EndpointSlice", "Node"} <= self._synced_sources

    # -- syncing -------------------------------------------------------------

    def _current_node_info(self) -> NodeInfo:
        info = node_info(self.node_name, self.tracker.node)
        if not info.primary_ips:
            info = node_info(self.node_name, self.tracker.node, self.interfaces()[1])
        return info

    def request_full_sync(self) -> None:
        with self.lock:
            self._needs_full = True
            self._notify()

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
            node_info = self._current_node_info()
            start = self.clock()
            full = self._needs_full or self._assemblies is None or node_info != self._node_info or (
                start - self._last_full >= FULL_SYNC_INTERVAL
            )
            changes = self.tracker.all_services() if full else self.tracker.take()
            expired = {key for key, (_, until) in self._tombstones.items() if until <= start}
            for key in expired:
                del self._tombstones[key]
            changes.services |= expired
            try:
                result = self._sync_full(node_info, changes.services) if full else self._sync_partial(changes.services)
            except Exception:
                self._needs_full = True
                self.tracker.forget_synced()
                self._assemblies = None
                self.observer.sync_failed(full, self.clock() - start)
                raise
            self.tracker.synced(changes.services)
            self._needs_full = False
            if full:
                self._last_full = start
                self._node_info = node_info
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

    def _compile(self, key: ServiceKey, family: Family, node_info: NodeInfo) -> ServiceRules | None:
        service = self.tracker.services.get(key)
        if service is None:
            tombstone = self._tombstones.get(key)
            if tombstone is None:
                return None
            ips = [ip for ip in tombstone[0] if (":" in ip) == (family == "ip6")]
            return ServiceRules((), tuple(("cluster-ips", Element(ip, comment=f"{key}, deleted")) for ip in ips))
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
        for op in delete_ops:
            self._pending_deletes.pop((op.family, op.name), None)
            self._committed[op.family].chains.pop(op.name, None)
        for family, name in tx.deferred_chain_deletes:
            self._pending_deletes.setdefault((family, name), now + CHAIN_DELETE_DELAY)

    def _sync_full(self, node_info: NodeInfo, keys: set[ServiceKey]) -> SyncResult:
        current = self.backend.read()
        assemblies: dict[Family, Assembly] = {}
        tx = Transaction()
        operations = 0
        missing: list[Assembly] = []
        for family in FAMILIES:
            assembly = Assembly(base_table(node_info, self.config, family))
            for key in self._all_keys():
                assembly.set_service(key, self._compile(key, family, node_info), track=False)
            if family in current.tables:
                tx.extend(diff(current.tables[family], assembly.table, delete_chains=False))
            else:
                missing.append(assembly)
            assemblies[family] = assembly
        if missing:
            operations += self._create_tables(missing)
        desired = {family: a.table for family, a in assemblies.items()}
        now = self.clock()
        # Chains read back that are still pending deletion keep their due time.
        delete_ops = self._due_deletes(now, desired)
        self._commit(tx, delete_ops, now)
        operations += tx.operations
        self._assemblies = assemblies
        self._committed = {family: _snapshot(table) for family, table in desired.items()}
        for family, name in self._pending_deletes:
            self._committed[family].chains[name] = Chain(name, ())
        self._rule_totals = {family: table.rule_count() for family, table in self._committed.items()}
        return SyncResult(True, operations, 0.0, len(keys))

    def _create_tables(self, assemblies: list[Assembly]) -> int:
        """Build the tables of families that have none on the node, in the pieces of ``plan.create``.

        Until a family's last piece lands no packet reaches its Service chains.
        Every skeleton goes first, while libnftables (which reads the whole
        ruleset before each command) still finds little in the kernel; then
        the backend gets all the pieces at once, so it can encode the next
        while the kernel takes in the previous.
        """
        built = [create(assembly.table) for assembly in assemblies]
        pieces = [table[0] for table in built] + [piece for table in built for piece in table[1:]]
        self.backend.apply_in_order(pieces)
        return sum(piece.operations for piece in pieces)

    def _sync_partial(self, keys: set[ServiceKey]) -> SyncResult:
        assert self._assemblies is not None and self._node_info is not None
        touched: dict[Family, Touched] = {family: Touched() for family in FAMILIES}
        for key in sorted(keys):
            for family, assembly in self._assemblies.items():
                touched[family].update(assembly.set_service(key, self._compile(key, family, self._node_info)))
        tx = Transaction()
        for family, assembly in self._assemblies.items():
            t = touched[family]
            if t:
                tx.extend(diff(self._committed[family], assembly.table, False, t.chains, t.elements, t.counters))
        now = self.clock()
        desired = {family: a.table for family, a in self._assemblies.items()}
        delete_ops = self._due_deletes(now, desired)
        self._commit(tx, delete_ops, now)
        for family, assembly in self._assemblies.items():
            committed = self._committed[family]
            before = sum(len(committed.chains[n].rules) for n in touched[family].chains if n in committed.chains)
            _apply_touched(committed, assembly.table, touched[family])
            after = sum(len(committed.chains[n].rules) for n in touched[family].chains if n in committed.chains)
            self._rule_totals[family] = self._rule_totals.get(family, 0) + after - before
            for (fam, name) in self._pending_deletes:
                if fam == family and name not in assembly.table.chains:
                    self._committed[family].chains[name] = Chain(name, ())
        return SyncResult(False, tx.operations, 0.0, len(keys))

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
        except (OSError, RuntimeError) as exc:
            log.warning("conntrack cleanup failed; stale UDP entries may remain until they time out: %s", exc)
            return
        if deleted:
            self.observer.conntrack_deleted(deleted)

    # -- inspection -----------------------------------------------------------

    def local_policy_report(self) -> list[LocalPolicyStatus]:
        """Every Service port with a Local traffic policy, and its local endpoints (IPv4 and IPv6 together)."""
        with self.lock:
            report = []
            for key in sorted(self.tracker.services):
                service = self.tracker.services[key]
                if not (service.internal_policy_local or service.external_policy_local):
                    continue
                slices = self.tracker.slices_of(key)
                local: set[tuple[str, int]] = set()
                ready: set[str] = set()
                has_any = False
                for port in service.ports:
                    for family in (4, 6):
                        selection = select(service, port_endpoints(port, slices, family), self.node_name,
                                           self.tracker.node.zone if self.tracker.node else "")
                        local |= {(pe.address, pe.port) for pe in selection.local}
                        ready |= {pe.address for pe in selection.local if pe.endpoint.ready}
                        has_any = has_any or selection.has_any
                report.append(LocalPolicyStatus(
                    namespace=service.namespace,
                    name=service.name,
                    internal_local=service.internal_policy_local,
                    external_local=service.external_policy_local,
                    local_endpoints=len({address for address, _ in local}),
                    local_ready_endpoints=len(ready),
                    has_endpoints=has_any,
                    health_check_node_port=service.health_check_node_port,
                ))
            return report

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


class SyncRunner(threading.Thread):
    """Runs ``proxier.sync`` no more often than ``min_period``, at least every ``period``.

    A failed sync is retried after a capped exponential backoff, as a full sync.
    Nothing runs until the proxier is ready (Services and slices listed once).
    """

    def __init__(
        self,
        proxier: Proxier,
        min_period: float,
        period: float,
        stop: threading.Event,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        super().__init__(name="kproxy-sync", daemon=True)
        self.proxier = proxier
        self.min_period = min_period
        self.period = period
        self.stop_event = stop
        self.backoff = backoff
        self.failures = 0
        self._last_start = float("-inf")

    def wake(self) -> None:
        with self.proxier.lock:
            self.proxier.changed.notify_all()

    def run(self) -> None:
        clock = self.proxier.clock
        retry_at: float | None = None
        next_periodic = clock() + self.period
        while not self.stop_event.is_set():
            with self.proxier.lock:
                now = clock()
                earliest = max(self._last_start + self.min_period, retry_at or float("-inf"))
                ready = self.proxier.ready
                due = ready and (self.proxier.has_work(now) or now >= next_periodic)
                if not due or now < earliest:
                    deadline = next_periodic
                    if ready and self.proxier.has_work(now):
                        deadline = min(deadline, earliest)
                    elif ready:
                        nd = self.proxier.next_deadline()
                        if nd is not None:
                            deadline = min(deadline, max(nd, earliest))
                    self.proxier.changed.wait(timeout=max(0.001, min(deadline - now, 1.0)))
                    continue
            if self.stop_event.is_set():
                break
            self._last_start = clock()
            next_periodic = self._last_start + self.period
            try:
                self.proxier.sync()
                self.failures = 0
                retry_at = None
            except Exception as exc:  # a sync must never kill the loop
                self.failures += 1
                delay = min(self.backoff[1], self.backoff[0] * 2 ** (self.failures - 1))
                retry_at = clock() + delay
                log.warning("sync failed (attempt %d), full resync in %.1fs: %s", self.failures, delay, exc)
