"""Inspection edges: the live tables for ``explain``, and the cluster for ``--diff`` and ``explain``.

The cluster comes from manifest files (``--from-file``) or from one list of the
API server (``--kubeconfig``, or the in-cluster ServiceAccount), through the
same conversion the daemon uses. The live tables are kproxy's own, read once.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kproxy.cluster.convert import Problem, build_cluster
from kproxy.cluster.model import Cluster
from kproxy.daemon.config import format_bind_address, parse_bind_address
from kproxy.nft.kernel import Backend
from kproxy.nft.objects import Element, Family, Ruleset

log = logging.getLogger(__name__)


class KernelTables:
    """LiveTables over kproxy's tables in this network namespace (read on first use)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._ruleset: Ruleset | None = None

    def _tables(self) -> Ruleset:
        if self._ruleset is None:
            self._ruleset = self.backend.read()
        return self._ruleset

    def element(self, family: Family, set_name: str, key: str) -> Element | None:
        table = self._tables().tables.get(family)
        return None if table is None else table.elements.get(set_name, {}).get(key)

    def set_keys(self, family: Family, set_name: str) -> list[str]:
        table = self._tables().tables.get(family)
        return [] if table is None else list(table.elements.get(set_name, {}))

    def chain_fingerprint(self, family: Family, chain: str) -> tuple[str, int] | None:
        table = self._tables().tables.get(family)
        found = None if table is None else table.chains.get(chain)
        return None if found is None else found.fingerprint


def cluster_from_api(kubeconfig: str | None, node_name: str) -> tuple[Cluster, list[Problem]]:
    """List Services, EndpointSlices and this Node once, and convert them (with what was skipped)."""
    from kproxy.cluster.watch import Watcher, api_resources
    from kproxy.daemon.run import kube_api_client

    api_client = kube_api_client(kubeconfig)
    objects: list[Any] = []
    from kubernetes.client.exceptions import ApiException

    for resource in api_resources(api_client, node_name):
        try:
            items, _ = Watcher(resource, lambda *a: None, lambda *a: None, threading.Event()).list_all()
        except ApiException as exc:
            if not (resource.optional and exc.status in (403, 404)):
                raise
            log.warning("cannot list %s (%s %s); going on without them", resource.kind, exc.status, exc.reason)
            continue
        objects.extend(item if "kind" in item else {**item, "kind": resource.kind} for item in items)
    return build_cluster(objects, node_name)


def daemon_skipped(metrics_address: str, timeout: float = 2.0) -> list[Problem] | None:
    """What the daemon on this node could not program (its ``/skipped``), or None if it does not answer.

    ``kproxy explain`` runs beside the daemon (``kubectl exec``), so the
    daemon's metrics address (``--metrics-bind-address``) is reachable.
    """
    import urllib.request

    host, port = parse_bind_address(metrics_address)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{format_bind_address(host, port)}/skipped"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            entries = json.loads(response.read())
        return [Problem(**{k: e[k] for k in ("kind", "key", "reason", "message", "part")}) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("the daemon's %s did not answer: %s", url, exc)
        return None
