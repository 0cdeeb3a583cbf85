"""The rules of kproxy's Service and pick chains as nf_tables expressions, without libnftables.

``nfnetlink`` sends rules as netlink messages; this module turns one rule,
written exactly as the compiler writes it, into the list of expressions
(``NFTA_RULE_EXPRESSIONS``) that nft itself would send for it. Only the
statements the compiler uses are understood, each by one pattern below; a
rule with anything else, or with a statement after its verdict, is refused
(``encode_rule`` returns None) and goes through libnftables instead.

Why not always libnftables: besides its cost (see ``nfnetlink``), nft 1.0.6
cannot add a rule that reads an existing map whose data is typed ``ip daddr
. th dport`` ("conflicting protocols specified"), and with the data typed
``tcp dport`` it silently adds ``meta l4proto tcp`` to the first such rule of
every batch, so UDP never reached the last slot of a pick chain. The
endpoints maps are typed ``th dport``, and their rules are always sent from
here (``tests/test_nfnetlink.py`` compares what the kernel holds with what
nft writes for the same text, expression by expression).

Registers follow nft: a statement's first value goes to register 1 (16
bytes); the fields of a concatenation fill 32-bit registers one after the
other, named as nft names them (a 16-byte boundary by its 128-bit name).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import struct
from typing import Callable

from kproxy.nft.objects import Family
from kproxy.rules.skeleton import skeleton_table

NFTA_LIST_ELEM = 1
NLA_F_NESTED = 0x8000
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFTA_META_DREG, NFTA_META_KEY, NFTA_META_SREG = 1, 2, 3
NFT_META_MARK, NFT_META_L4PROTO = 3, 16
NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA = 1, 2, 3
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFTA_BITWISE_SREG, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN, NFTA_BITWISE_MASK, NFTA_BITWISE_XOR, NFTA_BITWISE_OP = 1, 2, 3, 4, 5, 6
NFT_BITWISE_BOOL = 0
NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_BASE, NFTA_PAYLOAD_OFFSET, NFTA_PAYLOAD_LEN = 1, 2, 3, 4
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_DREG = 1, 2, 3
NFTA_NG_DREG, NFTA_NG_MODULUS, NFTA_NG_TYPE, NFTA_NG_OFFSET = 1, 2, 3, 4
NFT_NG_RANDOM = 1
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFTA_NAT_TYPE, NFTA_NAT_FAMILY, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_PROTO_MIN, NFTA_NAT_FLAGS = 1, 2, 3, 5, 7
NFT_NAT_DNAT = 1
NF_NAT_RANGE_PROTO_SPECIFIED = 2
NFTA_DYNSET_SET_NAME, NFTA_DYNSET_OP, NFTA_DYNSET_SREG_KEY, NFTA_DYNSET_TIMEOUT, NFTA_DYNSET_EXPR = 1, 3, 4, 6, 7
NFT_DYNSET_OP_UPDATE = 1
NFTA_FIB_DREG, NFTA_FIB_RESULT, NFTA_FIB_FLAGS = 1, 2, 3
NFTA_FIB_F_SADDR = 1
NFT_FIB_RESULT_ADDRTYPE = 3
RTN_LOCAL = 2
NFTA_CT_DREG, NFTA_CT_KEY = 1, 2
NFT_CT_STATE = 0
IP_CT_NEW_BIT = 1 << 3
NFTA_LIMIT_RATE, NFTA_LIMIT_UNIT, NFTA_LIMIT_BURST, NFTA_LIMIT_TYPE, NFTA_LIMIT_FLAGS = 1, 2, 3, 4, 5
NFT_LIMIT_PKTS = 0
NFT_LIMIT_F_INV = 1
NFTA_OBJREF_IMM_TYPE, NFTA_OBJREF_IMM_NAME = 1, 2
NFT_OBJECT_COUNTER = 1
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFPROTO: dict[Family, int] = {"ip": 2, "ip6": 10}
VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
LIMIT_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
NFT_DEFAULT_BURST = 5
"""nft's burst for a packet limit written without one."""


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def nested(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload)


def string(text: str) -> bytes:
    return text.encode() + b"\0"


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def verdict_data(verb: str, chain: str = "") -> bytes:
    """NFTA_DATA_VERDICT: ``drop``, ``accept``, ``return``, ``goto CHAIN`` or ``jump CHAIN``."""
    body = attr(NFTA_VERDICT_CODE, struct.pack("!i", VERDICTS[verb]))
    if chain:
        body += attr(NFTA_VERDICT_CHAIN, string(chain))
    return nested(NFTA_DATA_VERDICT, body)


def _expr(name: str, body: bytes) -> bytes:
    return nested(NFTA_LIST_ELEM, attr(NFTA_EXPR_NAME, string(name)) + nested(NFTA_EXPR_DATA, body))


def _value(kind: int, data: bytes) -> bytes:
    return nested(kind, attr(NFTA_DATA_VALUE, data))


def register(word: int) -> int:
    """nft's name of the register holding 32-bit word ``word`` of a statement's values."""
    return word // 4 + NFT_REG_1 if word % 4 == 0 else 8 + word


# -- expressions -----------------------------------------------------------


def meta_load(key: int, reg: int) -> bytes:
    return _expr("meta", attr(NFTA_META_KEY, u32(key)) + attr(NFTA_META_DREG, u32(reg)))


def payload_load(base: int, offset: int, length: int, reg: int) -> bytes:
    return _expr("payload", attr(NFTA_PAYLOAD_DREG, u32(reg)) + attr(NFTA_PAYLOAD_BASE, u32(base))
                 + attr(NFTA_PAYLOAD_OFFSET, u32(offset)) + attr(NFTA_PAYLOAD_LEN, u32(length)))


def cmp(reg: int, op: int, data: bytes) -> bytes:
    return _expr("cmp", attr(NFTA_CMP_SREG, u32(reg)) + attr(NFTA_CMP_OP, u32(op)) + _value(NFTA_CMP_DATA, data))


def bitwise(reg: int, mask: bytes, xor: bytes) -> bytes:
    return _expr("bitwise", attr(NFTA_BITWISE_SREG, u32(reg)) + attr(NFTA_BITWISE_DREG, u32(reg))
                 + attr(NFTA_BITWISE_OP, u32(NFT_BITWISE_BOOL)) + attr(NFTA_BITWISE_LEN, u32(len(mask)))
                 + _value(NFTA_BITWISE_MASK, mask) + _value(NFTA_BITWISE_XOR, xor))


def numgen(reg: int, modulus: int, offset: int) -> bytes:
    body = attr(NFTA_NG_DREG, u32(reg)) + attr(NFTA_NG_MODULUS, u32(modulus)) + attr(NFTA_NG_TYPE, u32(NFT_NG_RANDOM))
    return _expr("numgen", body + (attr(NFTA_NG_OFFSET, u32(offset)) if offset else b""))


def immediate(reg: int, data: bytes) -> bytes:
    return _expr("immediate", attr(NFTA_IMMEDIATE_DREG, u32(reg)) + _value(NFTA_IMMEDIATE_DATA, data))


def verdict(verb: str, chain: str = "") -> bytes:
    return _expr("immediate", attr(NFTA_IMMEDIATE_DREG, u32(NFT_REG_VERDICT))
                 + nested(NFTA_IMMEDIATE_DATA, verdict_data(verb, chain)))


def counter_ref(name: str) -> bytes:
    return _expr("objref", attr(NFTA_OBJREF_IMM_TYPE, u32(NFT_OBJECT_COUNTER)) + attr(NFTA_OBJREF_IMM_NAME, string(name)))


def dnat(family: Family, addr_reg: int, proto_reg: int, flags: int) -> bytes:
    body = (attr(NFTA_NAT_TYPE, u32(NFT_NAT_DNAT)) + attr(NFTA_NAT_FAMILY, u32(NFPROTO[family]))
            + attr(NFTA_NAT_REG_ADDR_MIN, u32(addr_reg)) + attr(NFTA_NAT_REG_PROTO_MIN, u32(proto_reg)))
    return _expr("nat", body + (attr(NFTA_NAT_FLAGS, u32(flags)) if flags else b""))


def host_u32(value: int) -> bytes:
    return struct.pack("=I", value)


# -- the fields of concatenations ------------------------------------------

Load = Callable[[int], bytes]
"""Loads a field into a register."""

_HEADER_FIELDS: dict[str, tuple[int, int, int]] = {
    # selector: (base, offset, length)
    "ip saddr": (NFT_PAYLOAD_NETWORK_HEADER, 12, 4),
    "ip daddr": (NFT_PAYLOAD_NETWORK_HEADER, 16, 4),
    "ip6 saddr": (NFT_PAYLOAD_NETWORK_HEADER, 8, 16),
    "ip6 daddr": (NFT_PAYLOAD_NETWORK_HEADER, 24, 16),
    "th dport": (NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
}
_META_FIELDS: dict[str, tuple[int, int]] = {"meta l4proto": (NFT_META_L4PROTO, 1), "meta mark": (NFT_META_MARK, 4)}
_NUMGEN = re.compile(r"numgen random mod ([1-9][0-9]*) offset ([0-9]+)")


def _field(text: str, family: Family, constant_type: str | None) -> tuple[Load, int] | None:
    """(how to load the field into a register, its length) for one part of a concatenation."""
    head = text.split(" ", 1)[0]
    if head in ("ip", "ip6") and head != family:
        return None
    if text in _HEADER_FIELDS:
        base, offset, length = _HEADER_FIELDS[text]
        return (lambda reg: payload_load(base, offset, length, reg)), length
    if text in _META_FIELDS:
        key, length = _META_FIELDS[text]
        return (lambda reg: meta_load(key, reg)), length
    match = _NUMGEN.fullmatch(text)
    if match:
        modulus, offset = int(match[1]), int(match[2])
        if modulus >= 1 << 32 or offset >= 1 << 32:
            return None
        return (lambda reg: numgen(reg, modulus, offset)), 4
    if constant_type is None:
        return None
    value = _constant(text, constant_type, family)
    if value is None:
        return None
    return (lambda reg: immediate(reg, value)), len(value)


def _constant(text: str, kind: str, family: Family) -> bytes | None:
    """A literal in a dynamic set's key (the rate-limit meter's frontend), encoded as its set type says."""
    try:
        if kind in ("ipv4_addr", "ipv6_addr"):
            if (kind == "ipv4_addr") != (family == "ip"):
                return None
            address = ipaddress.ip_address(text)
            return address.packed if str(address) == text else None
        if kind == "inet_proto" and text.isdigit() and int(text) < 256 and str(int(text)) == text:
            return bytes([int(text)])
        if kind == "inet_service" and text.isdigit() and int(text) < 65536 and str(int(text)) == text:
            return struct.pack("!H", int(text))
    except ValueError:
        return None
    return None


def _concat(text: str, family: Family, types: tuple[str, ...] | None = None) -> bytes | None:
    """Load every field of ``a . b . c`` into consecutive registers from register 1."""
    parts = text.split(" . ")
    if types is not None and len(types) != len(parts):
        return None
    out = b""
    word = 0
    for index, part in enumerate(parts):
        field = _field(part, family, types[index] if types else None)
        if field is None:
            return None
        load, length = field
        out += load(register(word))
        word += (length + 3) // 4
    return out


# -- statements --------------------------------------------------------------

_NAME = r"[A-Za-z0-9][A-Za-z0-9./:_-]*"
_STATEMENT = re.compile(
    r"(?:"
    rf'counter name "(?P<counter>{_NAME})"'
    r"|meta mark set meta mark \^ 0x(?P<xor>[0-9a-f]{8})"
    r"|meta l4proto (?P<l4proto>tcp|udp|sctp)"
    r"|numgen random mod (?P<modulus>[1-9][0-9]*) 0"
    r"|fib saddr type local(?P<fib>)"
    r"|ct state new(?P<ctnew>)"
    r"|(?P<lookup_key>(?:ip6? [sd]addr|meta l4proto|th dport|meta mark)(?: \. (?:ip6? [sd]addr|meta l4proto|th dport|meta mark))*) @(?P<lookup_set>[a-z0-9-]+)"
    r"|(?P<pfamily>ip6?) saddr (?P<prefix>[0-9a-f:][0-9a-f.:]*(?:/[0-9]+)?)"
    r"|update @(?P<update_set>[a-z0-9-]+) \{ (?P<update_key>[^{}]+?) (?:timeout (?P<timeout>[0-9]+)s"
    r"|limit rate over (?P<rate>[0-9]+)/(?P<unit>second|minute|hour|day)(?: burst (?P<burst>[0-9]+) packets)?) \}"
    r"|dnat to (?:\[(?P<dnat6>[0-9a-f:.]+)\]|(?P<dnat4>[0-9.]+)):(?P<dnat_port>[0-9]+)"
    r"|dnat (?P<map_family>ip6?) to (?P<map_key>[^@]+) map @(?P<map_set>endpoints-[0-9]+)"
    r"|(?P<verdict>drop|accept|return)"
    rf"|(?P<verb>goto|jump) (?P<chain>{_NAME})"
    r")(?: |$)"
)


@functools.cache
def dynamic_set_types(family: Family) -> dict[str, tuple[str, ...]]:
    """The key types of the skeleton's dynamic sets, which rules update (affinity, rate-limit meter)."""
    result = {}
    for name, decl in skeleton_table(family).sets.items():
        spec = decl.type_line
        if decl.dynamic and spec is not None and spec.startswith("type "):
            result[name] = tuple(part.strip() for part in spec[len("type "):].split(" . "))
    return result


@functools.lru_cache(maxsize=1 << 16)
def _statement(text: str, family: Family) -> bytes | None:
    """The expressions of one statement (statements repeat across rules, so they are cached); None if not encoded."""
    try:
        return _encode_statement(text, family)
    except (ValueError, OverflowError, struct.error):
        return None  # a number out of its field's range: nft would refuse it too


def _encode_statement(text: str, family: Family) -> bytes | None:
    m = _STATEMENT.fullmatch(text)
    if m is None:
        return None
    if m["counter"]:
        return counter_ref(m["counter"])
    if m["xor"]:
        return _MARK_XOR.fill(host_u32(int(m["xor"], 16)))
    if m["l4proto"]:
        return meta_load(NFT_META_L4PROTO, NFT_REG_1) + cmp(NFT_REG_1, NFT_CMP_EQ, bytes([PROTOCOLS[m["l4proto"]]]))
    if m["modulus"]:
        return numgen(NFT_REG_1, int(m["modulus"]), 0) + cmp(NFT_REG_1, NFT_CMP_EQ, host_u32(0))
    if m["fib"] is not None:
        body = attr(NFTA_FIB_DREG, u32(NFT_REG_1)) + attr(NFTA_FIB_RESULT, u32(NFT_FIB_RESULT_ADDRTYPE))
        return _expr("fib", body + attr(NFTA_FIB_FLAGS, u32(NFTA_FIB_F_SADDR))) + cmp(NFT_REG_1, NFT_CMP_EQ, host_u32(RTN_LOCAL))
    if m["ctnew"] is not None:
        ct = _expr("ct", attr(NFTA_CT_KEY, u32(NFT_CT_STATE)) + attr(NFTA_CT_DREG, u32(NFT_REG_1)))
        return ct + bitwise(NFT_REG_1, host_u32(IP_CT_NEW_BIT), host_u32(0)) + cmp(NFT_REG_1, NFT_CMP_NEQ, host_u32(0))
    if m["pfamily"]:
        return _prefix_match(m["pfamily"], m["prefix"], family)
    if m["lookup_set"]:
        key = _concat(m["lookup_key"], family)
        if key is None:
            return None
        return key + _expr("lookup", attr(NFTA_LOOKUP_SET, string(m["lookup_set"])) + attr(NFTA_LOOKUP_SREG, u32(NFT_REG_1)))
    if m["update_set"]:
        return _update(m, family, dynamic_set_types(family))
    if m["dnat_port"]:
        address = m["dnat6"] or m["dnat4"]
        if (m["dnat6"] is not None) != (family == "ip6"):
            return None
        packed = _address(address, family)
        port = int(m["dnat_port"])
        if packed is None or port >= 65536:
            return None
        return _DNAT_TO[family].fill(packed, struct.pack("!H", port))
    if m["map_set"]:
        if m["map_family"] != family:
            return None
        key = _concat(m["map_key"], family)
        if key is None:
            return None
        lookup = _expr("lookup", attr(NFTA_LOOKUP_SET, string(m["map_set"])) + attr(NFTA_LOOKUP_SREG, u32(NFT_REG_1))
                       + attr(NFTA_LOOKUP_DREG, u32(NFT_REG_1)))
        # The data is address . port: the port is the word after the address.
        return key + lookup + dnat(family, NFT_REG_1, register(1 if family == "ip" else 4), 0)
    if m["verdict"]:
        return verdict(m["verdict"])
    return verdict(m["verb"], m["chain"])


def _address(text: str, family: Family) -> bytes | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version != (4 if family == "ip" else 6):
        return None
    return address.packed


def _prefix_match(selector_family: str, text: str, family: Family) -> bytes | None:
    """``ip saddr 10.0.0.0/8`` as nft writes it: a shorter load when the prefix is whole bytes, else a mask."""
    if selector_family != family:
        return None
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None
    if network.version != (4 if family == "ip" else 6):
        return None
    base, offset, length = _HEADER_FIELDS[f"{family} saddr"]
    prefix = network.prefixlen
    packed = network.network_address.packed
    if prefix == length * 8 or (prefix % 8 == 0 and prefix > 0):
        size = prefix // 8
        return payload_load(base, offset, size, NFT_REG_1) + cmp(NFT_REG_1, NFT_CMP_EQ, packed[:size])
    return (payload_load(base, offset, length, NFT_REG_1)
            + bitwise(NFT_REG_1, network.netmask.packed, bytes(length))
            + cmp(NFT_REG_1, NFT_CMP_EQ, packed))


def _update(m: re.Match[str], family: Family, set_types: dict[str, tuple[str, ...]]) -> bytes | None:
    name = m["update_set"]
    types = set_types.get(name)
    if types is None:
        return None
    key = _concat(m["update_key"], family, types)
    if key is None:
        return None
    body = (attr(NFTA_DYNSET_SET_NAME, string(name)) + attr(NFTA_DYNSET_OP, u32(NFT_DYNSET_OP_UPDATE))
            + attr(NFTA_DYNSET_SREG_KEY, u32(NFT_REG_1)))
    if m["timeout"] is not None:
        body += attr(NFTA_DYNSET_TIMEOUT, struct.pack("!Q", int(m["timeout"]) * 1000))
    else:
        burst = int(m["burst"]) if m["burst"] is not None else NFT_DEFAULT_BURST
        limit = (attr(NFTA_LIMIT_RATE, struct.pack("!Q", int(m["rate"]))) + attr(NFTA_LIMIT_UNIT, struct.pack("!Q", LIMIT_UNITS[m["unit"]]))
                 + attr(NFTA_LIMIT_BURST, u32(burst)) + attr(NFTA_LIMIT_TYPE, u32(NFT_LIMIT_PKTS))
                 + attr(NFTA_LIMIT_FLAGS, u32(NFT_LIMIT_F_INV)))
        body += attr(NFTA_DYNSET_EXPR | NLA_F_NESTED, attr(NFTA_EXPR_NAME, string("limit")) + nested(NFTA_EXPR_DATA, limit))
    return key + _expr("dynset", body)


class _Template:
    """A statement's expressions with holes for its values: made once, filled for each rule (the hot statements)."""

    def __init__(self, build: Callable[..., bytes], *sizes: int) -> None:
        # Build with each value set to distinct marker bytes, then cut around them.
        markers = [bytes([0xA0 + i]) * size for i, size in enumerate(sizes)]
        whole = build(*markers)
        self.parts: list[bytes] = []
        for marker in markers:
            assert whole.count(marker) == 1, "a template's marker must be unique"
            before, whole = whole.split(marker)
            self.parts.append(before)
        self.parts.append(whole)
        self.sizes = sizes

    def fill(self, *values: bytes) -> bytes:
        out = self.parts[0]
        for value, size, part in zip(values, self.sizes, self.parts[1:]):
            if len(value) != size:
                raise ValueError(f"a value of {len(value)} bytes for a hole of {size}")
            out += value + part
        return out


_MARK_XOR = _Template(
    lambda xor: meta_load(NFT_META_MARK, NFT_REG_1) + bitwise(NFT_REG_1, b"\xff\xff\xff\xff", xor)
    + _expr("meta", attr(NFTA_META_KEY, u32(NFT_META_MARK)) + attr(NFTA_META_SREG, u32(NFT_REG_1))),
    4,
)
_DNAT_TO = {
    family: _Template(
        lambda address, port, family=family: immediate(NFT_REG_1, address) + immediate(2, port)
        + dnat(family, NFT_REG_1, 2, NF_NAT_RANGE_PROTO_SPECIFIED),
        4 if family == "ip" else 16, 2,
    )
    for family in NFPROTO
}


def encode_rule(rule: str, family: Family) -> bytes | None:
    """The NFTA_RULE_EXPRESSIONS payload of ``rule``, or None if this module does not encode it."""
    counter = _COUNTER_GOTO.fullmatch(rule)
    if counter is not None:  # most rules: a Service chain's counter and goto
        return counter_ref(counter[1]) + _verdict_statement(counter[2], counter[3])
    out = []
    position = 0
    end = len(rule)
    ended = protocol = False
    while position < end:
        if ended:
            return None  # nothing may follow a verdict
        match = _STATEMENT.match(rule, position)
        if match is None:
            return None
        if match["dnat_port"] and not protocol:
            return None  # nft maps a port only after a transport protocol match
        protocol = protocol or bool(match["l4proto"])
        text = match.group(0)
        encoded = _statement(text.rstrip(" "), family)
        if encoded is None:
            return None
        out.append(encoded)
        ended = bool(match["verdict"] or match["verb"])
        position = match.end()
        if text.endswith(" ") and position == end:
            return None  # a trailing space: not written by the compiler
    return b"".join(out) if out else None


_COUNTER_GOTO = re.compile(rf'counter name "({_NAME})" (goto|jump) ({_NAME})')


@functools.lru_cache(maxsize=1024)
def _verdict_statement(verb: str, chain: str) -> bytes:
    return verdict(verb, chain)
