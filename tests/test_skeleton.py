"""The skeleton file: it parses, its options are the compiler's, and its text is safe."""

from __future__ import annotations

import pytest

from kproxy.nft.objects import comment
from kproxy.nft.statements import render_rule, sets_it_reads
from kproxy.rules.compiler import ProxyConfig, table_options
from kproxy.rules.skeleton import option_names, skeleton_table


def test_options_are_the_ones_the_compiler_sets() -> None:
    """Every '# if' option in rules/kproxy.nft is one the compiler can switch on."""
    possible = table_options(ProxyConfig(cluster_cidrs=("10.0.0.0/8",)), "ip") | table_options(
        ProxyConfig(masquerade_all=True), "ip"
    )
    assert option_names() == possible == {"cluster-cidr", "masquerade-all"}


@pytest.mark.parametrize("family", ["ip", "ip6"])
def test_skeleton_renders_for_both_families(family: str) -> None:
    """The family placeholders are all replaced, and every comment passes the safe-text check."""
    table = skeleton_table(family, frozenset({"cluster-cidr"}))  # type: ignore[arg-type]
    text = "\n".join(render_rule(r, family) for c in table.chains.values() for r in c.rules) + "\n".join(
        line for s in table.sets.values() for line in s.body
    )
    assert "@FAMILY@" not in text and "@ADDR@" not in text
    assert ("ip6 daddr" in text) == (family == "ip6")
    for chain in table.chains.values():
        comment(chain.comment)
    comment(table.comment)
    assert len(table.sets) == 41


def test_options_switch_rules() -> None:
    """The masquerade rules for --cluster-cidr and --masquerade-all appear only when asked for."""
    plain = skeleton_table("ip").chains["masquerading"].rules
    cidr = skeleton_table("ip", frozenset({"cluster-cidr"})).chains["masquerading"].rules
    assert len(cidr) == len(plain) + 1
    assert any("cluster-cidrs" in sets_it_reads(r) for r in cidr) and not any("cluster-cidrs" in sets_it_reads(r) for r in plain)
