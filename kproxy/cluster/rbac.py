"""The Kubernetes API access the daemon needs: the one list the ClusterRole is checked against.

kproxy only reads. ``kproxy/watch.py`` lists and then watches, with the same
client call, four collections across all namespaces: Services,
``discovery.k8s.io`` EndpointSlices, Nodes (its own, through the field
selector ``metadata.name=<node>``) and ``networking.k8s.io`` ServiceCIDRs. It never gets single objects, writes, or
emits Events. ``daemonset.yaml``'s ClusterRole grants exactly this list
(``tests/test_deploy.py`` compares them, and derives the list again from the
requests ``watch.py`` makes).

RBAC cannot narrow a rule by field selector, so the role lets kproxy list and
watch every Node, not only its own; upstream's ``system:node-proxier`` grants
the same (and ``get`` besides).

This module imports nothing from kproxy, so any module can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

LIST_WATCH: tuple[str, ...] = ("list", "watch")
"""What one list-then-watch call needs: the watcher lists and watches with the same client function."""


@dataclass(frozen=True, slots=True)
class ApiAccess:
    """One resource the daemon reads, and how."""

    kind: str
    """The object kind, as ``watch.Resource.kind`` names it."""
    api_group: str
    """The RBAC API group: ``""`` for the core group."""
    resource: str
    """The plural resource name, as in RBAC rules and URLs."""
    verbs: tuple[str, ...]


API_ACCESS: tuple[ApiAccess, ...] = (
    ApiAccess("Service", "", "services", LIST_WATCH),
    ApiAccess("EndpointSlice", "discovery.k8s.io", "endpointslices", LIST_WATCH),
    ApiAccess("Node", "", "nodes", LIST_WATCH),
    ApiAccess("ServiceCIDR", "networking.k8s.io", "servicecidrs", LIST_WATCH),
)
"""Everything the daemon is allowed to do with the API server, and all of it is used."""


def allows(api_group: str, resource: str, verb: str) -> bool:
    """True if API_ACCESS grants ``verb`` on ``api_group``/``resource``."""
    return any(a.api_group == api_group and a.resource == resource and verb in a.verbs for a in API_ACCESS)


def access_for_kind(kind: str) -> ApiAccess:
    """The entry for an object kind (``Service``, ``EndpointSlice``, ``Node``); KeyError if there is none."""
    for access in API_ACCESS:
        if access.kind == kind:
            return access
    raise KeyError(f"kproxy/rbac.py grants no access to {kind} objects")


def permissions() -> frozenset[tuple[str, str, str]]:
    """API_ACCESS flattened to (api group, resource, verb) triples, for comparing with a ClusterRole."""
    return frozenset((a.api_group, a.resource, verb) for a in API_ACCESS for verb in a.verbs)
