"""Parse ``nft -j list table`` output into a ``Table``, for comparing with a compiled one. Pure.

Only what the planner compares is kept: set and map names, chain names with the
(digest, rule count) fingerprint taken from the digest comment on each chain's
last rule, and every element of the static sets and maps, written back in the
exact text the compiler uses for keys and values.
"""

from __future__ import annotations

from typing import Any

from kproxy.nft.objects import DIGEST_PREFIX, Chain, Element, Family, SetDecl, Table


class ReadbackError(ValueError):
    """JSON that does not look like nft's."""


def _atom(value: Any) -> str:
    if isinstance(value, bool):
        raise ReadbackError(f"unexpected boolean in element: {value!r}")
    if isinstance(value, (str, int)):
        return str(value)
    if isinstance(value, dict):
        if "concat" in value:
            return " . ".join(_atom(v) for v in value["concat"])
        if "prefix" in value:
            prefix = value["prefix"]
            return f"{prefix['addr']}/{prefix['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{_atom(low)}-{_atom(high)}"
    raise ReadbackError(f"unexpected element value: {value!r}")


def _verdict(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        verb, arg = next(iter(value.items()))
        if verb in ("goto", "jump"):
            return f"{verb} {arg['target']}"
        if arg is None:
            return str(verb)
    return _atom(value)


def _element(raw: Any, is_map: bool) -> Element:
    value = ""
    if is_map:
        raw, data = raw
        value = _verdict(data)
    comment = ""
    if isinstance(raw, dict) and "elem" in raw:
        comment = raw["elem"].get("comment", "")
        raw = raw["elem"]["val"]
    return Element(_atom(raw), value, comment)


def parse_table(document: dict[str, Any], family: Family) -> Table:
    """A Table from one ``nft -j list table FAMILY kproxy`` document."""
    table = Table(family=family)
    rules: dict[str, list[dict[str, Any]]] = {}
    for item in document.get("nftables", []):
        if not isinstance(item, dict) or len(item) != 1:
            raise ReadbackError(f"unexpected object: {item!r}")
        kind, body = next(iter(item.items()))
        if kind == "table":
            table.comment = body.get("comment", "")
        elif kind in ("set", "map"):
            name = body["name"]
            flags = body.get("flags", [])
            if ("timeout" in flags or "size" in body) and "dynamic" not in flags:
                # nft 1.0.6 leaves this flag out of its JSON; kproxy's sets with timeouts or a size are the
                # datapath's (conn-limit has a size and no timeout: the kernel keeps no timeout with ct count).
                flags = [*flags, "dynamic"]
            decl = SetDecl(kind, name, (f"flags {','.join(flags)}",) if flags else ())
            table.sets[name] = decl
            if not decl.dynamic:
                table.elements[name] = {}
                for raw in body.get("elem", []):
                    element = _element(raw, kind == "map")
                    table.elements[name][element.key] = element
        elif kind == "chain":
            rules.setdefault(body["name"], [])
            table.chains[body["name"]] = Chain(body["name"], ())
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(body)
        elif kind == "counter":
            table.counters[body["name"]] = body.get("comment", "")
    for name, chain_rules in rules.items():
        digest = ""
        if chain_rules:
            note = chain_rules[-1].get("comment", "")
            tail = note[len(DIGEST_PREFIX):] if note.startswith(DIGEST_PREFIX) else ""
            digest = tail if tail.isalnum() and tail.isascii() and tail.upper() == tail else ""
        table.chains[name] = Chain(name, (), fingerprint=(digest, len(chain_rules)))
    return table
