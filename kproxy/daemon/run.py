"""The long-running daemon: watchers, the sync loop, and a clean stop.

Startup checks the kernel's capabilities, then lists and watches the API
server; nothing is programmed until Services and EndpointSlices have both been
listed. The first sync adopts whatever kproxy's tables already hold (a
restart never flushes). SIGTERM and SIGINT stop the threads and leave the rules
in the kernel; only ``kproxy --cleanup`` removes them. SIGHUP asks for a full
resync (which also repairs anything changed in kproxy's tables by hand).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kproxy import __version__
from kproxy.cluster.watch import Backoff, Watcher, api_resources
from kproxy.daemon.config import DaemonConfig
from kproxy.daemon.drift import DriftWatcher
from kproxy.daemon.errors import StartupError
from kproxy.daemon.proxier import NullObserver, Proxier, SyncObserver
from kproxy.daemon.runner import SyncRunner
from kproxy.memory import gc_paused
from kproxy.nft.backend import NftablesBackend
from kproxy.nft.kernel import Backend, Counters
from kproxy.nft.monitor import RulesetMonitor
from kproxy.nft.objects import Family

log = logging.getLogger(__name__)


def kube_api_client(kubeconfig: str | None) -> Any:
    """An ApiClient from --kubeconfig, or from the in-cluster ServiceAccount."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def client_failure(config: DaemonConfig, exc: Exception) -> str:
    """Why the Kubernetes client could not be configured, in one line naming the kubeconfig and where it was set."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if not config.kubeconfig:
        return f"the in-cluster configuration (kproxy's ServiceAccount): {reason}"
    if not os.path.exists(config.kubeconfig):
        reason = "no such file"
    where = f"{config.kubeconfig} ({config.kubeconfig_source or 'kubeconfig'})"
    hint = ""
    if config.kubeconfig_source.endswith("clientConnection.kubeconfig"):
        hint = ("; in a pod kproxy needs no kubeconfig (it uses its ServiceAccount): remove "
                "clientConnection.kubeconfig from the file")
    return f"{where}: {reason}{hint}"


@dataclass
class Daemon:
    """All the running parts; ``start`` then ``wait``/``stop``."""

    config: DaemonConfig
    api_client: Any
    observer: SyncObserver | None = None
    watch_backoff: Backoff = field(default_factory=Backoff)
    watch_timeout: int = 300
    on_restart: Callable[[str, str], None] | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    backend_factory: Callable[[], Backend] = NftablesBackend
    """Makes the kernel edge, one per thread that uses it (tests pass one that refuses chosen transactions)."""

    def __post_init__(self) -> None:
        from kproxy.node.addresses import interface_addresses
        from kproxy.node.conntrack import DeferredConntrack

        self.backend = self.backend_factory()
        self.backend.check_capabilities()
        self.proxier = Proxier(
            self.backend,
            self.config.node_name,
            self.config.proxy_config(),
            conntrack=DeferredConntrack(),  # (pyroute2 is imported by the first cleanup, after the first commit)
            observer=self.observer,
            interfaces=interface_addresses,
        )
        self.runner = SyncRunner(self.proxier, self.config.min_sync_period, self.config.sync_period, self.stop_event,
                                 backoff=(min(0.5, self.config.sync_period), self.config.sync_period))
        # Drift: notifications of this network namespace's ruleset (the daemon's, with hostNetwork: the node's).
        self.drift = DriftWatcher(RulesetMonitor(), self.proxier, self.observer or NullObserver(),
                                  self.config.sync_period, self.stop_event)
        handlers = {"Service": self.proxier.on_service, "EndpointSlice": self.proxier.on_slice,
                    "Node": self.proxier.on_node, "ServiceCIDR": self.proxier.on_service_cidr}
        self.proxier.required_sources = set(handlers)
        self.watchers = [
            Watcher(
                resource,
                handlers[resource.kind],
                self.proxier.on_relist,
                self.stop_event,
                backoff=self.watch_backoff,
                watch_timeout=self.watch_timeout,
                on_restart=self.on_restart,
            )
            for resource in api_resources(self.api_client, self.config.node_name)
        ]

    def start(self) -> None:
        for watcher in self.watchers:
            watcher.start()
        self.runner.start()
        self.drift.start()
        log.info("kproxy %s started on node %s", __version__, self.config.node_name)
        log.info("%s", self.config.nodeport_summary())

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and syncing; the rules stay in the kernel."""
        self.stop_event.set()
        self.runner.wake()
        for watcher in self.watchers:
            watcher.interrupt()
        self.runner.join(timeout)
        self.drift.join(timeout)
        self.drift.monitor.close()
        for watcher in self.watchers:
            watcher.join(timeout)
        log.info("kproxy stopped; rules left in place")

    def wait(self) -> None:
        self.stop_event.wait()


class LockedReader:
    """kproxy's tables read for HTTP inspection, through a backend of its own.

    The sync loop owns its backend; a libnftables context must not be shared
    between threads, so /rules uses this one, one at a time. Counters are read
    over a netlink socket of their own, not through libnftables: a scrape does
    not wait for a /rules listing (seconds at 10k Services).
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._counters_lock = threading.Lock()

    def counters(self) -> Counters:
        with self._counters_lock:
            return self._backend.read_counters()

    def named_counters(self, names: Iterable[tuple[Family, str]]) -> Counters:
        with self._counters_lock:
            return self._backend.read_named_counters(names)

    def rules_text(self) -> str:
        with self._lock:
            parts = [self._backend.list_text(family) for family in ("ip", "ip6")]
        text = "".join(p for p in parts if p)
        return text or "# kproxy has not programmed any rules yet\n"


def start_observability(daemon: Daemon, registry: Any, metrics: Any) -> list[Callable[[], None]]:
    """Metrics (/metrics, /rules, /skipped), health (/healthz, /livez, /readyz) and healthCheckNodePort servers."""
    from kproxy.daemon.config import parse_bind_address
    from kproxy.observe.exposition import SharedExposition
    from kproxy.observe.health import ProxyHealth, ServiceHealthServers, proxier_health_inputs
    from kproxy.observe.http import start_metrics_server
    from kproxy.observe.metrics import ProxierCollector

    reader = LockedReader(daemon.backend_factory())
    collector = ProxierCollector(daemon.proxier, reader.counters, service_metrics=daemon.config.service_metrics,
                                 read_named=reader.named_counters)
    registry.register(collector)
    exposition = SharedExposition(registry, [collector])
    try:
        metrics_server = start_metrics_server(parse_bind_address(daemon.config.metrics_bind_address), exposition,
                                              reader.rules_text,
                                              lambda: [asdict(p) for p in daemon.proxier.skipped()],
                                              expose_rules=daemon.config.expose_rules)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {daemon.config.metrics_bind_address}: {exc.strerror or exc} "
                           "(is kube-proxy or another kproxy running on this node?)") from None
    health = ProxyHealth(proxier_health_inputs(daemon.proxier, daemon.config.sync_period, daemon.stop_event.is_set),
                         metrics)
    try:
        health_server = health.serve(parse_bind_address(daemon.config.healthz_bind_address))
    except OSError as exc:
        metrics_server.stop()
        raise StartupError(f"cannot serve health checks on {daemon.config.healthz_bind_address}: "
                           f"{exc.strerror or exc} (is kube-proxy or another kproxy running on this node?)") from None
    service_health = ServiceHealthServers(health.healthy)
    daemon.proxier.listeners.append(lambda proxier: service_health.sync(proxier.local_policy_report() or []))
    log.info("metrics on %s:%d, health on %s:%d", metrics_server.host or "*", metrics_server.port,
             health_server.host or "*", health_server.port)
    return [metrics_server.stop, health.stop, service_health.stop]


def run(config: DaemonConfig) -> int:
    """Run until SIGTERM/SIGINT: watchers, sync loop, metrics and health servers."""
    # Starting up is mostly importing (the kubernetes client, pyroute2, prometheus_client: about 0.4 s):
    # modules and classes are long-lived, and the cyclic GC's collections meanwhile found nothing (10-15%
    # of the imports' time). The lists and syncs pause it themselves. It is back on before their threads start:
    # the pause is one switch for the whole process, and a watcher's own pause would be undone by this one's end.
    with gc_paused():
        daemon, stoppers = _prepare(config)
    daemon.start()
    daemon.wait()
    daemon.stop()
    for stop in stoppers:
        stop()
    return 0


def _prepare(config: DaemonConfig) -> tuple[Daemon, list[Callable[[], None]]]:
    """The daemon configured, with its signal handlers and HTTP servers running; their stoppers."""
    import prometheus_client
    from prometheus_client import CollectorRegistry

    from kproxy.observe.metrics import ProxyMetrics

    prometheus_client.disable_created_metrics()
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    try:
        api_client = kube_api_client(config.kubeconfig)
    except Exception as exc:  # no kubeconfig file, not in a cluster, a malformed config
        raise StartupError(f"cannot configure the Kubernetes client from {client_failure(config, exc)}") from None
    daemon = Daemon(config, api_client, observer=metrics, on_restart=metrics.watch_restarted)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        daemon.stop_event.set()

    def on_hangup(_signum: int, _frame: Any) -> None:
        log.info("received SIGHUP: full resync")
        daemon.proxier.request_full_sync()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    stoppers = start_observability(daemon, registry, metrics)
    return daemon, stoppers
