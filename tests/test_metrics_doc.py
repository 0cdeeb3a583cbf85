"""docs/metrics.md lists exactly the metrics kproxy exports, with their types, labels and cardinality.

The exported side is the daemon's own registry (``ProxyMetrics`` and
``ProxierCollector``, built as ``kproxy.daemon.run`` builds them) with every
metric observed once, rendered by its exposition code and parsed back
(tests/harness/metricsdoc.py). tests/test_alerts.py checks a running daemon's
metric names against the same table, through Prometheus.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness.metricsdoc import METRICS_DOC, documented, exported_in_process

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = 2
"""``F`` in the table: the IP families every node programs."""


def test_documented_names_are_exactly_the_exported_ones() -> None:
    """No metric missing from the table, none listed that kproxy does not export."""
    exported, rows = exported_in_process(), documented()
    assert set(rows) == set(exported), {"undocumented": set(exported) - set(rows), "not exported": set(rows) - set(exported)}


def test_documented_types_and_labels_match() -> None:
    """Each row's type and label names are the exported family's."""
    exported = exported_in_process()
    for name, row in documented().items():
        assert row.type == exported[name].type, name
        assert row.labels == exported[name].labels, name


def _fixed_count(cell: str) -> int | None:
    """ "F x 18 (...)" -> 36, "2 x F" -> 4, "1" -> 1; None for prose ("one per ...", "at most ...")."""
    match = re.match(r"^((?:\d+|F)(?: x (?:\d+|F))*)\b", cell)
    if not match:
        return None
    count = 1
    for factor in match.group(1).split(" x "):
        count *= FAMILIES if factor == "F" else int(factor)
    return count


def test_fixed_cardinalities_are_the_exported_series_counts() -> None:
    """Every row that states a number of series (F = 2 families) states what the registry exposes."""
    exported, checked = exported_in_process(), 0
    for name, row in documented().items():
        count = _fixed_count(row.series)
        if count is not None:
            assert count == exported[name].series, (name, row.series, exported[name].series)
            checked += 1
    assert checked >= 15


def _literals(path: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, (ROOT / path).read_text()))


@pytest.mark.parametrize(("metric", "values"), [
    pytest.param("kproxy_drift_repairs_total",
                 _literals("kproxy/daemon/drift.py", r'"([a-z]+_[a-z_]+)"\)')
                 | _literals("kproxy/daemon/drift.py", r'(?:_drift\(|return )"(\w+)"'), id="drift-reasons"),
    pytest.param("kproxy_watch_restarts_total",
                 _literals("kproxy/cluster/watch.py", r'on_restart\(self\.resource\.kind, "(\w+)"\)'), id="watch-reasons"),
    pytest.param("kproxy_invalid_objects_skipped_total",
                 _literals("kproxy/cluster/convert.py", r'InvalidObject\(\s*"(\w+)"')
                 | _literals("kproxy/daemon/proxier.py", r'_quarantine\([^)]*"(\w+)"'), id="skip-reasons"),
])
def test_label_values_listed_are_those_the_code_uses(metric: str, values: set[str]) -> None:
    """The label values a row enumerates include every one the code can produce."""
    assert values, "the pattern found no value in the code: update this test"
    line = next(line for line in METRICS_DOC.read_text().splitlines() if line.startswith(f"| `{metric}` |"))
    missing = {v for v in values if f"`{v}`" not in line}
    assert not missing, f"{metric}: {missing} not in docs/metrics.md"
