"""kproxy's typed rules as nf_tables expressions, without libnftables. Pure.

``kproxy.nft.netlink`` sends rules as netlink messages; this module turns one
typed rule (``kproxy.nft.statements``) into the list of expressions
(``NFTA_RULE_EXPRESSIONS``) that nft itself sends for the same rule written
as text. Each statement has one encoding here. The statements only the
skeleton uses (verdict maps, masquerade, reject, ...) are
not encoded: the skeleton is loaded through libnftables. ``encode_rule``
raises ``NotEncodable`` for those, for values out of range, and for rules of
a shape nft would not write; the backend never falls back silently.

Why not always libnftables: besides its cost (see ``kproxy.nft.netlink``),
nft 1.0.6 cannot add a rule that reads an existing map whose data is typed
``ip daddr . th dport`` ("conflicting protocols specified"), and with the
data typed ``tcp dport`` it silently adds ``meta l4proto tcp`` to the first
such rule of every batch, so UDP never reached the last slot of a pick chain.
The endpoints maps are typed ``th dport``, and their rules are always sent
from here (``tests/test_nfnetlink.py`` compares what the kernel holds with
what nft writes for the same text, expression by expression).

Registers follow nft: a statement's first value goes to register 1 (16
bytes); the fields of a concatenation fill 32-bit registers one after the
other, named as nft names them (a 16-byte boundary by its 128-bit name).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

from kproxy.nft.statements import (
    TERMINAL,
    Const,
    Counter,
    DnatFromMap,
    DnatTo,
    Family,
    FromLocal,
    Key,
    KeyPart,
    Limit,
    Lookup,
    MarkXor,
    MatchPrefix,
    MatchProtocol,
    NewConnection,
    Numgen,
    NumgenIs,
    Rule,
    SetUpdate,
    Statement,
    Verdict,
)

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
NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_DREG, NFTA_LOOKUP_FLAGS = 1, 2, 3, 5
NFT_LOOKUP_F_INV = 1
NFTA_NG_DREG, NFTA_NG_MODULUS, NFTA_NG_TYPE, NFTA_NG_OFFSET = 1, 2, 3, 4
NFT_NG_RANDOM = 1
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFTA_NAT_TYPE, NFTA_NAT_FAMILY, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_PROTO_MIN, NFTA_NAT_FLAGS = 1, 2, 3, 5, 7
NFT_NAT_DNAT = 1
NF_NAT_RANGE_PROTO_SPECIFIED = 2
NFTA_DYNSET_SET_NAME, NFTA_DYNSET_OP, NFTA_DYNSET_SREG_KEY, NFTA_DYNSET_TIMEOUT, NFTA_DYNSET_EXPR = 1, 3, 4, 6, 7
NFT_DYNSET_OP_ADD, NFT_DYNSET_OP_UPDATE = 0, 1
NFTA_FIB_DREG, NFTA_FIB_RESULT, NFTA_FIB_FLAGS = 1, 2, 3
NFTA_FIB_F_SADDR = 1
NFT_FIB_RESULT_ADDRTYPE = 3
RTN_LOCAL = 2
NFTA_CT_DREG, NFTA_CT_KEY, NFTA_CT_DIRECTION = 1, 2, 3
NFT_CT_STATE, NFT_CT_DIRECTION, NFT_CT_PROTO_DST = 0, 1, 12
NFT_CT_SRC_IP, NFT_CT_DST_IP, NFT_CT_SRC_IP6, NFT_CT_DST_IP6 = 19, 20, 21, 22
IP_CT_DIR_ORIGINAL = 0
IP_CT_NEW_BIT = 1 << 3
NFTA_LIMIT_RATE, NFTA_LIMIT_UNIT, NFTA_LIMIT_BURST, NFTA_LIMIT_TYPE, NFTA_LIMIT_FLAGS = 1, 2, 3, 4, 5
NFT_LIMIT_PKTS, NFT_LIMIT_PKT_BYTES = 0, 1
NFT_LIMIT_F_INV = 1
NFTA_OBJREF_IMM_TYPE, NFTA_OBJREF_IMM_NAME = 1, 2
NFT_OBJECT_COUNTER = 1
NFTA_CONNLIMIT_COUNT, NFTA_CONNLIMIT_FLAGS = 1, 2
NFT_CONNLIMIT_F_INV = 1
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

_PAYLOAD_FIELDS: dict[tuple[str, str], tuple[int, int, int]] = {
    # (field, family): (base, offset, length)
    ("saddr", "ip"): (NFT_PAYLOAD_NETWORK_HEADER, 12, 4),
    ("daddr", "ip"): (NFT_PAYLOAD_NETWORK_HEADER, 16, 4),
    ("saddr", "ip6"): (NFT_PAYLOAD_NETWORK_HEADER, 8, 16),
    ("daddr", "ip6"): (NFT_PAYLOAD_NETWORK_HEADER, 24, 16),
    ("dport", "ip"): (NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
    ("dport", "ip6"): (NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
}
_META_FIELDS: dict[str, tuple[int, int]] = {"l4proto": (NFT_META_L4PROTO, 1), "mark": (NFT_META_MARK, 4)}
_CT_FIELDS: dict[tuple[str, str], tuple[int, int | None, int]] = {
    # (field, family): (ct key, direction (None: not sent), length)
    ("original-saddr", "ip"): (NFT_CT_SRC_IP, IP_CT_DIR_ORIGINAL, 4),
    ("original-daddr", "ip"): (NFT_CT_DST_IP, IP_CT_DIR_ORIGINAL, 4),
    ("original-saddr", "ip6"): (NFT_CT_SRC_IP6, IP_CT_DIR_ORIGINAL, 16),
    ("original-daddr", "ip6"): (NFT_CT_DST_IP6, IP_CT_DIR_ORIGINAL, 16),
    ("original-dport", "ip"): (NFT_CT_PROTO_DST, IP_CT_DIR_ORIGINAL, 2),
    ("original-dport", "ip6"): (NFT_CT_PROTO_DST, IP_CT_DIR_ORIGINAL, 2),
    ("direction", "ip"): (NFT_CT_DIRECTION, None, 1),
    ("direction", "ip6"): (NFT_CT_DIRECTION, None, 1),
}


def ct_load(key: int, direction: int | None, reg: int) -> bytes:
    """``ct [original] KEY``: a conntrack field of the packet's connection into a register."""
    body = attr(NFTA_CT_KEY, u32(key)) + attr(NFTA_CT_DREG, u32(reg))
    return _expr("ct", body + (attr(NFTA_CT_DIRECTION, bytes([direction])) if direction is not None else b""))


def _field(part: KeyPart, family: Family) -> tuple[Load, int]:
    """(how to load one part of a key into a register, its length)."""
    if isinstance(part, Numgen):
        if not 0 < part.modulus < 1 << 32 or not 0 <= part.offset < 1 << 32:
            raise NotEncodable(f"numgen out of range: {part!r}")
        return (lambda reg: numgen(reg, part.modulus, part.offset)), 4
    if isinstance(part, Const):
        value = _constant(part, family)
        return (lambda reg: immediate(reg, value)), len(value)
    if (part, family) in _PAYLOAD_FIELDS:
        base, offset, length = _PAYLOAD_FIELDS[(part, family)]
        return (lambda reg: payload_load(base, offset, length, reg)), length
    if part in _META_FIELDS:
        key, length = _META_FIELDS[part]
        return (lambda reg: meta_load(key, reg)), length
    if (part, family) in _CT_FIELDS:
        ct_key, direction, length = _CT_FIELDS[(part, family)]
        return (lambda reg: ct_load(ct_key, direction, reg)), length
    raise NotEncodable(f"the field {part!r} is not encoded here")


def _constant(part: Const, family: Family) -> bytes:
    """A literal in a dynamic set's key (the rate-limit meter's frontend)."""
    try:
        if part.kind == "addr":
            address = ipaddress.ip_address(part.value)
            if address.version != (4 if family == "ip" else 6):
                raise NotEncodable(f"{part.value} is not an address of {family}")
            return address.packed
        number = int(part.value)
        if part.kind == "proto" and 0 <= number < 256:
            return bytes([number])
        if part.kind == "port" and 0 <= number < 65536:
            return struct.pack("!H", number)
    except ValueError:
        pass
    raise NotEncodable(f"{part!r} cannot be encoded")


NFTA_BYTEORDER_SREG, NFTA_BYTEORDER_DREG, NFTA_BYTEORDER_OP, NFTA_BYTEORDER_LEN, NFTA_BYTEORDER_SIZE = 1, 2, 3, 4, 5
NFT_BYTEORDER_HTON = 1
INTERVAL_SETS = frozenset({"firewall-allow", "limit-allow"})
"""The interval sets the encoded rules look up. nft puts the host-order fields of a key
(``meta l4proto``) in network order before an interval set's lookup: for a 1-byte field, a
``byteorder`` of length 1 in 2-byte units, which the kernel runs as a no-op. kproxy writes it too."""


def byteorder(reg: int, length: int, size: int) -> bytes:
    return _expr("byteorder", attr(NFTA_BYTEORDER_SREG, u32(reg)) + attr(NFTA_BYTEORDER_DREG, u32(reg))
                 + attr(NFTA_BYTEORDER_OP, u32(NFT_BYTEORDER_HTON)) + attr(NFTA_BYTEORDER_LEN, u32(length))
                 + attr(NFTA_BYTEORDER_SIZE, u32(size)))


def _key(key: Key, family: Family, ranges: bool = False) -> bytes:
    """Load every part of ``a . b . c`` into consecutive registers from register 1 (for an interval set's lookup
    when ``ranges``)."""
    out = b""
    word = 0
    for part in key:
        load, length = _field(part, family)
        out += load(register(word))
        if ranges and part == "l4proto":
            out += byteorder(register(word), 1, 2)
        word += (length + 3) // 4
    return out


# -- statements --------------------------------------------------------------


def _statement(statement: Statement, family: Family) -> bytes:
    """The expressions of one statement."""
    match statement:
        case Counter(name):
            return counter_ref(name)
        case Verdict(kind, chain):
            return verdict(kind, chain)
        case MarkXor(value):
            return _MARK_XOR.fill(host_u32(value))
        case MatchProtocol(protocol):
            return meta_load(NFT_META_L4PROTO, NFT_REG_1) + cmp(NFT_REG_1, NFT_CMP_EQ, bytes([PROTOCOLS[protocol]]))
        case NumgenIs(modulus):
            if not 0 < modulus < 1 << 32:
                raise NotEncodable(f"numgen modulus {modulus}")
            return numgen(NFT_REG_1, modulus, 0) + cmp(NFT_REG_1, NFT_CMP_EQ, host_u32(0))
        case FromLocal():
            body = attr(NFTA_FIB_DREG, u32(NFT_REG_1)) + attr(NFTA_FIB_RESULT, u32(NFT_FIB_RESULT_ADDRTYPE))
            return _expr("fib", body + attr(NFTA_FIB_FLAGS, u32(NFTA_FIB_F_SADDR))) + cmp(
                NFT_REG_1, NFT_CMP_EQ, host_u32(RTN_LOCAL))
        case NewConnection():
            ct = _expr("ct", attr(NFTA_CT_KEY, u32(NFT_CT_STATE)) + attr(NFTA_CT_DREG, u32(NFT_REG_1)))
            return ct + bitwise(NFT_REG_1, host_u32(IP_CT_NEW_BIT), host_u32(0)) + cmp(NFT_REG_1, NFT_CMP_NEQ, host_u32(0))
        case MatchPrefix(field, cidr):
            return _prefix_match(field, cidr, family)
        case Lookup(key, name, negate):
            flags = attr(NFTA_LOOKUP_FLAGS, u32(NFT_LOOKUP_F_INV)) if negate else b""
            return _key(key, family, name in INTERVAL_SETS) + _expr(
                "lookup", attr(NFTA_LOOKUP_SET, string(name)) + attr(NFTA_LOOKUP_SREG, u32(NFT_REG_1)) + flags)
        case SetUpdate(name, key, timeout, limit, connections):
            return _update(name, key, timeout, limit, connections, family)
        case DnatTo(address, port):
            packed = _address(address, family)
            if not 0 < port < 65536:
                raise NotEncodable(f"port {port}")
            return _DNAT_TO[family].fill(packed, struct.pack("!H", port))
        case DnatFromMap(key, name):
            lookup = _expr("lookup", attr(NFTA_LOOKUP_SET, string(name)) + attr(NFTA_LOOKUP_SREG, u32(NFT_REG_1))
                           + attr(NFTA_LOOKUP_DREG, u32(NFT_REG_1)))
            # The data is address . port: the port is the word after the address.
            return _key(key, family) + lookup + dnat(family, NFT_REG_1, register(1 if family == "ip" else 4), 0)
    raise NotEncodable(f"{type(statement).__name__} is the skeleton's, loaded through libnftables")


def _address(text: str, family: Family) -> bytes:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise NotEncodable(f"{text!r} is not an address") from None
    if address.version != (4 if family == "ip" else 6):
        raise NotEncodable(f"{text} is not an address of {family}")
    return address.packed


def _prefix_match(field: str, text: str, family: Family) -> bytes:
    """``ip saddr 10.0.0.0/8`` as nft writes it: a shorter load when the prefix is whole bytes, else a mask."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise NotEncodable(f"{text!r} is not a CIDR") from None
    if network.version != (4 if family == "ip" else 6) or (field, family) not in _PAYLOAD_FIELDS:
        raise NotEncodable(f"{field} {text} in {family}")
    base, offset, length = _PAYLOAD_FIELDS[(field, family)]
    prefix = network.prefixlen
    packed = network.network_address.packed
    if prefix == length * 8 or (prefix % 8 == 0 and prefix > 0):
        size = prefix // 8
        return payload_load(base, offset, size, NFT_REG_1) + cmp(NFT_REG_1, NFT_CMP_EQ, packed[:size])
    return (payload_load(base, offset, length, NFT_REG_1)
            + bitwise(NFT_REG_1, network.netmask.packed, bytes(length))
            + cmp(NFT_REG_1, NFT_CMP_EQ, packed))


def _update(name: str, key: Key, timeout: int | None, limit: Limit | None, connections: int | None,
            family: Family) -> bytes:
    """``update @SET { KEY timeout | limit }``, or ``add @SET { KEY ct count over N }`` (a ``connlimit`` per element)."""
    op = NFT_DYNSET_OP_ADD if connections is not None else NFT_DYNSET_OP_UPDATE
    body = (attr(NFTA_DYNSET_SET_NAME, string(name)) + attr(NFTA_DYNSET_OP, u32(op))
            + attr(NFTA_DYNSET_SREG_KEY, u32(NFT_REG_1)))
    if connections is not None:
        if limit is not None or timeout is not None or not 0 <= connections < 1 << 32:
            raise NotEncodable(f"a connection count of {connections} (with a limit or a timeout: {limit}, {timeout})")
        body += attr(NFTA_DYNSET_EXPR | NLA_F_NESTED, attr(NFTA_EXPR_NAME, string("connlimit")) + nested(
            NFTA_EXPR_DATA, attr(NFTA_CONNLIMIT_COUNT, u32(connections)) + attr(NFTA_CONNLIMIT_FLAGS, u32(NFT_CONNLIMIT_F_INV))))
    elif limit is None:
        if timeout is None or timeout < 0:
            raise NotEncodable("a set update needs a timeout or a limit")
        body += attr(NFTA_DYNSET_TIMEOUT, struct.pack("!Q", timeout * 1000))
    else:
        body += attr(NFTA_DYNSET_EXPR | NLA_F_NESTED, _limit(limit))
    return _key(key, family) + _expr("dynset", body)


def _limit(limit: Limit) -> bytes:
    """The ``limit`` expression (name and data) of ``limit rate over ...``, packets or bytes."""
    if limit.bytes:
        burst = limit.burst or 0  # nft leaves a byte limit's burst out without one: the kernel takes 0
        kind = NFT_LIMIT_PKT_BYTES
        # The kernel keeps nanoseconds per unit x (rate + burst) in 64 bits, and refuses the rule otherwise.
        if LIMIT_UNITS[limit.unit] * 10**9 * (limit.rate + burst) >= 1 << 64:
            raise NotEncodable(f"limit out of range: {limit!r}")
    else:
        burst = limit.burst or NFT_DEFAULT_BURST  # as the text renderer writes it: no burst (or 0) is nft's default
        kind = NFT_LIMIT_PKTS
    if not (0 < limit.rate < 1 << 64 and 0 <= burst < 1 << 32):
        raise NotEncodable(f"limit out of range: {limit!r}")
    return attr(NFTA_EXPR_NAME, string("limit")) + nested(NFTA_EXPR_DATA, (
        attr(NFTA_LIMIT_RATE, struct.pack("!Q", limit.rate))
        + attr(NFTA_LIMIT_UNIT, struct.pack("!Q", LIMIT_UNITS[limit.unit]))
        + (attr(NFTA_LIMIT_BURST, u32(burst)) if burst else b"") + attr(NFTA_LIMIT_TYPE, u32(kind))
        + attr(NFTA_LIMIT_FLAGS, u32(NFT_LIMIT_F_INV))))


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
        for value, size, part in zip(values, self.sizes, self.parts[1:], strict=True):
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


_ENCODED_HERE = frozenset({Counter, Verdict, MarkXor, MatchProtocol, NumgenIs, FromLocal, NewConnection, MatchPrefix,
                           Lookup, SetUpdate, DnatTo, DnatFromMap})
"""Every statement of the generated chains (Service ports', pick and bandwidth chains)."""


def handles(rule: Rule) -> bool:
    """Whether this module encodes this kind of rule: every statement is one the Service and pick chains use.

    A cheap check of the statements' types only; values are checked when the
    rule is encoded (``NotEncodable``), which the backend reports as an error.
    """
    for statement in rule:
        if type(statement) not in _ENCODED_HERE:
            return False
    return True


def encode_rule(rule: Rule, family: Family) -> bytes:
    """The NFTA_RULE_EXPRESSIONS payload of ``rule``.

    NotEncodable for a statement only the skeleton uses, a value out of its
    range, a statement after the one that ends the rule, or a ``dnat to``
    without the protocol match nft requires before it.
    """
    last = len(rule) - 1
    cache = _ENCODED[family]
    out = []
    for index, statement in enumerate(rule):
        if index != last and isinstance(statement, TERMINAL):
            raise NotEncodable(f"{type(statement).__name__} must end its rule")
        if type(statement) is DnatTo and not any(isinstance(s, MatchProtocol) for s in rule[:index]):
            raise NotEncodable("dnat to a port needs a protocol match before it")
        encoded = cache.get(statement)
        if encoded is None:
            encoded = _statement(statement, family)
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[statement] = encoded
        out.append(encoded)
    return b"".join(out)


_CACHE_SIZE = 1 << 16
_ENCODED: dict[Family, dict[Statement, bytes]] = {"ip": {}, "ip6": {}}
"""Encoded statements (pick chains', verdicts, protocol matches repeat across rules and syncs)."""


class NotEncodable(Exception):
    """A rule or command this module does not encode (the skeleton's: loaded through libnftables)."""
