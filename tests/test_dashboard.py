"""dashboards/kproxy.json against a real Prometheus scraping a running daemon: every query returns data."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import re
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.builders import endpoint, endpoint_slice, service
from tests.harness.daemonbed import ApiInNode, KproxyProcess, dispatched, wait_until
from tests.harness.netbed import NetBed, Netns, Pod

pytestmark = pytest.mark.root

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "kproxy.json"
# Fixed ports, free for sure: the node namespace is new, nothing else listens in it, and both lie
# below the ephemeral range the daemon's other port-0 listeners (health, the API server) draw from.
METRICS_PORT = 10249
PROMETHEUS_PORT = 9090
INSTANCE = f"127.0.0.1:{METRICS_PORT}"
RATE_INTERVAL = "1m"
"""What ``$__rate_interval`` stands for: longer than the whole test, so every change below is in the window."""
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
METRICS = "kproxy.io/metrics"
SELECTOR = re.compile(r"\b((?:kubeproxy|kproxy)_[a-z0-9_]+)(\{[^}]*\})?")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$")
RANGE = re.compile(r"\[([^\]]*)\]")


# -- the dashboard -----------------------------------------------------------------------


def panel_targets(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(panel title and refId, expr) of every target, rows' nested panels included."""
    for panel in panels:
        yield from panel_targets(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield f"{panel['title']} [{target.get('refId', '?')}]", target["expr"]


def template_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """{variable name: query} of the dashboard's query variables."""
    found = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            found[var["name"]] = query["query"] if isinstance(query, dict) else query
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$name`` and ``${name}``; an unknown variable raises KeyError."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


def promql_regex(*values: str) -> str:
    """What Grafana puts in a PromQL regex for selected values (escaped, alternatives in a group)."""
    escaped = [re.escape(v).replace("\\", "\\\\") for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def selector_problems(expr: str, labels_of: dict[str, set[str]]) -> list[str]:
    """Selectors missing the node (or ip_family) filter, ip_family filters on metrics without it, other ranges."""
    problems = [f"range [{r}] instead of [$__rate_interval]" for r in RANGE.findall(expr) if r != "$__rate_interval"]
    for metric, matchers in SELECTOR.findall(expr):
        labels = labels_of.get(metric)
        if labels is None:
            problems.append(f"{metric}: not exported by the daemon")
            continue
        if 'instance=~"$node"' not in matchers:
            problems.append(f"{metric}: not filtered by instance=~\"$node\"")
        if 'job="$job"' not in matchers:
            problems.append(f"{metric}: not filtered by job=\"$job\" (kube-proxy's targets export kubeproxy_* too)")
        filtered = 'ip_family=~"$ip_family"' in matchers
        if "ip_family" in labels and not filtered:
            problems.append(f"{metric}: has ip_family but is not filtered by it")
        if "ip_family" not in labels and "ip_family" in matchers:
            problems.append(f"{metric}: has no ip_family label but is filtered by it")
    return problems


# -- Prometheus ----------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A Prometheus server's HTTP API, reached from inside a namespace."""

    netns: Netns
    url: str
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        """GET a JSON API path; an error answer (4xx/5xx) is returned as its JSON body."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with self.netns.entered():
            try:
                with opener.open(url, timeout=5) as response:
                    return json.load(response)
            except urllib.error.HTTPError as exc:
                return json.load(exc)

    def ready(self) -> bool:
        """Whether /-/ready answers 200."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with self.netns.entered():
            try:
                with opener.open(f"{self.url}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None without one."""
        result = self.query(expr).get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def label_values(self, label: str, selector: str) -> list[str]:
        answer = self.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        assert answer["status"] == "success", answer
        return answer["data"]

    def labels_by_metric(self, prefix_regex: str) -> dict[str, set[str]]:
        """{metric name: label names} of every series whose name matches."""
        answer = self.get("/api/v1/series", **{"match[]": f'{{__name__=~"{prefix_regex}"}}'})
        assert answer["status"] == "success", answer
        found: dict[str, set[str]] = {}
        for series in answer["data"]:
            found.setdefault(series["__name__"], set()).update(series)
        return found

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def problem(prometheus: Prometheus, expr: str) -> str | None:
    """Why an instant query gives the panel nothing to draw (error, empty, only NaN), or None."""
    answer = prometheus.query(expr)
    if answer.get("status") != "success":
        return f"error {answer.get('errorType')}: {answer.get('error')}"
    result = answer["data"]["result"]
    if not result:
        return "empty result"
    samples = [r["value"][1] for r in result] if answer["data"]["resultType"] == "vector" else [result[1]]
    if all(math.isnan(float(v)) for v in samples):
        return f"only NaN ({len(samples)} series)"
    return None


@pytest.fixture
def bed(daemon_bed: NetBed) -> NetBed:
    """The daemon test bed (tests/harness/daemonbed.py)."""
    return daemon_bed


@contextlib.contextmanager
def running_prometheus(node: Netns, job: str, rules: dict[str, Any] | None = None) -> Iterator[Prometheus]:
    """Prometheus in ``node`` scraping INSTANCE as ``job`` every second (evaluating ``rules``); stopped and removed after."""
    with tempfile.TemporaryDirectory(prefix="kproxy-prometheus-") as tmp:
        settings: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [INSTANCE]}]}],
        }
        if rules is not None:
            rule_file = Path(tmp) / "rules.yaml"
            rule_file.write_text(yaml.safe_dump(rules, sort_keys=False))
            settings["rule_files"] = [str(rule_file)]
        config = Path(tmp) / "prometheus.yml"
        config.write_text(yaml.safe_dump(settings))
        log = Path(tmp) / "prometheus.log"
        with log.open("wb") as log_file:
            proc = node.popen(
                "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}", "--log.level=warn",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
            )
        server = Prometheus(node, f"http://127.0.0.1:{PROMETHEUS_PORT}", proc, log)
        try:
            wait_until(lambda: proc.poll() is not None or server.ready(), 20, "Prometheus /-/ready")
            assert proc.poll() is None, f"Prometheus exited with {proc.returncode}:\n{server.tail()}"
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def prometheus(bed: NetBed) -> Iterator[Prometheus]:
    """Prometheus in the node namespace scraping 127.0.0.1:METRICS_PORT every second; stopped and removed after."""
    with running_prometheus(bed.node, "kproxy") as server:
        yield server


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def pod_slice(name: str, pods: list[Pod], protocol: str = "TCP") -> dict[str, Any]:
    """The Service's slice, stamped with a trigger time (so network programming latency is observed)."""
    port = {"name": "http", "port": 8080, "protocol": "TCP"} if protocol == "TCP" else {
        "name": "dns", "port": 5353, "protocol": "UDP"}
    return endpoint_slice(f"{name}-abc", name, [endpoint(p.ip4, node=p.node_name, zone=p.zone) for p in pods],
                          ports=[port], annotations={TRIGGER_TIME: now_rfc3339()})


def servers_seen(bed: NetBed, dst: str, port: int = 80, count: int = 60) -> set[str]:
    results = bed.local_pods[-1].netns.connect_many(dst, port, count, timeout=0.5)
    return results.servers if results.all_ok else set()


def test_every_dashboard_query_returns_data(bed: NetBed, api_in_node: ApiInNode, prometheus: Prometheus) -> None:
    """Churn a real daemon scraped by a real Prometheus; every dashboard and variable query returns data."""
    dashboard = json.loads(DASHBOARD.read_text())
    targets = list(panel_targets(dashboard["panels"]))
    variables = template_queries(dashboard)
    assert targets and set(variables) == {"job", "node", "ip_family"}, (len(targets), variables)
    (job_variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    assert job_variable["current"]["value"] == "kproxy", "deploy/monitoring's job name is the default"
    sources = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in sources] == [("datasource", "prometheus")], sources
    api = api_in_node.api
    kproxy = KproxyProcess(bed, api_in_node, "--metrics-bind-address", INSTANCE)
    kproxy.wait_syncs(1, timeout=15)

    # After the startup full sync, so these are partial syncs.
    # The default --service-metrics=annotated: the new connections of the annotated Services only.
    api.create(service("web", cluster_ip="10.96.0.10", annotations={METRICS: "true"}))
    api.create(pod_slice("web", bed.pods[:2]))
    api.create(service("limited", cluster_ip="10.96.0.11",
                       annotations={"kproxy.io/rate-limit": "5/second", "kproxy.io/rate-limit-burst": "5"}))
    api.create(pod_slice("limited", bed.pods[:1]))
    dns_ports = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    api.create(service("dns", cluster_ip="10.96.0.12", ports=dns_ports, annotations={METRICS: "true"}))
    api.create(pod_slice("dns", bed.local_pods[:2], protocol="UDP"))
    api.create(service("local-only", cluster_ip="10.96.0.13", internalTrafficPolicy="Local"))
    api.create(pod_slice("local-only", bed.remote_pods))
    api.create(service("invalid", cluster_ip="10.96.0.14", annotations={"kproxy.io/rate-limit": "lots"}))
    wait_until(lambda: dispatched(bed, "10.96.0.10 . tcp . 80"), 15, "Services programmed")  # then traffic
    wait_until(lambda: servers_seen(bed, "10.96.0.10") == {p.name for p in bed.pods[:2]}, 5, "Services programmed")
    # Counters and histograms first seen now: the churn below makes their rates non-zero.
    first_seen = ["kubeproxy_network_programming_duration_seconds_count",
                  "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                  "kubeproxy_sync_full_proxy_rules_duration_seconds_count", "kproxy_rate_limit_drops_total",
                  "kproxy_service_new_connections_total", "kproxy_invalid_objects_skipped_total"]
    wait_until(lambda: all(prometheus.query(m)["data"]["result"] for m in first_seen), 10,
               f"Prometheus to scrape {first_seen}")

    # Endpoint churn, each change programmed before the next.
    for pods in (bed.pods[:3], bed.pods[1:], bed.pods[:2]):
        api.update(pod_slice("web", pods))
        wait_until(lambda: servers_seen(bed, "10.96.0.10", count=150) == {p.name for p in pods}, 5,
                   f"web on {[p.name for p in pods]}")

    # The table deleted by hand: the drift watcher restores it at once (a full resync).
    # (Before the traffic below: the new table's nft counters start from 0.)
    bed.node.nft("delete", "table", "ip", "kproxy")
    api.update(pod_slice("web", bed.pods[:1]))
    wait_until(lambda: dispatched(bed, "10.96.0.10 . tcp . 80"), 10, "the table restored")  # then traffic
    wait_until(lambda: servers_seen(bed, "10.96.0.10") == {bed.pods[0].name}, 5, "the table restored")
    assert any("another program changed kproxy's tables" in e.get("msg", "") for e in kproxy.lines()), kproxy.tail()

    # Traffic: one client over the rate limit, and a UDP flow.
    client = bed.local_pods[-1].netns
    over_limit = client.connect_many("10.96.0.11", 80, 40, timeout=0.3)
    assert over_limit.ok and over_limit.failed, over_limit.summary()
    wait_until(lambda: client.connect("10.96.0.12", 53, proto="udp", timeout=0.3).ok, 5, "the UDP Service")
    udp = client.start_udp_flow("10.96.0.12", 53, interval_ms=20)
    served_by = udp.wait_for(lambda r: r.ok, timeout=5).server
    # The UDP endpoint that served the flow goes away: its conntrack entry is deleted.
    api.update(pod_slice("dns", [p for p in bed.local_pods[:2] if p.name != served_by], protocol="UDP"))
    udp.wait_for(lambda r: r.ok and r.server != served_by, timeout=5)
    udp.stop()

    # Watches dropped: every watcher restarts.
    assert api.wait_for_watchers("services")
    api.drop_watches()

    counted = ["kproxy_rate_limit_drops_total", "kproxy_watch_restarts_total", "kproxy_conntrack_entries_deleted_total",
               "kproxy_drift_repairs_total"]
    for metric in counted:
        wait_until(lambda: (prometheus.value(f"sum({metric})") or 0) > 0, 10,
                   f"Prometheus to scrape a non-zero {metric}")

    # Only the annotated Services' new connections; the rate-limited one's drops (it is not annotated).
    assert prometheus.label_values("service", "kproxy_service_new_connections_total") == ["dns", "web"]
    assert prometheus.label_values("service", "kproxy_rate_limit_drops_total") == ["limited"]

    # The variables, as Grafana resolves them.
    assert prometheus.label_values("job", LABEL_VALUES.match(variables["job"]).group(1)) == ["kproxy"]
    node_selector = substitute(LABEL_VALUES.match(variables["node"]).group(1), {"job": "kproxy"})
    node_values = prometheus.label_values("instance", node_selector)
    assert node_values == [INSTANCE], node_values
    family_selector = substitute(LABEL_VALUES.match(variables["ip_family"]).group(1), {"job": "kproxy", "node": ".*"})
    assert prometheus.label_values("ip_family", family_selector) == ["IPv4", "IPv6"]

    # Every panel query: with All selected, and with one node and one family selected.
    labels_of = prometheus.labels_by_metric("kubeproxy_.+|kproxy_.+")
    problems = [f"{title}: {p}\n    {expr}" for title, expr in targets for p in selector_problems(expr, labels_of)]
    selections = {
        "All": {"job": "kproxy", "node": ".*", "ip_family": ".*"},
        "one": {"job": "kproxy", "node": promql_regex(INSTANCE), "ip_family": promql_regex("IPv4")},
    }

    def failing() -> list[str]:
        found = []
        for name, selected in selections.items():
            values = {**selected, "__rate_interval": RATE_INTERVAL, "__interval": "1s", "__range": RATE_INTERVAL}
            for title, expr in targets:
                query = substitute(expr, values)
                why = problem(prometheus, query)
                if why:
                    found.append(f"{title} ({name}): {why}\n    {query}")
        return found

    try:
        wait_until(lambda: not failing(), 10, "every dashboard query to return data", interval=0.5)
    except AssertionError:
        pass  # reported below, with the reasons
    problems += failing()
    assert not problems, f"{len(problems)} dashboard queries fail:\n" + "\n".join(problems)
    assert kproxy.stop() == 0
