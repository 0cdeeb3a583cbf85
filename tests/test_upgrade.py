"""Upgrading kproxy: the tables an older kproxy wrote are adopted by this one without a failed connection.

The older kproxy is taken from this repository's history (``git archive`` of
its ``kproxy`` and ``rules`` folders into a temporary directory) and runs
``python -m kproxy --once`` in the bed's node namespace, as its daemon would
have left the node. Traffic starts; then this tree's daemon starts against the
test API server holding the same objects, and adopts the tables (its first
sync is a full one that reads them back). No connection fails, and the tables
end up exactly as this tree compiles them: planning once more sends nothing.

The commits are fixed, so the test means the same thing as main moves on.
CI clones main with its full history; a checkout without these commits fails
with a message saying so (nothing is skipped).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.cluster.convert import build_cluster
from kproxy.nft.backend import NftablesBackend
from kproxy.nft.objects import Transaction
from kproxy.rules.compiler import ProxyConfig, compile_ruleset, node_info
from kproxy.rules.plan import plan
from tests.harness.builders import service
from tests.harness.daemonbed import DAEMON_FLAGS, ApiInNode, KproxyProcess, wait_until
from tests.harness.netbed import NetBed
from tests.harness.program import node_manifest, pod_slice

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS = {
    # The last layout before "Endpoint changes are elements only" (7df2eb0) rebuilt the datapath:
    # pick chains by class, no-endpoint sets, endpoints-check after DNAT.
    "before-elements-only": "666b86ac992c60abfb4eac9c1a9e49939823abe9",
    # An older one, before the node's own connections met endpoints-check in filter-output-pre-dnat (92ff049).
    "before-filter-output-pre-dnat": "06312a56fe86878d78619ee14c0f20e9972ebcc6",
}
CLUSTER_CIDRS = DAEMON_FLAGS[DAEMON_FLAGS.index("--cluster-cidr") + 1]


def old_tree(commit: str, into: Path) -> Path:
    """The ``kproxy`` and ``rules`` folders of ``commit``, extracted under ``into``."""
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if known.returncode != 0:
        pytest.fail(f"the upgrade test needs commit {commit} of kproxy's history, which this checkout ({ROOT}) "
                    "does not have: clone the repository with its full history (no --depth)")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "kproxy", "rules"],
                             capture_output=True, check=True)
    tar_path = into / "old.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "old", filter="data")
    return into / "old"


@pytest.fixture
def bed(daemon_bed: NetBed) -> NetBed:
    return daemon_bed


def objects(bed: NetBed) -> list[dict[str, Any]]:
    """A ClusterIP Service with endpoints, one being scaled, a NodePort, one without endpoints, a UDP port."""
    return [
        service("web", cluster_ip="10.96.0.10"),
        pod_slice("web", bed.pods),
        service("scaled", cluster_ip="10.96.0.11"),
        pod_slice("scaled", bed.pods[:1]),
        service("nodeport", cluster_ip="10.96.0.12", type="NodePort",
                ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]),
        pod_slice("nodeport", bed.remote_pods),
        service("empty", cluster_ip="10.96.0.13"),
        service("dns", cluster_ip="10.96.0.14", ports=[{"name": "dns", "port": 53, "protocol": "UDP",
                                                       "targetPort": 5353}]),
        pod_slice("dns", bed.pods, port=5353, protocol="UDP", port_name="dns"),
    ]


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kproxy-upgrade-") as path:
        yield Path(path)


@pytest.mark.parametrize("commit", list(PREVIOUS.values()), ids=list(PREVIOUS))
def test_tables_of_an_older_kproxy_are_adopted_without_a_failed_connection(
        bed: NetBed, api_in_node: ApiInNode, workdir: Path, commit: str) -> None:
    """The old kproxy programs the node with --once; under traffic to a ClusterIP and a NodePort the new daemon
    adopts its tables: 0 failed connections, then an endpoint change works and a replan sends 0 operations."""
    old = old_tree(commit, workdir)
    manifests = objects(bed) + [node_manifest(bed)]
    (workdir / "cluster.yaml").write_text(yaml.safe_dump_all(manifests))
    once = subprocess.run(["ip", "netns", "exec", bed.node.name, sys.executable, "-m", "kproxy", "--once",
                           "--from-file", str(workdir / "cluster.yaml"), "--node-name", bed.node_name,
                           "--cluster-cidr", CLUSTER_CIDRS], cwd=old, capture_output=True, text=True, timeout=60)
    assert once.returncode == 0 and "applied" in once.stdout, (once.stdout, once.stderr)
    for obj in objects(bed):
        api_in_node.api.create(obj)
    client = bed.local_pods[-1].netns
    with client.start_loop("10.96.0.10", 80, interval_ms=20) as cluster_ip, \
            bed.client.start_loop(bed.node_ip4, 30080, interval_ms=20) as node_port:
        cluster_ip.wait_ok(10)
        node_port.wait_ok(10)
        kproxy = KproxyProcess(bed, api_in_node)
        try:
            first = kproxy.wait_syncs(1, timeout=20)[0]
            assert first["sync"] == "full" and first["operations"] > 0, f"nothing to adopt from {commit}? {first}"
            print(f"upgrade from {commit[:7]}: first sync {first}")
            api_in_node.api.update(pod_slice("scaled", bed.pods))
            wait_until(lambda: len(client.connect_many("10.96.0.11", 80, 60).servers) == len(bed.pods), 10,
                       "the scaled Service to reach every pod")
            cluster_ip.wait_more_ok(50)
            node_port.wait_more_ok(50)
            summaries = cluster_ip.stop(), node_port.stop()
            # Chains the old layout had are emptied at once and deleted a second later (CHAIN_DELETE_DELAY).
            wait_until(lambda: replan(bed).operations == 0, 10, "the tables to be as this tree compiles them")
        finally:
            code = kproxy.stop()
    assert all(s.failed == 0 for s in summaries), summaries
    print(f"upgrade from {commit[:7]}: {summaries}")
    assert code == 0, kproxy.tail()
    assert client.connect("10.96.0.13", 80).error == "refused"
    assert client.connect("10.96.0.14", 53, proto="udp").ok
    left = replan(bed)
    assert left.operations == 0, f"the adopted tables differ from this tree's compile:\n{left}"


def replan(bed: NetBed) -> Transaction:
    """What this tree would still send to bring the node to its compile of the objects (after the scale-up)."""
    current = [*objects(bed)[:2], service("scaled", cluster_ip="10.96.0.11"), pod_slice("scaled", bed.pods),
               *objects(bed)[4:], node_manifest(bed)]
    cluster, problems = build_cluster(current, bed.node_name)
    assert problems == []
    desired = compile_ruleset(cluster, node_info(bed.node_name, cluster.node),
                              ProxyConfig(cluster_cidrs=tuple(CLUSTER_CIDRS.split(","))))
    with bed.node.entered():
        return plan(NftablesBackend().read(), desired)
