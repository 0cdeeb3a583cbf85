"""/metrics at scale: real HTTP scrapes of a real daemon holding N Services' nft counters.

    .venv/bin/python benchmarks/scrape.py [--quick] [--sizes N ...] [--settings none annotated all]

For each size, in a fresh network namespace: the test API server holds N
Services x 10 endpoints (``benchmarks/synthetic.py``; one in 100 annotated
``kproxy.io/metrics: "true"``, one in 500 with a ``kproxy.io/rate-limit``), and
then, for each ``--service-metrics`` setting, the daemon (``python -m kproxy``,
its own process, started with that setting on an empty ruleset) programs them,
and it is scraped:

* sequential scrapes, each more than a second after the previous one (so none
  is served from the shared result of another): wall time as the client sees
  it, and the daemon's CPU time (utime + stime from ``/proc``) per scrape;
* 20 scrapers at once, three rounds: the daemon's peak RSS growth (its
  ``VmHWM`` is reset through ``/proc/PID/clear_refs`` first, so the start-up
  peak does not hide it) and the slowest scrape.

``--setting legacy`` runs the daemon without the flag, for daemons that do not
have it (``--root`` runs another checkout's ``kproxy``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL_SIZES = [1_000, 10_000, 30_000]
QUICK_SIZES = [200]
SETTINGS = ["none", "annotated", "all"]
METRICS_PORT = 10249
SCRAPERS = 20
ROUNDS = 3
ANNOTATED_EVERY = 100
RATE_LIMITED_EVERY = 500
TICKS = os.sysconf("SC_CLK_TCK")


def _inside_netns(argv: list[str]) -> int:
    """Re-run this script in a fresh network namespace, then delete it."""
    name = f"kpt-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        env = dict(os.environ, KPROXY_BENCH_NETNS=name)
        result = subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, *argv], env=env,
                                stdout=subprocess.PIPE, text=True)
        sys.stdout.write(result.stdout)  # through this process's stdout, so callers can capture it
        return result.returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def scrape(timeout: float = 600.0, accept: str = "") -> tuple[float, bytes]:
    """One GET /metrics: (seconds, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        body = response.read()
        seconds = time.perf_counter() - t0
        if response.status != 200:
            raise RuntimeError(f"/metrics answered {response.status}")
        return seconds, body
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Daemon:
    """``python -m kproxy`` in this namespace, logging JSON to a file."""

    def __init__(self, kubeconfig: str, setting: str, root: Path) -> None:
        self.log = tempfile.NamedTemporaryFile("w+b", suffix=".log")
        extra = [] if setting == "legacy" else ["--service-metrics", setting]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kproxy", "--kubeconfig", kubeconfig, "--hostname-override", "node-0",
             "--cluster-cidr", "10.128.0.0/9", "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
             "--healthz-bind-address", "127.0.0.1:0", "--log-format", "json", "-v", *extra],
            stderr=self.log, stdout=subprocess.DEVNULL, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
        )

    def synced(self) -> bool:
        self.log.seek(0)
        for raw in self.log.read().decode(errors="replace").splitlines():
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if "operations" in entry and "sync" in entry:
                return True
        return False

    def wait_synced(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.synced():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"the daemon did not sync:\n{self.log.read().decode(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def series_of(body: bytes, name: str) -> int:
    prefix = name.encode()
    return sum(1 for line in body.splitlines() if line.startswith(prefix))


def delete_tables() -> None:
    for family in ("ip", "ip6"):
        subprocess.run(["nft", "delete", "table", family, "kproxy"], check=False, capture_output=True)


def measure(services: int, setting: str, kubeconfig: str, root: Path, sequential: int) -> dict[str, Any]:
    delete_tables()  # every daemon starts cold: its RSS does not depend on adopting the previous one's tables
    daemon = Daemon(kubeconfig, setting, root)
    try:
        daemon.wait_synced()
        time.sleep(1.0)  # the first sync's listeners, the health server
        pid = daemon.proc.pid
        times, cpu = [], []
        body = b""
        for _ in range(sequential):
            before = cpu_seconds(pid)
            seconds, body = scrape()
            cpu.append(cpu_seconds(pid) - before)
            times.append(seconds)
            time.sleep(1.1)  # past the shared result's lifetime
        # 20 scrapers at once, a few rounds; the peak RSS counted from here.
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")
        rss_before = status_kb(pid, "VmRSS")
        slowest = 0.0
        failures: list[str] = []
        t0 = time.perf_counter()
        for _ in range(ROUNDS):
            results: list[float] = []

            def one(results: list[float] = results) -> None:
                try:
                    results.append(scrape()[0])
                except Exception as exc:
                    failures.append(repr(exc))

            threads = [threading.Thread(target=one) for _ in range(SCRAPERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            slowest = max([slowest, *results])
            time.sleep(1.1)
        concurrent_wall = time.perf_counter() - t0 - 1.1 * ROUNDS
        growth_mb = (status_kb(pid, "VmHWM") - rss_before) / 1024
        if failures:
            raise RuntimeError(f"concurrent scrapes failed: {failures[:3]}")
        return {
            "services": services,
            "setting": setting,
            "series": series_of(body, "kproxy_service_new_connections_total")
            + series_of(body, "kproxy_rate_limit_drops_total"),
            "body_kb": len(body) / 1024,
            "first_s": times[0],
            "p50_s": statistics.median(times),
            "cpu_s": statistics.median(cpu),
            "concurrent_slowest_s": slowest,
            "concurrent_wall_s": concurrent_wall,
            "rss_mb": rss_before / 1024,
            "growth_mb": growth_mb,
        }
    finally:
        daemon.stop()


def run(sizes: list[int], settings: list[str], root: Path, sequential: int) -> list[dict[str, Any]]:
    from benchmarks.synthetic import node_manifest, service_manifest, slice_manifest
    from tests.harness.fakeapi import FakeKubeAPI

    rows = []
    for services in sizes:
        api = FakeKubeAPI(bookmark_interval=5).start()
        handle = tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False)
        try:
            json.dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "bench",
                "clusters": [{"name": "bench", "cluster": {"server": api.url}}],
                "users": [{"name": "bench", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
            }, handle)
            handle.close()
            api.create(node_manifest())
            for i in range(services):
                manifest = service_manifest(i)
                annotations = {}
                if i % ANNOTATED_EVERY == 0:
                    annotations["kproxy.io/metrics"] = "true"
                if i % RATE_LIMITED_EVERY == 3:
                    annotations["kproxy.io/rate-limit"] = "100/second"
                if annotations:
                    manifest["metadata"]["annotations"] = annotations
                api.create(manifest)
                api.create(slice_manifest(i, 10))
            for setting in settings:
                rows.append(measure(services, setting, handle.name, root, sequential))
        finally:
            api.stop()
            os.unlink(handle.name)
        delete_tables()
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZES[0]} Services (the test suite runs this)")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--settings", nargs="+", choices=[*SETTINGS, "legacy"])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose kproxy runs (default: this one)")
    parser.add_argument("--json", action="store_true", help="also print each row as JSON")
    args = parser.parse_args(argv)
    if "KPROXY_BENCH_NETNS" not in os.environ:
        code = _inside_netns(argv)
        if code:
            raise SystemExit(code)
        return []
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    rows = run(sizes, args.settings or SETTINGS, args.root.resolve(), 2 if args.quick else 5)
    print("| Services x 10 endpoints | --service-metrics | per-Service series | body KB | first scrape s | "
          f"scrape p50 s | daemon CPU s / scrape | {SCRAPERS} at once: slowest s | RSS MB | "
          f"{SCRAPERS} at once: peak RSS growth MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['services']:,} | {r['setting']} | {r['series']:,} | {r['body_kb']:.0f} | {r['first_s']:.3f} | "
              f"{r['p50_s']:.3f} | {r['cpu_s']:.2f} | {r['concurrent_slowest_s']:.2f} | {r['rss_mb']:.0f} | "
              f"{r['growth_mb']:.1f} |")
        if args.json:
            print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
