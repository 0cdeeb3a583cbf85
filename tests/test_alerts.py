"""deploy/monitoring/: the alert rules in promtool and in a real Prometheus scraping a real daemon; the monitors.

* ``promtool check rules`` accepts the rule file; ``promtool test rules`` runs
  tests/data/alerts/kproxy-alerts-test.yaml, which fires every alert on its
  series and checks it stays silent otherwise.
* As root: Prometheus (Debian's) scrapes the daemon in the netns bed with a
  copy of the rules whose ``for:`` and sync period are shortened. All rules
  load and evaluate; none fires while the daemon is healthy; the sync alerts
  fire while its syncs fail (another process holds an ``owner`` table named
  ``ip kproxy``: only that process may change it, and libnftables 1.0.6 cannot
  even list it as JSON) and the stale one resolves when that process exits;
  ``KproxyDown`` fires when the daemon is frozen with SIGSTOP. Every metric
  name Prometheus scrapes from the daemon is one docs/metrics.md lists.
* The PodMonitor, ServiceMonitor, scrape config and PrometheusRule agree with
  daemonset.yaml and the rule file.
"""

from __future__ import annotations

import copy
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.harness.daemonbed import ApiInNode, KproxyProcess, wait_until
from tests.harness.metricsdoc import SUFFIXES, documented, exported_in_process
from tests.harness.netbed import NetBed
from tests.test_dashboard import Prometheus, running_prometheus

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "kproxy-alerts.yaml"
UNIT_TESTS = Path(__file__).resolve().parent / "data" / "alerts" / "kproxy-alerts-test.yaml"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
JOB = "kproxy"
METRICS_PORT = 10249
INSTANCE = f"127.0.0.1:{METRICS_PORT}"
SYNC_PERIOD = 1
"""The daemon's --sync-period in the live test, in seconds (the rules assume 30)."""
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def alerts(groups: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups["groups"] for rule in group["rules"]}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


# -- promtool --------------------------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts(rules()))} rules found" in result.stdout


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    """Each alert fires on its series with its labels and summary, and not before its for: or on others."""
    summaries_only = rules()
    for rule in alerts(summaries_only).values():
        rule["annotations"] = {"summary": rule["annotations"]["summary"]}
    (tmp_path / RULES.name).write_text(yaml.safe_dump(summaries_only, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_unit_tests_that_fire_and_stay_silent() -> None:
    cases = [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    names = set(alerts(rules()))
    assert {c["alertname"] for c in cases} == names
    for name in names:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it stays silent"


def test_rules_use_only_metrics_kproxy_exports() -> None:
    """Every kubeproxy_*/kproxy_* name in an expression is one the daemon's registry has (histograms by series)."""
    exported = exported_in_process()
    names = {name + suffix for name, family in exported.items()
             for suffix in {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}[family.type]}
    used = {m for rule in alerts(rules()).values() for m in re.findall(r"\b(?:kubeproxy|kproxy)_\w+", rule["expr"])}
    assert used and used <= names, used - names
    for rule in alerts(rules()).values():
        uses_kproxy = bool(re.search(r"\b(?:kubeproxy|kproxy)_\w+|\bup\{", rule["expr"]))
        assert not uses_kproxy or f'job="{JOB}"' in rule["expr"], rule["alert"]


def _slugs(markdown: str) -> set[str]:
    """GitHub's anchors for a document's headings."""
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_every_alert_points_at_a_troubleshooting_section() -> None:
    anchors = _slugs(TROUBLESHOOTING.read_text())
    for name, rule in alerts(rules()).items():
        assert set(rule["annotations"]) == {"summary", "description", "runbook"}, name
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/troubleshooting.md" and anchor in anchors, (name, anchor)
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name


def test_prometheusrule_holds_the_rule_file() -> None:
    (doc,) = [d for d in yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert doc["metadata"]["namespace"] == "kube-system"
    assert doc["spec"] == rules()


# -- the monitors ------------------------------------------------------------------------------------


def daemonset() -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all((ROOT / "daemonset.yaml").read_text()) if d and d["kind"] == "DaemonSet")


def metrics_port() -> dict[str, Any]:
    """The DaemonSet's port named ``metrics`` (the monitors select it by name)."""
    ports = daemonset()["spec"]["template"]["spec"]["containers"][0].get("ports", [])
    found = [p for p in ports if p.get("name") == "metrics"]
    assert found, "daemonset.yaml declares no port named metrics, which the PodMonitor and ServiceMonitor select"
    assert found[0]["containerPort"] == METRICS_PORT
    return found[0]


def monitor(path: str, kind: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((MONITORING / path).read_text()) if d]
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return selector["matchLabels"].items() <= labels.items()


ENDPOINT_FIELDS = {"port", "path", "interval", "honorLabels", "relabelings"}
RELABEL_FIELDS = {"sourceLabels", "targetLabel"}


@pytest.mark.parametrize(("path", "kind", "endpoints"), [
    ("podmonitor.yaml", "PodMonitor", "podMetricsEndpoints"),
    ("servicemonitor.yaml", "ServiceMonitor", "endpoints"),
])
def test_monitor_scrapes_kproxy_pods_as_the_rules_expect(path: str, kind: str, endpoints: str) -> None:
    """Right namespace and selector, job="kproxy" from a label that is there, the metrics port, honorLabels."""
    found = monitor(path, kind)
    pod = daemonset()["spec"]["template"]
    assert found["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(found["spec"]) == {"jobLabel", "selector", "namespaceSelector", endpoints}
    assert found["spec"]["namespaceSelector"] == {"matchNames": [daemonset()["metadata"]["namespace"]]}
    if kind == "PodMonitor":
        selected = pod["metadata"]["labels"]
    else:
        service = monitor(path, "Service")
        for version in sorted({"1.31.0", kubernetes_validate.latest_version()}):
            kubernetes_validate.validate(service, version, strict=True)
        assert service["metadata"]["namespace"] == daemonset()["metadata"]["namespace"]
        assert _selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
        assert service["spec"]["clusterIP"] == "None"
        (port,) = service["spec"]["ports"]
        assert (port["port"], port["targetPort"]) == (METRICS_PORT, "metrics")
        selected = service["metadata"]["labels"]
    assert _selects(found["spec"]["selector"], selected)
    assert selected[found["spec"]["jobLabel"]] == JOB
    (endpoint,) = found["spec"][endpoints]
    assert set(endpoint) <= ENDPOINT_FIELDS and endpoint["honorLabels"] is True
    assert all(set(r) <= RELABEL_FIELDS for r in endpoint["relabelings"])
    assert endpoint["port"] == metrics_port()["name"]


def test_scrape_config_keeps_the_kproxy_pods_metrics_port() -> None:
    """The relabelling keeps exactly the pods labelled as the DaemonSet's, on the port named metrics."""
    (job,) = yaml.safe_load((MONITORING / "scrape-config.yaml").read_text())
    assert job["job_name"] == JOB and job["honor_labels"] is True
    (sd,) = job["kubernetes_sd_configs"]
    assert sd == {"role": "pod", "namespaces": {"names": [daemonset()["metadata"]["namespace"]]}}
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    name = daemonset()["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name",
                                     "__meta_kubernetes_pod_container_port_name"]
    assert keep["regex"] == f"{name};{metrics_port()['name']}"


# -- a real Prometheus, a real daemon ------------------------------------------------------------------


def shortened_rules() -> dict[str, Any]:
    """The rules with every for: at 1 s and KproxySyncStale's sync period at SYNC_PERIOD."""
    short = copy.deepcopy(rules())
    for rule in alerts(short).values():
        if "for" in rule:
            rule["for"] = "1s"
    stale = alerts(short)["KproxySyncStale"]
    assert stale["expr"].count("4 * 30") == 1, "the rule's sync period changed: update this test"
    stale["expr"] = stale["expr"].replace("4 * 30", f"4 * {SYNC_PERIOD}")
    return short


@pytest.fixture
def prometheus_with_rules(daemon_bed: NetBed) -> Iterator[Prometheus]:
    """Prometheus in the node namespace, scraping 127.0.0.1:10249 and evaluating the shortened rules every second."""
    with running_prometheus(daemon_bed.node, JOB, shortened_rules()) as server:
        yield server


def firing(prometheus: Prometheus) -> set[str]:
    answer = prometheus.get("/api/v1/alerts")
    assert answer["status"] == "success", answer
    return {a["labels"]["alertname"] for a in answer["data"]["alerts"] if a["state"] == "firing"}


def evaluated_rules(prometheus: Prometheus) -> dict[str, str]:
    """{alert name: health} of the rules Prometheus evaluated at least once."""
    answer = prometheus.get("/api/v1/rules")
    assert answer["status"] == "success", answer
    return {rule["name"]: rule["health"] for group in answer["data"]["groups"] for rule in group["rules"]
            if not rule.get("lastEvaluation", "").startswith("0001-")}


def last_evaluation(prometheus: Prometheus) -> str:
    """When the kproxy rule group was last evaluated (Prometheus's own timestamp)."""
    answer = prometheus.get("/api/v1/rules")
    assert answer["status"] == "success", answer
    (group,) = answer["data"]["groups"]
    return str(group["lastEvaluation"])


@pytest.mark.root
def test_alerts_fire_on_a_stalled_daemon(daemon_bed: NetBed, api_in_node: ApiInNode,
                                         prometheus_with_rules: Prometheus) -> None:
    bed, prometheus = daemon_bed, prometheus_with_rules
    kproxy = KproxyProcess(bed, api_in_node, "--metrics-bind-address", INSTANCE, "--sync-period", f"{SYNC_PERIOD}s")
    holder: subprocess.Popen[bytes] | None = None
    try:
        kproxy.wait_syncs(1, timeout=15)
        names = set(alerts(rules()))
        # Loaded and evaluated without error, then a few more evaluations with the daemon scraped: silence.
        wait_until(lambda: set(evaluated_rules(prometheus)) == names, 10, "every rule evaluated")
        assert set(evaluated_rules(prometheus).values()) == {"ok"}, evaluated_rules(prometheus)
        wait_until(lambda: prometheus.value(f'up{{job="{JOB}"}}') == 1
                   and prometheus.query("kubeproxy_sync_proxy_rules_last_timestamp_seconds")["data"]["result"],
                   10, "Prometheus to scrape the daemon")
        # Every metric name the running daemon exports is one docs/metrics.md lists.
        scraped = {r["metric"]["__name__"] for r in prometheus.query(f'count by (__name__) ({{job="{JOB}"}})')["data"]["result"]}
        listed = {name + suffix for name, row in documented().items() for suffix in SUFFIXES[row.type]}
        kproxys = {n for n in scraped if n.startswith(("kproxy_", "kubeproxy_"))}
        assert len(kproxys) > 20 and kproxys <= listed, kproxys - listed
        for _ in range(4):  # four more evaluations of every rule, with the daemon's series: all silent
            stamp = last_evaluation(prometheus)
            wait_until(lambda: last_evaluation(prometheus) != stamp, 5, "the next evaluation")
            assert firing(prometheus) == set(), f"alerts firing on a healthy daemon:\n{kproxy.tail()}"

        # Every sync fails: another process owns a table named ip kproxy (kproxy can neither read nor change it).
        holder = bed.node.popen("nft", "-i", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        assert holder.stdin is not None
        holder.stdin.write(b"delete table ip kproxy; add table ip kproxy { flags owner; }\n")
        holder.stdin.flush()
        wait_until(lambda: {"KproxySyncFailing", "KproxySyncStale"} <= firing(prometheus), 20,
                   "KproxySyncFailing and KproxySyncStale")
        assert "KproxyDown" not in firing(prometheus), "the daemon answers scrapes all along"
        assert kproxy.proc.poll() is None, kproxy.tail()
        assert any("sync failed" in e.get("msg", "") for e in kproxy.lines()), kproxy.tail()

        # The holder exits, its table goes with it: kproxy syncs again, and its rules are fresh.
        holder.stdin.close()
        holder.wait(10)
        holder = None
        wait_until(lambda: "KproxySyncStale" not in firing(prometheus), 20, "KproxySyncStale to resolve")

        # Frozen: the daemon no longer answers scrapes. Thawed, it answers again.
        kproxy.send(signal.SIGSTOP)
        try:
            wait_until(lambda: "KproxyDown" in firing(prometheus), 20, "KproxyDown")
        finally:
            kproxy.send(signal.SIGCONT)
        # (Also: a SIGTERM sent at the very moment of SIGCONT can reach a thread other than the main one,
        # whose wait it then never interrupts, and be lost; so the stop below waits for the daemon to answer.)
        wait_until(lambda: prometheus.value(f'up{{job="{JOB}"}}') == 1, 10, "the thawed daemon to answer scrapes")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(5)
    assert kproxy.stop() == 0
