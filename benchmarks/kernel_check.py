"""Asking the kernel, cheaply, whether kproxy's maps hold given ClusterIPs and endpoints.

The user-path benchmarks judge "programmed" from the kernel, not from
kproxy's logs. ``nft`` cannot be the probe: every ``nft get element`` reads
the whole table into its cache first (11 s and 900 MB at 30k Services). This
module speaks nf_tables netlink itself (written here, independently of
kproxy's own encoder in ``kproxy/nft/netlink.py``):

* ``Probe.holds()``: one ``sendmsg`` of ``NFT_MSG_GETSETELEM`` requests, one
  per element, each a point lookup of one key in one map (the kernel answers
  under RCU, without the commit mutex, so it never waits for or delays a
  transaction), then compares every answer's data with the expected data.
  About 0.3 ms of CPU for a few Services' ClusterIP and endpoints.
* ``dump()``: every element of a map (``NLM_F_DUMP``), for the full check
  once the timing is over.

Keys are nft's registers: each field padded to 4 bytes, addresses and ports
in network order, the pick slot (``numgen``'s output) in host order.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM = 12, 13
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NLA_F_NESTED = 0x8000
NFPROTO_IPV4 = 2
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
TABLE = "kproxy"


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _attrs(data: bytes) -> Iterable[tuple[int, bytes]]:
    at = 0
    while at + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, at)
        if size < 4:
            return
        yield kind & 0x3FFF, data[at + 4 : at + size]
        at += (size + 3) & ~3


def frontend_key(address: str, proto: str, port: int) -> bytes:
    """``addr . proto . port`` as the kernel stores it (service-ips, the head of an endpoints key)."""
    return ipaddress.ip_address(address).packed + bytes([PROTOCOLS[proto], 0, 0, 0]) + struct.pack("!HH", port, 0)


def slot_key(frontend: bytes, slot: int) -> bytes:
    """``frontend . slot`` of the endpoints maps: slot(k) = k << 16, in host order (numgen's)."""
    return frontend + struct.pack("=I", slot)


def endpoint_data(address: str, port: int) -> bytes:
    """``addr . port``, the data of an endpoints-map element."""
    return ipaddress.ip_address(address).packed + struct.pack("!HH", port, 0)


def endpoints_map(k: int) -> str:
    """The band that holds slot k: endpoints-4 (1-4), endpoints-8 (5-8), ... (rules/README.md)."""
    band = 4
    while k > band:
        band *= 2
    return f"endpoints-{band}"


@dataclass(frozen=True)
class Element:
    set: str
    key: bytes
    data: bytes | None
    """Expected data bytes (an endpoint); None: any data (a verdict), presence is enough."""


class Netlink:
    """One NETLINK_NETFILTER socket in the calling thread's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.seq = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _message(self, kind: int, flags: int, payload: bytes) -> tuple[int, bytes]:
        self.seq += 1
        body = struct.pack("!BBH", NFPROTO_IPV4, 0, 0) + payload
        header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | kind, flags, self.seq, 0)
        return self.seq, header + body

    def _get_request(self, element: Element) -> tuple[int, bytes]:
        key = _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, element.key))
        payload = (_attr(NFTA_SET_ELEM_LIST_TABLE, TABLE.encode() + b"\0")
                   + _attr(NFTA_SET_ELEM_LIST_SET, element.set.encode() + b"\0")
                   + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, _attr(NFTA_LIST_ELEM | NLA_F_NESTED, key)))
        return self._message(NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_ACK, payload)

    def _messages(self) -> Iterable[tuple[int, int, bytes]]:
        """(type, seq, payload after the nlmsghdr) of every message in one datagram."""
        data = self.sock.recv(1 << 20)
        at = 0
        while at + 16 <= len(data):
            length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, at)
            yield kind, seq, data[at + 16 : at + length]
            at += (length + 3) & ~3

    @staticmethod
    def _elements(payload: bytes) -> Iterable[tuple[bytes, bytes | None]]:
        """(key, data value) of each element in a NEWSETELEM message (data None for verdicts)."""
        for kind, value in _attrs(payload[4:]):  # after the nfgenmsg
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            for _, element in _attrs(value):
                key = data = None
                for ekind, evalue in _attrs(element):
                    if ekind == NFTA_SET_ELEM_KEY:
                        key = next((v for k, v in _attrs(evalue) if k == NFTA_DATA_VALUE), None)
                    elif ekind == NFTA_SET_ELEM_DATA:
                        data = next((v for k, v in _attrs(evalue) if k == NFTA_DATA_VALUE), None)
                if key is not None:
                    yield key, data

    def prepare(self, elements: list[Element]) -> tuple[dict[int, Element], bytes]:
        """The requests for ``lookup``, built once: (sequence number -> element, the datagram)."""
        by_seq: dict[int, Element] = {}
        batch = []
        for element in elements:
            seq, message = self._get_request(element)
            by_seq[seq] = element
            batch.append(message)
        return by_seq, b"".join(batch)

    def lookup(self, prepared: tuple[dict[int, Element], bytes]) -> dict[Element, bytes | bool | None]:
        """Each element's data in the kernel (True for verdict data), or False if the kernel has no such element.

        All requests go in one datagram; the kernel answers each with the
        element and an ACK, or with an error (ENOENT: no such element, table
        or set).
        """
        by_seq, datagram = prepared
        self.sock.send(datagram)
        found: dict[Element, bytes | bool | None] = {}
        pending = set(by_seq)
        while pending:
            for kind, seq, payload in self._messages():
                element = by_seq.get(seq)
                if element is None:
                    continue
                if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
                    for _key, data in self._elements(payload):
                        found[element] = data if data is not None else True
                elif kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", payload)
                    if error != 0:
                        found[element] = False
                        if -error != 2:  # not ENOENT: something else is wrong
                            raise OSError(-error, f"GETSETELEM {element.set}: {os.strerror(-error)}")
                    pending.discard(seq)
        return found

    def dump(self, set_name: str) -> dict[bytes, bytes | None]:
        """Every element of ``set_name`` in ``ip kproxy``: key -> data value (None for verdicts); {} without the set."""
        payload = (_attr(NFTA_SET_ELEM_LIST_TABLE, TABLE.encode() + b"\0")
                   + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
        seq, message = self._message(NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP, payload)
        self.sock.send(message)
        out: dict[bytes, bytes | None] = {}
        while True:
            for kind, got_seq, body in self._messages():
                if got_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", body)
                    if error == 0:
                        return out
                    if -error == 2:
                        return {}
                    raise OSError(-error, f"dump {set_name}: {os.strerror(-error)}")
                for key, data in self._elements(body):
                    out[key] = data


class Probe:
    """Whether the kernel holds a fixed list of elements (with the expected data), in one round trip."""

    def __init__(self, elements: list[Element]) -> None:
        self.elements = elements
        self.netlink = Netlink()
        self.prepared = self.netlink.prepare(elements)

    def missing(self) -> list[Element]:
        found = self.netlink.lookup(self.prepared)
        return [e for e in self.elements if found.get(e) in (None, False)
                or (e.data is not None and found[e] != e.data)]

    def holds(self) -> bool:
        return not self.missing()

    def close(self) -> None:
        self.netlink.close()
