"""Inspection edges: the live tables for ``explain``, and the cluster for ``--diff`` and ``explain``.

The cluster comes from manifest files (``--from-file``) or from one list of the
API server (``--kubeconfig``, or the in-cluster ServiceAccount), through the
same conversion the daemon uses. The live tables are kproxy's own, read once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kproxy.convert import build_cluster
from kproxy.model import Cluster
from kproxy.nft import NftablesBackend
from kproxy.ruleset import Element, Family, Ruleset

log = logging.getLogger(__name__)


class KernelTables:
    """LiveTables over kproxy's tables in this network namespace (read on first use)."""

    def __init__(self, backend: NftablesBackend) -> None:
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

    def chain_rules(self, family: Family, chain: str) -> list[str] | None:
        return self.backend.chain_rules(family, chain)


def cluster_from_api(kubeconfig: str | None, node_name: str) -> Cluster:
    """List Services, EndpointSlices and this Node once, and convert them."""
    from kproxy.daemon import kube_api_client
    from kproxy.watch import Watcher, api_resources

    api_client = kube_api_client(kubeconfig)
    objects: list[Any] = []
    for resource in api_resources(api_client, node_name):
        items, _ = Watcher(resource, lambda *a: None, lambda *a: None, threading.Event()).list_all()
        for item in items:
            item.setdefault("kind", resource.kind)
        objects.extend(items)
    cluster, problems = build_cluster(objects, node_name)
    for problem in problems:
        log.warning("%s", problem)
    return cluster
