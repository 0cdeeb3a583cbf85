"""A small in-process Kubernetes API server for kproxy's tests.

kproxy watches Services, EndpointSlices and Nodes.  Its informer code
(list, then watch from the list's resourceVersion, resume after a dropped
connection, relist after ``410 Gone``) cannot be tested meaningfully against
mocks of the client library, and a real control plane is too heavy for unit
tests.  :class:`FakeKubeAPI` sits in between: it runs a real HTTP/1.1 server on
``127.0.0.1`` (ephemeral port, background threads) that speaks the list/watch
protocol of kube-apiserver closely enough for the *unchanged* official
``kubernetes`` Python client:

* One global resourceVersion counter shared by all kinds; an event history
  that watches replay from; compaction (:meth:`FakeKubeAPI.compact`,
  ``history_limit``) producing ``410 Expired`` exactly like the real server
  (an ``ERROR`` watch event inside an HTTP 200 stream).
* Lists sent chunked as a 1.34+ server sends them (item by item, through Go's
  2 KiB buffer before chunking: ``_EncodedList``), and chunked watch streams
  with ``ADDED``/``MODIFIED``/``DELETED``/``BOOKMARK`` events,
  ``timeoutSeconds``, label selectors (with objects entering/leaving a
  selector reported as ``ADDED``/``DELETED``), ``metadata.name`` and
  ``metadata.namespace`` field selectors, and ``limit``/``continue`` paging
  over a consistent snapshot (``remainingItemCount`` only without selectors,
  as the real server); a list with ``resourceVersion=0`` is served whole from
  the latest state, ignoring ``limit``, as the real server serves it from its
  watch cache.
* Lists cost little beyond the socket: each stored object is encoded to JSON
  once (on its first list, or by :meth:`FakeKubeAPI.warm`) and the sorted
  keys are kept, so 30,000 Services and their EndpointSlices list in pages of
  500 about as fast as a client reads them.
* Create/get/replace/patch/delete with ``kind: Status`` errors (404
  NotFound, 409 AlreadyExists/Conflict, 400 BadRequest, 410 Expired, 500).
* Fault injection: :meth:`~FakeKubeAPI.drop_watches`,
  :meth:`~FakeKubeAPI.set_failing`, :meth:`~FakeKubeAPI.stop` /
  :meth:`~FakeKubeAPI.start` (same port, state kept),
  :meth:`~FakeKubeAPI.force_410_on_next_watch`.

Tests drive the state in-process (``create``/``update``/``patch``/``delete``
take and return plain manifest dicts) and synchronise with
:meth:`~FakeKubeAPI.wait_for_watchers` instead of sleeping.  Use the
``fake_api`` fixture and :func:`client_config`.

Deliberate simplifications: strategic-merge patches are applied as JSON merge
patches (lists are replaced, not merged by key); no defaulting, validation or
IP allocation is done (manifests are stored as given, plus server-managed
metadata); server-side apply is not supported; list ``resourceVersion``
parameters other than ``0`` are ignored (lists are served from the latest
state; continued pages from the first page's snapshot).
"""

from __future__ import annotations

import base64
import bisect
import copy
import json
import logging
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client
import pytest
import yaml

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace is "" for cluster-scoped kinds

_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_MERGE_PATCH_TYPES = {"application/merge-patch+json", "application/strategic-merge-patch+json"}
_JSON_PATCH_TYPE = "application/json-patch+json"

VERSION_INFO: JSON = {
    "major": "1", "minor": "33", "gitVersion": "v1.33.0",
    "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
    "buildDate": "2024-08-13T07:28:49Z", "goVersion": "go1.22.5", "compiler": "gc",
    "platform": "linux/amd64",
}


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ResourceType:
    """One served resource (kind, REST path, scope)."""

    kind: str
    plural: str
    group: str  # "" for the core group
    version: str
    namespaced: bool
    has_status: bool  # has a /status subresource; main-resource writes keep status

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def qualified(self) -> str:
        """Name used in error messages, e.g. ``endpointslices.discovery.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


SERVICES = ResourceType("Service", "services", "", "v1", namespaced=True, has_status=True)
ENDPOINT_SLICES = ResourceType("EndpointSlice", "endpointslices", "discovery.k8s.io", "v1",
                               namespaced=True, has_status=False)
NODES = ResourceType("Node", "nodes", "", "v1", namespaced=False, has_status=True)
SERVICE_CIDRS = ResourceType("ServiceCIDR", "servicecidrs", "networking.k8s.io", "v1", namespaced=False,
                             has_status=True)
RESOURCES: tuple[ResourceType, ...] = (SERVICES, ENDPOINT_SLICES, NODES, SERVICE_CIDRS)


def resource_type(name: str | ResourceType) -> ResourceType:
    """Resolve ``"Service"``, ``"service"`` or ``"services"`` (etc.) to a :class:`ResourceType`."""
    if isinstance(name, ResourceType):
        return name
    for res in RESOURCES:
        if name in (res.kind, res.plural) or name.lower() in (res.kind.lower(), res.plural):
            return res
    raise ValueError(f"fake API server does not serve {name!r}")


# --------------------------------------------------------------------------- errors


class FakeApiError(Exception):
    """A failed API operation; ``status`` is the ``kind: Status`` body sent over HTTP."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    @property
    def status(self) -> JSON:
        body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(res: ResourceType, name: str) -> JSON:
    details: JSON = {"name": name, "kind": res.plural}
    if res.group:
        details["group"] = res.group
    return details


def _not_found(res: ResourceType, name: str) -> FakeApiError:
    return FakeApiError(404, "NotFound", f'{res.qualified} "{name}" not found', _details(res, name))


def _bad_request(message: str) -> FakeApiError:
    return FakeApiError(400, "BadRequest", message)


def _conflict(res: ResourceType, name: str, why: str) -> FakeApiError:
    return FakeApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.qualified} "{name}": {why}',
                        _details(res, name))


def _expired(message: str) -> FakeApiError:
    return FakeApiError(410, "Expired", message)


# --------------------------------------------------------------------------- selectors


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # in, notin, =, !=, exists, !
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values  # "!=" and "notin"


_KEY = r"[^\s!=(),]+"
_SET_RE = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^()]*)\)$")
_EQ_RE = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*([^\s!=(),]*)$")
_NOT_EXISTS_RE = re.compile(rf"^!\s*({_KEY})$")
_EXISTS_RE = re.compile(rf"^({_KEY})$")


class LabelSelector:
    """The string form of a label selector, e.g. ``app=x,!service.kubernetes.io/headless``."""

    def __init__(self, text: str = "") -> None:
        self.text = text
        self.requirements = [self._parse_requirement(part) for part in self._split(text)]

    @staticmethod
    def _split(text: str) -> list[str]:
        parts, depth, current = [], 0, []
        for ch in text:
            depth += (ch == "(") - (ch == ")")
            if ch == "," and depth == 0:
                parts.append("".join(current))
                current = []
            else:
                current.append(ch)
        parts.append("".join(current))
        return [p.strip() for p in parts if p.strip()]

    @staticmethod
    def _parse_requirement(part: str) -> _Requirement:
        if m := _SET_RE.match(part):
            values = frozenset(v.strip() for v in m.group(3).split(","))
            if not m.group(3).strip():
                raise ValueError(f"{part!r}: for 'in', 'notin' operators, values set can't be empty")
            return _Requirement(m.group(1), m.group(2), values)
        if m := _EQ_RE.match(part):
            return _Requirement(m.group(1), "!=" if m.group(2) == "!=" else "=", frozenset([m.group(3)]))
        if m := _NOT_EXISTS_RE.match(part):
            return _Requirement(m.group(1), "!")
        if m := _EXISTS_RE.match(part):
            return _Requirement(m.group(1), "exists")
        raise ValueError(f"unable to parse requirement: {part!r}")

    def matches(self, labels: dict[str, str] | None) -> bool:
        return all(r.matches(labels or {}) for r in self.requirements)


class FieldSelector:
    """``metadata.name`` / ``metadata.namespace`` field selectors (``=``, ``==``, ``!=``)."""

    FIELDS = ("metadata.name", "metadata.namespace")

    def __init__(self, text: str = "") -> None:
        self.terms: list[tuple[str, bool, str]] = []  # (field, equal?, value)
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.match(r"^([^=!]+)(==|=|!=)(.*)$", part)
            if not m:
                raise ValueError(f"invalid field selector: {part!r}")
            name = m.group(1).strip()
            if name not in self.FIELDS:
                raise ValueError(f'field label not supported: {name}')
            self.terms.append((name, m.group(2) != "!=", m.group(3).strip()))

    def matches(self, obj: JSON) -> bool:
        meta = obj.get("metadata", {})
        values = {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", "")}
        return all((values[f] == v) == eq for f, eq, v in self.terms)


@dataclass
class _Filter:
    """What one list/watch request selects."""

    res: ResourceType
    namespace: str | None = None
    labels: LabelSelector = field(default_factory=LabelSelector)
    fields: FieldSelector = field(default_factory=FieldSelector)

    def matches(self, obj: JSON | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)


# --------------------------------------------------------------------------- events and watches


@dataclass(frozen=True)
class _Event:
    rv: int
    res: ResourceType
    type: str  # ADDED, MODIFIED, DELETED
    obj: JSON  # state after the change (for DELETED: last state, stamped with the deletion rv)
    prev: JSON | None  # state before the change (None for ADDED)

    def translate(self, flt: _Filter) -> JSON | None:
        """The watch event ``flt`` sees, if any (selector transitions become ADDED/DELETED)."""
        if self.res is not flt.res:
            return None
        now, before = flt.matches(self.obj), flt.matches(self.prev)
        if self.type == "DELETED":
            return {"type": "DELETED", "object": self.obj} if before else None
        if now and before:
            return {"type": "MODIFIED", "object": self.obj}
        if now:
            return {"type": "ADDED", "object": self.obj}
        if before:
            return {"type": "DELETED", "object": self.obj}
        return None


class _WatchStream:
    """Server-side state of one open watch connection."""

    def __init__(self, flt: _Filter, conn: socket.socket) -> None:
        self.filter = flt
        self.conn = conn
        self.queue: deque[_Event] = deque()
        self.dropped = False
        self.ready = False  # response headers and initial events have been written


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _peer_closed(sock: socket.socket) -> bool:
    """True if the client has closed its end (a watch client never sends anything)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


# --------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``null`` deletes a key); returns a new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(doc: JSON, ops: list[JSON]) -> JSON:
    """RFC 6902 JSON patch (add, remove, replace, test); returns a new document."""
    result: Any = copy.deepcopy(doc)
    for op in ops:
        kind, value = op["op"], op.get("value")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        if not tokens:  # the whole document
            if kind == "test" and result != value:
                raise FakeApiError(422, "Invalid", "test operation failed at the document root")
            if kind in ("add", "replace"):
                result = copy.deepcopy(value)
            elif kind != "test":
                raise FakeApiError(422, "Invalid", f"cannot {kind} the document root")
            continue
        parent = result
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last: Any = tokens[-1]
        if isinstance(parent, list) and last != "-":
            last = int(last)
        if kind == "test":
            if parent[last] != value:
                raise FakeApiError(422, "Invalid", f"test operation failed at {op['path']}")
        elif kind == "remove":
            del parent[last]
        elif kind == "replace":
            parent[last]
            parent[last] = copy.deepcopy(value)
        elif kind == "add" and isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else last, copy.deepcopy(value))
        elif kind == "add":
            parent[last] = copy.deepcopy(value)
        else:
            raise FakeApiError(422, "Invalid", f"unsupported JSON patch operation {kind!r}")
    return result


# --------------------------------------------------------------------------- the server


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(obj: JSON) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def _strip_type(obj: JSON) -> JSON:
    """A list item as the real server returns it: no kind/apiVersion."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


_LAST_CHUNK = b"0\r\n\r\n"
"""The terminating chunk of a chunked HTTP/1.1 body (no trailers)."""


def _chunk(data: bytes) -> bytes:
    """One chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


_GO_BUFFER_BEFORE_CHUNKING = 2048
"""net/http's ``bufferBeforeChunkingSize``: a response without Content-Length goes through a buffer of this
size, and each write of the handler is sent as chunks by ``bufio.Writer``'s rules (``_go_chunks``)."""


@dataclass(frozen=True)
class _EncodedList:
    """A list response already encoded as JSON: the writes a 1.34+ kube-apiserver makes for it.

    Its JSON encoder writes a collection item by item (StreamingCollectionEncodingToJSON, locked on since
    1.34): the list's head, then each item and each comma between them, then the end. Sent as Go's HTTP
    server sends those writes: with a Content-Length when they fit its 2 KiB buffer, else chunked, so a
    client reads what a real server sends it (chunks of 2 KiB, some items whole, most cut across them).
    """

    writes: list[bytes]

    def body(self) -> bytes:
        return b"".join(self.writes)

    def chunked(self, block: int = 1 << 18) -> Iterator[bytes]:
        """The body in HTTP/1.1 chunked transfer coding, with its terminating chunk, in blocks of about
        ``block`` bytes to write as they are made (the first reaches the client at once, as the real
        server's first items do)."""
        pending: list[bytes] = []
        size = 0
        for chunk in _go_chunks(self.writes, _GO_BUFFER_BEFORE_CHUNKING):
            pending.append(_chunk(chunk))
            size += len(chunk)
            if size >= block:
                yield b"".join(pending)
                pending.clear()
                size = 0
        pending.append(_LAST_CHUNK)
        yield b"".join(pending)


def _go_chunks(writes: list[bytes], size: int) -> Iterator[bytes]:
    """The chunks Go's ``bufio.Writer`` of ``size`` bytes passes on for these writes (then its final flush): a
    write larger than the free space goes out whole when the buffer is empty, else fills it and flushes it."""
    buffered = bytearray()
    for data in writes:
        view = memoryview(data)
        while len(view) > size - len(buffered):
            if not buffered:
                yield bytes(view)
                view = view[len(view):]
                break
            cut = size - len(buffered)
            buffered += view[:cut]
            view = view[cut:]
            yield bytes(buffered)
            buffered.clear()
        buffered += view
    if buffered:
        yield bytes(buffered)


class FakeKubeAPI:
    """A fake kube-apiserver serving Services, EndpointSlices, Nodes and ServiceCIDRs.

    All public methods are thread-safe.  Objects are plain dicts; everything
    returned is a deep copy.  Stored objects are never mutated in place (each
    write stores a new dict), so the event history can share them.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, bookmark_interval: float = 1.0,
                 history_limit: int | None = None, initial_resource_version: int = 1,
                 unserved: frozenset[str] = frozenset()) -> None:
        self.host = host
        self.unserved = unserved
        """Kinds this server answers 404 for, as an older API server does (e.g. ``{"ServiceCIDR"}``)."""
        self.bookmark_interval = bookmark_interval
        """Seconds between BOOKMARK events on watches with ``allowWatchBookmarks=true``."""
        self.history_limit = history_limit
        """If set, only the newest ``history_limit`` events are kept (older ones are compacted)."""
        self._port = port
        self._cond = threading.Condition(threading.RLock())
        self._objects: dict[str, dict[Key, JSON]] = {res.plural: {} for res in RESOURCES}
        self._sorted: dict[str, list[Key] | None] = {res.plural: [] for res in RESOURCES}
        """The keys of ``_objects`` in order (None: to be sorted again after a create or delete)."""
        self._encoded: dict[str, dict[Key, tuple[JSON, bytes]]] = {res.plural: {} for res in RESOURCES}
        """Each stored object's list-item JSON, with the object it encodes (stale when that is not the stored one)."""
        self._changed: dict[str, int] = {res.plural: 0 for res in RESOURCES}
        """The resourceVersion of each resource's latest event."""
        self._rv = initial_resource_version
        self._floor = initial_resource_version  # history holds every event with rv > _floor
        self._history: deque[_Event] = deque()
        self._streams: set[_WatchStream] = set()
        self._conns: set[socket.socket] = set()
        self._watch_count: Counter[str] = Counter()
        self._list_count: Counter[str] = Counter()
        self._failing = False
        self._force_410: list[ResourceType | None] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        with self._cond:
            return self._httpd is not None

    def start(self) -> FakeKubeAPI:
        """Start serving (again) on the same port; state survives stop()/start()."""
        with self._cond:
            if self._httpd is not None:
                raise RuntimeError("fake API server already running")
            httpd = _HTTPServer((self.host, self._port), self)
            self._port = httpd.server_address[1]
            self._httpd = httpd
            self._thread = threading.Thread(target=httpd.accept_loop, name=f"fakeapi-{self._port}",
                                            daemon=True)
            self._thread.start()
        logger.info("fake API server listening on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and abruptly close every connection (watches see a dropped connection)."""
        with self._cond:
            httpd, thread = self._httpd, self._thread
            if httpd is None:
                return
            self._httpd = self._thread = None
            httpd.stopping = True
            self._drop_streams_locked()
            for conn in self._conns:
                _shutdown(conn)
        _shutdown(httpd.socket)  # wakes the accept() in accept_loop
        httpd.server_close()
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: not self._conns, timeout):
                logger.warning("fake API server: %d connections still open after stop()", len(self._conns))
        logger.info("fake API server on port %d stopped", self._port)

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- fault injection

    def drop_watches(self) -> int:
        """Abruptly close all open watch connections (no terminating chunk); returns how many."""
        with self._cond:
            n = self._drop_streams_locked()
        logger.info("fake API server: dropped %d watches", n)
        return n

    def set_failing(self, failing: bool) -> None:
        """While failing, every request gets a 500 InternalError; open watches are dropped."""
        with self._cond:
            self._failing = failing
            if failing:
                self._drop_streams_locked()

    def force_410_on_next_watch(self, resource: str | ResourceType | None = None, count: int = 1) -> None:
        """Answer the next ``count`` watch requests (for ``resource``, or any) with a 410 ERROR event."""
        res = resource_type(resource) if resource is not None else None
        with self._cond:
            self._force_410.extend([res] * count)

    def compact(self) -> int:
        """Discard all event history; watches/continue tokens from older rvs get 410. Returns the rv."""
        with self._cond:
            self._history.clear()
            self._floor = self._rv
            return self._rv

    # ----------------------------------------------------------------- observation

    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    @property
    def watch_count(self) -> Counter[str]:
        """Watch requests received so far, keyed by plural (``"services"``, ...)."""
        with self._cond:
            return Counter(self._watch_count)

    @property
    def list_count(self) -> Counter[str]:
        """List (non-watch collection GET) requests received so far, keyed by plural."""
        with self._cond:
            return Counter(self._list_count)

    def open_watchers(self, resource: str | ResourceType) -> int:
        """Number of watch streams for ``resource`` currently open (and not closed by the client)."""
        res = resource_type(resource)
        with self._cond:
            return self._live_watchers_locked(res)

    def wait_for_watchers(self, resource: str | ResourceType, n: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` watch streams for ``resource`` are open; False on timeout.

        A stream counts as open once its response headers have been written:
        changes made after this returns are guaranteed to reach it, and
        dropping it now shows up in the client as a broken stream (a drop
        before the headers would let urllib3 silently retry the GET).
        """
        res = resource_type(resource)
        with self._cond:
            return self._wait_locked(lambda: self._live_watchers_locked(res) >= n, timeout)

    def wait_for_watch_requests(self, resource: str | ResourceType, n: int, timeout: float = 5.0) -> bool:
        """Block until ``watch_count[resource] >= n``; False on timeout."""
        res = resource_type(resource)
        with self._cond:
            return self._wait_locked(lambda: self._watch_count[res.plural] >= n, timeout)

    # ----------------------------------------------------------------- test-driver CRUD

    def create(self, obj: JSON) -> JSON:
        """Create ``obj`` (kind from ``obj["kind"]``, namespace defaults to ``default``)."""
        res = resource_type(obj.get("kind", ""))
        with self._cond:
            return copy.deepcopy(self._create_locked(res, obj, None))

    def load(self, objects: Iterable[JSON]) -> int:
        """Create many objects, taking them over: they are stored as given (and stamped), not copied.

        For benchmark clusters of 30,000 Services; the caller must not touch
        the objects afterwards. Returns how many were created.
        """
        count = 0
        with self._cond:
            for obj in objects:
                self._create_locked(resource_type(obj.get("kind", "")), obj, None, take=True)
                count += 1
        return count

    def create_yaml(self, text: str) -> list[JSON]:
        """Create every document of a (multi-document) YAML manifest."""
        return [self.create(doc) for doc in yaml.safe_load_all(text) if doc]

    def update(self, obj: JSON) -> JSON:
        """Replace an object (including status). A ``metadata.resourceVersion`` must match, if given.

        As on the real server, an update that changes nothing does not bump
        the resourceVersion and sends no event.
        """
        res = resource_type(obj.get("kind", ""))
        with self._cond:
            return copy.deepcopy(self._update_locked(res, obj, None, None, keep_status=False))

    def patch(self, kind: str, namespace: str | None, name: str, patch: JSON) -> JSON:
        """Apply a JSON merge patch to an object."""
        res = resource_type(kind)
        with self._cond:
            return copy.deepcopy(self._patch_locked(res, namespace, name, patch, "application/merge-patch+json",
                                                    None, keep_status=False))

    def delete(self, kind: str, namespace: str | None, name: str) -> JSON:
        """Delete an object; returns its last state (stamped with the deletion resourceVersion)."""
        res = resource_type(kind)
        with self._cond:
            return copy.deepcopy(self._delete_locked(res, namespace, name, None))

    def get(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        """The stored object, or None."""
        res = resource_type(kind)
        with self._cond:
            obj = self._objects[res.plural].get(self._obj_key(res, namespace, name))
            return copy.deepcopy(obj)

    def list_objects(self, kind: str, namespace: str | None = None) -> list[JSON]:
        """All stored objects of a kind (optionally one namespace), sorted by namespace/name."""
        res = resource_type(kind)
        with self._cond:
            return [copy.deepcopy(o) for k, o in sorted(self._objects[res.plural].items())
                    if namespace is None or k[0] == namespace]

    # ----------------------------------------------------------------- internals (lock held)

    def _wait_locked(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._cond.wait(remaining)
        return True

    def _drop_streams_locked(self) -> int:
        streams = list(self._streams)
        for stream in streams:
            stream.dropped = True
            _shutdown(stream.conn)
        self._streams.clear()
        self._cond.notify_all()
        return len(streams)

    def _live_watchers_locked(self, res: ResourceType) -> int:
        for stream in [s for s in self._streams if s.filter.res is res]:
            if _peer_closed(stream.conn):
                stream.dropped = True
                self._streams.discard(stream)
                self._cond.notify_all()
        return sum(1 for s in self._streams if s.filter.res is res and s.ready)

    @staticmethod
    def _obj_key(res: ResourceType, namespace: str | None, name: str) -> Key:
        return ((namespace or "default") if res.namespaced else ""), name

    def _record_locked(self, res: ResourceType, type_: str, obj: JSON, prev: JSON | None) -> None:
        event = _Event(self._rv, res, type_, obj, prev)
        self._changed[res.plural] = self._rv
        self._history.append(event)
        if self.history_limit is not None:
            while len(self._history) > self.history_limit:
                self._floor = self._history.popleft().rv
        for stream in self._streams:
            if stream.filter.res is res:
                stream.queue.append(event)
        self._cond.notify_all()

    def _normalize_locked(self, res: ResourceType, obj: Any, namespace: str | None, take: bool = False) -> JSON:
        """Deep-copied ``obj`` (``take``: ``obj`` itself) with kind/apiVersion/namespace checked and filled in."""
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
            raise _bad_request("the request body must be a JSON object with an object 'metadata'")
        if not take:
            obj = copy.deepcopy(obj)
        if obj.get("kind", res.kind) != res.kind or obj.get("apiVersion", res.api_version) != res.api_version:
            raise _bad_request(f"the object ({obj.get('apiVersion')}, Kind={obj.get('kind')}) does not match "
                               f"the expected {res.api_version}, Kind={res.kind}")
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            body_ns = meta.get("namespace")
            if namespace and body_ns and body_ns != namespace:
                raise _bad_request("the namespace of the provided object does not match the namespace sent "
                                   "on the request")
            meta["namespace"] = body_ns or namespace or "default"
        else:
            meta.pop("namespace", None)
        return obj

    def _create_locked(self, res: ResourceType, body: Any, namespace: str | None, take: bool = False) -> JSON:
        obj = self._normalize_locked(res, body, namespace, take)
        meta = obj["metadata"]
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise FakeApiError(422, "Invalid", f'{res.kind} "" is invalid: metadata.name: Required value: '
                                   "name or generateName is required", _details(res, ""))
            meta["name"] = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
        key = _key(obj)
        if key in self._objects[res.plural]:
            raise FakeApiError(409, "AlreadyExists", f'{res.qualified} "{meta["name"]}" already exists',
                               _details(res, meta["name"]))
        self._rv += 1
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=str(self._rv))
        self._objects[res.plural][key] = obj
        self._sorted[res.plural] = None
        self._record_locked(res, "ADDED", obj, None)
        return obj

    def _update_locked(self, res: ResourceType, body: Any, namespace: str | None, name: str | None,
                       subresource: str | None = None, keep_status: bool = True) -> JSON:
        new = self._normalize_locked(res, body, namespace)
        meta = new["metadata"]
        if name is not None and meta.get("name") != name:
            raise _bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the "
                               f"URL ({name})")
        if not meta.get("name"):
            raise FakeApiError(422, "Invalid", f'{res.kind} "" is invalid: metadata.name: Required value')
        key = _key(new)
        old = self._objects[res.plural].get(key)
        if old is None:
            raise _not_found(res, key[1])
        old_meta = old["metadata"]
        if meta.get("resourceVersion") and meta["resourceVersion"] != old_meta["resourceVersion"]:
            raise _conflict(res, key[1], "the object has been modified; please apply your changes to the "
                                         "latest version and try again")
        if subresource == "status":  # only status changes
            status, new = new.get("status"), copy.deepcopy(old)
            new.pop("status", None)
            if status is not None:
                new["status"] = status
        elif keep_status and res.has_status:  # main resource: status changes are ignored
            new.pop("status", None)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        meta = new["metadata"]
        meta.update(uid=old_meta["uid"], creationTimestamp=old_meta["creationTimestamp"],
                    resourceVersion=old_meta["resourceVersion"])
        if new == old:  # no-op update: no new resourceVersion, no event
            return old
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._objects[res.plural][key] = new
        self._record_locked(res, "MODIFIED", new, old)
        return new

    def _patch_locked(self, res: ResourceType, namespace: str | None, name: str, patch: Any,
                      content_type: str, subresource: str | None, keep_status: bool = True) -> JSON:
        key = self._obj_key(res, namespace, name)
        old = self._objects[res.plural].get(key)
        if old is None:
            raise _not_found(res, name)
        if content_type == _JSON_PATCH_TYPE:
            if not isinstance(patch, list):
                raise _bad_request("a JSON patch must be a list of operations")
            try:
                patched = json_patch(old, patch)
            except (KeyError, IndexError, ValueError, TypeError) as exc:
                raise FakeApiError(422, "Invalid", f"JSON patch failed: {exc!r}") from exc
        elif content_type in _MERGE_PATCH_TYPES:
            if not isinstance(patch, dict):
                raise _bad_request("a merge patch must be a JSON object")
            patched = merge_patch(old, patch)
        else:
            raise FakeApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media types "
                               f"include: {_JSON_PATCH_TYPE}, {', '.join(sorted(_MERGE_PATCH_TYPES))}")
        if not isinstance(patched, dict):
            raise _bad_request("the patch did not produce an object")
        patched_meta = patched.setdefault("metadata", {})
        if patched_meta.get("name") != name or (res.namespaced and patched_meta.get("namespace") != key[0]):
            raise _bad_request("a patch cannot change the name or namespace of an object")
        return self._update_locked(res, patched, key[0] or None, name, subresource, keep_status)

    def _delete_locked(self, res: ResourceType, namespace: str | None, name: str,
                       preconditions: JSON | None) -> JSON:
        key = self._obj_key(res, namespace, name)
        old = self._objects[res.plural].get(key)
        if old is None:
            raise _not_found(res, name)
        for field_, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = (preconditions or {}).get(field_)
            if wanted and wanted != old["metadata"].get(field_):
                raise _conflict(res, name, f"Precondition failed: {label} in precondition: {wanted}, "
                                           f"{label} in object meta: {old['metadata'].get(field_)}")
        del self._objects[res.plural][key]
        self._sorted[res.plural] = None
        self._encoded[res.plural].pop(key, None)
        self._rv += 1
        final = dict(old, metadata=dict(old["metadata"], resourceVersion=str(self._rv)))
        self._record_locked(res, "DELETED", final, old)
        return final

    def _snapshot_locked(self, res: ResourceType, rv: int) -> dict[Key, JSON]:
        """The objects of ``res`` as they were at ``rv`` (rolled back through the history)."""
        if rv < self._floor:
            raise _expired("The provided continue parameter is too old to display a consistent list result. "
                           "You can start a new list without the continue parameter.")
        state = dict(self._objects[res.plural])
        for event in reversed(self._history):
            if event.rv <= rv:
                break
            if event.res is res:
                if event.prev is None:
                    state.pop(_key(event.obj), None)
                else:
                    state[_key(event.prev)] = event.prev
        return state

    def warm(self) -> None:
        """Encode every stored object for lists now (a benchmark's first list then costs what later ones do)."""
        with self._cond:
            for res in RESOURCES:
                self._sorted_keys_locked(res)
                for key, obj in self._objects[res.plural].items():
                    self._item_locked(res, key, obj)

    def _sorted_keys_locked(self, res: ResourceType) -> list[Key]:
        keys = self._sorted[res.plural]
        if keys is None:
            keys = self._sorted[res.plural] = sorted(self._objects[res.plural])
        return keys

    def _item_locked(self, res: ResourceType, key: Key, obj: JSON) -> bytes:
        """The list-item JSON of a stored object (or of an older version of it, from a snapshot)."""
        cached = self._encoded[res.plural].get(key)
        if cached is not None and cached[0] is obj:
            return cached[1]
        data = json.dumps(_strip_type(obj), separators=(",", ":")).encode()
        if self._objects[res.plural].get(key) is obj:
            self._encoded[res.plural][key] = (obj, data)
        return data

    def _list_locked(self, flt: _Filter, limit: int, continue_token: str, rv_param: str | None = None) -> _EncodedList:
        res = flt.res
        if continue_token:
            try:
                token = json.loads(base64.urlsafe_b64decode(continue_token.encode()))
                list_rv, after = int(token["rv"]), tuple(token["start"])
            except (ValueError, KeyError, TypeError) as exc:
                raise _bad_request(f"continue key is not valid: {exc}") from exc
            if list_rv < self._floor or list_rv < self._changed[res.plural]:  # changed since: roll back (or 410)
                state = self._snapshot_locked(res, list_rv)
                keys = sorted(state)
            else:
                state, keys = self._objects[res.plural], self._sorted_keys_locked(res)
        else:
            list_rv, after = self._rv, ("", "")
            state, keys = self._objects[res.plural], self._sorted_keys_locked(res)
            if rv_param == "0":  # the real server answers from its watch cache, whole: limit does not apply
                limit = 0
        start = bisect.bisect_right(keys, after) if continue_token else 0
        end = len(keys)
        if flt.namespace is not None:  # a namespace's keys are one range
            start = max(start, bisect.bisect_left(keys, (flt.namespace, "")))
            end = bisect.bisect_left(keys, (flt.namespace + "\0", ""))
        unselected = not flt.labels.requirements and not flt.fields.terms
        items: list[bytes] = []
        position = start
        while position < end and not (limit and len(items) >= limit):
            obj = state[keys[position]]
            if unselected or flt.matches(obj):
                items.append(self._item_locked(res, keys[position], obj))
            position += 1
        metadata: JSON = {"resourceVersion": str(list_rv)}
        if limit and len(items) >= limit and any(unselected or flt.matches(state[keys[p]]) for p in range(position, end)):
            token = json.dumps({"rv": list_rv, "start": list(keys[position - 1])}).encode()
            metadata["continue"] = base64.urlsafe_b64encode(token).decode()
            if unselected:  # the real server counts only lists without label or field selectors
                metadata["remainingItemCount"] = end - position
        head = json.dumps({"kind": res.list_kind, "apiVersion": res.api_version, "metadata": metadata},
                          separators=(",", ":")).encode()
        writes = [head[:-1] + b',"items":[']  # (the real encoder writes the head in pieces too small to matter)
        for i, item in enumerate(items):
            if i:
                writes.append(b",")
            writes.append(item)
        writes += [b"]", b"}\n"]
        return _EncodedList(writes)

    def _open_watch_locked(self, stream: _WatchStream, rv_param: str | None) -> list[JSON]:
        """Initial events for a new watch; registers ``stream`` for live events unless it must end."""
        res = stream.filter.res
        self._watch_count[res.plural] += 1
        self._cond.notify_all()
        if rv_param not in (None, "", "0"):
            try:
                since = int(rv_param)  # type: ignore[arg-type]
            except ValueError:
                raise FakeApiError(400, "BadRequest", f"resourceVersion: Invalid value: {rv_param!r}") from None
        forced = next((i for i, r in enumerate(self._force_410) if r is None or r is res), None)
        if forced is not None:
            del self._force_410[forced]
            return [self._too_old_event(int(rv_param or 0))]
        if rv_param in (None, "", "0"):
            initial = [{"type": "ADDED", "object": o} for _, o in sorted(self._objects[res.plural].items())
                       if stream.filter.matches(o)]
        elif since < self._floor:
            return [self._too_old_event(since)]
        else:
            initial = [e for e in (ev.translate(stream.filter) for ev in self._history if ev.rv > since) if e]
        self._streams.add(stream)
        self._cond.notify_all()
        return initial

    def _too_old_event(self, rv: int) -> JSON:
        message = f"too old resource version: {rv} ({self._floor + 1})"
        return {"type": "ERROR", "object": _expired(message).status}

    def _discovery(self, path: str) -> JSON | None:
        """Discovery documents (``/api``, ``/apis``, ``/api/v1``, ...), or None."""
        groups = sorted({r.group for r in RESOURCES if r.group})
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self._port}"}]}
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [self._discovery(f"/apis/{g}")
                                                                          for g in groups]}
        for group in groups:
            if path == f"/apis/{group}":
                gv = {"groupVersion": f"{group}/v1", "version": "v1"}
                return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv],
                        "preferredVersion": gv}
        for prefix in sorted({r.prefix for r in RESOURCES}):
            if path == prefix:
                members = [r for r in RESOURCES if r.prefix == prefix]
                resources = []
                for r in members:
                    resources.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced,
                                      "kind": r.kind, "verbs": ["create", "delete", "get", "list", "patch",
                                                                "update", "watch"]})
                    if r.has_status:
                        resources.append({"name": f"{r.plural}/status", "singularName": "",
                                          "namespaced": r.namespaced, "kind": r.kind,
                                          "verbs": ["get", "patch", "update"]})
                return {"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": members[0].api_version, "resources": resources}
        return None


# --------------------------------------------------------------------------- HTTP layer


@dataclass(frozen=True)
class _Route:
    res: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


def _route(path: str) -> _Route | None:
    parts = [p for p in path.split("/") if p]
    for res in RESOURCES:
        prefix = res.prefix.strip("/").split("/")
        if parts[:len(prefix)] != prefix:
            continue
        rest = parts[len(prefix):]
        if res.namespaced and len(rest) >= 3 and rest[0] == "namespaces" and rest[2] == res.plural:
            namespace, tail = rest[1], rest[3:]
        elif rest and rest[0] == res.plural:
            namespace, tail = None, rest[1:]
            if tail and res.namespaced:
                continue  # /api/v1/services/foo does not exist
        else:
            continue
        if len(tail) > 2 or (len(tail) == 2 and not (tail[1] == "status" and res.has_status)):
            continue
        return _Route(res, namespace, tail[0] if tail else None, tail[1] if len(tail) == 2 else None)
    return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], api: FakeKubeAPI) -> None:
        self.api = api
        self.stopping = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # skip HTTPServer's reverse DNS lookup (getfqdn)
        self.server_name, self.server_port = self.server_address[:2]

    def accept_loop(self) -> None:
        """Accept until stop() shuts the listening socket down (no polling)."""
        while not self.stopping:
            try:
                request, address = self.get_request()
            except OSError:
                if self.stopping:
                    break
                logger.exception("fake API server: accept failed")
                continue
            try:
                self.process_request(request, address)
            except Exception:
                self.handle_error(request, address)
                self.shutdown_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.api._cond:
            if self.stopping:
                request.close()
                return
            self.api._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with self.api._cond:
            self.api._conns.discard(request)
            self.api._cond.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("fake API server: error on connection from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ----------------------------------------------------------------- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send_json(self, code: int, obj: JSON | bytes | _EncodedList) -> None:
        if isinstance(obj, _EncodedList) and sum(map(len, obj.writes)) <= _GO_BUFFER_BEFORE_CHUNKING:
            obj = obj.body()  # all of it still in the buffer when the handler returns: Go counts it
        if isinstance(obj, _EncodedList):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for block in obj.chunked():
                self.wfile.write(block)
            return
        data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _write_chunk(self, obj: JSON) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(_chunk(data))

    def _handle(self, method: str) -> None:
        api = self.server.api
        try:
            raw = self._read_body()
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            route = _route(url.path)
            is_watch = query.get("watch") in _TRUE
            if route and method == "GET" and not is_watch and route.name is None:
                with api._cond:
                    api._list_count[route.res.plural] += 1
            with api._cond:
                failing = api._failing
            if failing:
                if route and is_watch and method == "GET":
                    with api._cond:
                        api._watch_count[route.res.plural] += 1
                raise FakeApiError(500, "InternalError", "Internal error occurred: injected failure "
                                   "(FakeKubeAPI.set_failing)", {"causes": [{"message": "injected failure"}]})
            if route is None or route.res.kind in api.unserved:
                self._non_resource(method, url.path)
                return
            body = self._parse_body(raw) if raw else None
            self._resource(method, route, query, body)
        except FakeApiError as err:
            self._send_json(err.code, err.status)
        except OSError:
            self.close_connection = True
        except Exception as exc:  # a bug in the fake: report it like the real server would
            logger.exception("fake API server: internal error handling %s %s", method, self.path)
            self._send_json(500, FakeApiError(500, "InternalError", f"Internal error occurred: {exc!r}").status)

    def _parse_body(self, raw: bytes) -> Any:
        try:
            if "yaml" in self.headers.get("Content-Type", ""):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise _bad_request(f"the request body could not be decoded: {exc}") from exc

    def _non_resource(self, method: str, path: str) -> None:
        path = path.rstrip("/") or "/"
        if method == "GET" and path == "/version":
            self._send_json(200, VERSION_INFO)
        elif method == "GET" and path in ("/healthz", "/livez", "/readyz"):
            data = b"ok"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif method == "GET" and (doc := self.server.api._discovery(path)) is not None:
            self._send_json(200, doc)
        else:
            raise FakeApiError(404, "NotFound", "the server could not find the requested resource",
                               {"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]})

    # ----------------------------------------------------------------- resources

    def _filter(self, route: _Route, query: dict[str, str]) -> _Filter:
        try:
            fields = FieldSelector(query.get("fieldSelector", ""))
            labels = LabelSelector(query.get("labelSelector", ""))
        except ValueError as exc:
            raise _bad_request(str(exc)) from exc
        if route.name is not None:  # deprecated watch on a single object
            fields.terms.append(("metadata.name", True, route.name))
        return _Filter(route.res, route.namespace, labels, fields)

    def _resource(self, method: str, route: _Route, query: dict[str, str], body: Any) -> None:
        if method == "GET" and query.get("watch") in _TRUE and not route.subresource:
            self._watch(route, query)
            return
        api = self.server.api
        with api._cond:  # compute under the lock, write to the socket outside it
            code, result = self._rest_locked(method, route, query, body)
        self._send_json(code, result)

    def _rest_locked(self, method: str, route: _Route, query: dict[str, str], body: Any) -> tuple[int, JSON | _EncodedList]:
        api, res, name = self.server.api, route.res, route.name
        if name is None and method == "GET":
            try:
                limit = int(query.get("limit") or 0)
            except ValueError:
                raise _bad_request(f"limit: Invalid value: {query['limit']!r}") from None
            return 200, api._list_locked(self._filter(route, query), limit, query.get("continue", ""),
                                         query.get("resourceVersion"))
        if name is None and method == "POST" and (route.namespace is not None or not res.namespaced):
            return 201, api._create_locked(res, body, route.namespace)
        if name is not None and method == "GET":
            obj = api._objects[res.plural].get(api._obj_key(res, route.namespace, name))
            if obj is None:
                raise _not_found(res, name)
            return 200, obj
        if name is not None and method == "PUT":
            return 200, api._update_locked(res, body, route.namespace, name, route.subresource)
        if name is not None and method == "PATCH":
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
            return 200, api._patch_locked(res, route.namespace, name, body, content_type, route.subresource)
        if name is not None and method == "DELETE" and not route.subresource:
            preconditions = body.get("preconditions") if isinstance(body, dict) else None
            final = api._delete_locked(res, route.namespace, name, preconditions)
            if res is SERVICES:  # the real server returns the object for Services, a Status otherwise
                return 200, final
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": dict(_details(res, name), uid=final["metadata"]["uid"])}
        raise FakeApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _watch(self, route: _Route, query: dict[str, str]) -> None:
        api = self.server.api
        stream = _WatchStream(self._filter(route, query), self.connection)
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        except ValueError:
            raise _bad_request(f"timeoutSeconds: Invalid value: {query['timeoutSeconds']!r}") from None
        bookmarks = query.get("allowWatchBookmarks") in _TRUE
        with api._cond:
            initial = api._open_watch_locked(stream, query.get("resourceVersion"))
            registered = stream in api._streams
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if registered:
                with api._cond:  # the headers are out: from now on it counts as an open watch
                    stream.ready = True
                    api._cond.notify_all()
            for event in initial:
                self._write_chunk(event)
            if registered:
                if not self._stream(stream, timeout, bookmarks):
                    self.close_connection = True  # dropped: no terminating chunk
                    return
            with api._cond:  # unregister before the client can see the end of the stream
                api._streams.discard(stream)
                api._cond.notify_all()
            self.wfile.write(_LAST_CHUNK)
        except OSError:
            self.close_connection = True
        finally:
            with api._cond:
                api._streams.discard(stream)
                api._cond.notify_all()

    def _stream(self, stream: _WatchStream, timeout: float | None, bookmarks: bool) -> bool:
        """Send live events until the timeout (True) or until the stream is dropped (False)."""
        api, res = self.server.api, stream.filter.res
        deadline = time.monotonic() + timeout if timeout is not None else None
        interval = api.bookmark_interval
        next_bookmark = time.monotonic() + interval if bookmarks else None
        while True:
            events: list[JSON] = []
            with api._cond:
                while True:
                    if stream.dropped or _peer_closed(stream.conn):
                        return False
                    while stream.queue:
                        if event := stream.queue.popleft().translate(stream.filter):
                            events.append(event)
                    if events:
                        break
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        return True
                    if next_bookmark is not None and now >= next_bookmark:
                        events.append({"type": "BOOKMARK", "object": {
                            "kind": res.kind, "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(api._rv)}}})
                        next_bookmark = now + interval
                        break
                    waits = [t - now for t in (deadline, next_bookmark) if t is not None]
                    api._cond.wait(min(waits) if waits else None)
            for event in events:
                self._write_chunk(event)


# --------------------------------------------------------------------------- pytest glue


def client_config(server: FakeKubeAPI) -> kubernetes.client.Configuration:
    """A client Configuration pointing at ``server`` (ignoring any proxy in the environment)."""
    config = kubernetes.client.Configuration(host=server.url)
    config.proxy = None
    return config


@pytest.fixture
def fake_api() -> Iterator[FakeKubeAPI]:
    """A running :class:`FakeKubeAPI`, stopped after the test."""
    server = FakeKubeAPI().start()
    try:
        yield server
    finally:
        server.stop()
