"""What kproxy's /metrics exports, and what docs/metrics.md says it exports, in one comparable shape.

``exported_in_process`` builds the daemon's registry as ``kproxy.daemon.run``
does (``ProxyMetrics`` plus ``ProxierCollector``), records one of every
observation, and parses the exposition; ``parse_exposition`` reads any
/metrics body (a running daemon's, too); ``documented`` reads the table of
docs/metrics.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
METRICS_DOC = ROOT / "docs" / "metrics.md"
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')


@dataclass
class Family:
    type: str
    labels: set[str] = field(default_factory=set)
    series: int = 0


def parse_exposition(text: str) -> dict[str, Family]:
    """{family name as exposed (counters with ``_total``): Family}; ``le`` and ``_created`` samples left out."""
    # ``x_created`` gauges are prometheus_client's creation times, which the daemon turns off.
    families = {name: Family(kind) for name, kind in TYPE_LINE.findall(text) if not name.endswith("_created")}
    owners = {name + suffix: name for name, fam in families.items() for suffix in SUFFIXES[fam.type]}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"unparsable sample line: {line!r}"
        name, labels = match.group(1), match.group(2) or ""
        if name.endswith("_created"):
            continue
        owner = owners.get(name)
        assert owner is not None, f"sample {name} belongs to no declared family"
        families[owner].series += 1
        families[owner].labels |= set(LABEL.findall(labels)) - {"le"}
    return families


class _Proxier:
    """What ProxierCollector reads, with nothing to report."""

    oldest_pending_wall = None

    def local_policy_report(self, timeout: float | None = None) -> list[Any]:
        return []

    def metrics_services(self, timeout: float | None = None) -> frozenset[str]:
        return frozenset()


def exported_in_process() -> dict[str, Family]:
    """The daemon's registry, every metric observed once (one value per label), as exposed."""
    from prometheus_client import CollectorRegistry, generate_latest

    from kproxy.observe.metrics import ProxierCollector, ProxyMetrics

    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.sync_done(True, 0.1, 10, 20, 30)
    metrics.sync_done(False, 0.01, 2, 20, 31)
    metrics.sync_failed(False, 0.01)
    metrics.cleanup_failed()
    metrics.programming_latency(1.5)
    metrics.changes(1, 2, 0, 0)
    metrics.invalid_object("Service", "malformed")
    metrics.conntrack_deleted(1)
    metrics.drift_repaired("table_deleted")
    metrics.watch_restarted("Service", "timeout")
    metrics.healthz(200)
    metrics.livez(200)
    counters = {("ip", "conns-0123abcd-default/web/tcp/http"): (5, 300),
                ("ip", "drops-0123abcd-default/web/tcp/http"): (1, 60)}
    collector = ProxierCollector(_Proxier(), lambda: counters, service_metrics="all")
    registry.register(collector)
    return parse_exposition(generate_latest(registry).decode() + collector.exposition())


@dataclass(frozen=True)
class Row:
    name: str
    type: str
    labels: frozenset[str]
    series: str
    """The "series per node" cell: a number for fixed cardinality, else prose."""


def documented(path: Path = METRICS_DOC) -> dict[str, Row]:
    """The rows of docs/metrics.md's table: | `name` | type | `label`, ... or none | series | what |."""
    rows: dict[str, Row] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^\| `([a-z_]+)` \| (\w+) \| ([^|]*) \| ([^|]*) \|", line)
        if match:
            name, kind, labels, series = match.groups()
            assert name not in rows, f"{name} documented twice"
            label_names = frozenset(re.findall(r"`(\w+)`", labels))
            assert label_names or labels.strip() == "none", line
            rows[name] = Row(name, kind, label_names, series.strip())
    return rows
