"""Helpers for end-to-end daemon tests: the test API server and kproxy processes in the node namespace.

The test API server listens inside the bed's node namespace, so the daemon,
which runs there as a real process (``python -m kproxy``), reaches it on its
own loopback. Tests drive the API server in-process (create, update, drop
watches, stop) and watch the effect with real traffic and the daemon's JSON
log lines.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.fakeapi import FakeKubeAPI
from tests.harness.netbed import NetBed

DAEMON_FLAGS = ("--cluster-cidr", "10.244.0.0/16,fd00:244::/48", "--min-sync-period", "20ms",
                "--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dispatched(bed: NetBed, frontend: str) -> bool:
    """Whether the node's service-ips map holds ``frontend`` (``10.96.0.40 . tcp . 80``).

    Wait on this, not on traffic, for a frontend that is not programmed yet (a
    cold start or a rebuilt table lands it last): a probe sent before goes out
    untranslated and leaves a conntrack entry on the node, which a later
    connection reusing its source port joins, and is never DNATed.
    """
    listing = bed.node.nft("list", "map", "ip", "kproxy", "service-ips", check=False)
    # The whole key: "10.96.0.4 . tcp . 80" is not "10.96.0.40 . tcp . 80" nor "10.96.0.4 . tcp . 8080".
    return listing.returncode == 0 and re.search(rf"(?<![\w.:]){re.escape(frontend)}\s", listing.stdout) is not None


@dataclass
class ApiInNode:
    """A FakeKubeAPI whose listening socket lives in the node namespace."""

    bed: NetBed
    unserved: frozenset[str] = frozenset()
    """Kinds the API server answers 404 for (an older API server)."""
    api: FakeKubeAPI = field(init=False)
    kubeconfig: Path = field(init=False)

    def __post_init__(self) -> None:
        with self.bed.node.entered():
            self.api = FakeKubeAPI(bookmark_interval=0.5, unserved=self.unserved).start()
        handle = tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False)
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.api.url}}],
            "users": [{"name": "test", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }, handle)
        handle.close()
        self.kubeconfig = Path(handle.name)

    def start(self) -> None:
        with self.bed.node.entered():
            self.api.start()

    def stop(self) -> None:
        self.api.stop()

    def close(self) -> None:
        if self.api.running:
            self.api.stop()
        self.kubeconfig.unlink(missing_ok=True)


class KproxyProcess:
    """``python -m kproxy`` (the daemon) in the node namespace, logging JSON to a file."""

    def __init__(self, bed: NetBed, api: ApiInNode, *extra: str) -> None:
        self.bed = bed
        self.log = tempfile.NamedTemporaryFile("w+b", suffix=".log")
        self.proc = bed.node.popen(
            sys.executable, "-m", "kproxy", "--kubeconfig", str(api.kubeconfig), "--hostname-override",
            bed.node_name, "--log-format", "json", "-v", *DAEMON_FLAGS, *extra, stderr=self.log,
        )

    def lines(self) -> list[dict[str, Any]]:
        self.log.seek(0)
        entries = []
        for raw in self.log.read().decode(errors="replace").splitlines():
            try:
                entries.append(json.loads(raw))
            except json.JSONDecodeError:
                entries.append({"msg": raw})
        return entries

    def syncs(self) -> list[dict[str, Any]]:
        return [e for e in self.lines() if "sync" in e and "operations" in e]

    def wait_syncs(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return wait_until(lambda: len(self.syncs()) >= count and self.syncs(), timeout, f"{count} syncs")

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"kproxy did not stop on {signal.Signals(signum).name}:\n{self.tail()}") from None

    def tail(self, n: int = 40) -> str:
        return "\n".join(json.dumps(e) for e in self.lines()[-n:])


@pytest.fixture
def daemon_bed(netbed: NetBed, api_in_node: ApiInNode) -> NetBed:
    """The bed with servers in every pod (TCP 8080, UDP 5353), a default route, and the Node in the API server."""
    from tests.harness.builders import node

    netbed.node.ip("route", "add", "default", "via", netbed.router_ip4)
    netbed.start_servers(tcp_ports=[8080], udp_ports=[5353])
    api_in_node.api.create(node(netbed.node_name, [netbed.node_ip4, netbed.node_ip6], zone=netbed.zone))
    return netbed


@pytest.fixture
def api_in_node(netbed: NetBed, request: pytest.FixtureRequest) -> Iterator[ApiInNode]:
    """A test API server reachable from the node namespace at 127.0.0.1 (parametrize indirectly with unserved kinds)."""
    api = ApiInNode(netbed, getattr(request, "param", frozenset()))
    try:
        yield api
    finally:
        api.close()
