"""One object never stops the proxy: the daemon against the test API server, with hostile and limit-sized objects.

The first test runs the daemon as a process (as in production) while one
Service changes steadily and objects at the API server's limits, or with junk,
arrive: every change is still programmed at once. The second runs the daemon
in-process with a kernel edge that refuses one Service's transactions, to show
bisection and quarantine.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kproxy.daemon.config import DaemonConfig
from kproxy.daemon.run import Daemon, kube_api_client
from kproxy.nft.backend import NftablesBackend
from kproxy.nft.kernel import NftError
from kproxy.nft.objects import Transaction
from kproxy.observe.metrics import ProxyMetrics
from tests.harness.builders import endpoint, endpoint_slice, service
from tests.harness.daemonbed import ApiInNode, KproxyProcess, dispatched, wait_until
from tests.harness.netbed import NetBed, Pod

pytestmark = pytest.mark.root

LONG_NS, LONG_NAME = "n" * 63, "s" + "x" * 59
"""The names that once froze every sync: a 63-character namespace, a 60-character name."""


def pod_slice(name: str, pods: list[Pod], namespace: str = "default", **kw: Any) -> dict[str, Any]:
    return endpoint_slice(f"{name}-abc", name, [endpoint(p.ip4, node=p.node_name, zone=p.zone) for p in pods],
                          namespace=namespace, **kw)


@pytest.fixture
def bed(daemon_bed: NetBed) -> NetBed:
    return daemon_bed


def served_by(bed: NetBed, dst: str, count: int = 30) -> set[str]:
    results = bed.client.connect_many(dst, 80, count, timeout=2.5)
    return results.servers if results.all_ok else set()


def _programmed_within(bed: NetBed, dst: str, pods: list[Pod], seconds: float, what: str) -> None:
    """The frontend in the kernel first (no probe goes out untranslated: see ``dispatched``), then its endpoints."""
    deadline = time.monotonic() + seconds
    wait_until(lambda: dispatched(bed, f"{dst} . tcp . 80"), seconds, f"{what}: its frontend")
    wait_until(lambda: served_by(bed, dst, count=10 * len(pods)) == {p.name for p in pods},
               max(deadline - time.monotonic(), 0.0), what)  # (polled at least once)


def test_hostile_and_limit_sized_objects_never_delay_other_changes(bed: NetBed, api_in_node: ApiInNode) -> None:
    """While one Service changes steadily, hostile objects arrive; every change lands at once; fixes land at the next sync."""
    api = api_in_node.api
    kproxy = KproxyProcess(bed, api_in_node)
    api.create(service("steady", cluster_ip="10.96.0.50"))
    api.create(pod_slice("steady", bed.pods[:1]))
    _programmed_within(bed, "10.96.0.50", bed.pods[:1], 15, "the steady Service")
    hostile = [
        (service(LONG_NAME, LONG_NS, "10.96.0.51"), pod_slice(LONG_NAME, bed.pods[1:2], LONG_NS)),
        (service("junk-notes", cluster_ip="10.96.0.52", annotations={
            "kproxy.io/rate-limit": "lots", "kproxy.io/rate-limit-burst": '" ; flush ruleset'}),
         pod_slice("junk-notes", bed.pods[2:3])),
        (service("zone-ip", cluster_ip="fd00::1%x\n}{"), pod_slice("zone-ip", bed.pods[:1])),
        (service("many-ports", cluster_ip="10.96.0.53",
                 ports=[{"name": f"p{i}", "port": 1 + i, "protocol": "TCP"} for i in range(2000)]), None),
        (service("wrong-types", cluster_ip="10.96.0.55", ports=[{"name": "http", "port": 80, "protocol": ["TCP"]}]),
         endpoint_slice("evil-abc", "steady", [endpoint("10.244.1.99", node='a" } ; flush ruleset')])),
    ]
    rotation = [bed.pods[1:2], bed.pods[2:3], bed.pods[:2], bed.pods[:1], bed.pods[1:3]]
    for (svc, eps), pods in zip(hostile, rotation, strict=False):
        api.create(svc)
        if eps is not None:
            api.create(eps)
        api.update(pod_slice("steady", pods))
        _programmed_within(bed, "10.96.0.50", pods, 5, f"the steady change after {svc['metadata']['name'][:20]}")

    _programmed_within(bed, "10.96.0.51", bed.pods[1:2], 5, "the Service with the longest legal names")
    _programmed_within(bed, "10.96.0.52", bed.pods[2:3], 5, "the Service with junk annotations (they are ignored)")
    assert bed.client.connect("10.96.0.53", 1999, timeout=1).error == "refused", "2000 ports, no endpoints: refused"

    api.update(service("zone-ip", cluster_ip="10.96.0.54"))
    _programmed_within(bed, "10.96.0.54", bed.pods[:1], 5, "the fixed Service")
    api.delete("Service", "default", "many-ports")
    # (its ClusterIP stays in cluster-ips for a minute, so clients are refused at once: look for its ports)
    wait_until(lambda: "10.96.0.53 . tcp" not in bed.node.nft("list", "table", "ip", "kproxy").stdout, 3,
               "the deleted Service")

    lines = [e.get("msg", "") for e in kproxy.lines()]
    assert not any("sync failed" in m or "Traceback" in m for m in lines), kproxy.tail(60)
    for name in ("junk-notes", "zone-ip", "wrong-types", "evil-abc"):
        warnings = [m for m in lines if m.startswith("skipping") and f"/{name}:" in m]
        assert warnings, f"{name} is named in a warning"
        assert len(warnings) == len(set(warnings)), f"each problem of {name} is logged once: {warnings}"
    assert any("zone-ip: no longer skipped" in m for m in lines)
    assert "flush ruleset" not in bed.node.nft("list", "ruleset").stdout
    assert kproxy.stop() == 0


class RefusingBackend(NftablesBackend):
    """The kernel edge, refusing every transaction that names ``refuse`` (as the kernel refuses a bad batch)."""

    refuse: str | None = "default/refused-"
    refusals = 0

    def _check(self, tx: Transaction) -> None:
        if self.refuse and any(self.refuse in op.render() for op in tx.ops):
            type(self).refusals += 1
            raise NftError("Invalid argument", f"injected: a transaction naming {self.refuse}")

    def apply(self, tx: Transaction) -> None:
        self._check(tx)
        super().apply(tx)

    def apply_in_order(self, transactions: Any) -> None:
        for tx in transactions:  # the pieces before the refused one land, as in the kernel
            self.apply(tx)


def test_kernel_refusing_one_service_quarantines_it_alone(bed: NetBed, api_in_node: ApiInNode) -> None:
    """A Service the kernel refuses, at startup and later, is quarantined by bisection; the others are programmed."""
    api = api_in_node.api
    api.create(service("refused-early", cluster_ip="10.96.0.60"))
    api.create(pod_slice("refused-early", bed.pods[:1]))
    api.create(service("steady", cluster_ip="10.96.0.61"))
    api.create(pod_slice("steady", bed.pods[:1]))
    config = DaemonConfig(node_name=bed.node_name, cluster_cidrs=("10.244.0.0/16",), min_sync_period=0.02,
                          sync_period=5.0, kubeconfig=str(api_in_node.kubeconfig))
    registry = CollectorRegistry()
    RefusingBackend.refuse, RefusingBackend.refusals = "default/refused-", 0
    with bed.node.entered():  # the daemon's threads and sockets live in the node's namespace
        daemon = Daemon(config, kube_api_client(config.kubeconfig), observer=ProxyMetrics(registry),
                        backend_factory=RefusingBackend)
        daemon.start()
    try:
        _programmed_within(bed, "10.96.0.61", bed.pods[:1], 15, "the steady Service, beside a refused one at startup")
        assert set(daemon.proxier.quarantined) == {"default/refused-early"}
        # No slice: its arrival, in a sync of its own, would change the refused Service, rightly counted again.
        api.create(service("refused-late", cluster_ip="10.96.0.62"))
        api.create(service("other", cluster_ip="10.96.0.63"))
        api.create(pod_slice("other", bed.pods[1:2]))
        _programmed_within(bed, "10.96.0.63", bed.pods[1:2], 5, "a Service created beside a refused one")
        wait_until(lambda: set(daemon.proxier.quarantined) == {"default/refused-early", "default/refused-late"}, 5,
                   "both refused Services quarantined")
        for dst in ("10.96.0.60", "10.96.0.62"):  # from client2: client connects to .62 once it is programmed
            assert not bed.client2.connect(dst, 80, timeout=0.5).ok, f"{dst} is not programmed"
        skipped = registry.get_sample_value("kproxy_invalid_objects_skipped_total",
                                            {"kind": "Service", "reason": "kernel_refused"})
        assert skipped == 2
        api.update(pod_slice("steady", bed.pods[1:3]))
        _programmed_within(bed, "10.96.0.61", bed.pods[1:3], 5, "a later change, not slowed by the quarantine")
        refusals = RefusingBackend.refusals
        api.update(pod_slice("steady", bed.pods[:1]))
        _programmed_within(bed, "10.96.0.61", bed.pods[:1], 5, "another change")
        assert RefusingBackend.refusals == refusals, "a quarantined Service is not retried until it changes"

        RefusingBackend.refuse = None  # the kernel takes it now; the Service changes, so it is retried
        api.create(pod_slice("refused-late", bed.pods[:1]))
        api.update(service("refused-late", cluster_ip="10.96.0.62", labels={"v": "2"},
                           ports=[{"name": "http", "port": 80}, {"name": "alt", "port": 81}]))
        _programmed_within(bed, "10.96.0.62", bed.pods[:1], 5, "the fixed Service")
        assert set(daemon.proxier.quarantined) == {"default/refused-early"}
    finally:
        daemon.stop()
