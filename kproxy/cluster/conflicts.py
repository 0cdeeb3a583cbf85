"""Two Services claiming one frontend: an address . protocol . port, or a NodePort.

The API server allocates ClusterIPs and NodePorts uniquely, but externalIPs,
load-balancer IPs written by a controller, and manifests read from files can
collide. The compiler resolves a collision deterministically: the first
Service by namespace/name gets the frontend (``kproxy.rules.assembly``). This module
only finds collisions, so that each is named in one warning saying who wins.

``FrontendIndex`` does it one Service change at a time for the daemon;
``find_conflicts`` does it for a whole cluster read from files. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from kproxy.cluster.model import Service, ServiceKey


@dataclass(frozen=True, slots=True)
class Conflict:
    """``frontend`` is claimed by ``winner`` and ``loser``; traffic to it goes to ``winner``."""

    frontend: str
    winner: ServiceKey
    loser: ServiceKey

    def __str__(self) -> str:
        return (f"Services {self.winner} and {self.loser} both claim {self.frontend}; "
                f"{self.winner} gets it (the first by namespace/name), {self.loser} does not")


def frontends(service: Service) -> frozenset[str]:
    """What a Service claims: ``address proto/port`` for its Service IPs, ``NodePort proto/port`` for NodePorts."""
    claimed = set()
    addresses = (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips)
    for port in service.ports:
        for address in addresses:
            claimed.add(f"{address} {port.protocol}/{port.port}")
        if port.node_port:
            claimed.add(f"NodePort {port.protocol}/{port.node_port}")
    return frozenset(claimed)


class FrontendIndex:
    """Who claims what, kept up to date one Service at a time."""

    def __init__(self) -> None:
        self._claims: dict[str, set[ServiceKey]] = {}
        self._by_service: dict[ServiceKey, frozenset[str]] = {}

    def update(self, key: ServiceKey, service: Service | None) -> list[Conflict]:
        """Record ``key``'s claims (None: it is gone); return the conflicts it is now part of that it was not before."""
        old = self._by_service.pop(key, frozenset())
        new = frontends(service) if service is not None else frozenset()
        before = {frontend: self._pair(frontend, key) for frontend in old}
        for frontend in old - new:
            holders = self._claims[frontend]
            holders.discard(key)
            if not holders:
                del self._claims[frontend]
        for frontend in new - old:
            self._claims.setdefault(frontend, set()).add(key)
        if new:
            self._by_service[key] = new
        found = []
        for frontend in sorted(new):
            pair = self._pair(frontend, key)
            if pair is not None and pair != before.get(frontend):
                found.append(pair)
        return found

    def _pair(self, frontend: str, key: ServiceKey) -> Conflict | None:
        holders = self._claims.get(frontend, set())
        if len(holders) < 2 or key not in holders:
            return None
        winner = min(holders)
        loser = key if key != winner else min(h for h in holders if h != winner)
        return Conflict(frontend, winner, loser)


def find_conflicts(services: Mapping[ServiceKey, Service]) -> list[Conflict]:
    """Every frontend claimed by more than one Service: one conflict per Service that loses it."""
    claims: dict[str, list[ServiceKey]] = {}
    for key in sorted(services):
        for frontend in frontends(services[key]):
            claims.setdefault(frontend, []).append(key)
    return [
        Conflict(frontend, holders[0], loser)
        for frontend, holders in sorted(claims.items())
        for loser in holders[1:]
    ]
