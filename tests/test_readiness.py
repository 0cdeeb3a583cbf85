"""Readiness that means programmed, and /rules kept private, with the daemon in the node namespace.

The daemon runs against the test API server (tests/harness/daemonbed.py).
/readyz answers 503 until the first full sync has programmed the node, while
/livez and /healthz keep upstream's meaning (healthy from startup); the moment /readyz
turns 200, every Service answers. On a metrics address opened to the node's
network, /metrics answers any client and /rules and /skipped only loopback
ones, unless --expose-rules.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.harness.builders import service
from tests.harness.daemonbed import ApiInNode, KproxyProcess, wait_until
from tests.harness.netbed import NetBed, Netns
from tests.harness.program import pod_slice

pytestmark = pytest.mark.root

HEALTH = "127.0.0.1:10256"
SERVICES = 300


def http_get(netns: Netns, url: str) -> tuple[int, str]:
    """GET ``url`` from inside ``netns``: (status, body); (0, reason) if nothing answers."""
    with netns.entered():
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)


def cluster_ip(i: int) -> str:
    return f"10.96.{1 + i // 250}.{1 + i % 250}"


def test_readyz_turns_200_only_once_the_node_is_programmed(daemon_bed: NetBed, api_in_node: ApiInNode) -> None:
    """With the API server down, /livez is 200 (upstream: healthy from startup) and /readyz 503; once it is up,
    /readyz turns 200 only after the first full sync: at that moment the first and the last of 300 Services
    already answer."""
    bed, api = daemon_bed, api_in_node.api
    api_in_node.stop()
    for i in range(SERVICES):
        api.create(service(f"s{i}", cluster_ip=cluster_ip(i)))
        api.create(pod_slice(f"s{i}", bed.pods[:2]))
    kproxy = KproxyProcess(bed, api_in_node, "--healthz-bind-address", HEALTH)
    try:
        wait_until(lambda: http_get(bed.node, f"http://{HEALTH}/livez")[0] == 200, 10, "/livez 200")
        status, body = http_get(bed.node, f"http://{HEALTH}/readyz")
        assert status == 503, body
        assert json.loads(body)["reason"] == "the first full sync has not succeeded yet"
        assert kproxy.syncs() == []
        api_in_node.start()
        wait_until(lambda: http_get(bed.node, f"http://{HEALTH}/readyz")[0] == 200, 40, "/readyz 200",  # watch backoff: up to 30 s
                   interval=0.01)
        client = bed.local_pods[-1].netns
        for i in (0, SERVICES - 1):
            result = client.connect(cluster_ip(i), 80, timeout=1.0)
            assert result.ok, f"ready, yet Service s{i} does not answer: {result}"
        # The sync's log line comes at its very end, after its conntrack cleanups: /readyz turns 200 before it.
        wait_until(lambda: kproxy.syncs(), 10, "the first sync's log line")
        assert kproxy.syncs()[0]["sync"] == "full"
    finally:
        assert kproxy.stop() == 0, kproxy.tail()


def test_rules_and_skipped_stay_private_on_an_open_metrics_address(daemon_bed: NetBed,
                                                                   api_in_node: ApiInNode) -> None:
    """Metrics on 0.0.0.0: another host gets /metrics but 403 for /rules and /skipped; the node's loopback gets
    all three; --expose-rules opens them to every client."""
    bed = daemon_bed
    api_in_node.api.create(service("web", cluster_ip="10.96.0.10"))
    api_in_node.api.create(pod_slice("web", bed.pods[:1]))
    remote, local = f"http://{bed.node_ip4}:10249", "http://127.0.0.1:10249"
    flags = ("--metrics-bind-address", "0.0.0.0:10249", "--healthz-bind-address", HEALTH)
    kproxy = KproxyProcess(bed, api_in_node, *flags)
    try:
        wait_until(lambda: http_get(bed.node, f"http://{HEALTH}/readyz")[0] == 200, 15, "/readyz 200")
        status, body = http_get(bed.client, f"{remote}/metrics")
        assert status == 200 and "kubeproxy_sync_proxy_rules_duration_seconds" in body
        for path in ("/rules", "/skipped"):
            status, body = http_get(bed.client, f"{remote}{path}")
            assert status == 403 and "--expose-rules" in body, (path, status, body)
        status, body = http_get(bed.node, f"{local}/rules")
        assert status == 200 and "table ip kproxy" in body
        assert http_get(bed.node, f"{local}/skipped") == (200, "[]\n")
    finally:
        assert kproxy.stop() == 0, kproxy.tail()
    kproxy = KproxyProcess(bed, api_in_node, *flags, "--expose-rules")
    try:
        wait_until(lambda: http_get(bed.node, f"http://{HEALTH}/readyz")[0] == 200, 15, "/readyz 200")
        status, body = http_get(bed.client, f"{remote}/rules")
        assert status == 200 and "table ip kproxy" in body
        assert http_get(bed.client, f"{remote}/skipped")[0] == 200
    finally:
        assert kproxy.stop() == 0, kproxy.tail()
