"""Health: /healthz, /livez and /readyz, and one healthCheckNodePort server per Local Service.

Semantics are upstream's (``pkg/proxy/healthcheck/proxy_health.go`` and
``service_health.go``):

* The proxy is *healthy* unless a change has been pending (queued and not yet
  programmed) for at least the health timeout, ``2 x syncPeriod``. A proxy
  that is starting, or fully synced, is healthy; so is one whose first sync is
  still under way, until its oldest change is that old. A failing sync leaves
  its changes pending, so the proxy turns unhealthy one timeout later.
* ``/healthz`` also answers 503 when the node is not eligible: unknown, or
  being deleted (deletion timestamp or the ``ToBeDeletedByClusterAutoscaler``
  taint), so load balancers drain it. ``/livez`` ignores the node.
* Both answer JSON with ``lastUpdated``, ``currentTime``, ``healthy`` and the
  per-family ``status`` (``/healthz`` adds ``nodeEligible``), as Go's
  ``json.Marshal`` writes them. ``lastUpdated`` is the current time when the
  answer is 200, and the last successful sync otherwise (the start time
  before the first one, where upstream marks its proxier updated).
* ``/readyz`` is kproxy's own, for the pod's readiness probe: 200 only once
  the first full sync has succeeded (the node's rules are programmed), and
  from then on unless the proxy turns unhealthy as above (a change pending
  for ``2 x syncPeriod``: syncs failing or stuck) or the daemon is stopping
  (SIGTERM received). The node's state is ignored. Its JSON body says
  ``ready`` and, when not, ``reason``. A DaemonSet rollout with
  ``minReadySeconds`` therefore waits for each new pod to have programmed
  its node, and stops at the first node where it cannot.
* A healthCheckNodePort server answers 200 when the Service has at least one
  local endpoint and the proxy is healthy (node state ignored), else 503, with
  ``X-Load-Balancing-Endpoint-Weight: <local endpoints>``. A port that cannot
  be bound is skipped and tried again at the next sync.
* Inputs are read at request time, without the proxier's lock (a sync may
  hold it for minutes; these are single attribute reads).
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kproxy.observe.http import HTTPService, Request, Response
from kproxy.observe.metrics import IP_FAMILIES
from kproxy.rules.endpoints import LocalPolicyStatus

log = logging.getLogger(__name__)

JSON = "application/json"
HEALTH_TIMEOUT_SYNC_PERIODS = 2
"""Upstream: ``NewProxyHealthServer(addr, 2*config.SyncPeriod.Duration, ...)``."""
_NOSNIFF = ("X-Content-Type-Options", "nosniff")


@dataclass(frozen=True, slots=True)
class HealthInputs:
    """What the proxy's health is computed from, read at request time."""

    last_updated: float | None
    """Wall time of the last successful sync; None before the first."""
    oldest_pending: float | None
    """Wall time of the oldest change not yet programmed; None when all are."""
    node_eligible: bool
    """The node is known and not being deleted."""
    sync_period: float
    """Seconds; the health timeout is twice this."""
    stopping: bool = False
    """The daemon is shutting down (/readyz answers 503)."""


@dataclass(frozen=True, slots=True)
class HealthStatus:
    healthy: bool
    """The proxy alone (node state ignored): no change pending for the health timeout or longer."""
    node_eligible: bool
    last_updated: float
    current_time: float


class HealthCounter(Protocol):
    """Counts answers by status code (ProxyMetrics)."""

    def healthz(self, code: int) -> None: ...

    def livez(self, code: int) -> None: ...


class HealthSource(Protocol):
    """What health reads from the sync engine (a Proxier)."""

    last_success_wall: float | None
    """Wall time of the last successful sync."""
    oldest_pending_wall: float | None
    """Wall time of the oldest change not yet programmed."""

    def node_eligible(self) -> bool:
        """Whether this node's Node object is known and not being deleted."""
        ...


def proxier_health_inputs(proxier: HealthSource, sync_period: float,
                          stopping: Callable[[], bool] = lambda: False) -> Callable[[], HealthInputs]:
    """HealthInputs from the sync engine (and whether the daemon is stopping), read at each probe."""

    def read() -> HealthInputs:
        return HealthInputs(
            last_updated=proxier.last_success_wall,
            oldest_pending=proxier.oldest_pending_wall,
            node_eligible=proxier.node_eligible(),
            sync_period=sync_period,
            stopping=stopping(),
        )

    return read


def go_time(timestamp: float | None) -> str:
    """A UNIX time as Go marshals a UTC ``time.Time`` to JSON (RFC 3339, trailing zeros trimmed)."""
    if timestamp is None:
        return "0001-01-01T00:00:00Z"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


class ProxyHealth:
    """``/healthz``, ``/livez`` and ``/readyz``."""

    def __init__(
        self,
        inputs: Callable[[], HealthInputs],
        counter: HealthCounter | None = None,
        clock: Callable[[], float] = time.time,
        families: Sequence[str] = IP_FAMILIES,
        started: float | None = None,
    ) -> None:
        self.inputs = inputs
        self.counter = counter
        self.clock = clock
        self.families = tuple(families)
        self.started = clock() if started is None else started
        """Stands for the last update before the first sync (upstream calls Updated() when its proxier starts)."""
        self._server: HTTPService | None = None

    def status(self) -> HealthStatus:
        return self._status(self.inputs())

    def _status(self, state: HealthInputs) -> HealthStatus:
        now = self.clock()
        timeout = HEALTH_TIMEOUT_SYNC_PERIODS * state.sync_period
        stale = state.oldest_pending is not None and now - state.oldest_pending >= timeout
        last = state.last_updated if state.last_updated is not None else self.started
        return HealthStatus(not stale, state.node_eligible, last, now)

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): programmed once, healthy since, and not stopping."""
        state = self.inputs()
        status = self._status(state)
        if state.stopping:
            return False, "kproxy is stopping"
        if state.last_updated is None:
            return False, "the first full sync has not succeeded yet"
        if not status.healthy:
            return False, (f"a change has waited {HEALTH_TIMEOUT_SYNC_PERIODS} x syncPeriod "
                           f"({HEALTH_TIMEOUT_SYNC_PERIODS * state.sync_period:g}s) without being programmed")
        return True, ""

    def readyz(self, request: Request) -> Response:
        state = self.inputs()
        ready, reason = self.readiness()
        body: dict[str, Any] = {"ready": ready}
        if reason:
            body["reason"] = reason
        body["lastUpdated"] = go_time(state.last_updated)
        body["currentTime"] = go_time(self.clock())
        return Response(200 if ready else 503, json.dumps(body, separators=(",", ":")).encode(), JSON, (_NOSNIFF,))

    def healthy(self) -> bool:
        """The proxy's own health, as healthCheckNodePort servers report it (node state ignored)."""
        return self.status().healthy

    def _answer(self, status: HealthStatus, ok: bool, node_eligible: bool | None) -> Response:
        body: dict[str, Any] = {
            "lastUpdated": go_time(status.current_time if ok else status.last_updated),
            "currentTime": go_time(status.current_time),
        }
        if node_eligible is not None:
            body["nodeEligible"] = node_eligible
        body["healthy"] = status.healthy
        body["status"] = {
            family: {"lastUpdated": go_time(status.last_updated), "healthy": status.healthy}
            for family in sorted(self.families)
        }
        return Response(
            200 if ok else 503,
            json.dumps(body, separators=(",", ":")).encode(),
            JSON,
            (_NOSNIFF,),
        )

    def healthz(self, request: Request) -> Response:
        status = self.status()
        response = self._answer(status, status.healthy and status.node_eligible, status.node_eligible)
        if self.counter is not None:
            self.counter.healthz(response.status)
        return response

    def livez(self, request: Request) -> Response:
        status = self.status()
        response = self._answer(status, status.healthy, None)
        if self.counter is not None:
            self.counter.livez(response.status)
        return response

    def serve(self, address: tuple[str, int]) -> HTTPService:
        """Listen on ``address`` (``--healthz-bind-address``, parsed) and serve from a daemon thread."""
        self.stop()
        server = HTTPService(address, {"/healthz": self.healthz, "/livez": self.livez, "/readyz": self.readyz},
                             name="healthz")
        self._server = server.start()
        log.info("serving /healthz, /livez and /readyz on %s port %d", server.host, server.port)
        return server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


ServiceName = tuple[str, str]
"""(namespace, name)"""


class _Instance:
    """One Service's health check server; ``endpoints`` is read and written under ServiceHealthServers' lock."""

    def __init__(self, name: ServiceName, port: int, endpoints: int) -> None:
        self.name = name
        self.port = port
        self.endpoints = endpoints
        self.server: HTTPService | None = None


def service_health_body(namespace: str, name: str, endpoints: int, proxy_healthy: bool) -> bytes:
    """The body upstream writes: tab-indented JSON, no trailing newline."""
    body = {
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": endpoints,
        "serviceProxyHealthy": proxy_healthy,
    }
    return json.dumps(body, indent="\t").encode()


class ServiceHealthServers:
    """An HTTP server on the healthCheckNodePort of every ``externalTrafficPolicy: Local`` Service.

    Register after each successful sync:
    ``proxier.listeners.append(lambda p: servers.sync(p.local_policy_report() or []))``.
    """

    def __init__(self, proxy_healthy: Callable[[], bool], host: str = "") -> None:
        self.proxy_healthy = proxy_healthy
        self.host = host
        """Where to listen: "" (all addresses, dual-stack) unless tests or --nodeport-addresses say otherwise."""
        self._lock = threading.Lock()
        self._stopped = False
        self._services: dict[ServiceName, _Instance] = {}
        self._failed: dict[ServiceName, int] = {}
        """Ports that could not be bound, so the warning is logged once per (Service, port)."""

    def sync(self, report: Iterable[LocalPolicyStatus]) -> None:
        """Open servers for new ports, close those whose Service or port went away, update the counts."""
        if self._stopped:
            return
        wanted: dict[ServiceName, tuple[int, int]] = {}
        for status in report:
            if status.external_local and status.health_check_node_port:
                wanted[(status.namespace, status.name)] = (status.health_check_node_port, status.local_ready_endpoints)
        with self._lock:
            stale = [i for n, i in self._services.items() if n not in wanted or wanted[n][0] != i.port]
            for instance in stale:
                del self._services[instance.name]
            for name, (_port, endpoints) in wanted.items():
                kept = self._services.get(name)
                if kept is not None:
                    kept.endpoints = endpoints
            new = [_Instance(n, p, e) for n, (p, e) in wanted.items() if n not in self._services]
        for instance in stale:
            log.info("closing health check for %s/%s on port %d", *instance.name, instance.port)
            if instance.server is not None:
                instance.server.stop()
        for name in [n for n in self._failed if n not in wanted or wanted[n][0] != self._failed[n]]:
            del self._failed[name]
        for instance in new:
            self._open(instance)

    def _open(self, instance: _Instance) -> None:
        namespace, name = instance.name
        try:
            server = HTTPService(
                (self.host, instance.port), {}, name=f"health-{namespace}/{name}",
                default_route=lambda request: self._answer(instance, request),
            )
        except OSError as exc:
            again = self._failed.get(instance.name) == instance.port
            log.log(logging.DEBUG if again else logging.WARNING,
                    "cannot serve the health check of %s/%s on port %d (retried at the next sync): %s",
                    namespace, name, instance.port, exc)
            self._failed[instance.name] = instance.port
            return
        self._failed.pop(instance.name, None)
        instance.server = server
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._services[instance.name] = instance
        if stopped:  # stop() ran while this sync was opening servers
            server.stop()
            return
        server.start()
        log.info("serving the health check of %s/%s on port %d", namespace, name, server.port)

    def _answer(self, instance: _Instance, request: Request) -> Response:
        with self._lock:
            count = instance.endpoints
        healthy = self.proxy_healthy()
        return Response(
            200 if count > 0 and healthy else 503,
            service_health_body(*instance.name, count, healthy),
            JSON,
            (_NOSNIFF, ("X-Load-Balancing-Endpoint-Weight", str(count))),
        )

    def ports(self) -> dict[ServiceName, int]:
        """{(namespace, name): bound port} of the servers now running."""
        with self._lock:
            return {
                name: instance.server.port for name, instance in self._services.items() if instance.server is not None
            }

    def stop(self) -> None:
        """Close every server; later syncs open nothing."""
        with self._lock:
            self._stopped = True
            instances = list(self._services.values())
            self._services.clear()
        for instance in instances:
            if instance.server is not None:
                instance.server.stop()
