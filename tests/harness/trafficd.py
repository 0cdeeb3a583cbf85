#!/usr/bin/env python3
"""Tiny traffic tool for the kproxy network-namespace test bed.

Run inside a namespace with ``ip netns exec NS python tests/harness/trafficd.py MODE ...``.
Only the standard library is used, so it also runs under ``python -S``.

Modes
-----
``serve --name ID [--tcp PORT ...] [--udp PORT ...] [--bind ::]``
    Listen on every given port (dual-stack ``::`` by default).  TCP: on accept send
    ``ID <peer-ip>\\n`` and close.  UDP: answer every datagram with ``ID <peer-ip>``
    (sent from the address the datagram was addressed to).  Prints ``READY`` once
    all sockets listen.  Runs until SIGTERM/SIGINT.

``connect --dst IP --port P [--count N] [--proto tcp|udp] [--timeout S] ...``
    Make N connection attempts and print a JSON list of results (see ``Result``).

``loop --dst IP --port P [--interval-ms MS] [--proto tcp|udp] [--progress] ...``
    Start one attempt every MS milliseconds until stdin is closed or SIGTERM, then
    print one JSON summary line (see ``summarize``).  With ``--progress`` every
    result is also printed as a JSON line as soon as it completes.  ``READY`` is
    printed when the loop starts.

``udp-flow --dst IP --port P [--interval-ms MS]``
    Send one datagram every MS milliseconds from ONE socket (one 5-tuple) and print a
    JSON line per interval (a reply, an error, or a timeout when nothing came back
    within the interval).  The first line is ``{"event": "ready", ...}`` with the
    local address.  Runs until stdin is closed or SIGTERM.

The connection engine (``run_attempts``) is importable; ``tests/harness/netbed.py`` runs it
in-process inside a network namespace (via setns) to avoid a process per call.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

# Linux constants missing from Python 3.11's socket module.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)

UDP_PAYLOAD = b"ping\n"

# Error kinds reported in Result.error
REFUSED = "refused"          # TCP RST / ICMP port unreachable
TIMEOUT = "timeout"          # no answer within the timeout
UNREACHABLE = "unreachable"  # EHOSTUNREACH / ENETUNREACH (ICMP unreachable, no route, ARP failure)
PROHIBITED = "prohibited"    # EACCES / EPERM (ICMPv6 admin prohibited, local nft drop on output)
RESET = "reset"              # connection reset after it was established
EOF = "eof"                  # TCP connection closed without a reply line
ERROR = "error"              # anything else; see Result.detail


def classify_errno(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return REFUSED
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN):
        return UNREACHABLE
    if err in (errno.ETIMEDOUT,):
        return TIMEOUT
    if err in (errno.EACCES, errno.EPERM):
        return PROHIBITED
    if err in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
        return RESET
    return ERROR


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def normalize_ip(ip: str) -> str:
    """Strip the IPv4-mapped prefix and any scope id."""
    ip = ip.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


@dataclass
class Result:
    """Outcome of one connection attempt (JSON-serialisable)."""

    i: int                        # attempt index
    ok: bool
    server: str | None = None     # server ID from the reply line
    peer: str | None = None       # source IP the server saw
    error: str | None = None      # one of the kinds above when not ok
    detail: str | None = None     # errno name or raw reply on oddities
    local: str | None = None      # local IP of our socket
    local_port: int | None = None
    t: float = 0.0                # wall-clock start time (time.time())
    elapsed: float = 0.0          # seconds until the result was known

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})

    def __str__(self) -> str:  # compact, handy in assertion messages
        if self.ok:
            return f"#{self.i} ok {self.server} (peer {self.peer})"
        return f"#{self.i} {self.error}" + (f" ({self.detail})" if self.detail else "")


def parse_reply(data: bytes) -> tuple[str | None, str | None]:
    parts = data.decode(errors="replace").strip().split()
    server = parts[0] if parts else None
    peer = parts[1] if len(parts) > 1 else None
    return server, peer


SocketFactory = Callable[[int, int], socket.socket]


def _default_factory(family: int, type_: int) -> socket.socket:
    return socket.socket(family, type_)


class _Attempt:
    __slots__ = ("buf", "deadline", "i", "local", "shared", "sock", "state", "t0", "t_wall")

    def __init__(self, i: int, sock: socket.socket, timeout: float, shared: bool) -> None:
        self.i = i
        self.sock = sock
        self.t_wall = time.time()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.state = "connecting"
        self.buf = b""
        self.local: tuple | None = None
        self.shared = shared


def run_attempts(
    dst: str,
    port: int,
    *,
    proto: str = "tcp",
    count: int | None = 1,
    timeout: float = 1.0,
    parallel: int = 32,
    rate: float | None = None,
    src: str | None = None,
    src_port: int | None = None,
    same_source_port: bool = False,
    stop: threading.Event | None = None,
    socket_factory: SocketFactory = _default_factory,
) -> Iterator[Result]:
    """Make connection attempts and yield a Result for each, in completion order.

    count=None means "until ``stop`` is set".  At most ``parallel`` attempts are in
    flight; with ``rate`` (attempts/second) starts are paced.  ``same_source_port``
    keeps one source port for all attempts (UDP: one socket; TCP: bind to the port
    of the first connection) and forces ``parallel=1``.
    """
    if proto not in ("tcp", "udp"):
        raise ValueError(f"unsupported proto {proto!r}")
    family = family_of(dst)
    stype = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    if same_source_port:
        parallel = 1
    parallel = max(1, parallel)
    interval = (1.0 / rate) if rate else 0.0
    sel = selectors.DefaultSelector()
    inflight: dict[int, _Attempt] = {}
    shared_udp: socket.socket | None = None
    fixed_port = src_port
    started = 0
    next_start = time.monotonic()

    def result(a: _Attempt, ok: bool, **kw) -> Result:
        return Result(i=a.i, ok=ok, t=a.t_wall, elapsed=time.monotonic() - a.t0,
                      local=normalize_ip(a.local[0]) if a.local else None,
                      local_port=a.local[1] if a.local else None, **kw)

    def finish(a: _Attempt) -> None:
        inflight.pop(a.i, None)
        try:
            sel.unregister(a.sock)
        except (KeyError, ValueError):
            pass
        if not a.shared:
            a.sock.close()

    def new_socket() -> socket.socket:
        s = socket_factory(family, stype)
        try:
            s.setblocking(False)
            if same_source_port or fixed_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if src is not None or fixed_port:
                s.bind((src or ("::" if family == socket.AF_INET6 else "0.0.0.0"), fixed_port or 0))
        except BaseException:
            s.close()
            raise
        return s

    def start(i: int) -> Result | None:
        nonlocal shared_udp, fixed_port
        shared = False
        try:
            if proto == "udp" and same_source_port:
                if shared_udp is None:
                    shared_udp = new_socket()
                    shared_udp.connect((dst, port))
                s = shared_udp
                shared = True
                # Drop late replies/errors belonging to a previous attempt.
                while True:
                    try:
                        s.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        continue
            else:
                s = new_socket()
        except OSError as e:
            return Result(i=i, ok=False, error=classify_errno(e.errno or 0),
                          detail=_errname(e.errno or 0), t=time.time())
        a = _Attempt(i, s, timeout, shared)
        try:
            if proto == "tcp":
                err = s.connect_ex((dst, port))
                if err not in (0, errno.EINPROGRESS):
                    a.local = _local(s)
                    finish(a)
                    return result(a, False, error=classify_errno(err), detail=_errname(err))
                a.local = _local(s)
                if same_source_port and not fixed_port and a.local:
                    fixed_port = a.local[1]
                sel.register(s, selectors.EVENT_WRITE, a)
            else:
                if not shared:
                    s.connect((dst, port))
                a.local = _local(s)
                s.send(UDP_PAYLOAD)
                a.state = "reading"
                sel.register(s, selectors.EVENT_READ, a)
        except OSError as e:
            finish(a)
            return result(a, False, error=classify_errno(e.errno or 0), detail=_errname(e.errno or 0))
        inflight[i] = a
        return None

    def on_event(a: _Attempt) -> Result | None:
        s = a.sock
        if a.state == "connecting":
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                finish(a)
                return result(a, False, error=classify_errno(err), detail=_errname(err))
            a.state = "reading"
            sel.modify(s, selectors.EVENT_READ, a)
            return None
        try:
            data = s.recv(4096)
        except BlockingIOError:
            return None
        except OSError as e:
            finish(a)
            return result(a, False, error=classify_errno(e.errno or 0), detail=_errname(e.errno or 0))
        if proto == "udp":
            finish(a)
            server, peer = parse_reply(data)
            return result(a, True, server=server, peer=peer)
        if data:
            a.buf += data
            if b"\n" not in a.buf:
                return None
        finish(a)
        if not a.buf:
            return result(a, False, error=EOF)
        server, peer = parse_reply(a.buf.split(b"\n", 1)[0])
        return result(a, True, server=server, peer=peer)

    try:
        while True:
            can_start = not (stop is not None and stop.is_set()) and (count is None or started < count)
            if not can_start and not inflight:
                return
            now = time.monotonic()
            while can_start and len(inflight) < parallel and now >= next_start:
                r = start(started)
                started += 1
                next_start = max(next_start + interval, now) if interval else now
                if r is not None:
                    yield r
                can_start = not (stop is not None and stop.is_set()) and (count is None or started < count)
                now = time.monotonic()
            wake = [a.deadline for a in inflight.values()]
            if can_start and len(inflight) < parallel:
                wake.append(next_start)
            if stop is not None:
                wake.append(now + 0.05)  # poll the stop flag
            wait = max(0.0, min(wake) - now) if wake else 0.0
            for key, _ in sel.select(wait):
                r = on_event(key.data)
                if r is not None:
                    yield r
            now = time.monotonic()
            for a in [a for a in inflight.values() if a.deadline <= now]:
                finish(a)
                yield result(a, False, error=TIMEOUT)
    finally:
        for a in list(inflight.values()):
            finish(a)
        if shared_udp is not None:
            shared_udp.close()
        sel.close()


def _local(s: socket.socket) -> tuple | None:
    try:
        return s.getsockname()[:2]
    except OSError:
        return None


def summarize(results: list[Result], max_failures: int = 200) -> dict:
    """Summary of a loop run: counts per server ID and per error kind, and failures."""
    by_server: dict[str, int] = {}
    by_error: dict[str, int] = {}
    failures = []
    for r in results:
        if r.ok:
            by_server[str(r.server)] = by_server.get(str(r.server), 0) + 1
        else:
            by_error[str(r.error)] = by_error.get(str(r.error), 0) + 1
            if len(failures) < max_failures:
                failures.append({"i": r.i, "t": r.t, "error": r.error, "detail": r.detail})
    ts = [r.t for r in results]
    return {
        "event": "summary",
        "total": len(results),
        "ok": sum(by_server.values()),
        "failed": sum(by_error.values()),
        "by_server": by_server,
        "by_error": by_error,
        "failures": failures,
        "first_t": min(ts) if ts else None,
        "last_t": max(ts) if ts else None,
    }


# ---------------------------------------------------------------------------- server

def _make_listener(bind: str, port: int, stype: int) -> socket.socket:
    family = family_of(bind)
    s = socket.socket(family, stype)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        if ipaddress.ip_address(bind) == ipaddress.IPv6Address("::"):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if stype == socket.SOCK_DGRAM:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    if stype == socket.SOCK_DGRAM:
        # Also for v4-mapped traffic on a dual-stack socket.
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s.bind((bind, port))
    if stype == socket.SOCK_STREAM:
        s.listen(4096)
    s.setblocking(False)
    return s


def _udp_reply(s: socket.socket, name: str) -> None:
    try:
        _data, anc, _flags, addr = s.recvmsg(65535, socket.CMSG_SPACE(64))
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        return  # e.g. a queued ICMP error
    reply = f"{name} {normalize_ip(addr[0])}".encode()
    cmsgs = []
    for level, ctype, cdata in anc:
        # Answer from the address the datagram was sent to, so that clients with
        # connected sockets accept the reply even on multi-address hosts.
        if level == socket.IPPROTO_IP and ctype == IP_PKTINFO and len(cdata) >= 12:
            _ifindex, _spec, dst = struct.unpack("i4s4s", cdata[:12])
            cmsgs = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("i4s4s", 0, dst, b"\0" * 4))]
        elif level == socket.IPPROTO_IPV6 and ctype == IPV6_PKTINFO and len(cdata) >= 20:
            dst6 = cdata[:16]
            cmsgs = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, dst6 + struct.pack("i", 0))]
    try:
        s.sendmsg([reply], cmsgs, 0, addr)
    except OSError:
        try:
            s.sendto(reply, addr)
        except OSError:
            pass


def serve(name: str, tcp_ports: list[int], udp_ports: list[int], bind: str = "::") -> None:
    sel = selectors.DefaultSelector()
    for p in tcp_ports:
        sel.register(_make_listener(bind, p, socket.SOCK_STREAM), selectors.EVENT_READ, "tcp")
    for p in udp_ports:
        sel.register(_make_listener(bind, p, socket.SOCK_DGRAM), selectors.EVENT_READ, "udp")
    if not tcp_ports and not udp_ports:
        raise SystemExit("serve: need at least one --tcp or --udp port")
    print("READY", flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if key.data == "udp":
                _udp_reply(s, name)
                continue
            try:
                conn, addr = s.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError:
                continue
            try:
                conn.setblocking(True)
                conn.settimeout(1.0)
                conn.sendall(f"{name} {normalize_ip(addr[0])}\n".encode())
            except OSError:
                pass
            finally:
                conn.close()


# ---------------------------------------------------------------------------- CLI

def _install_stop_handlers(stop: threading.Event) -> None:
    def on_signal(_signo, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_stdin():
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cmd_connect(args) -> int:
    results = list(run_attempts(
        args.dst, args.port, proto=args.proto, count=args.count, timeout=args.timeout,
        parallel=args.parallel, rate=args.rate, src=args.src, src_port=args.src_port,
        same_source_port=args.same_source_port))
    results.sort(key=lambda r: r.i)
    _emit([r.to_dict() for r in results])
    return 0


def cmd_loop(args) -> int:
    stop = threading.Event()
    _install_stop_handlers(stop)
    print("READY", flush=True)
    results: list[Result] = []
    for r in run_attempts(
            args.dst, args.port, proto=args.proto, count=None, timeout=args.timeout,
            parallel=args.parallel, rate=1000.0 / args.interval_ms, src=args.src, stop=stop):
        results.append(r)
        if args.progress:
            _emit({"event": "result", **r.to_dict()})
    results.sort(key=lambda r: r.i)
    _emit(summarize(results))
    return 0


def cmd_udp_flow(args) -> int:
    stop = threading.Event()
    _install_stop_handlers(stop)
    s = socket.socket(family_of(args.dst), socket.SOCK_DGRAM)
    if args.src or args.src_port:
        s.bind((args.src or ("::" if s.family == socket.AF_INET6 else "0.0.0.0"), args.src_port or 0))
    s.connect((args.dst, args.port))
    local = s.getsockname()
    _emit({"event": "ready", "local": normalize_ip(local[0]), "local_port": local[1]})
    interval = args.interval_ms / 1000.0
    i = 0
    while not stop.is_set():
        t_wall, t0 = time.time(), time.monotonic()
        deadline = t0 + interval
        base = {"i": i, "t": t_wall, "local": normalize_ip(local[0]), "local_port": local[1]}
        got = False
        try:
            s.send(UDP_PAYLOAD)
        except OSError as e:
            _emit({"event": "result", **base, "ok": False, "error": classify_errno(e.errno or 0),
                   "detail": _errname(e.errno or 0), "elapsed": 0.0})
            got = True
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                data = s.recv(65535)
            except TimeoutError:
                break
            except OSError as e:
                _emit({"event": "result", **base, "ok": False, "error": classify_errno(e.errno or 0),
                       "detail": _errname(e.errno or 0), "elapsed": time.monotonic() - t0})
                got = True
                continue
            server, peer = parse_reply(data)
            _emit({"event": "result", **base, "ok": True, "server": server, "peer": peer,
                   "elapsed": time.monotonic() - t0})
            got = True
        if not got and not stop.is_set():
            _emit({"event": "result", **base, "ok": False, "error": TIMEOUT,
                   "elapsed": time.monotonic() - t0})
        i += 1
    s.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trafficd", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)

    sp = sub.add_parser("serve", help="TCP/UDP servers answering 'ID <peer-ip>'")
    sp.add_argument("--name", required=True)
    sp.add_argument("--tcp", type=int, action="append", default=[])
    sp.add_argument("--udp", type=int, action="append", default=[])
    sp.add_argument("--bind", default="::")

    def client_args(sp, loop=False):
        sp.add_argument("--dst", required=True)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
        sp.add_argument("--timeout", type=float, default=1.0)
        sp.add_argument("--src", default=None, help="local source address")
        sp.add_argument("--parallel", type=int, default=1 if loop else 32)

    cp = sub.add_parser("connect", help="N attempts, JSON list of results")
    client_args(cp)
    cp.add_argument("--count", type=int, default=1)
    cp.add_argument("--rate", type=float, default=None, help="attempts per second")
    cp.add_argument("--src-port", type=int, default=None)
    cp.add_argument("--same-source-port", "--src-port-reuse", action="store_true")

    lp = sub.add_parser("loop", help="attempt every --interval-ms until stdin EOF/SIGTERM")
    client_args(lp, loop=True)
    lp.set_defaults(parallel=16)
    lp.add_argument("--interval-ms", type=float, default=20.0)
    lp.add_argument("--progress", action="store_true", help="print every result as a JSON line")

    fp = sub.add_parser("udp-flow", help="one long-lived UDP flow, one JSON line per interval")
    fp.add_argument("--dst", required=True)
    fp.add_argument("--port", type=int, required=True)
    fp.add_argument("--interval-ms", type=float, default=50.0)
    fp.add_argument("--src", default=None)
    fp.add_argument("--src-port", type=int, default=None)

    args = p.parse_args(argv)
    if args.mode == "serve":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            serve(args.name, args.tcp, args.udp, args.bind)
        except KeyboardInterrupt:
            pass
        return 0
    if args.mode == "connect":
        return cmd_connect(args)
    if args.mode == "loop":
        return cmd_loop(args)
    return cmd_udp_flow(args)


if __name__ == "__main__":
    sys.exit(main())
