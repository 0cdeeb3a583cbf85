"""Loads ``rules/kproxy.nft``, the static part of kproxy's tables.

The skeleton is a readable nft file written once for a generic family. This
module reads it (from the installed package, or from the source tree) and turns
it into ``ruleset`` values for one family and one set of options, which the
compiler then fills in. The file is read once per process; after that
everything here is pure.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

from kproxy.nft.objects import Chain, Family, SetDecl, Table

ADDR_TYPES: dict[Family, str] = {"ip": "ipv4_addr", "ip6": "ipv6_addr"}
_CONDITION = re.compile(r"\s+#\s*if\s+([a-z-]+)\s*$")
_COMMENT = re.compile(r'^comment "([^"]*)"$')


class SkeletonError(ValueError):
    """The skeleton file does not have the shape this parser expects."""


@functools.cache
def skeleton_text() -> str:
    """The skeleton as shipped: inside the wheel, or in the source tree."""
    packaged = resources.files("kproxy").joinpath("rules/kproxy.nft")
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parents[2] / "rules" / "kproxy.nft").read_text()


@functools.cache
def _parse(text: str) -> tuple[str, tuple[SetDecl, ...], tuple[tuple[Chain, tuple[str | None, ...]], ...]]:
    """Parse the generic skeleton: (table comment, sets, chains with rule conditions)."""
    table_comment = ""
    sets: list[SetDecl] = []
    chains: list[tuple[Chain, tuple[str | None, ...]]] = []
    block: list[str] | None = None
    header: tuple[str, str] | None = None
    in_table = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_table:
            if line != "table @FAMILY@ kproxy {":
                raise SkeletonError(f"line {number}: expected the table header, got {line!r}")
            in_table = True
            continue
        if header is None:
            match = re.match(r"^(set|map|chain) ([a-z0-9-]+) \{$", line)
            if match:
                header, block = (match.group(1), match.group(2)), []
            elif _COMMENT.match(line):
                table_comment = _COMMENT.match(line).group(1)  # type: ignore[union-attr]
            elif line == "}":
                in_table = False
            else:
                raise SkeletonError(f"line {number}: unexpected {line!r}")
            continue
        assert block is not None
        if line != "}":
            block.append(line)
            continue
        kind, name = header
        if kind in ("set", "map"):
            sets.append(SetDecl(kind, name, tuple(block)))  # type: ignore[arg-type]
        else:
            base, chain_comment, rules, conditions = "", "", [], []
            for item in block:
                comment_match = _COMMENT.match(item)
                if item.startswith("type "):
                    base = item
                elif comment_match:
                    chain_comment = comment_match.group(1)
                else:
                    condition = _CONDITION.search(item)
                    rules.append(item[: condition.start()] if condition else item)
                    conditions.append(condition.group(1) if condition else None)
            chains.append((Chain(name, tuple(rules), chain_comment, base), tuple(conditions)))
        header, block = None, None
    if header is not None or in_table:
        raise SkeletonError("unterminated block at end of skeleton")
    return table_comment, tuple(sets), tuple(chains)


def _for_family(line: str, family: Family) -> str:
    return line.replace("@FAMILY@", family).replace("@ADDR@", ADDR_TYPES[family])


@functools.cache
def _skeleton(text: str, family: Family, options: frozenset[str]) -> tuple[str, dict[str, SetDecl], dict[str, Chain]]:
    table_comment, sets, chains = _parse(text)
    set_decls = {s.name: SetDecl(s.kind, s.name, tuple(_for_family(b, family) for b in s.body)) for s in sets}
    chain_map: dict[str, Chain] = {}
    for chain, conditions in chains:
        rules = tuple(
            _for_family(rule, family)
            for rule, condition in zip(chain.rules, conditions)
            if condition is None or condition in options
        )
        chain_map[chain.name] = Chain(chain.name, rules, chain.comment, _for_family(chain.base, family))
    return table_comment, set_decls, chain_map


def skeleton_table(family: Family, options: frozenset[str] = frozenset(), text: str | None = None) -> Table:
    """A new Table holding the skeleton for ``family``; options switch '# if' rules on."""
    table_comment, sets, chains = _skeleton(text if text is not None else skeleton_text(), family, options)
    return Table(family=family, comment=table_comment, sets=dict(sets), chains=dict(chains))


def option_names(text: str | None = None) -> frozenset[str]:
    """Every option a '# if' in the skeleton mentions."""
    _, _, chains = _parse(text if text is not None else skeleton_text())
    return frozenset(c for _, conditions in chains for c in conditions if c)
