"""The API server edge: list, then watch, Services, EndpointSlices, this Node and the ServiceCIDRs.

Each resource has its own thread running the list/watch protocol through the
official ``kubernetes`` client:

* list, as client-go's informers do: ``resourceVersion=0``, served from the
  API server's watch cache in one response (pages, if the server cuts it
  anyway), decoded one item at a time as the body arrives (``liststream``)
  and handed to the proxier as an iterator, which converts each item and
  drops it; the proxier applies the list once it has all of it (objects
  missing from it are deleted); then watch from the list's resourceVersion
  with bookmarks;
* ADDED / MODIFIED / DELETED go to the proxier; BOOKMARK only moves the
  resourceVersion; unknown event types are logged and skipped;
* an ERROR event with code 410 (or a 410 response) means the version expired:
  list again at once;
* a dropped connection, a server error or a timeout reconnects the watch from
  the last resourceVersion after a capped, jittered backoff; repeated failure
  to watch falls back to a fresh list.

Services are filtered on the server with label selectors, as upstream does:
headless Services and those another proxy owns never reach kproxy.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kproxy.cluster.liststream import ListStream
from kproxy.cluster.rbac import LIST_WATCH, access_for_kind

log = logging.getLogger(__name__)

SERVICE_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
LIST_PAGE = 500
OPTIONAL_RETRY = 300.0
"""Seconds between attempts to list a resource the API server does not serve (or RBAC does not allow)."""


class Expired(Exception):
    """The resourceVersion is too old (410 Gone): list again."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter."""

    initial: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap, self.initial * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    """Service, EndpointSlice or Node."""
    list_call: Callable[..., Any]
    """The client's list function for all namespaces (or nodes)."""
    label_selector: str | None = None
    field_selector: str | None = None
    optional: bool = False
    """Older API servers do not serve it (404), or the RBAC may predate it (403): then it lists as
    empty, is logged once, and is listed again every ``OPTIONAL_RETRY`` seconds."""


def api_resources(api_client: Any, node_name: str) -> list[Resource]:
    """The three resources kproxy watches, bound to one ApiClient."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    discovery = client.DiscoveryV1Api(api_client)
    networking = client.NetworkingV1Api(api_client)
    resources = [
        Resource("Service", core.list_service_for_all_namespaces, label_selector=SERVICE_SELECTOR),
        Resource("EndpointSlice", discovery.list_endpoint_slice_for_all_namespaces),
        Resource("Node", core.list_node, field_selector=f"metadata.name={node_name}"),
        Resource("ServiceCIDR", networking.list_service_cidr, optional=True),
    ]
    for resource in resources:
        # Every call here lists and then watches: kproxy/rbac.py (and so the
        # ClusterRole in daemonset.yaml) must grant both.
        granted = access_for_kind(resource.kind).verbs
        assert set(LIST_WATCH) <= set(granted), f"kproxy/rbac.py must grant list and watch on {resource.kind}"
    return resources


class Watcher(threading.Thread):
    """List and watch one resource forever (until ``stop`` is set)."""

    def __init__(
        self,
        resource: Resource,
        on_event: Callable[[str, Mapping[str, Any]], None],
        on_relist: Callable[[str, Iterable[Mapping[str, Any]]], None],
        stop: threading.Event,
        backoff: Backoff = Backoff(),
        watch_timeout: int = 300,
        on_restart: Callable[[str, str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name=f"kproxy-watch-{resource.kind}", daemon=True)
        self.resource = resource
        self.on_event = on_event
        self.on_relist = on_relist
        self.stop_event = stop
        self.backoff = backoff
        self.watch_timeout = watch_timeout
        self.on_restart = on_restart or (lambda kind, reason: None)
        self.rng = rng or random.Random()
        self.resource_version: str | None = None
        self.listed = 0
        """How many objects the last list had."""
        self._response: Any = None
        self._reported_unavailable = False

    def _selectors(self) -> dict[str, str]:
        kwargs = {}
        if self.resource.label_selector:
            kwargs["label_selector"] = self.resource.label_selector
        if self.resource.field_selector:
            kwargs["field_selector"] = self.resource.field_selector
        return kwargs

    def list_items(self) -> Iterator[Mapping[str, Any]]:
        """Every object of the resource, one at a time as the response arrives.

        When it is exhausted, ``resource_version`` is the list's and
        ``listed`` the number of objects. The first request asks for
        ``resourceVersion=0`` (the watch cache, no paging); a server that
        pages anyway gets its pages asked for with the ``continue`` token.
        """
        token: str | None = None
        count = 0
        while True:
            kwargs: dict[str, Any] = dict(self._selectors(), _preload_content=False, _request_timeout=(10, 60))
            if token:
                kwargs.update(_continue=token, limit=LIST_PAGE)
            else:
                kwargs["resource_version"] = "0"
            response = self.resource.list_call(**kwargs)
            try:
                stream = ListStream(response.stream(65536, decode_content=True))
                for item in stream.items():
                    count += 1
                    yield item
            finally:
                response.release_conn()
            token = stream.metadata.get("continue")
            if not token:
                self.resource_version = stream.metadata.get("resourceVersion", "")
                self.listed = count
                return

    def list_all(self) -> tuple[list[Mapping[str, Any]], str]:
        """Every object of the resource, and the list's resourceVersion (for one-off reads: ``explain``)."""
        items = list(self.list_items())
        return items, self.resource_version or ""

    def _stream(self) -> Iterator[dict[str, Any]]:
        response = self.resource.list_call(
            **self._selectors(),
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self.resource_version,
            timeout_seconds=self.watch_timeout,
            _preload_content=False,
            _request_timeout=(10, self.watch_timeout + 30),
        )
        self._response = response
        buffer = b""
        try:
            for chunk in response.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buffer.strip():
                yield json.loads(buffer)
        finally:
            self._response = None
            response.release_conn()

    def _watch(self) -> None:
        """Consume one watch stream; returns when the server ends it."""
        for event in self._stream():
            if self.stop_event.is_set():
                return
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.on_event(kind, obj)
                self.resource_version = (obj.get("metadata") or {}).get("resourceVersion", self.resource_version)
            elif kind == "BOOKMARK":
                self.resource_version = (obj.get("metadata") or {}).get("resourceVersion", self.resource_version)
            elif kind == "ERROR":
                if obj.get("code") == 410:
                    raise Expired(obj.get("message", "expired"))
                raise RuntimeError(f"watch error: {obj.get('message', obj)}")
            else:
                log.warning("%s watch: skipping unknown event type %r", self.resource.kind, kind)

    def _sleep(self, attempt: int) -> None:
        self.stop_event.wait(self.backoff.delay(attempt, self.rng))

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        need_list = True
        failures = 0
        while not self.stop_event.is_set():
            try:
                if need_list:
                    self.on_relist(self.resource.kind, self.list_items())
                    need_list = False
                    log.info("listed %d %s objects at resourceVersion %s", self.listed, self.resource.kind,
                             self.resource_version)
                self._watch()
                failures = 0
                self.on_restart(self.resource.kind, "timeout")
            except Expired as exc:
                log.info("%s watch expired (%s): listing again", self.resource.kind, exc)
                self.on_restart(self.resource.kind, "expired")
                need_list = True
            except ApiException as exc:
                failures += 1
                if exc.status == 410:
                    need_list = True
                    self.on_restart(self.resource.kind, "expired")
                    continue
                if self.resource.optional and exc.status in (403, 404) and need_list:
                    self._unavailable(exc.status)
                    continue
                log.warning("%s: API server answered %s %s; retrying", self.resource.kind, exc.status, exc.reason)
                self.on_restart(self.resource.kind, "error")
                need_list = need_list or failures >= 5
                self._sleep(failures)
            except Exception as exc:  # dropped connections, timeouts, refused connects
                if self.stop_event.is_set():
                    return
                failures += 1
                log.warning("%s watch interrupted (%s: %s); reconnecting", self.resource.kind, type(exc).__name__, exc)
                self.on_restart(self.resource.kind, "connection")
                need_list = need_list or failures >= 5
                self._sleep(failures)

    def _unavailable(self, status: int) -> None:
        """An optional resource the API server does not serve (404) or RBAC does not allow (403)."""
        if not self._reported_unavailable:
            why = "the API server does not serve it" if status == 404 else "RBAC does not allow listing it"
            log.warning("%s: %s (%d); going on without it, trying again every %.0f s", self.resource.kind, why,
                        status, OPTIONAL_RETRY)
            self._reported_unavailable = True
        self.on_relist(self.resource.kind, [])
        self.stop_event.wait(OPTIONAL_RETRY)

    def interrupt(self) -> None:
        """Close the current watch connection (used at shutdown)."""
        response = self._response
        if response is not None:
            try:
                response.shutdown() if hasattr(response, "shutdown") else response.close()
            except Exception as exc:  # pragma: no cover - best effort at shutdown
                log.debug("closing the watch connection: %s", exc)
