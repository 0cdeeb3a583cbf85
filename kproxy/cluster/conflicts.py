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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kproxy.cluster.model import Service, ServiceKey

ADDRESS, NODEPORT = 0, 1
"""Ranks: dispatch looks up Service IPs (ClusterIP, external, load-balancer) before NodePorts."""


@dataclass(frozen=True, slots=True)
class Conflict:
    """``frontend`` is claimed by ``winner`` and ``loser``; traffic to it goes to ``winner``."""

    frontend: str
    winner: ServiceKey
    loser: ServiceKey
    by_rank: bool = False
    """The winner holds it as a Service IP and the loser as a NodePort on a node address."""

    def __str__(self) -> str:
        why = "a Service IP is looked up before a NodePort" if self.by_rank else "the first by namespace/name"
        return (f"Services {self.winner} and {self.loser} both claim {self.frontend}; "
                f"{self.winner} gets it ({why}), {self.loser} does not")


def frontends(service: Service, node_addresses: Iterable[str] = ()) -> dict[str, int]:
    """What a Service claims, with the rank it claims it at.

    ``address proto/port`` for its Service IPs; ``NodePort proto/port`` and,
    on each node address, ``address proto/port`` for its NodePorts.
    """
    claimed: dict[str, int] = {}
    addresses = (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips)
    for port in service.ports:
        for address in addresses:
            claimed[f"{address} {port.protocol}/{port.port}"] = ADDRESS
        if port.node_port:
            claimed.setdefault(f"NodePort {port.protocol}/{port.node_port}", NODEPORT)
            for address in node_addresses:
                claimed.setdefault(f"{address} {port.protocol}/{port.node_port}", NODEPORT)
    return claimed


def _winner(holders: Mapping[ServiceKey, int]) -> tuple[ServiceKey, int]:
    key = min(holders, key=lambda k: (holders[k], k))
    return key, holders[key]


class FrontendIndex:
    """Who claims what, kept up to date one Service at a time."""

    def __init__(self, node_addresses: Iterable[str] = ()) -> None:
        self._claims: dict[str, dict[ServiceKey, int]] = {}
        self._by_service: dict[ServiceKey, dict[str, int]] = {}
        self._services: dict[ServiceKey, Service] = {}
        self._node_addresses = tuple(node_addresses)

    def set_node_addresses(self, addresses: Iterable[str]) -> list[Conflict]:
        """The node's addresses changed: claims of NodePorts move with them."""
        addresses = tuple(addresses)
        if addresses == self._node_addresses:
            return []
        self._node_addresses = addresses
        found = []
        for key, service in sorted(self._services.items()):
            found += self.update(key, service)
        return found

    def update(self, key: ServiceKey, service: Service | None) -> list[Conflict]:
        """Record ``key``'s claims (None: it is gone); return the conflicts it is now part of that it was not before."""
        old = self._by_service.pop(key, {})
        new = frontends(service, self._node_addresses) if service is not None else {}
        claims = self._claims
        before = {frontend: self._pair(frontend, key) for frontend in old if len(claims[frontend]) > 1}
        for frontend in old:
            holders = claims[frontend]
            holders.pop(key, None)
            if not holders:
                del claims[frontend]
        shared = []  # (the common case, a Service alone on its frontends, needs no more)
        for frontend, rank in new.items():
            others = claims.get(frontend)
            if others is None:
                claims[frontend] = {key: rank}
            else:
                others[key] = rank
                if len(others) > 1:
                    shared.append(frontend)
        if new:
            self._by_service[key] = new
            self._services[key] = service  # type: ignore[assignment]
        else:
            self._services.pop(key, None)
        found = []
        for frontend in sorted(shared):
            pair = self._pair(frontend, key)
            if pair is not None and pair != before.get(frontend):
                found.append(pair)
        return found

    def neighbours(self, keys: Iterable[ServiceKey]) -> set[ServiceKey]:
        """The Services that share a frontend with any of ``keys`` (``keys`` themselves left out)."""
        keys = set(keys)
        found: set[ServiceKey] = set()
        for key in keys:
            for frontend in self._by_service.get(key, {}):
                found.update(self._claims.get(frontend, {}))
        return found - keys

    def _pair(self, frontend: str, key: ServiceKey) -> Conflict | None:
        holders = self._claims.get(frontend, {})
        if len(holders) < 2 or key not in holders:
            return None
        winner, rank = _winner(holders)
        loser = key if key != winner else _winner({k: r for k, r in holders.items() if k != winner})[0]
        return Conflict(frontend, winner, loser, by_rank=rank < holders[loser])


def find_conflicts(services: Mapping[ServiceKey, Service], node_addresses: Iterable[str] = ()) -> list[Conflict]:
    """Every frontend claimed by more than one Service: one conflict per Service that loses it."""
    node_addresses = tuple(node_addresses)
    claims: dict[str, dict[ServiceKey, int]] = {}
    for key in sorted(services):
        for frontend, rank in frontends(services[key], node_addresses).items():
            claims.setdefault(frontend, {})[key] = rank
    found = []
    for frontend, holders in sorted(claims.items()):
        winner, rank = _winner(holders)
        for loser in sorted(k for k in holders if k != winner):
            found.append(Conflict(frontend, winner, loser, by_rank=rank < holders[loser]))
    return found
