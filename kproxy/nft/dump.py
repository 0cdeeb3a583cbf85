"""kproxy's tables read with nf_tables netlink dumps (the socket side of ``kproxy.nft.tabledump``).

For each family: the table (NFT_MSG_GETTABLE: does it exist, its comment)
and its sets (a GETSET dump); then, one after the other, the elements of
each static set (a GETSETELEM dump per set), the chains (GETCHAIN) and the
rules (GETRULE) of both families, and the counters of both in one GETOBJ
dump (``kproxy.nft.counters``' request). A few tens of round trips,
whatever the size of the tables.

The kernel writes a dump's messages while the reader waits in ``recv``
(half the time of a read at 10k Services: it walks a hash set from its
start again for each message it fills). So a reader thread sends the
requests and receives the answers, one dump after the other, while the
calling thread parses what came (``TableParser``): the two overlap. At most
``QUEUED`` buffers wait between them; what is held is the Table being built
and those buffers.

The dumps are not one atomic snapshot: the ruleset generation
(NFT_MSG_GETGEN) is read before and after them all, and everything is read
again if it changed or if the kernel marked an answer ``NLM_F_DUMP_INTR``
(at most ``READ_ATTEMPTS`` times in all; then ``DumpError``, and the backend
reads through libnftables, which retries on its own). One caller at a time.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from functools import cache, partial
from typing import Protocol

from kproxy.memory import gc_paused
from kproxy.nft.counters import dump_request as counters_request
from kproxy.nft.netlink import NETLINK_NETFILTER
from kproxy.nft.objects import Family, Ruleset
from kproxy.nft.tabledump import (
    PROTOCOL_NAMES,
    Answers,
    DumpError,
    Handler,
    TableParser,
    chains_request,
    elements_request,
    finishes,
    generation,
    generation_request,
    rules_request,
    sets_request,
    table_request,
)

log = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = ("ip", "ip6")
READ_ATTEMPTS = 3
RECV_BYTES = 1 << 16
"""The kernel fills a dump's messages up to 32 KB each: room for two."""
RECV_TIMEOUT = 10.0
"""Seconds to wait for the kernel's next answer (it answers at once; this only bounds a bug)."""
QUEUED = 32
"""Buffers (up to 32 KB each) the reader thread may receive ahead of the parser."""

Request = tuple[Callable[[int], bytes], Handler]
"""How to write a request for a sequence number, and the handler of its answer's messages."""


class Transport(Protocol):
    """Where requests go and answers come from: a netlink socket, or a recording in tests."""

    def send(self, data: bytes) -> None: ...

    def recv(self) -> bytes: ...

    def close(self) -> None: ...


class SocketTransport:
    """A NETLINK_NETFILTER socket in the current network namespace."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(RECV_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def recv(self) -> bytes:
        return self._sock.recv(RECV_BYTES)

    def close(self) -> None:
        self._sock.close()


PROTOCOLS_FILE = "/etc/protocols"


@cache
def protocol_names(path: str = PROTOCOLS_FILE) -> dict[int, str]:
    """Protocol number -> the name nft prints for it: the first line of ``/etc/protocols`` with that number, as
    ``getprotobynumber`` finds it; tcp, udp and sctp whatever the file says if it cannot be read."""
    names: dict[int, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and fields[1].isdigit() and 0 <= int(fields[1]) <= 255:
                    names.setdefault(int(fields[1]), fields[0])
    except OSError:
        return dict(PROTOCOL_NAMES)
    return names


class Changed(Exception):
    """The ruleset changed while it was read: read it again."""


class TableDump:
    """Reads ``ip kproxy`` and ``ip6 kproxy`` over netlink (``read``)."""

    def __init__(self, transport: Callable[[], Transport] = SocketTransport) -> None:
        self._open = transport
        self._transport: Transport | None = None
        self._seq = 0
        self.requests = 0
        """Requests sent by the last ``read`` (all attempts)."""

    def open(self) -> None:
        """Open the socket now, in the current network namespace (``read`` opens it if it is not open, or was closed
        after a failure)."""
        if self._transport is None:
            self._transport = self._open()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def read(self) -> Ruleset:
        """The tables as they are (absent tables are left out); DumpError if they cannot be read exactly, or if
        the socket fails."""
        self.requests = 0
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                with gc_paused():  # 250k elements and their texts: nothing cyclic to look for
                    return self._read_once()
            except Changed:
                if attempt == READ_ATTEMPTS:
                    raise DumpError(f"the ruleset changed while it was read, {READ_ATTEMPTS} times in a row") from None
            except OSError as exc:
                self.close()  # the socket may hold the rest of a dump: start afresh next time
                raise DumpError(f"netlink: {os.strerror(exc.errno or errno.EIO)}") from None
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _read_once(self) -> Ruleset:
        generations: list[int | None] = []

        def gen(message: int, family: int, data: bytes, start: int, end: int) -> None:
            generations.append(generation(data, start, end))

        self._run([(generation_request, gen)])
        parsers: dict[Family, TableParser] = {}
        for family in FAMILIES:
            parser = TableParser(family, protocol_names())
            self._run([(partial(table_request, family), parser.table)], missing_ok=True)
            if parser.exists:
                self._run([(partial(sets_request, family), parser.set)])
                parsers[family] = parser
        requests: list[Request] = []
        for family, parser in parsers.items():
            for name in parser.element_sets():
                requests.append((partial(elements_request, family, name), parser.elements))
            requests.append((partial(chains_request, family), parser.chain))
            requests.append((partial(rules_request, family), parser.rule))
        if parsers:
            counted = list(parsers.values())

            def counter(message: int, family: int, data: bytes, start: int, end: int) -> None:
                for parser in counted:
                    parser.counter(message, family, data, start, end)

            requests.append((counters_request, counter))
        requests.append((generation_request, gen))
        self._run(requests)
        if len(generations) != 2 or None in generations:
            raise DumpError(f"the generation ids the kernel answered: {generations}")
        if generations[0] != generations[1]:
            raise Changed()
        ruleset = Ruleset()
        for family, parser in parsers.items():
            ruleset.tables[family] = parser.finish()
            for name, reason in parser.unread.items():
                log.warning("%s kproxy: the elements of %r are not read (%s); kproxy declares no such set", family,
                            name, reason)
        return ruleset

    def _run(self, requests: list[Request], missing_ok: bool = False) -> None:
        """Send the requests one after the other and feed every message of their answers to their handlers:
        a reader thread receives while this one parses. Changed if the kernel marked an answer interrupted;
        DumpError for an error answer (ENOENT is an empty answer with ``missing_ok``)."""
        if self._transport is None:
            self._transport = self._open()
        transport = self._transport
        pending: list[tuple[bytes, Answers]] = []
        for build, handle in requests:
            self._seq = self._seq % 0x7FFFFFFF + 1
            pending.append((build(self._seq), Answers(self._seq, handle)))
        self.requests += len(pending)
        received: queue.Queue[tuple[int, bytes] | BaseException | None] = queue.Queue(QUEUED)
        stop = threading.Event()

        def receive() -> None:
            try:
                for index, (request, answers) in enumerate(pending):
                    if stop.is_set():
                        break
                    transport.send(request)
                    while True:
                        data = transport.recv()
                        received.put((index, data))
                        if finishes(data, answers.seq):
                            break
                received.put(None)
            except BaseException as exc:
                received.put(exc)

        reader = threading.Thread(target=receive, name="kproxy-dump", daemon=True)
        reader.start()
        ended = False
        try:
            while True:
                item = received.get()
                ended = item is None or isinstance(item, BaseException)
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                index, data = item
                answers = pending[index][1]
                answers.feed(data)
                if answers.finished and answers.error and not (missing_ok and answers.error == errno.ENOENT):
                    raise DumpError(f"the kernel refused a dump: {os.strerror(answers.error)}")
        except BaseException:
            stop.set()  # the reader finishes the dump it is in (the socket stays clean), then stops
            while not ended:
                item = received.get()
                ended = item is None or isinstance(item, BaseException)
            raise
        finally:
            reader.join()
        if any(answers.interrupted for _, answers in pending):
            raise Changed()
        unfinished = [answers.seq for _, answers in pending if not answers.finished]
        if unfinished:
            raise DumpError(f"answers that did not end: {unfinished}")
