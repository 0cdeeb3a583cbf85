"""Small HTTP servers: /metrics, /rules and /skipped, and the base the health servers share.

* One ``HTTPService`` per listening port: a stdlib ``ThreadingHTTPServer``
  whose accept loop runs in a daemon thread. Routes are exact paths mapped to
  plain functions from a ``Request`` to a ``Response`` (frozen values), so the
  handlers are testable without sockets.
* The socket is bound and listening when the constructor returns, so a client
  may connect at once; ``stop()`` wakes the accept loop through a socket pair
  (no polling interval), closes the socket (new connections are refused) and
  joins the thread.
* A wildcard host (``""``, ``0.0.0.0`` or ``::``) listens dual-stack on
  ``[::]`` where the kernel allows it, as Go's ``net.Listen("tcp",
  "0.0.0.0:port")`` does upstream; otherwise on IPv4 only. Port 0 picks a free
  port (``HTTPService.port``).
* Requests are logged at debug level only; a handler that raises answers 500
  and is logged with its traceback.
* ``max_handlers`` bounds the requests handled at once (a thread each); the
  accept loop waits for a free one, and further clients wait in the listen
  backlog, in the kernel. The metrics server is bounded: its memory does not
  grow with the number of scrapers.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from kproxy.observe.exposition import SharedExposition

log = logging.getLogger(__name__)

TEXT_PLAIN = "text/plain; charset=utf-8"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
METRICS_HANDLERS = 16
"""Requests the metrics server handles at once (each waits for the shared collection, or writes its result)."""


@dataclass(frozen=True, slots=True)
class Request:
    """What a route sees of an HTTP request."""

    method: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Header names lowercased."""
    client: str = ""
    """The peer's address (an IPv4 peer of a dual-stack listener as ``::ffff:a.b.c.d``)."""


@dataclass(frozen=True, slots=True)
class Response:
    """What a route answers."""

    status: int
    body: bytes = b""
    content_type: str = TEXT_PLAIN
    headers: tuple[tuple[str, str], ...] = ()
    """Extra headers, in order."""


Route = Callable[[Request], Response]


def not_found(request: Request) -> Response:
    return Response(404, b"404 page not found\n")


class _Handler(BaseHTTPRequestHandler):
    server: HTTPService
    timeout = 10  # seconds a client may take to send its request
    server_version = "kproxy"

    def _answer(self, send_body: bool) -> None:
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=parts.path,
            query=parts.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            client=str(self.client_address[0]) if self.client_address else "",
        )
        route = self.server.routes.get(parts.path, self.server.default_route)
        try:
            response = route(request)
        except Exception:
            log.exception("%s: handler for %s failed", self.server.name, parts.path)
            response = Response(500, b"internal error\n")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(response.body)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s: %s %s", self.server.name, self.address_string(), format % args)


class HTTPService(ThreadingHTTPServer):
    """A listening HTTP server with exact-path routes, served from a daemon thread."""

    daemon_threads = True
    request_queue_size = 128
    """The listen backlog (socketserver's default, 5, drops the SYNs of a sixth client at once: it retries a second later)."""

    def __init__(
        self,
        address: tuple[str, int],
        routes: Mapping[str, Route],
        name: str = "http",
        default_route: Route = not_found,
        max_handlers: int | None = None,
    ) -> None:
        host, port = address
        self.name = name
        self.routes = dict(routes)
        self.default_route = default_route
        self._handlers = threading.BoundedSemaphore(max_handlers) if max_handlers else None
        self._dual_stack = False
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._wake_r, self._wake_w = socket.socketpair()
        if host in WILDCARD_HOSTS and socket.has_dualstack_ipv6():
            self.address_family = socket.AF_INET6
            self._dual_stack = True
            bind_host = "::"
        elif host in WILDCARD_HOSTS:
            self.address_family = socket.AF_INET
            bind_host = "0.0.0.0"
        else:
            self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            bind_host = host
        try:
            super().__init__((bind_host, port), _Handler)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise

    def server_bind(self) -> None:
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: it resolves the host name (getfqdn), which can block.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        """Handle the request in a thread of its own, once one of the ``max_handlers`` is free."""
        if self._handlers is not None:
            while not self._handlers.acquire(timeout=0.5):
                if self._stopped:
                    self.shutdown_request(request)
                    return
        try:
            super().process_request(request, client_address)
        except BaseException:
            if self._handlers is not None:
                self._handlers.release()
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self._handlers is not None:
                self._handlers.release()

    @property
    def port(self) -> int:
        """The bound port (the chosen one when asked for port 0)."""
        return int(self.server_address[1])

    @property
    def host(self) -> str:
        return str(self.server_address[0])

    def start(self) -> HTTPService:
        """Serve from a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"kproxy-{self.name}", daemon=True)
            self._thread.start()
        return self

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopped:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r or self._stopped:
                        return
                    self._handle_request_noblock()  # type: ignore[attr-defined]  # socketserver's, undocumented

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the socket and join the serving thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
        self.server_close()
        self._wake_r.close()
        self._wake_w.close()


def is_loopback(address: str) -> bool:
    """Whether a peer address is a loopback one (127.0.0.0/8, ::1, or 127.x mapped into IPv6)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def loopback_only(route: Route, path: str) -> Route:
    """``route`` for loopback clients; 403 for any other, naming the flag that opens it."""

    def guarded(request: Request) -> Response:
        if is_loopback(request.client):
            return route(request)
        return Response(403, f"{path} is served to loopback clients only (kproxy --expose-rules opens it)\n".encode())

    return guarded


def metrics_routes(
    metrics_source: SharedExposition | CollectorRegistry,
    rules_text: Callable[[], str],
    skipped: Callable[[], list[dict[str, object]]] = list,
    expose_rules: bool = False,
) -> dict[str, Route]:
    """``/metrics`` (Prometheus text, or OpenMetrics when the scraper asks for it), ``/rules`` and ``/skipped``.

    ``/rules`` (the whole ruleset) and ``/skipped`` (object names and problems)
    answer loopback clients only, unless ``expose_rules``: a metrics address
    opened for Prometheus does not publish them. A bare registry is served
    through a SharedExposition of its own.
    """
    exposition = metrics_source if isinstance(metrics_source, SharedExposition) else SharedExposition(metrics_source)

    def metrics(request: Request) -> Response:
        body, content_type = exposition.render(request.headers.get("accept", ""))
        return Response(200, body, content_type)

    def rules(request: Request) -> Response:
        return Response(200, rules_text().encode(), TEXT_PLAIN)

    def skipped_objects(request: Request) -> Response:
        return Response(200, (json.dumps(skipped(), indent=1) + "\n").encode(), "application/json")

    if expose_rules:
        return {"/metrics": metrics, "/rules": rules, "/skipped": skipped_objects}
    return {"/metrics": metrics, "/rules": loopback_only(rules, "/rules"),
            "/skipped": loopback_only(skipped_objects, "/skipped")}


def start_metrics_server(
    address: tuple[str, int],
    metrics_source: SharedExposition | CollectorRegistry,
    rules_text: Callable[[], str],
    skipped: Callable[[], list[dict[str, object]]] = list,
    max_handlers: int = METRICS_HANDLERS,
    expose_rules: bool = False,
) -> HTTPService:
    """Serve ``/metrics``, ``/rules`` and ``/skipped`` on ``address`` (from ``parse_bind_address``); 404 elsewhere."""
    routes = metrics_routes(metrics_source, rules_text, skipped, expose_rules)
    server = HTTPService(address, routes, name="metrics", max_handlers=max_handlers).start()
    log.info("serving /metrics, and /rules and /skipped to %s, on %s port %d",
             "any client" if expose_rules else "loopback clients only", server.host, server.port)
    return server
