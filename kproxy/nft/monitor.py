"""Who changes the ruleset: nf_tables notifications, and cheap checks of the generation and kproxy's tables.

``RulesetMonitor`` joins the NFNLGRP_NFTABLES netlink group of this network
namespace and reads the notifications of every committed transaction
(``kproxy.nft.notifications`` parses them). It also asks, over a socket of
its own, for the current ruleset generation (NFT_MSG_GETGEN) and whether
kproxy's tables exist (NFT_MSG_GETTABLE): a few hundred bytes each, whatever
the size of the tables.

When notifications come faster than they are read (a large transaction
announces every element it adds), the kernel drops some and the socket
reports ENOBUFS: ``read`` then raises ``NotificationsLost``, and the caller
must check the tables another way.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterator

from kproxy.nft.notifications import NFNL_SUBSYS_NFTABLES, NFTA_GEN_ID, Commit, Commits
from kproxy.nft.objects import TABLE, Family

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NFT_MSG_GETTABLE, NFT_MSG_GETGEN = 1, 16
NFTA_TABLE_NAME = 1
_FAMILY_NUMBERS: dict[Family, int] = {"ip": 2, "ip6": 10}
RECEIVE_BUFFER = 8 << 20


class NotificationsLost(Exception):
    """The kernel dropped notifications (the socket's buffer overflowed): what changed is unknown."""


class RulesetMonitor:
    """nf_tables notifications and queries, in the network namespace it was created in."""

    def __init__(self) -> None:
        self._group = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._group.bind((0, 0))
        try:
            self._group.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)  # SO_RCVBUFFORCE (root)
        except OSError:
            self._group.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self._query = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._query.bind((0, 0))
        self._query.settimeout(5.0)
        self._seq = 0
        self._commits = Commits()
        self._buffer = bytearray(1 << 20)

    def subscribe(self) -> None:
        """Start receiving the group's notifications (the kernel builds them only while someone listens)."""
        self._group.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)

    def fileno(self) -> int:
        return self._group.fileno()

    def close(self) -> None:
        self._group.close()
        self._query.close()

    # -- notifications -----------------------------------------------------------------------

    def read(self, timeout: float) -> list[Commit]:
        """The transactions committed since the last read, waiting up to ``timeout`` seconds for the first one."""
        commits: list[Commit] = []
        wait: float | None = max(0.0, timeout)
        while True:
            ready, _, _ = select.select([self._group], [], [], wait)
            if not ready:
                return commits
            try:
                size = self._group.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return commits
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._commits.forget()
                    raise NotificationsLost(f"the kernel dropped ruleset notifications: {exc.strerror}") from None
                raise
            commits.extend(self._commits.feed_bytes(bytes(memoryview(self._buffer)[:size])))
            wait = 0.0  # then take what is already there, without waiting

    # -- queries ---------------------------------------------------------------------------------

    def _ask(self, msg_type: int, family: int, payload: bytes = b"") -> Iterator[bytes]:
        """Send one request; yield the payloads of the answers (raises OSError for an error answer)."""
        self._seq += 1
        seq = self._seq
        body = struct.pack("!BBH", family, 0, 0) + payload
        header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                             NLM_F_REQUEST | NLM_F_ACK, seq, 0)
        self._query.send(header + body)
        while True:
            data = self._query.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, reply_seq, _ = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    return
                if reply_seq == seq:
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + 16)
                        if code:
                            raise OSError(-code, os.strerror(-code))
                        return  # the ACK: nothing more comes
                    yield data[offset + 16 : offset + length]
                offset += (length + 3) & ~3

    def generation(self) -> int:
        """The ruleset's current generation id (it grows by one with every committed transaction)."""
        for payload in self._ask(NFT_MSG_GETGEN, socket.AF_UNSPEC):
            attributes = payload[4:]
            offset = 0
            while offset + 4 <= len(attributes):
                length, kind = struct.unpack_from("=HH", attributes, offset)
                if length < 4:
                    break
                if kind & 0x3FFF == NFTA_GEN_ID and length == 8:
                    return int(struct.unpack_from("!I", attributes, offset + 4)[0])
                offset += (length + 3) & ~3
        raise OSError(errno.EIO, "no generation id in the kernel's answer")

    def has_table(self, family: Family) -> bool:
        """Whether ``FAMILY kproxy`` exists."""
        name = TABLE.encode() + b"\0"
        attribute = struct.pack("=HH", 4 + len(name), NFTA_TABLE_NAME) + name + b"\0" * (-len(name) % 4)
        try:
            for _ in self._ask(NFT_MSG_GETTABLE, _FAMILY_NUMBERS[family], attribute):
                pass
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

