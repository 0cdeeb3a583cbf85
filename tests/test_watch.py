"""The watcher's list: one request from the watch cache, items streamed to the proxier, pages if the server cuts them."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import kubernetes

from kproxy.cluster.watch import Resource, Watcher, api_resources
from tests.harness.builders import service
from tests.harness.fakeapi import FakeKubeAPI, client_config


def _services(api: FakeKubeAPI, count: int) -> None:
    for i in range(count):
        api.create(service(f"s{i}", cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}"))


def _service_resource(fake_api: FakeKubeAPI) -> Resource:
    client = kubernetes.client.ApiClient(client_config(fake_api))
    return next(r for r in api_resources(client, "node-a") if r.kind == "Service")


def _recording(resource: Resource, calls: list[dict[str, Any]], page: int | None = None) -> Resource:
    """The same resource, recording each list call's arguments (and, with ``page``, a server that pages anyway)."""

    def list_call(**kwargs: Any) -> Any:
        calls.append(kwargs)
        if page is not None and not kwargs.get("watch"):
            kwargs = {k: v for k, v in kwargs.items() if k != "resource_version"}
            kwargs["limit"] = page
        return resource.list_call(**kwargs)

    return Resource(resource.kind, list_call, resource.label_selector, resource.field_selector, resource.optional)


def test_one_request_from_the_watch_cache_streamed_to_the_proxier(fake_api: FakeKubeAPI) -> None:
    """resourceVersion=0, no paging; the proxier gets an iterator whose first item comes before the list is complete."""
    _services(fake_api, 30)
    calls: list[dict[str, Any]] = []
    seen: list[int] = []

    def on_relist(kind: str, objects: Iterable[Mapping[str, Any]]) -> None:
        assert not isinstance(objects, list), "an iterator over the response, not a list"
        for obj in objects:
            seen.append(watcher.listed)
            assert obj["metadata"]["name"].startswith("s")

    watcher = Watcher(_recording(_service_resource(fake_api), calls), lambda *_: None, on_relist, threading.Event())
    watcher.on_relist("Service", watcher.list_items())
    assert len(seen) == 30 and watcher.listed == 30
    assert [c.get("resource_version") for c in calls] == ["0"] and "limit" not in calls[0]
    assert watcher.resource_version == str(fake_api._rv)


def test_a_server_that_pages_anyway_is_followed(fake_api: FakeKubeAPI) -> None:
    """Pages of 7: every object once, the continue token sent with the page size, the list's resourceVersion kept."""
    _services(fake_api, 30)
    calls: list[dict[str, Any]] = []
    watcher = Watcher(_recording(_service_resource(fake_api), calls, page=7), lambda *_: None, lambda *_: None,
                      threading.Event())
    items, version = watcher.list_all()
    assert sorted(o["metadata"]["name"] for o in items) == sorted(f"s{i}" for i in range(30))
    assert len(calls) == 5 and all(c.get("_continue") and c.get("limit") for c in calls[1:])
    assert version == str(fake_api._rv)
