"""Golden files: what the compiler emits, scenario by scenario, and that nft accepts it.

``tests/golden/base.nft`` is the whole script for an empty cluster (the
skeleton, both families). Every other golden file holds only what one scenario
adds on top of that base. Regenerate after an intended change with
``UPDATE_GOLDEN=1 ./dev test tests/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kproxy.cluster.convert import build_cluster
from kproxy.rules.compiler import ProxyConfig, compile_ruleset
from kproxy.rules.plan import render_ruleset
from kproxy.rules.skeleton import skeleton_table
from tests.harness.builders import node
from tests.harness.scenarios import CIDRS, NODE, SCENARIOS

GOLDEN = Path(__file__).parent / "golden"
SKELETON_CHAINS = set(skeleton_table("ip").chains)


def _render(objects: list[dict[str, Any]], config: ProxyConfig) -> str:
    cluster, problems = build_cluster(objects + [node("node-a", ["192.168.50.1", "fd00:50::1"])], "node-a")
    assert problems == []
    return render_ruleset(compile_ruleset(cluster, NODE, config))


def _scenario_part(script: str, base: str) -> str:
    """The lines a scenario adds to the base script."""
    base_lines = set(base.splitlines())
    return "".join(line + "\n" for line in script.splitlines() if line not in base_lines)


def _compare(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.nft"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs; if intended, regenerate with UPDATE_GOLDEN=1"


def test_golden_base() -> None:
    """An empty cluster compiles to exactly the skeleton in both families."""
    _compare("base", _render([], CIDRS))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_scenario(name: str) -> None:
    """Each scenario adds exactly its golden lines to the base."""
    objects, config = SCENARIOS[name]
    _compare(name, _scenario_part(_render(objects, config), _render([], config)))


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_scenario_passes_nft_check(name: str, nft_check) -> None:
    """The whole script of every scenario is accepted by nft -c."""
    objects, config = SCENARIOS[name]
    nft_check(_render(objects, config))
