"""/metrics at 1,000 Services: the daemon (``python -m kproxy``) in a namespace of its own, scraped over real HTTP.

Each test runs the daemon against the test API server in a fresh network
namespace (deleted afterwards, also on failure) holding ``SERVICES`` Services,
one in a hundred annotated ``kproxy.io/metrics: "true"``, a few rate-limited,
one annotated and dual-stack; connections to two ClusterIPs leave through a
veth, so the nft counters count real packets. The tests check behaviour (which
series, their values, that Prometheus and promtool parse everything, memory
under 20 scrapers at once); ``benchmarks/scrape.py`` measures time.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.builders import endpoint, endpoint_slice, node, service
from tests.harness.daemonbed import wait_until
from tests.harness.fakeapi import FakeKubeAPI
from tests.harness.netbed import Netns

pytestmark = pytest.mark.root

SERVICES = 1000
ANNOTATED_EVERY = 100
RATE_LIMITED = (7, 257, 507, 757)
METRICS_PORT = 10249
PROMETHEUS_PORT = 9090
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
CONNS, DROPS = "kproxy_service_new_connections_total", "kproxy_rate_limit_drops_total"
SCRAPERS, ROUNDS = 20, 3
MEMORY_BOUND_MB = 20
"""Peak RSS growth allowed while 20 scrapers hit /metrics at once (before: 154 MB at 1,000 Services)."""


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 256}.{i % 256}"


def objects() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = [node("node-a", ["192.168.77.1"])]
    for i in range(SERVICES):
        annotations = {}
        if i % ANNOTATED_EVERY == 0:
            annotations["kproxy.io/metrics"] = "true"
        if i in RATE_LIMITED:
            annotations["kproxy.io/rate-limit"] = "100/second"
        found.append(service(f"svc-{i}", f"ns-{i % 10}", cluster_ip(i), annotations=annotations))
        found.append(endpoint_slice(f"svc-{i}-1", f"svc-{i}", [endpoint(f"10.244.{i // 256}.{i % 256}")],
                                    namespace=f"ns-{i % 10}"))
    found.append(service("dual", "shop", ["10.97.0.1", "fd00:97::1"], ipFamilies=["IPv4", "IPv6"],
                         ipFamilyPolicy="RequireDualStack", annotations={"kproxy.io/metrics": "true"}))
    found.append(endpoint_slice("dual-4", "dual", [endpoint("10.244.99.1")], namespace="shop"))
    found.append(endpoint_slice("dual-6", "dual", [endpoint("fd00:244::99:1")], namespace="shop", address_type="IPv6"))
    return found


def annotated_series() -> list[dict[str, str]]:
    expected = [{"namespace": f"ns-{i % 10}", "service": f"svc-{i}", "port": "http", "ip_family": "IPv4"}
                for i in range(0, SERVICES, ANNOTATED_EVERY)]
    expected += [{"namespace": "shop", "service": "dual", "port": "http", "ip_family": f} for f in ("IPv4", "IPv6")]
    return sorted(expected, key=lambda d: sorted(d.items()))


def drop_series() -> list[dict[str, str]]:
    return sorted(({"namespace": f"ns-{i % 10}", "service": f"svc-{i}", "port": "http", "ip_family": "IPv4"}
                   for i in RATE_LIMITED), key=lambda d: sorted(d.items()))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes, openmetrics: bool) -> Samples:
    """Every sample, as prometheus_client's parser reads the body (it refuses a family that appears twice)."""
    text = body.decode()
    families = openmetrics_parser.text_string_to_metric_families(text) if openmetrics else \
        text_string_to_metric_families(text)
    samples: Samples = {}
    for family in families:
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return samples


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return sorted((dict(labels) for n, labels in samples if n == name), key=lambda d: sorted(d.items()))


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@dataclass
class ScrapeBed:
    """A namespace with the test API server holding ``objects()``, and a daemon started with ``start``."""

    netns: Netns
    api: FakeKubeAPI
    kubeconfig: Path
    proc: subprocess.Popen | None = None
    log: Any = field(default=None)

    def start(self, *flags: str) -> None:
        self.log = tempfile.NamedTemporaryFile("w+b", suffix=".log")
        self.proc = self.netns.popen(
            sys.executable, "-m", "kproxy", "--kubeconfig", str(self.kubeconfig), "--hostname-override", "node-a",
            "--cluster-cidr", "10.244.0.0/16,fd00:244::/48", "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
            "--healthz-bind-address", "127.0.0.1:0", "--log-format", "json", "-v", *flags, stderr=self.log,
        )
        wait_until(lambda: self.proc is not None and (self.proc.poll() is not None or self.synced()), 60, "the first sync")
        assert self.proc.poll() is None, self.tail()

    def lines(self) -> list[dict[str, Any]]:
        self.log.seek(0)
        found = []
        for raw in self.log.read().decode(errors="replace").splitlines():
            try:
                found.append(json.loads(raw))
            except json.JSONDecodeError:
                found.append({"msg": raw})
        return found

    def synced(self) -> bool:
        return any("operations" in e and "sync" in e for e in self.lines())

    def tail(self) -> str:
        return "\n".join(json.dumps(e) for e in self.lines()[-30:])

    def scrape(self, accept: str = "") -> tuple[bytes, str]:
        conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=30)
        with self.netns.entered():
            conn.connect()  # the socket is the namespace's
        try:
            conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, body[:300]
            return body, response.getheader("Content-Type") or ""
        finally:
            conn.close()

    def connect(self, ip: str, times: int) -> None:
        """New TCP connections to ip:80 (their SYNs leave through the veth; nothing answers)."""
        with self.netns.entered():
            for _ in range(times):
                sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
                sock.setblocking(False)
                try:
                    sock.connect((ip, 80))
                except OSError:
                    pass
                sock.close()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise


@pytest.fixture
def scrape_bed() -> Iterator[ScrapeBed]:
    name = f"kpt-scrape-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    netns = Netns(name)
    api = None
    kubeconfig = Path(tempfile.mkstemp(suffix=".kubeconfig")[1])
    bed = None
    try:
        netns.ip_batch(["link set lo up", "link add v0 type veth peer name v1", "link set v0 up", "link set v1 up",
                        "addr add 192.168.77.1/24 dev v0", "route add default via 192.168.77.2 dev v0",
                        "addr add fd00:77::1/64 dev v0 nodad", "route add default via fd00:77::2 dev v0"])
        with netns.entered():
            api = FakeKubeAPI(bookmark_interval=5).start()
        for obj in objects():
            api.create(obj)
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": api.url}}],
            "users": [{"name": "test", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        bed = ScrapeBed(netns, api, kubeconfig)
        yield bed
    finally:
        try:
            if bed is not None:
                bed.stop()
        finally:
            if api is not None:
                api.stop()
            kubeconfig.unlink(missing_ok=True)
            subprocess.run(["ip", "netns", "del", name], check=False)


def _counted(bed: ScrapeBed, labels: dict[str, str], expected: int) -> bool:
    samples = parse(bed.scrape()[0], openmetrics=False)
    return samples.get((CONNS, frozenset(labels.items()))) == expected


def test_default_exports_the_annotated_services_and_the_drops(scrape_bed: ScrapeBed) -> None:
    """``--service-metrics`` unset (annotated): the new connections of the annotated Services, with the packets
    counted, and the drops of every rate-limited Service; the rest of the registry as before, in both formats."""
    scrape_bed.start()
    scrape_bed.connect(cluster_ip(100), 3)
    scrape_bed.connect("fd00:97::1", 2)
    for accept, openmetrics in (("", False), (OPENMETRICS, True)):
        body, content_type = scrape_bed.scrape(accept)
        assert content_type.startswith("application/openmetrics-text" if openmetrics else "text/plain; version=0.0.4")
        samples = parse(body, openmetrics)
        assert series(samples, CONNS) == annotated_series()
        assert series(samples, DROPS) == drop_series()
        for name in ("kproxy_syncs_total", "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                     "kubeproxy_sync_proxy_rules_no_local_endpoints_total"):
            assert any(n == name for n, _ in samples), name
        assert samples[("kproxy_syncs_total", frozenset({("kind", "full")}))] >= 1
    web = {"namespace": "ns-0", "service": "svc-100", "port": "http", "ip_family": "IPv4"}
    wait_until(lambda: _counted(scrape_bed, web, 3), 5, "3 connections counted")
    wait_until(lambda: _counted(scrape_bed, {"namespace": "shop", "service": "dual", "port": "http",
                                             "ip_family": "IPv6"}, 2), 5, "2 IPv6 connections counted")
    assert not [e for e in scrape_bed.lines() if e.get("level") in ("warning", "error")], scrape_bed.tail()
    assert scrape_bed.stop() == 0


def test_all_exports_every_service(scrape_bed: ScrapeBed) -> None:
    """``--service-metrics all``: a series per Service port and family; ``none``: none (the drops stay)."""
    scrape_bed.start("--service-metrics", "all")
    for accept, openmetrics in (("", False), (OPENMETRICS, True)):
        samples = parse(scrape_bed.scrape(accept)[0], openmetrics)
        assert len(series(samples, CONNS)) == SERVICES + 2
        assert series(samples, DROPS) == drop_series()
    assert scrape_bed.stop() == 0
    scrape_bed.start("--service-metrics", "none")
    samples = parse(scrape_bed.scrape()[0], openmetrics=False)
    assert series(samples, CONNS) == []
    assert series(samples, DROPS) == drop_series()
    assert scrape_bed.stop() == 0


def test_twenty_concurrent_scrapes_stay_within_a_memory_bound(scrape_bed: ScrapeBed) -> None:
    """20 scrapers at once, three rounds, with every Service's series: the daemon's peak RSS grows by less than
    MEMORY_BOUND_MB, each round is served by one collection (two, should a round outlast the shared result), and
    every scraper gets the whole body."""
    scrape_bed.start("--service-metrics", "all")
    pid = scrape_bed.proc.pid if scrape_bed.proc else 0
    child = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    pid = int(child[0]) if child else pid  # `ip netns exec` execs the daemon: normally the same process
    reference, _ = scrape_bed.scrape()
    time.sleep(1.1)
    collected_before = sum("collected /metrics" in e.get("msg", "") for e in scrape_bed.lines())
    Path(f"/proc/{pid}/clear_refs").write_text("5\n")  # VmHWM := VmRSS
    rss_before = status_kb(pid, "VmRSS")
    for _ in range(ROUNDS):
        bodies: list[bytes] = []
        errors: list[str] = []

        def one(bodies: list[bytes] = bodies, errors: list[str] = errors) -> None:
            try:
                bodies.append(scrape_bed.scrape()[0])
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=one) for _ in range(SCRAPERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors and len(bodies) == SCRAPERS, errors[:3]
        assert {len(series(parse(b, False), CONNS)) for b in bodies[:3]} == {SERVICES + 2}
        assert all(abs(len(b) - len(reference)) < 2000 for b in bodies)
        time.sleep(1.1)
    growth_mb = (status_kb(pid, "VmHWM") - rss_before) / 1024
    collections = sum("collected /metrics" in e.get("msg", "") for e in scrape_bed.lines()) - collected_before
    assert growth_mb < MEMORY_BOUND_MB, f"peak RSS grew by {growth_mb:.1f} MB"
    assert 1 <= collections <= 2 * ROUNDS, collections
    assert scrape_bed.stop() == 0


# -- Prometheus and promtool read all of it --------------------------------------------------


def prometheus_get(netns: Netns, path: str, **params: Any) -> dict[str, Any]:
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}{path}?{urllib.parse.urlencode(params)}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with netns.entered():
        try:
            with opener.open(url, timeout=5) as response:
                return json.load(response)
        except OSError as exc:
            return {"status": "unreachable", "error": str(exc)}


def instant(netns: Netns, expr: str) -> float | None:
    answer = prometheus_get(netns, "/api/v1/query", query=expr)
    result = answer.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_and_promtool_parse_every_series(scrape_bed: ScrapeBed) -> None:
    """A real Prometheus scrapes the daemon (OpenMetrics, as it asks for) with every Service's series: the target
    is up, every sample is ingested, the per-Service families are counters; promtool parses the text format."""
    scrape_bed.start("--service-metrics", "all")
    text, _ = scrape_bed.scrape()
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    problems = checked.stdout.decode() + checked.stderr.decode()
    assert "error while linting" not in problems and "parse" not in problems.lower(), problems[:2000]
    openmetrics_body, _ = scrape_bed.scrape(OPENMETRICS)
    sample_lines = [line for line in openmetrics_body.decode().splitlines() if line and not line.startswith("#")]
    with tempfile.TemporaryDirectory(prefix="kproxy-prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "kproxy", "static_configs": [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]}],
        }))
        log = Path(tmp) / "prometheus.log"
        with log.open("wb") as log_file:
            proc = scrape_bed.netns.popen(
                "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}", "--log.level=warn",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_until(lambda: proc.poll() is not None or instant(scrape_bed.netns, 'up{job="kproxy"}') == 1, 30,
                       "Prometheus to scrape kproxy")
            assert proc.poll() is None, log.read_text()[-2000:]
            wait_until(lambda: instant(scrape_bed.netns, f"count({CONNS})") == SERVICES + 2, 10,
                       "every per-Service series in Prometheus")
            scraped = instant(scrape_bed.netns, 'scrape_samples_scraped{job="kproxy"}')
            assert scraped is not None and abs(scraped - len(sample_lines)) <= 10, (scraped, len(sample_lines))
            assert instant(scrape_bed.netns, f"count({DROPS})") == len(RATE_LIMITED)
            for name in (CONNS, DROPS):
                metadata = prometheus_get(scrape_bed.netns, "/api/v1/metadata", metric=re.sub("_total$", "", name))
                types = {m["type"] for m in metadata["data"].get(re.sub("_total$", "", name), [])}
                assert types == {"counter"}, metadata
            assert "ingest" not in log.read_text().lower(), log.read_text()[-2000:]  # "Error on ingesting samples ..."
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert scrape_bed.stop() == 0
