"""Records the netlink messages nft itself sends for every rule, element and object shape kproxy sends over netlink.

Run as root: ``python -m tests.harness.record_netlink [--out DIR]`` (default
``tests/data/netlink/``). In a fresh network namespace of its own (deleted
afterwards, also on failure) it has nft (``nft --debug=mnl -f``) build a table
laid out like kproxy's, and keeps the bytes nft sent for the commands that
kproxy sends over its own encoder (``kproxy.nft.netlink``):

* ``rules.json``: one ``add rule`` per rule shape. The shapes come from what
  kproxy compiles: ``compile_ruleset`` on the golden scenarios
  (``tests.harness.scenarios``), on ``EXTRA_SHAPES`` and ``EDGE_SHAPES`` (as
  in ``tests/test_nfnetlink.py``) and on ``MORE_SHAPES`` (every endpoints-C
  map, IPv6 firewall and no-endpoint elements, a burst of 0), kept
  ``RULES_PER_SHAPE`` per shape (``shape_of``); and a few hand-written rules
  (``SUPPLEMENT``) for what the compiler does not write today (``accept``,
  ``return``, whole-address and destination prefixes, plain lookups). Each
  rule carries the digest comment kproxy puts on the last rule of a chain
  (here every recorded rule is alone in its chain).
* ``elements.json``: ``add element`` for ``ELEMENTS_PER_SHAPE`` elements of
  each shape of every static, non-interval set and map kproxy fills over
  netlink (and ``SUPPLEMENT_ELEMENTS``), and one ``delete element`` per set
  and family.
* ``objects.json``: the table, chain and counter declarations (with comments
  and without), ``flush chain``, ``delete chain``, ``delete counter``.

Every entry has the nft command as nft was given it, the kproxy value that
command is the text of (a typed rule, an element, an object: see
``op_json``), and nft's message: its type and its payload after the
netlink header, as hex, split per top-level attribute, with the rule
expressions and the set elements one per line. ``tests/test_netlink_bytes.py``
encodes the same values with kproxy's encoder and compares.

How the bytes are captured: ``nft --debug=mnl`` prints every message of the
batch nft sends as libmnl's ``mnl_nlmsg_fprintf`` dump, one line per 32-bit
word: attribute headers as ``|len|flags|type|`` (flags ``N`` nested, ``B``
network byte order), everything else as 4 hex bytes. ``parse_mnl`` rebuilds
the bytes from it and checks each message's length against its header. The
dump shows only four of the message header's flags (and kproxy sets its ACK
flag differently anyway), so what is kept is the message type and payload.

Pick rules (``dnat ... map @endpoints-C``) are recorded in the same batch as
the declaration of the map they read: nft 1.0.6 cannot add them once the map
exists (see ``kproxy.nft.expressions``). Elements and deletes are recorded in
later runs, against sets and objects that exist, as kproxy sends them.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kproxy.cluster.convert import build_cluster
from kproxy.nft import statements as st
from kproxy.nft.objects import Chain, Element, Family, Op, Ruleset, Table, with_digest
from kproxy.nft.statements import Rule
from kproxy.rules.compiler import ProxyConfig, compile_ruleset
from kproxy.rules.plan import create
from kproxy.rules.skeleton import skeleton_table
from tests.harness.builders import endpoint, endpoint_slice, service
from tests.harness.scenarios import CIDRS, NODE, SCENARIOS

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "netlink"
FAMILIES: tuple[Family, ...] = ("ip", "ip6")

# -- the shapes ------------------------------------------------------------------------------------

# The same clusters as EXTRA_SHAPES and EDGE_SHAPES in tests/test_nfnetlink.py (no test module imports
# another, so they are repeated here): a cascade for more endpoints than the largest pick chain,
# affinity and rate limits in IPv6, cluster CIDRs that are not whole bytes, CIDRs of length 0,
# a per-minute limit with a burst and an IPv6 SCTP cascade.
EXTRA_SHAPES: tuple[list[dict[str, Any]], ProxyConfig] = (
    [
        service("big", "shop", "10.96.0.80"),
        endpoint_slice("big-1", "big", [endpoint(f"10.244.{3 + i // 200}.{i % 200 + 1}") for i in range(300)], namespace="shop"),
        service("sticky6", "shop", ["10.96.0.81", "fd00:96::81"], ipFamilies=["IPv4", "IPv6"], sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}, annotations={"kproxy.io/rate-limit": "10/second"},
                ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
        endpoint_slice("sticky6-1", "sticky6", [endpoint("10.244.1.81"), endpoint("10.244.2.81", node="node-b")],
                       namespace="shop", ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]),
        endpoint_slice("sticky6-6", "sticky6", [endpoint("fd00:244:1::81"), endpoint("fd00:244:2::81", node="node-b")],
                       namespace="shop", address_type="IPv6", ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]),
        service("local6", "shop", ["10.96.0.82", "fd00:96::82"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                externalTrafficPolicy="Local", ports=[{"name": "http", "port": 80, "nodePort": 30082, "protocol": "TCP"}]),
        endpoint_slice("local6-1", "local6", [endpoint("10.244.1.82")], namespace="shop"),
        endpoint_slice("local6-6", "local6", [endpoint("fd00:244:1::82")], namespace="shop", address_type="IPv6"),
    ],
    ProxyConfig(cluster_cidrs=("172.16.0.0/13", "fd01:244::/57")),
)
EDGE_SHAPES: tuple[list[dict[str, Any]], ProxyConfig] = (
    [
        service("edge", "shop", ["10.96.0.90", "fd00:96::90"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                externalTrafficPolicy="Local",
                annotations={"kproxy.io/rate-limit": "30/minute", "kproxy.io/rate-limit-burst": "7"},
                ports=[{"name": "sig", "port": 5060, "nodePort": 30090, "protocol": "SCTP"}]),
        endpoint_slice("edge-1", "edge", [endpoint("10.244.1.90")], namespace="shop",
                       ports=[{"name": "sig", "port": 5060, "protocol": "SCTP"}]),
        endpoint_slice("edge-6", "edge", [endpoint(f"fd00:244:1::{i + 1:x}") for i in range(260)], namespace="shop",
                       address_type="IPv6", ports=[{"name": "sig", "port": 5060, "protocol": "SCTP"}]),
    ],
    ProxyConfig(cluster_cidrs=("0.0.0.0/0", "::/0")),
)

MORE_SHAPES: dict[str, tuple[list[dict[str, Any]], ProxyConfig]] = {
    # 129 endpoints in each family: slots in every endpoints-C map, up to endpoints-256 (pick-256).
    "wide": (
        [
            service("wide", "shop", ["10.96.0.100", "fd00:96::100"], ipFamilies=["IPv4", "IPv6"]),
            endpoint_slice("wide-1", "wide", [endpoint(f"10.244.9.{i + 1}") for i in range(129)], namespace="shop"),
            endpoint_slice("wide-6", "wide", [endpoint(f"fd00:244:9::{i + 1:x}") for i in range(129)], namespace="shop",
                           address_type="IPv6"),
        ],
        CIDRS,
    ),
    # A dual-stack load balancer with source ranges and no endpoints: firewall and no-endpoint elements in IPv6 too.
    "lb6-no-endpoints": (
        [
            service("lb6", "shop", ["10.96.0.120", "fd00:96::120"], ipFamilies=["IPv4", "IPv6"], type="LoadBalancer",
                    loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8:1::/48"],
                    ports=[{"name": "https", "port": 443, "nodePort": 30120}],
                    status={"loadBalancer": {"ingress": [{"ip": "192.0.2.120"}, {"ip": "2001:db8::120"}]}}),
        ],
        CIDRS,
    ),
    # The smallest burst kproxy accepts (nft has no burst of 0: it stands for the default, 5).
    "burst-one": (
        [
            service("zero", "shop", "10.96.0.110",
                    annotations={"kproxy.io/rate-limit": "10/second", "kproxy.io/rate-limit-burst": "1"}),
            endpoint_slice("zero-1", "zero", [endpoint("10.244.1.110")], namespace="shop"),
        ],
        CIDRS,
    ),
}

SPARE = "kpt-spare"
"""A chain and a counter of the recording's own, without comments: they hold ``SUPPLEMENT`` and are deleted at the end."""

SUPPLEMENT: dict[Family, tuple[Rule, ...]] = {
    family: (
        (st.MatchProtocol("tcp"), st.Verdict("accept")),
        (st.Verdict("return"),),
        (st.Verdict("jump", "mark-for-masquerade"),),
        (st.MatchPrefix("saddr", "10.1.2.3/32" if family == "ip" else "fd00::1:2:3/128"), st.Verdict("drop")),
        (st.MatchPrefix("daddr", "10.96.0.0/16" if family == "ip" else "fd00:96::/64"), st.Verdict("accept")),
        (st.MatchPrefix("daddr", "10.96.0.0/12" if family == "ip" else "fd00:96::/108"), st.Verdict("accept")),
        (st.MatchPrefix("saddr", "10.128.0.0/9" if family == "ip" else "fd00:8000::/17"), st.Verdict("accept")),
        (st.Lookup(("daddr",), "cluster-ips"), st.Verdict("return")),
        (st.Lookup(("saddr", "daddr"), "hairpin"), st.Verdict("accept")),
        (st.NumgenIs(1 << 31), st.MatchProtocol("sctp"), st.DnatTo("10.0.0.1" if family == "ip" else "fd00::1", 65535)),
    )
    for family in FAMILIES
}
"""Statements and values the encoder handles that the compiled shapes do not have (in chain ``SPARE``)."""

SUPPLEMENT_ELEMENTS: dict[Family, tuple[tuple[str, Element], ...]] = {
    "ip": (
        ("cluster-ips", Element("10.96.99.1")),
        ("service-ips", Element("10.96.99.2 . udp . 53", "drop")),
        ("service-nodeports", Element("udp . 30999", "jump reject-chain", "a jump")),
        ("no-endpoint-nodeport-drop", Element("udp . 30998")),
    ),
    "ip6": (
        ("cluster-ips", Element("fd00:96::99:1")),
        ("service-ips", Element("fd00:96::99:2 . udp . 53", "drop")),
        ("service-nodeports", Element("udp . 30999", "jump reject-chain", "a jump")),
        ("no-endpoint-nodeport-drop", Element("udp . 30998")),
        ("no-endpoint-drop", Element("fd00:96::99:2 . udp . 54")),
    ),
}
"""Elements without comments, and a ``jump`` verdict (the compiler writes ``goto`` and ``drop``)."""
for _family, _address in (("ip", "10.96.99.3"), ("ip6", "fd00:96::99:3")):
    # Every class set, whatever sizes the scenarios reach.
    SUPPLEMENT_ELEMENTS[_family] += tuple(  # type: ignore[index]
        (f"{prefix}class-{size}", Element(f"{_address} . tcp . {1000 + size}", comment="a class"))
        for prefix in ("", "local-") for size in (4, 8, 16, 32, 64, 128, 256))

RULES_PER_SHAPE = 2
"""How many rules of one shape (``shape_of``) are kept, in compile order."""
ELEMENTS_PER_SHAPE = 2
OBJECTS_PER_FAMILY = 3
"""Chain and counter declarations kept per family, in compile order."""


def compiled_sources() -> list[tuple[str, Ruleset]]:
    """(name, ruleset) of every golden scenario, then ``extra``, ``edge`` and ``MORE_SHAPES``."""
    sources = [(name, _compile(*SCENARIOS[name])) for name in sorted(SCENARIOS)]
    sources += [("extra", _compile(*EXTRA_SHAPES)), ("edge", _compile(*EDGE_SHAPES))]
    return sources + [(name, _compile(*MORE_SHAPES[name])) for name in MORE_SHAPES]


def _compile(objects: list[dict[str, Any]], config: ProxyConfig) -> Ruleset:
    cluster, problems = build_cluster(objects, NODE.name)
    assert problems == [], problems
    return compile_ruleset(cluster, NODE, config)


def shape_of(value: Any) -> Any:
    """What decides a value's encoding, and not its particular names and numbers.

    Rules of one shape differ only in values nft writes in the same bytes
    (an address for an address, a name for a name): statement classes and
    their structure, the field keywords, the families of addresses, whether
    a number is 0 (nft leaves out a numgen offset of 0), and what kind of
    prefix a CIDR is (``/0``, whole bytes, masked, whole address).
    """
    if dataclasses.is_dataclass(value):
        return (type(value).__name__, *(shape_of(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, tuple):
        return tuple(shape_of(v) for v in value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return "0" if value == 0 else "int"
    assert isinstance(value, str)
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return value if re.fullmatch(r"[a-z][a-z-]*", value) else "name"
    if "/" not in value:
        return f"address{network.version}"
    bits = network.max_prefixlen
    prefix = network.prefixlen
    kind = "0" if prefix == 0 else "whole" if prefix == bits else "bytes" if prefix % 8 == 0 else "masked"
    return f"prefix{network.version}-{kind}"


# -- kproxy values as JSON (the test rebuilds them; nothing parses rule text) ----------------------


def to_json(value: Any) -> Any:
    """A statement (or a part of one) as JSON: ``{"type": CLASS, field: value, ...}``, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__name__, **{f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    """The inverse of ``to_json``: classes of ``kproxy.nft.statements`` by name."""
    if isinstance(value, dict):
        cls = getattr(st, value["type"])
        return cls(**{name: from_json(v) for name, v in value.items() if name != "type"})
    if isinstance(value, list):
        return tuple(from_json(v) for v in value)
    return value


def op_json(op: Op) -> dict[str, Any]:
    """A command kproxy sends, as JSON: what the test needs to build the same ``Op``."""
    out: dict[str, Any] = {"verb": op.verb, "kind": op.kind, "family": op.family}
    if op.kind == "rules":
        ((chain,),) = (op.chains,)
        ((rule,),) = (chain.rules,)
        return {**out, "chain": chain.name, "rule": to_json(rule)}
    if op.name:
        out["name"] = op.name
    comment = op.chain.comment if op.chain is not None else op.comment
    if comment:
        out["comment"] = comment
    if op.kind == "element":
        out["elements"] = [{k: v for k, v in dataclasses.asdict(e).items() if v} for e in op.elements]
    return out


def op_from_json(data: dict[str, Any]) -> Op:
    """The ``Op`` that ``op_json`` described (element commands get the skeleton's declaration of their set)."""
    family: Family = data["family"]
    kind, verb = data["kind"], data["verb"]
    if kind == "rules":
        return Op("add", "rules", family, chains=(Chain(data["chain"], (from_json(data["rule"]),)),))
    name, comment = data.get("name", ""), data.get("comment", "")
    if kind == "element":
        elements = tuple(Element(**e) for e in data["elements"])
        return Op(verb, "element", family, name, set_decl=skeleton_table(family).sets[name], elements=elements)
    if kind == "chain" and verb == "add":
        return Op("add", "chain", family, name, chain=Chain(name, (), comment))
    return Op(verb, kind, family, name, comment=comment)


# -- netlink attributes ----------------------------------------------------------------------------

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
MESSAGE_NAMES = {
    0: "NEWTABLE", 3: "NEWCHAIN", 5: "DELCHAIN", 6: "NEWRULE", 8: "DELRULE",
    12: "NEWSETELEM", 14: "DELSETELEM", 18: "NEWOBJ", 20: "DELOBJ",
}
"""nf_tables message types (low byte; the high byte is the subsystem, 10)."""
LISTS = {
    "NEWRULE": 4,  # NFTA_RULE_EXPRESSIONS
    "NEWSETELEM": 3,  # NFTA_SET_ELEM_LIST_ELEMENTS
    "DELSETELEM": 3,
}
"""The top-level attribute holding a list (expressions, elements), written one member per line in fixtures."""


@dataclass(frozen=True)
class Attr:
    """One netlink attribute: type (without flags), flags, payload (unpadded) and, when nested, its attributes."""

    type: int
    flags: int
    payload: bytes
    children: tuple[Attr, ...] | None

    def encode(self) -> bytes:
        payload = self.payload if self.children is None else b"".join(c.encode() for c in self.children)
        return struct.pack("=HH", 4 + len(payload), self.type | self.flags) + payload + b"\0" * (-len(payload) % 4)


def attributes(data: bytes) -> tuple[Attr, ...]:
    """Parse a run of attributes (nested ones by their NLA_F_NESTED flag); ValueError on a bad length."""
    out = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ValueError(f"a truncated attribute header at {offset}")
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            raise ValueError(f"attribute of length {length} at {offset} of {len(data)}")
        payload = data[offset + 4:offset + length]
        flags = kind & (NLA_F_NESTED | NLA_F_NET_BYTEORDER)
        out.append(Attr(kind & NLA_TYPE_MASK, flags, payload, attributes(payload) if flags & NLA_F_NESTED else None))
        offset += (length + 3) & ~3
    return tuple(out)


@dataclass(frozen=True)
class Message:
    """One nf_tables message: its type (subsystem byte dropped), sequence number and payload (nfgenmsg and attributes)."""

    type: int
    seq: int
    payload: bytes

    @property
    def name(self) -> str:
        return MESSAGE_NAMES.get(self.type, str(self.type))

    @property
    def attributes(self) -> tuple[Attr, ...]:
        return attributes(self.payload[4:])


def messages(data: bytes | bytearray) -> list[Message]:
    """The messages of a batch (kproxy's ``Batch.data``), begin and end left out."""
    out = []
    offset = 0
    while offset < len(data):
        length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
        if kind not in (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END):
            out.append(Message(kind & 0xFF, seq, bytes(data[offset + 16:offset + length])))
        offset += (length + 3) & ~3
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LENGTH = re.compile(r"^\|\s+(\d{10})\s+\|\s+\| message length \|$")
_TYPE = re.compile(r"^\| (\d{5}) \| [R-][M-][A-][E-] \|\s+\|  type \| flags  \|$")
_NUMBER = re.compile(r"^\|\s+(\d{10})\s+\|\s+\|\s*(sequence number|port ID)\s*\|$")
_WORD = re.compile(r"^\| ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2})  \|\t\|")
_HEADER = re.compile(r"^\|(\d{5})\|([N-])([B-])\|(\d{5})\|\t\|len \|flags\| type\|$")


def parse_mnl(text: str) -> list[tuple[int, int, bytes]]:
    """Every message in ``nft --debug=mnl`` output: (type, sequence number, payload after the netlink header).

    The bytes are rebuilt word by word; a message whose rebuilt length is not
    the length in its header (a word the dump does not show) is an error.
    """
    found: list[tuple[int, int, bytes]] = []
    length: int | None = None
    kind = seq = 0
    body = bytearray()

    def finish() -> None:
        if length is not None:
            if 16 + len(body) != length:
                raise ValueError(f"message of type {kind} (seq {seq}): {16 + len(body)} bytes rebuilt, {length} announced")
            found.append((kind, seq, bytes(body)))

    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        if (match := _LENGTH.match(line)) is not None:
            finish()
            length, body = int(match.group(1)), bytearray()
        elif (match := _TYPE.match(line)) is not None:
            kind = int(match.group(1))
        elif (match := _NUMBER.match(line)) is not None:
            if match.group(2) == "sequence number":
                seq = int(match.group(1))
        elif (match := _HEADER.match(line)) is not None:
            flags = (NLA_F_NESTED if match.group(2) == "N" else 0) | (NLA_F_NET_BYTEORDER if match.group(3) == "B" else 0)
            body += struct.pack("=HH", int(match.group(1)), int(match.group(4)) | flags)
        elif (match := _WORD.match(line)) is not None:
            body += bytes(int(h, 16) for h in match.groups())
        elif line.startswith("|") and "|" in line[1:]:
            raise ValueError(f"an mnl dump line not understood: {raw!r}")
    finish()
    return found


def batch_of(text: str) -> list[Message]:
    """The messages of the one batch in ``nft --debug=mnl`` output (between batch begin and end)."""
    dumped = parse_mnl(text)
    begins = [i for i, (kind, _, _) in enumerate(dumped) if kind == NFNL_MSG_BATCH_BEGIN]
    ends = [i for i, (kind, _, _) in enumerate(dumped) if kind == NFNL_MSG_BATCH_END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(f"expected one batch, found {len(begins)} begins and {len(ends)} ends")
    return [Message(kind & 0xFF, seq, payload) for kind, seq, payload in dumped[begins[0] + 1:ends[0]]]


def payload_lines(message: Message) -> list[str]:
    """A message's payload as hex: the nfgenmsg, then each top-level attribute, a list's members one per line."""
    lines = [message.payload[:4].hex()]
    listing = LISTS.get(message.name)
    for attr in message.attributes:
        if attr.type == listing and attr.children is not None:
            lines.append(attr.encode()[:4].hex())
            lines.extend(child.encode().hex() for child in attr.children)
        else:
            lines.append(attr.encode().hex())
    joined = bytes.fromhex("".join(lines))
    if joined != message.payload:
        raise ValueError(f"{message.name} (seq {message.seq}) does not split back into its own bytes")
    return lines


def string_attr(attrs: tuple[Attr, ...], kind: int) -> str:
    """The string in attribute ``kind`` (a table, chain, set or object name)."""
    (attr,) = [a for a in attrs if a.type == kind]
    return attr.payload.rstrip(b"\0").decode()


# -- recording --------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One recorded command: its nft text, the kproxy command it is the text of, nft's message."""

    nft: str
    op: Op
    source: str
    message: Message | None = None

    def to_json(self) -> dict[str, Any]:
        assert self.message is not None
        return {"source": self.source, "nft": self.nft, "op": op_json(self.op),
                "message": self.message.name, "payload": payload_lines(self.message)}


@dataclass
class Plan:
    """What the recording sends: the setup (not recorded) and the commands of each recorded run."""

    setup: list[str]
    rules: list[Entry]
    objects: list[Entry]
    elements: list[Entry]
    deletes: list[Entry]


def _merged(sources: list[tuple[str, Ruleset]]) -> dict[Family, Table]:
    """The golden scenarios and the extra shapes in one table per family (the edge shapes' CIDRs would overlap)."""
    tables: dict[Family, Table] = {}
    for name, ruleset in sources:
        if name == "edge":
            continue
        for family, table in ruleset.tables.items():
            into = tables.setdefault(family, Table(family, table.comment, dict(table.sets)))
            for chain_name, chain in table.chains.items():
                into.chains.setdefault(chain_name, chain)
            for counter, comment_text in table.counters.items():
                into.counters.setdefault(counter, comment_text)
            for set_name, members in table.elements.items():
                for element in members.values():
                    into.add_element(set_name, element)
    return tables


Source = tuple[str, Ruleset | None]
"""A compiled source by name, or ``("supplement", None)`` for the hand-written shapes."""


def plan_recording() -> Plan:
    """Choose the shapes to record and write the nft commands for them."""
    sources = compiled_sources()
    merged = _merged(sources)
    setup = [str(create(merged[family])[0]) for family in FAMILIES]  # the skeleton: table, sets, base chains, their rules
    objects, declarations = _object_entries(sources, merged)
    everything: list[Source] = [*sources, ("supplement", None)]
    elements, deletes = _element_entries(everything)
    return Plan([*setup, *declarations], _rule_entries(everything), objects, elements, deletes)


def _object_entries(sources: list[tuple[str, Ruleset]], merged: dict[Family, Table]) -> tuple[list[Entry], list[str]]:
    """(the recorded table, chain and counter declarations; the other declarations, for the setup)."""
    objects: list[Entry] = []
    declarations: list[str] = []
    for family in FAMILIES:
        table_op = Op("add", "table", family, comment=merged[family].comment)
        objects.append(Entry(table_op.render(), table_op, "skeleton"))
    for family in FAMILIES:
        skeleton = skeleton_table(family).chains
        chains: dict[str, Chain] = {}
        counters: dict[str, str] = {}
        for _, ruleset in sources:
            table = ruleset.tables[family]
            for chain in table.chains.values():
                if chain.name not in skeleton and not chain.base:  # base chains go through libnftables
                    chains.setdefault(chain.name, Chain(chain.name, (), chain.comment))
            for counter, comment_text in table.counters.items():
                counters.setdefault(counter, comment_text)
        ops = [Op("add", "chain", family, c.name, chain=c) for c in chains.values()]
        ops += [Op("add", "counter", family, name, comment=comment_text) for name, comment_text in counters.items()]
        for op in ops:
            recorded = sum(e.op.kind == op.kind and e.op.family == family for e in objects) < OBJECTS_PER_FAMILY
            if recorded:
                objects.append(Entry(op.render(), op, "compiled"))
            else:
                declarations.append(op.render())
        for op in (Op("add", "chain", family, SPARE, chain=Chain(SPARE, ())), Op("add", "counter", family, SPARE),
                   Op("add", "table", family)):
            objects.append(Entry(op.render(), op, "supplement"))
    return objects, declarations


def _rule_entries(sources: list[Source]) -> list[Entry]:
    """``RULES_PER_SHAPE`` rules of each shape of the compiled chains (not the skeleton's), and ``SUPPLEMENT``."""
    rules: list[Entry] = []
    seen: dict[Any, int] = {}
    for source, ruleset in sources:
        for family in FAMILIES:
            if ruleset is None:
                chains = [Chain(SPARE, SUPPLEMENT[family])]
            else:
                skeleton = skeleton_table(family).chains
                # Base chains (the bandwidth hooks) are declared, with their rules, through libnftables.
                chains = [c for c in ruleset.tables[family].chains.values() if c.name not in skeleton and not c.base]
            for chain in chains:
                for rule in chain.rules:
                    shape = (family, shape_of(rule))
                    if ruleset is not None and seen.get(shape, 0) >= RULES_PER_SHAPE:
                        continue
                    seen[shape] = seen.get(shape, 0) + 1
                    alone = Chain(chain.name, (rule,))
                    (text,) = with_digest(alone, family)
                    op = Op("add", "rules", family, chains=(alone,))
                    rules.append(Entry(f"add rule {family} kproxy {chain.name} {text}", op, source))
    return rules


def _element_entries(sources: list[Source]) -> tuple[list[Entry], list[Entry]]:
    """(``ELEMENTS_PER_SHAPE`` elements of each shape of every static set and map, and ``SUPPLEMENT_ELEMENTS``;
    the deletes: one element of each set and family, then the spare chain's and counter's)."""
    elements: list[Entry] = []
    deletes: list[Entry] = []
    seen: dict[tuple[Family, str, str, bool], int] = {}
    added: set[tuple[Family, str, str]] = set()
    for source, ruleset in sources:
        for family in FAMILIES:
            skeleton_sets = skeleton_table(family).sets
            if ruleset is None:
                members = list(SUPPLEMENT_ELEMENTS[family])
            else:
                members = [(name, e) for name, els in ruleset.tables[family].elements.items() for e in els.values()]
            for set_name, element in members:
                decl = skeleton_sets[set_name]
                if decl.interval or decl.dynamic or (family, set_name, element.key) in added:
                    continue
                value = element.value.split(" ")[0] if " . " not in element.value else "address . port"
                shape = (family, set_name, value, bool(element.comment))
                if ruleset is not None and seen.get(shape, 0) >= ELEMENTS_PER_SHAPE:
                    continue
                seen[shape] = seen.get(shape, 0) + 1
                added.add((family, set_name, element.key))
                op = Op("add", "element", family, set_name, set_decl=decl, elements=(element,))
                elements.append(Entry(op.render(), op, source))
                if not any(d.op.family == family and d.op.name == set_name for d in deletes):
                    gone = Op("delete", "element", family, set_name, set_decl=decl, elements=(Element(element.key),))
                    deletes.append(Entry(gone.render(), gone, source))
    for family in FAMILIES:
        for verb, kind in (("flush", "chain"), ("delete", "chain"), ("delete", "counter")):
            op = Op(verb, kind, family, SPARE)  # type: ignore[arg-type]
            deletes.append(Entry(op.render(), op, "supplement"))
    return elements, deletes


class Namespace:
    """A network namespace of the recording's own (``kpt-bytes-XXXXXXXX``), deleted on leaving the with-block."""

    def __init__(self) -> None:
        self.name = f"kpt-bytes-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Namespace:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def nft(self, script: str, debug: bool) -> str:
        """Run an nft script in the namespace; with ``debug``, nft's ``--debug=mnl`` dump (stdout)."""
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as file:
            file.write(script)
            file.flush()
            argv = ["ip", "netns", "exec", self.name, "nft", *(["--debug=mnl"] if debug else []), "-f", file.name]
            result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nft refused a script: {result.stderr.strip()[:2000]}")
        return result.stdout


_EXPECTED = {
    ("add", "rules"): ("NEWRULE", 2), ("add", "table"): ("NEWTABLE", 1), ("add", "chain"): ("NEWCHAIN", 3),
    ("flush", "chain"): ("DELRULE", 2), ("delete", "chain"): ("DELCHAIN", 3), ("add", "counter"): ("NEWOBJ", 2),
    ("delete", "counter"): ("DELOBJ", 2), ("add", "element"): ("NEWSETELEM", 2), ("delete", "element"): ("DELSETELEM", 2),
}
"""(the message nft sends for a command, the attribute naming the chain, set or object it is for)."""


def _assign(entries: list[Entry], found: list[Message], what: str) -> None:
    """Give each entry its message, in order: each must be of the command's kind, family and object."""
    if len(found) != len(entries):
        raise RuntimeError(f"{what}: {len(entries)} commands, {len(found)} messages")
    for entry, message in zip(entries, found, strict=True):
        op = entry.op
        want, name_attr = _EXPECTED[(op.verb, op.kind)]
        name = op.chains[0].name if op.kind == "rules" else op.name or "kproxy"
        family = {2: "ip", 10: "ip6"}.get(message.payload[0])
        if (message.name, family, string_attr(message.attributes, name_attr)) != (want, op.family, name):
            raise RuntimeError(f"{what}: {message.name} {family} for {entry.nft[:200]}")
        entry.message = message


def record(plan: Plan) -> None:
    """Run nft on the plan in a fresh namespace and give each entry the message nft sent for it.

    The recorded commands come last in each script, one message each, in
    order: the first run's last messages are the objects' (tables last), then
    the rules'.
    """
    objects = [e for e in plan.objects if e.op.kind != "table"] + [e for e in plan.objects if e.op.kind == "table"]
    with Namespace() as netns:
        script = "\n".join([*plan.setup, *(e.nft for e in objects), *(e.nft for e in plan.rules), ""])
        batch = batch_of(netns.nft(script, debug=True))
        recorded = batch[len(batch) - len(objects) - len(plan.rules):]
        _assign(objects, recorded[:len(objects)], "objects")
        _assign(plan.rules, recorded[len(objects):], "rules")
        _assign(plan.elements, batch_of(netns.nft("\n".join(e.nft for e in plan.elements) + "\n", debug=True)), "elements")
        _assign(plan.deletes, batch_of(netns.nft("\n".join(e.nft for e in plan.deletes) + "\n", debug=True)), "deletes")


def fixtures(plan: Plan) -> dict[str, str]:
    """The fixture files' contents by name."""
    def dump(entries: list[Entry]) -> str:
        return pretty([e.to_json() for e in entries]) + "\n"

    element_deletes = [e for e in plan.deletes if e.op.kind == "element"]
    object_deletes = [e for e in plan.deletes if e.op.kind != "element"]
    return {"rules.json": dump(plan.rules), "elements.json": dump(plan.elements + element_deletes),
            "objects.json": dump(plan.objects + object_deletes)}


def pretty(value: Any, indent: str = "") -> str:
    """JSON with every list or object that fits in 110 characters on one line (a statement, an element, a hex line)."""
    compact = json.dumps(value)
    if len(compact) + len(indent) <= 110 or not isinstance(value, (list, dict)) or not value:
        return compact
    inner = indent + " "
    if isinstance(value, list):
        return "[\n" + ",\n".join(inner + pretty(v, inner) for v in value) + "\n" + indent + "]"
    items = (f"{inner}{json.dumps(k)}: {pretty(v, inner)}" for k, v in value.items())
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"where to write the fixtures (default {DATA_DIR})")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("record_netlink needs root (network namespaces, nft)", file=sys.stderr)
        return 2
    plan = plan_recording()
    record(plan)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in fixtures(plan).items():
        (args.out / name).write_text(text)
    counts = {kind: len(entries) for kind, entries in
              (("rules", plan.rules), ("elements", plan.elements), ("deletes", plan.deletes), ("objects", plan.objects))}
    print(f"recorded into {args.out}: {counts}")
    return 0


def iter_entries(directory: Path = DATA_DIR) -> Iterator[dict[str, Any]]:
    """Every recorded entry of the fixture files in ``directory``."""
    for name in ("rules.json", "objects.json", "elements.json"):
        yield from json.loads((directory / name).read_text())


if __name__ == "__main__":
    sys.exit(main())
