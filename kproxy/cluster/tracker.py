"""Change tracking: the cluster as the watchers see it, and what changed since the last sync.

Every Service and EndpointSlice is held as its converted model value. A change
marks its Service dirty; at sync time a dirty Service whose state equals the
state at the last successful sync is dropped, so changes that cancel out cost
nothing. Trigger times (``endpoints.kubernetes.io/last-change-trigger-time``)
are kept for the network programming latency metric, as upstream keeps them:
only those later than the tracker's start, and none for a Service whose slice
was deleted. Pure: no I/O, no clock (the start is given), no locking (the
caller serialises access).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

from kproxy.cluster.model import (
    Cluster,
    EndpointSlice,
    Node,
    Service,
    ServiceCIDR,
    ServiceKey,
    SliceKey,
    union_of_cidrs,
)

log = logging.getLogger(__name__)

ServiceState = tuple[Service | None, tuple[EndpointSlice, ...]]


def parse_trigger_time(text: str) -> float | None:
    """RFC 3339 (``2026-12-01T10:00:00Z``, fractions allowed) to a UNIX timestamp."""
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(slots=True)
class Changes:
    """What a sync has to program."""

    services: set[ServiceKey]
    """Services whose rules may differ from what was last programmed."""
    service_changes: int
    endpoint_changes: int
    trigger_times: list[float] = field(default_factory=list)
    """Trigger times of the endpoint changes in this sync (UNIX seconds)."""


class ChangeTracker:
    """Services, slices and the node, plus the dirty set since the last sync."""

    def __init__(self, started: float | None = None) -> None:
        self.started = started
        """When the proxy started (UNIX seconds), or None. A trigger time from before it is not measured, as
        upstream's trackerStartTime: a slice listed at startup was last changed at any time in the past, and
        the time since then is not how long programming took (10k old slices would fill the histogram's
        top bucket at every restart)."""
        self.services: dict[ServiceKey, Service] = {}
        self.slices: dict[SliceKey, EndpointSlice] = {}
        self.node: Node | None = None
        self._service_cidrs: dict[str, ServiceCIDR] = {}
        self._by_service: dict[ServiceKey, dict[SliceKey, EndpointSlice]] = {}
        self._synced: dict[ServiceKey, ServiceState] = {}
        self._dirty_services: set[ServiceKey] = set()
        self._dirty_endpoints: set[ServiceKey] = set()
        self._trigger_times: dict[ServiceKey, list[float]] = {}
        self.service_changes_total = 0
        self.endpoint_changes_total = 0

    # -- updates from the watchers ------------------------------------------

    def set_service(self, key: ServiceKey, service: Service | None) -> None:
        if self.services.get(key) == service:
            return
        if service is None:
            self.services.pop(key, None)
        else:
            self.services[key] = service
        self._dirty_services.add(key)
        self.service_changes_total += 1

    def set_slice(self, key: SliceKey, eps: EndpointSlice | None, unusable: bool = False) -> None:
        """A slice's new state; None for a deleted slice, or with ``unusable`` for one that exists but
        could not be converted (its endpoints go, and its Service's pending trigger times stay)."""
        old = self.slices.get(key)
        if old == eps:
            return
        if old is not None:
            held = self._by_service.get(old.service_key)
            if held is not None:
                held.pop(key, None)
                if not held:  # a Service's last slice: forget the Service here too (known() reads these keys)
                    del self._by_service[old.service_key]
            self._dirty_endpoints.add(old.service_key)
        if eps is None:
            self.slices.pop(key, None)
            if old is not None and not unusable:
                # As upstream: a deleted slice carries the time of its last update, not of this change, and
                # the Service's pending trigger times go with it (none of them is measured).
                self._trigger_times.pop(old.service_key, None)
        else:
            self.slices[key] = eps
            self._by_service.setdefault(eps.service_key, {})[key] = eps
            self._dirty_endpoints.add(eps.service_key)
            if eps.trigger_time and (old is None or old.trigger_time != eps.trigger_time):
                when = parse_trigger_time(eps.trigger_time)
                if when is not None and (self.started is None or when > self.started):
                    self._trigger_times.setdefault(eps.service_key, []).append(when)
        self.endpoint_changes_total += 1

    def set_node(self, node: Node | None) -> None:
        self.node = node

    def set_service_cidr(self, name: str, cidr: ServiceCIDR | None) -> None:
        if cidr is None:
            self._service_cidrs.pop(name, None)
        else:
            self._service_cidrs[name] = cidr

    def service_cidr_names(self) -> list[str]:
        return list(self._service_cidrs)

    def service_cidrs(self) -> tuple[str, ...]:
        """The union of every ServiceCIDR's ranges."""
        return union_of_cidrs(self._service_cidrs.values())

    # -- reading -----------------------------------------------------------

    def slices_of(self, key: ServiceKey) -> tuple[EndpointSlice, ...]:
        return tuple(eps for _, eps in sorted(self._by_service.get(key, {}).items()))

    def state(self, key: ServiceKey) -> ServiceState:
        """What a Service's rules are compiled from: the Service and its slices."""
        return self.services.get(key), self.slices_of(key)

    def cluster(self) -> Cluster:
        """A snapshot view of everything (for full syncs and inspection)."""
        return Cluster(services=dict(self.services), slices=dict(self.slices), node=self.node,
                       service_cidrs=self.service_cidrs())

    def pending(self) -> tuple[int, int]:
        """(services with service changes, services with endpoint changes) not yet synced."""
        return len(self._dirty_services), len(self._dirty_endpoints)

    # -- syncing -------------------------------------------------------------

    def take(self) -> Changes:
        """The changes to program now; changes that cancelled out are dropped."""
        dirty = self._dirty_services | self._dirty_endpoints
        real = {key for key in dirty if self._synced.get(key, (None, ())) != self.state(key)}
        changes = Changes(
            services=real,
            service_changes=len(self._dirty_services & real),
            endpoint_changes=len(self._dirty_endpoints & real),
            trigger_times=[t for key in real for t in self._trigger_times.get(key, [])],
        )
        self._dirty_services.clear()
        self._dirty_endpoints.clear()
        self._trigger_times.clear()
        return changes

    def known(self) -> set[ServiceKey]:
        """Every known Service (and every Service programmed before)."""
        return set(self.services) | set(self._synced) | set(self._by_service)

    def all_services(self) -> Changes:
        """The changes to program now, for a full sync: every known Service."""
        changes = self.take()
        changes.services = self.known()
        return changes

    def synced(self, keys: set[ServiceKey]) -> None:
        """Record that ``keys`` are now programmed as they are now."""
        for key in keys:
            state = self.state(key)
            if state == (None, ()):
                self._synced.pop(key, None)
            else:
                self._synced[key] = state

    def forget_synced(self) -> None:
        """After a failed sync: nothing is known to be programmed any more."""
        self._synced.clear()
