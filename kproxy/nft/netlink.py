"""Simple transactions sent as nf_tables netlink messages, without libnftables.

libnftables reads its cache of the whole table (every chain, set and
counter) before it runs any command: 35-50 ms at 10k Services, whatever the
command, and its parser costs tens of microseconds per rule or element. Most
of what kproxy sends is simple: elements of its sets and maps (an endpoint
comes or goes), Service chains and pick chains, and their counters. Those
have small fixed binary layouts, so this module encodes them itself and
sends each transaction as one batch on a netlink socket: the kernel applies
the batch atomically, exactly as it would from nft.

Only what kproxy writes is supported: elements of the skeleton's static,
non-interval sets and maps (keys of addresses, protocols, ports and
pick-chain slot numbers; data of verdicts or ``address . port``); chains
that are not base chains; named counters; and the rules of the chains the
compiler generates (``kproxy.nft.expressions`` encodes them), all with their comments.
``encodable()`` says whether a transaction qualifies; everything else (the
skeleton: the table, its sets, base chains and their rules) goes through
libnftables.

pyroute2's nf_tables messages are general, but they build a Python object
per attribute (slow for 100k elements) and their batch commit does not read
the kernel's answers; the few layouts here are small enough to pack directly
with ``struct``, and ``tests/test_nfnetlink.py`` checks that the kernel ends
up with exactly what libnftables writes for the same commands.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from kproxy.memory import gc_paused
from kproxy.nft.expressions import NotEncodable, encode_rule, handles, host_u32, nested, verdict_data
from kproxy.nft.expressions import attr as _attr
from kproxy.nft.expressions import string as _string
from kproxy.nft.objects import (
    DIGEST_PREFIX,
    TABLE,
    Element,
    Family,
    Op,
    SetDecl,
    Transaction,
    chain_fingerprint,
    comment,
)
from kproxy.nft.statements import render_rule

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELSET = 11
NFT_MSG_NEWCHAIN = 3
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWOBJ = 18
NFT_MSG_DELOBJ = 20
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLMSG_ERROR = 0x2
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_COMMENT = 0
"""The comment's type in the user data of elements, chains, rules and objects alike."""
NFTA_TABLE_NAME, NFTA_TABLE_USERDATA = 1, 6
NFTA_SET_TABLE, NFTA_SET_NAME = 1, 2
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_USERDATA = 1, 3, 12
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA, NFTA_OBJ_USERDATA = 1, 2, 3, 4, 8
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFT_OBJECT_COUNTER = 1
NFPROTO: dict[Family, int] = {"ip": 2, "ip6": 10}
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
MAX_ELEMENTS_BYTES = 60000
"""An element list is one netlink attribute, whose length is 16 bits."""

Field = Callable[[str], bytes]


class NetlinkError(Exception):
    """The kernel refused a batch (nothing of it was applied); ``op`` is the command it refused, if known."""

    def __init__(self, message: str, code: int, op: Op | None = None, command: str | None = None) -> None:
        super().__init__(f"{message}: {command}" if command else message)
        self.reason = message
        self.code = code
        self.op = op
        self.command = command
        """The refused command, as nft would write its first line."""


def _ipv4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def _ipv6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


@functools.lru_cache(maxsize=256)
def _proto(text: str) -> bytes:
    """A protocol by number or by name (kproxy writes tcp, udp and sctp; another program's element, read back as nft
    names it from /etc/protocols, is deleted by that name)."""
    if text in PROTOCOLS:
        return bytes([PROTOCOLS[text]])
    if text.isdigit():
        return bytes([int(text)])
    try:
        return bytes([socket.getprotobyname(text)])
    except OSError:
        raise ValueError(f"unknown protocol {text!r}") from None


def _port(text: str) -> bytes:
    return struct.pack("!H", int(text))


def _host_u32(text: str) -> bytes:
    return host_u32(int(text))


def _proto_word(text: str) -> bytes:
    return _proto(text) + b"\0\0\0"


def _port_word(text: str) -> bytes:
    return struct.pack("!HH", int(text), 0)


_PADDED: dict[Field, Field] = {_proto: _proto_word, _port: _port_word}
"""Encoders of the fields narrower than 32 bits, padded as in a concatenation."""

_TYPES: dict[str, Field] = {
    "ipv4_addr": _ipv4,
    "ipv6_addr": _ipv6,
    "inet_proto": _proto,
    "inet_service": _port,
    "mark": _host_u32,
}
_TYPEOF: dict[str, Field] = {
    "ip daddr": _ipv4,
    "ip saddr": _ipv4,
    "ip6 daddr": _ipv6,
    "ip6 saddr": _ipv6,
    "meta l4proto": _proto,
    "th dport": _port,
}


class SetLayout:
    """How one set's keys (and map data) are laid out in the kernel, with caches of encoded parts.

    Keys and data repeat a lot (an endpoints key is ``frontend . slot``: the
    frontend repeats once per endpoint, the slot once per frontend; an
    endpoint's data once per frontend), so the parts are encoded once.
    """

    __slots__ = ("_address_pair", "_cache_values", "_encode_value", "_lasts", "_prefixes", "_values", "data", "key")

    def __init__(self, key: tuple[Field, ...], data: tuple[Field, ...] | None) -> None:
        self.key = key
        self.data = data
        """None for a set; empty for a verdict map."""
        self._prefixes: dict[str, bytes] = {}
        self._lasts: dict[str, bytes] = {}
        self._values: dict[str, bytes] = {}
        self._encode_value: Callable[[str], bytes] = (
            _verdict if data == () else _address_port_data(data[0]) if data in _ADDRESS_PORT else functools.partial(_data, self)
        )
        self._cache_values = data not in _ADDRESS_PORT
        """An endpoint's ``address . port`` is its own (100k at 10k Services): encoded straight, never cached."""
        self._address_pair: int | None = _ADDRESS_PAIRS.get(key)
        """The address family of a key of two addresses (hairpin: ``endpoint . endpoint``), whose parts never repeat."""

    def encode_data(self, text: str) -> bytes:
        return _concat(self.data or (), text)

    def clear(self) -> None:
        """Forget the cached parts (they are only worth keeping within one batch)."""
        self._prefixes.clear()
        self._lasts.clear()
        self._values.clear()


def _concat(fields: tuple[Field, ...], text: str, part_of_concatenation: bool = False) -> bytes:
    parts = text.split(" . ")
    if len(parts) != len(fields):
        raise ValueError(f"{text!r} does not have {len(fields)} fields")
    if len(fields) == 1 and not part_of_concatenation:
        return fields[0](parts[0])
    # each field of a concatenation fills whole 32-bit registers
    return b"".join([_PADDED.get(encode, encode)(part) for encode, part in zip(fields, parts, strict=True)])


def _padded(value: bytes) -> bytes:
    return value + b"\0" * (-len(value) % 4)


def _typeof_field(expression: str) -> Field | None:
    if expression.startswith("numgen "):
        return _host_u32  # numgen writes a host-order 32-bit integer
    return _TYPEOF.get(expression)


def _fields(spec: str, typeof: bool) -> tuple[Field, ...] | None:
    fields = []
    for part in spec.split(" . "):
        field = _typeof_field(part.strip()) if typeof else _TYPES.get(part.strip())
        if field is None:
            return None
        fields.append(field)
    return tuple(fields)


@functools.cache
def layout_of(decl: SetDecl) -> SetLayout | None:
    """How a set's keys (and map data) are encoded, from its declaration; None if this module does not encode them.

    Static, non-interval sets and maps only: the dynamic ones are the
    datapath's, and interval sets are loaded with the skeleton.
    """
    spec = decl.type_line
    if decl.dynamic or decl.interval or spec is None:
        return None
    typeof = spec.startswith("typeof ")
    key_text, _, data_text = spec.split(" ", 1)[1].partition(" : ")
    key = _fields(key_text, typeof)
    if key is None:
        return None
    if not data_text:
        return SetLayout(key, None)
    if data_text.strip() == "verdict":
        return SetLayout(key, ())
    data = _fields(data_text, typeof)
    return SetLayout(key, data) if data is not None else None


def _sendable_kind(op: Op) -> bool:
    """Whether this module sends this kind of command (for rules, if it encodes every one of them)."""
    if op.kind == "element":
        return op.verb in ("add", "delete") and op.set_decl is not None and layout_of(op.set_decl) is not None
    if op.kind == "chain":
        return op.verb in ("flush", "delete") or (op.verb == "add" and op.chain is not None and not op.chain.base)
    if op.kind == "counter":
        return op.verb in ("add", "delete")
    if op.kind in ("set", "map"):
        return op.verb == "delete"  # declarations are the skeleton's (libnftables); a set it no longer has goes here, last
    return op.kind in ("rules", "table") and op.verb == "add"


def sent_here(op: Op) -> bool:
    """Whether this module sends this command: by its kind and, for rules, by their statements' kinds.

    Values are not checked here: one that cannot be encoded raises
    ``NotEncodable`` when the batch is built, an error rather than a reason
    to send the command some other way.
    """
    return _sendable_kind(op) and all(handles(rule) for chain in op.chains for rule in chain.rules)


def encodable_op(op: Op) -> bool:
    """Whether this module can send the command: it is sent here, and every value in it can be encoded."""
    if not sent_here(op):
        return False
    try:
        for chain in op.chains:
            for rule in chain.rules:
                encode_rule(rule, op.family)
    except NotEncodable:
        return False
    return True


def encodable(tx: Transaction) -> bool:
    """Whether every command of ``tx`` is one this module can send."""
    return bool(tx.ops) and all(encodable_op(op) for op in tx.ops)


@functools.lru_cache(maxsize=1 << 16)
def _verdict(text: str) -> bytes:
    """NFTA_SET_ELEM_DATA holding a verdict: ``goto CHAIN``, ``jump CHAIN`` or ``drop``."""
    verb, _, chain = text.partition(" ")
    return nested(NFTA_SET_ELEM_DATA, verdict_data(verb, chain))


def _encoded_elements(layout: SetLayout, elements: Iterable[Element], adding: bool) -> Iterator[bytes]:
    """One NFTA_LIST_ELEM per element: key, and when adding, data (maps) and the comment.

    The hot loop of a cold start (140k elements at 10k Services). A
    concatenated key is its prefix (an endpoint's frontend) and its last
    field (a slot); consecutive elements mostly share the prefix and the
    comment, so those are looked up only when they change, and every part
    is encoded once per batch.
    """
    prefixes, lasts, values = layout._prefixes, layout._lasts, layout._values
    encode_value, last_field, element_head = layout._encode_value, layout.key[-1], _ELEM_HEAD
    single = len(layout.key) == 1
    pair_family, pton = layout._address_pair, socket.inet_pton
    has_data = adding and layout.data is not None
    cache_values = layout._cache_values
    current_prefix = current_comment = None
    key_head = note = b""
    for element in elements:
        if single:
            key = last_field(element.key)
        elif pair_family is not None:
            first, separator, second = element.key.partition(" . ")
            if not separator or " " in second:
                raise ValueError(f"{element.key!r} does not have 2 fields")
            key = pton(pair_family, first) + pton(pair_family, second)  # whole 32-bit words
        else:
            prefix, _, last = element.key.rpartition(" . ")
            if prefix != current_prefix:
                current_prefix = prefix
                key_head = prefixes.get(prefix) or prefixes.setdefault(prefix, _concat(layout.key[:-1], prefix, True))
            slot = lasts.get(last)
            if slot is None:
                slot = lasts[last] = _padded(last_field(last))
            key = key_head + slot  # whole 32-bit words: no padding needed
        if adding and element.comment != current_comment:
            current_comment = element.comment
            note = _comment(current_comment) if current_comment else b""
        value = b""
        if has_data:
            if not cache_values:
                value = encode_value(element.value)
            else:
                value = values.get(element.value, b"")
                if not value:
                    value = values[element.value] = encode_value(element.value)
        size = len(key)
        yield b"".join((element_head(12 + size + len(value) + len(note), _LIST_ELEM, 8 + size, _KEY, 4 + size,
                                     NFTA_DATA_VALUE), key, value, note))


_ELEM_HEAD = struct.Struct("=HHHHHH").pack
_LIST_ELEM = NFTA_LIST_ELEM | NLA_F_NESTED
_KEY = NFTA_SET_ELEM_KEY | NLA_F_NESTED


_ADDRESS_PORT = ((_ipv4, _port), (_ipv6, _port))
_ADDRESS_PAIRS: dict[tuple[Field, ...], int] = {(_ipv4, _ipv4): socket.AF_INET, (_ipv6, _ipv6): socket.AF_INET6}


def _address_port_data(address: Field) -> Callable[[str], bytes]:
    """The data of an endpoints map element, ``address . port``, encoded straight from its text (the hot path)."""
    size = 4 if address is _ipv4 else 16
    head = struct.pack("=HHHH", 4 + 4 + size + 4, NFTA_SET_ELEM_DATA | NLA_F_NESTED, 4 + size + 4, NFTA_DATA_VALUE)
    family = socket.AF_INET if size == 4 else socket.AF_INET6
    pton, port_word = socket.inet_pton, struct.Struct("!HH").pack

    def encode(text: str) -> bytes:
        host, separator, port = text.partition(" . ")
        number = int(port)
        if not separator or " " in port or not 0 <= number < 65536:
            raise ValueError(f"{text!r} is not an address . port")
        return head + pton(family, host) + port_word(number, 0)

    return encode


def _data(layout: SetLayout, text: str) -> bytes:
    value = layout.encode_data(text)
    return _attr(NFTA_SET_ELEM_DATA | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, value))


@functools.lru_cache(maxsize=1 << 16)
def _comment(text: str) -> bytes:
    """An element's comment (many elements share one): see ``_udata_comment``."""
    return _udata_comment(NFTA_SET_ELEM_USERDATA, text)


def _message(kind: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    nfgen = struct.pack("!BBH", family, 0, res_id)
    length = 16 + len(nfgen) + len(payload)
    return struct.pack("=IHHII", length, kind, flags, seq, 0) + nfgen + payload


def _element_messages(op: Op, first_seq: int) -> Iterator[tuple[bytes, int, int]]:
    """The messages of an element command, one at a time (a message holds up to 60 KB of elements),
    each with the range of ``op.elements`` it carries."""
    assert op.set_decl is not None
    layout = layout_of(op.set_decl)
    assert layout is not None
    adding = op.verb == "add"
    kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if adding else NFT_MSG_DELSETELEM)
    flags = NLM_F_REQUEST | (NLM_F_CREATE if adding else 0)
    head = _attr(NFTA_SET_ELEM_LIST_TABLE, _string(TABLE)) + _attr(NFTA_SET_ELEM_LIST_SET, _string(op.name))
    family = NFPROTO[op.family]
    seq = first_seq
    chunk: list[bytes] = []
    size = start = 0
    for index, encoded in enumerate(_encoded_elements(layout, op.elements, adding)):
        if size + len(encoded) > MAX_ELEMENTS_BYTES and chunk:
            message = head + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, b"".join(chunk))
            yield _message(kind, flags, seq, family, message), start, index
            seq += 1
            chunk, size, start = [], 0, index
        chunk.append(encoded)
        size += len(encoded)
    if chunk:
        message = head + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, b"".join(chunk))
        yield _message(kind, flags, seq, family, message), start, len(op.elements)


@dataclass(frozen=True, slots=True)
class Batch:
    """The bytes of one transaction, and what each message's sequence number was for."""

    data: bytearray
    commands: dict[int, Op]
    last: int
    """The sequence number of the last command, the one that asks for an ACK."""
    seqs: range = range(0)
    """Every sequence number of the batch, begin and end included (errors at commit carry the begin's)."""
    parts: dict[int, tuple[int, int]] | None = None
    """What of its command each message carries: a range of elements, or of chains (rules)."""

    def refused(self, seq: int) -> Op | None:
        """The command a refused message belongs to, narrowed to the elements or chain that message carried."""
        op = self.commands.get(seq)
        if op is None or self.parts is None or seq not in self.parts:
            return op
        lo, hi = self.parts[seq]
        if op.kind == "element":
            return replace(op, elements=op.elements[lo:hi])
        if op.kind == "rules":
            return replace(op, chains=op.chains[lo:hi])
        return op

    def describe(self, seq: int) -> str:
        """The refused message's command as nft would write it (for a rule, the rule itself)."""
        op = self.commands.get(seq)
        if op is None:
            return f"message {seq} of the batch"
        where = f"{op.family} {TABLE}"
        if op.kind == "rules":
            first = min(s for s, o in self.commands.items() if o is op)  # rules: one message each, in order
            rules = [(chain.name, rule) for chain in op.chains for rule in chain.rules]
            chain_name, rule = rules[seq - first]
            return f"add rule {where} {chain_name} {render_rule(rule, op.family)}"
        if op.kind == "element":
            narrowed = self.refused(seq) or op
            keys = [element.key for element in narrowed.elements[:3]]
            more = ", ..." if len(narrowed.elements) > 3 else ""
            return f"{op.verb} element {where} {op.name} {{ {', '.join(keys)}{more} }}"
        return f"{op.verb} {op.kind} {where} {op.name}".rstrip()


def encode(tx: Transaction, first_seq: int = 1) -> Batch:
    """The netlink batch for a transaction; raises NotEncodable unless ``encodable(tx)``.

    Trying is cheaper than asking ``encodable`` first, which encodes every rule once more.
    """
    with gc_paused():  # hundreds of thousands of small bytes objects: nothing cyclic to find
        try:
            return _encode(tx, first_seq)
        finally:
            for decl in {op.set_decl for op in tx.ops if op.set_decl is not None}:
                layout = layout_of(decl)
                if layout is not None:
                    layout.clear()


def _encode(tx: Transaction, first_seq: int) -> Batch:
    # One growing buffer: a cold start's batch is 8 MB at 10k Services, and a
    # list of its messages plus their join would hold it twice.
    out = bytearray(_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES))
    commands: dict[int, Op] = {}
    parts: dict[int, tuple[int, int]] = {}
    seq = first_seq + 1
    last_at = -1
    if not tx.ops:
        raise NotEncodable("an empty transaction")
    for op in tx.ops:
        if not _sendable_kind(op):
            raise NotEncodable(op.render()[:200])
        messages = _element_messages(op, seq) if op.kind == "element" else _object_messages(op, seq)
        for message, lo, hi in messages:
            commands[seq] = op
            if hi - lo != len(op.elements or op.chains):
                parts[seq] = (lo, hi)
            seq += 1
            last_at = len(out)
            out += message
    if last_at >= 0:  # only the last command asks for an answer: errors are reported anyway
        (flags,) = struct.unpack_from("=H", out, last_at + 6)
        struct.pack_into("=H", out, last_at + 6, flags | NLM_F_ACK)
    out += _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)
    return Batch(out, commands, max(commands) if commands else 0, range(first_seq, seq + 1), parts)


def _udata_comment(kind: int, text: str) -> bytes:
    comment(text)  # the same check as for nft text: raises UnsafeText
    raw = _string(text)
    return _attr(kind, bytes([NFTNL_UDATA_COMMENT, len(raw)]) + raw)


def _object_messages(op: Op, first_seq: int) -> list[tuple[bytes, int, int]]:
    """Messages for table, chain, counter and rule commands (rules: with the index of the chain each is for)."""
    family = NFPROTO[op.family]
    kind = op.kind
    if kind == "rules":
        return _rule_messages(op, first_seq, family)
    name = _attr(NFTA_CHAIN_NAME if kind == "chain" else NFTA_OBJ_NAME, _string(op.name))
    if kind in ("set", "map"):
        payload = _attr(NFTA_SET_TABLE, _string(TABLE)) + _attr(NFTA_SET_NAME, _string(op.name))
        msg_type, flags = NFT_MSG_DELSET, 0
    elif kind == "table":
        note = _udata_comment(NFTA_TABLE_USERDATA, op.comment) if op.comment else b""
        msg_type, flags, payload = NFT_MSG_NEWTABLE, NLM_F_CREATE, _attr(NFTA_TABLE_NAME, _string(TABLE)) + note
    elif kind == "chain" and op.verb == "flush":
        msg_type, flags, payload = NFT_MSG_DELRULE, 0, _TABLE_ATTR + _attr(NFTA_RULE_CHAIN, _string(op.name))
    elif kind == "chain" and op.verb == "delete":
        msg_type, flags, payload = NFT_MSG_DELCHAIN, 0, _TABLE_ATTR + name
    elif kind == "chain":
        assert op.chain is not None
        note = _udata_comment(NFTA_CHAIN_USERDATA, op.chain.comment) if op.chain.comment else b""
        msg_type, flags, payload = NFT_MSG_NEWCHAIN, NLM_F_CREATE, _TABLE_ATTR + name + note
    elif op.verb == "delete":
        msg_type, flags, payload = NFT_MSG_DELOBJ, 0, _TABLE_ATTR + name + _COUNTER_TYPE
    else:
        note = _udata_comment(NFTA_OBJ_USERDATA, op.comment) if op.comment else b""
        msg_type, flags, payload = NFT_MSG_NEWOBJ, NLM_F_CREATE, _TABLE_ATTR + name + _COUNTER_TYPE + _COUNTER_ZERO + note
    return [(_message((NFNL_SUBSYS_NFTABLES << 8) | msg_type, NLM_F_REQUEST | flags, first_seq, family, payload), 0, 0)]


def _rule_messages(op: Op, first_seq: int, family: int) -> list[tuple[bytes, int, int]]:
    messages: list[tuple[bytes, int, int]] = []
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND
    for position, chain in enumerate(op.chains):
        where = _TABLE_ATTR + _attr(NFTA_RULE_CHAIN, _string(chain.name))
        last = len(chain.rules) - 1
        for index, rule in enumerate(chain.rules):
            payload = where + _attr(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, encode_rule(rule, op.family))
            if index == last:
                payload += _udata_comment(NFTA_RULE_USERDATA, DIGEST_PREFIX + chain_fingerprint(chain, op.family)[0])
            messages.append((_message(kind, flags, first_seq + len(messages), family, payload), position, position + 1))
    return messages


# Attributes that are the same in every message (the table is attribute 1 of chains, rules and objects alike).
_TABLE_ATTR = _attr(NFTA_CHAIN_TABLE, _string(TABLE))
_COUNTER_TYPE = _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
_COUNTER_ZERO = _attr(
    NFTA_OBJ_DATA | NLA_F_NESTED,
    _attr(NFTA_COUNTER_BYTES, struct.pack("!Q", 0)) + _attr(NFTA_COUNTER_PACKETS, struct.pack("!Q", 0)),
)


class BatchSocket:
    """A netlink socket that sends batches to nf_tables in this network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._seq = 1
        self._set_buffer(socket.SO_RCVBUF, 4 << 20, 33)  # SO_RCVBUFFORCE: room for the answers to a large batch
        # Error answers carry only the failed message's header, not the whole message (up to 60 KB).
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)

    def _set_buffer(self, option: int, size: int, force: int) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, option, size)

    def close(self) -> None:
        self._sock.close()

    def prepare(self, tx: Transaction) -> Batch:
        """Encode ``tx`` now (a few microseconds per element or rule) to send it later."""
        batch = encode(tx, self._seq)
        self._seq += len(batch.commands) + 2
        return batch

    def _drain(self) -> None:
        """Drop answers left over from an earlier batch (there should be none)."""
        while True:
            try:
                self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ENOBUFS: answers were lost; what is left is read on the next round
                continue

    def send(self, tx: Transaction, batch: Batch | None = None) -> None:
        """Apply ``tx`` (encoded by ``prepare``, or now) atomically; raises NetlinkError naming the refused command."""
        if batch is None:
            batch = self.prepare(tx)
        self._drain()
        try:
            self._set_buffer(socket.SO_SNDBUF, len(batch.data) + 65536, 32)  # SO_SNDBUFFORCE
            self._sock.sendall(batch.data)
        except OSError as exc:  # for example EMSGSIZE without CAP_NET_ADMIN to raise the buffer
            message = f"could not send a batch of {len(batch.data)} bytes: {exc.strerror}"
            raise NetlinkError(message, exc.errno or errno.EIO) from None
        answered = False
        failure: tuple[int, int] | None = None
        while True:
            try:
                data = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)  # the kernel answered while handling sendall
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: some answers were lost, so the batch's fate is unknown
                raise NetlinkError(f"lost the kernel's answers to a batch: {exc.strerror}", exc.errno or errno.EIO) from None
            for seq, code in _acks(data):
                if seq not in batch.seqs:
                    continue
                answered |= seq == batch.last
                if code and failure is None:
                    failure = (seq, code)
        if failure is not None:
            seq, code = failure
            raise NetlinkError(f"the kernel refused it: {os.strerror(code)}", code, batch.refused(seq), batch.describe(seq))
        if batch.commands and not answered:
            raise NetlinkError("no answer from the kernel for the batch", errno.EIO)


def _acks(data: bytes) -> Iterable[tuple[int, int]]:
    """(sequence number, errno) of every NLMSG_ERROR message (errno 0: an ACK)."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, offset + 16)
            yield seq, -error
        offset += (length + 3) & ~3
