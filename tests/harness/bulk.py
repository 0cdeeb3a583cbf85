"""Servers and clients for the limit tests: held connections, and bulk transfers timed after a head start.

``python bulk.py serve --name N --hold P --source P --sink P`` runs in a pod's
namespace (``Netns.popen``) and prints ``READY``:

* ``--hold``: TCP; answers ``N <peer>`` and keeps the connection open until the peer closes it.
* ``--source``: TCP; reads a line ``BYTES``, then sends that many bytes and closes.
* ``--sink``: TCP; reads until the peer half-closes, then answers a JSON line:
  ``{"bytes": total, "rate": bytes per second after the first --skip bytes}``,
  measured where the bytes arrive.

The clients (``hold``, ``download``) run in the calling thread, inside a
namespace entered with ``Netns.entered()``. Every call is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
import time

SKIP = 2 * 1024 * 1024
"""nft's byte buckets start full (one second of rate plus the burst): rates are timed after this many bytes."""


def _listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(256)
    return s


def _peer(addr: tuple) -> str:
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") else host


def _hold(conn: socket.socket, name: str, addr: tuple) -> None:
    with conn:
        try:
            conn.sendall(f"{name} {_peer(addr)}\n".encode())
            conn.settimeout(120)
            while conn.recv(4096):
                pass
        except OSError:
            pass


def _source(conn: socket.socket) -> None:
    with conn:
        try:
            conn.settimeout(60)
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(64)
                if not chunk:
                    return
                line += chunk
            remaining = int(line)
            block = b"x" * 65536
            while remaining > 0:
                sent = conn.send(block[: min(remaining, len(block))])
                remaining -= sent
        except (OSError, ValueError):
            pass


def _sink(conn: socket.socket, skip: int) -> None:
    with conn:
        try:
            conn.settimeout(60)
            total, mark_time, mark_bytes = 0, None, 0
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                total += len(chunk)
                if mark_time is None and total >= skip:
                    mark_time, mark_bytes = time.monotonic(), total
            rate = None
            if mark_time is not None:
                elapsed = time.monotonic() - mark_time
                rate = (total - mark_bytes) / elapsed if elapsed > 0 else None
            conn.sendall((json.dumps({"bytes": total, "rate": rate}) + "\n").encode())
        except OSError:
            pass


def serve(name: str, hold: int | None, source: int | None, sink: int | None, skip: int) -> None:
    sel = selectors.DefaultSelector()
    for port, kind in ((hold, "hold"), (source, "source"), (sink, "sink")):
        if port:
            sel.register(_listener(port), selectors.EVENT_READ, kind)
    print("READY", flush=True)
    while True:
        for key, _ in sel.select():
            try:
                conn, addr = key.fileobj.accept()  # type: ignore[union-attr]
            except OSError:
                continue
            conn.setblocking(True)
            if key.data == "hold":
                target, args = _hold, (conn, name, addr)
            elif key.data == "source":
                target, args = _source, (conn,)
            else:
                target, args = _sink, (conn, skip)
            threading.Thread(target=target, args=args, daemon=True).start()


# -- clients (in the calling thread's namespace) -----------------------------------------------


def hold(destination: str, port: int, timeout: float = 1.0) -> socket.socket | None:
    """A TCP connection that answered its greeting, left open; None if it was refused, dropped or timed out."""
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((destination, port))
        if not s.recv(256):
            raise OSError("closed")
        return s
    except OSError:
        s.close()
        return None


def download(destination: str, port: int, total: int, skip: int = SKIP, timeout: float = 30.0) -> float:
    """Bytes per second received from a ``--source`` server, after the first ``skip`` bytes."""
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((destination, port))
        s.sendall(f"{total}\n".encode())
        received, mark_time, mark_bytes = 0, None, 0
        deadline = time.monotonic() + timeout
        while received < total and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += len(chunk)
            if mark_time is None and received >= skip:
                mark_time, mark_bytes = time.monotonic(), received
        if mark_time is None or received < total:
            raise OSError(f"download: {received} of {total} bytes")
        return (received - mark_bytes) / (time.monotonic() - mark_time)


def upload(destination: str, port: int, total: int, timeout: float = 30.0) -> float:
    """Bytes per second a ``--sink`` server received after its first ``skip`` bytes (measured there)."""
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((destination, port))
        block = b"y" * 65536
        sent = 0
        while sent < total:
            sent += s.send(block[: min(total - sent, len(block))])
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            reply += chunk
    answer = json.loads(reply)
    if answer.get("rate") is None or answer["bytes"] != total:
        raise OSError(f"upload: the server saw {answer}")
    return float(answer["rate"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    sp = sub.add_parser("serve")
    sp.add_argument("--name", required=True)
    sp.add_argument("--hold", type=int)
    sp.add_argument("--source", type=int)
    sp.add_argument("--sink", type=int)
    sp.add_argument("--skip", type=int, default=SKIP)
    args = parser.parse_args(argv)
    serve(args.name, args.hold, args.source, args.sink, args.skip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
