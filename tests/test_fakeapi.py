"""Tests for the fake Kubernetes API server in tests/harness/fakeapi.py.

Everything goes through the unchanged official ``kubernetes`` client, so these
tests also pin down how that client reacts to the protocol (410, bookmarks,
dropped connections) - behaviour kproxy's informers rely on.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.harness.fakeapi import FakeApiError, FakeKubeAPI, LabelSelector, client_config

NS = "default"
NOT_PROXIED = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"


# --------------------------------------------------------------------------- manifests and helpers


def service(name: str, labels: dict[str, str] | None = None, namespace: str = NS) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}


def endpoint_slice(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "web", **(labels or {})}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}, "nodeName": "node-1"}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def node(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": dict(labels or {})},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}}


MANIFESTS: dict[str, Callable[..., dict[str, Any]]] = {
    "Service": service, "EndpointSlice": endpoint_slice, "Node": node}


@pytest.fixture
def api_client(fake_api: FakeKubeAPI) -> Iterator[client.ApiClient]:
    with client.ApiClient(client_config(fake_api)) as api:
        yield api


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def disco(api_client: client.ApiClient) -> client.DiscoveryV1Api:
    return client.DiscoveryV1Api(api_client)


def take(func: Callable[..., Any], n: int, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The first ``n`` events of a watch (fewer if the stream ends first)."""
    kwargs.setdefault("timeout_seconds", 5)
    events: list[dict[str, Any]] = []
    stream = watch.Watch().stream(func, *args, **kwargs)
    try:
        for event in stream:
            events.append(event)
            if len(events) == n:
                break
    finally:
        stream.close()
    return events


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["raw_object"]["metadata"].get("name", "")) for e in events]


class WatchThread:
    """Consumes ``Watch().stream(func, ...)`` in a thread; events go to a queue, the exception to ``error``."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.watch = watch.Watch()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            for event in self.watch.stream(func, *args, **kwargs):
                self.events.put(event)
        except BaseException as exc:
            self.error = exc

    def next(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.events.get(timeout=timeout)

    def join(self, timeout: float = 5.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "watch thread did not finish"


# --------------------------------------------------------------------------- REST


def test_version_and_discovery(core: client.CoreV1Api, disco: client.DiscoveryV1Api,
                               api_client: client.ApiClient) -> None:
    """/version and the discovery documents deserialize with the official client."""
    assert client.VersionApi(api_client).get_code().git_version == "v1.33.0"
    assert {r.name for r in core.get_api_resources().resources} >= {"services", "nodes"}
    assert [r.name for r in disco.get_api_resources().resources] == ["endpointslices"]
    groups = client.ApisApi(api_client).get_api_versions().groups
    assert [g.name for g in groups] == ["discovery.k8s.io", "networking.k8s.io"]


def crud_ops(kind: str, core: client.CoreV1Api, disco: client.DiscoveryV1Api) -> dict[str, Callable[..., Any]]:
    if kind == "Service":
        return {"create": lambda b: core.create_namespaced_service(NS, b),
                "read": lambda n: core.read_namespaced_service(n, NS),
                "list": lambda: core.list_namespaced_service(NS),
                "replace": lambda n, b: core.replace_namespaced_service(n, NS, b),
                "patch": lambda n, p: core.patch_namespaced_service(n, NS, p),
                "delete": lambda n: core.delete_namespaced_service(n, NS)}
    if kind == "EndpointSlice":
        return {"create": lambda b: disco.create_namespaced_endpoint_slice(NS, b),
                "read": lambda n: disco.read_namespaced_endpoint_slice(n, NS),
                "list": lambda: disco.list_namespaced_endpoint_slice(NS),
                "replace": lambda n, b: disco.replace_namespaced_endpoint_slice(n, NS, b),
                "patch": lambda n, p: disco.patch_namespaced_endpoint_slice(n, NS, p),
                "delete": lambda n: disco.delete_namespaced_endpoint_slice(n, NS)}
    return {"create": core.create_node, "read": core.read_node, "list": core.list_node,
            "replace": core.replace_node, "patch": core.patch_node, "delete": core.delete_node}


@pytest.mark.parametrize("kind", ["Service", "EndpointSlice", "Node"])
def test_crud_through_official_client(kind: str, fake_api: FakeKubeAPI, core: client.CoreV1Api,
                                      disco: client.DiscoveryV1Api) -> None:
    """create/read/list/replace/patch/delete work for each served resource and bump the global rv."""
    ops = crud_ops(kind, core, disco)
    start_rv = fake_api.resource_version()
    created = ops["create"](MANIFESTS[kind]("a"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.resource_version == str(start_rv + 1)
    assert created.metadata.namespace == (None if kind == "Node" else NS)
    with pytest.raises(ApiException) as exc:
        ops["create"](MANIFESTS[kind]("a"))
    assert exc.value.status == 409 and json.loads(exc.value.body)["reason"] == "AlreadyExists"

    assert ops["read"]("a").metadata.uid == created.metadata.uid
    listed = ops["list"]()
    assert [i.metadata.name for i in listed.items] == ["a"]
    assert listed.metadata.resource_version == created.metadata.resource_version

    body = MANIFESTS[kind]("a", labels={"tier": "web"})
    body["metadata"]["resourceVersion"] = created.metadata.resource_version
    replaced = ops["replace"]("a", body)
    assert replaced.metadata.labels == body["metadata"]["labels"]
    assert int(replaced.metadata.resource_version) == start_rv + 2
    assert replaced.metadata.uid == created.metadata.uid
    with pytest.raises(ApiException) as exc:  # stale resourceVersion
        ops["replace"]("a", body)
    assert exc.value.status == 409 and json.loads(exc.value.body)["reason"] == "Conflict"

    patched = ops["patch"]("a", {"metadata": {"labels": {"patched": "yes"}}})
    assert patched.metadata.labels == {**body["metadata"]["labels"], "patched": "yes"}
    assert int(patched.metadata.resource_version) == start_rv + 3

    ops["delete"]("a")
    assert fake_api.resource_version() == start_rv + 4
    with pytest.raises(ApiException) as exc:
        ops["read"]("a")
    assert exc.value.status == 404
    with pytest.raises(ApiException) as exc:
        ops["delete"]("a")
    assert exc.value.status == 404


def test_errors_are_status_objects(core: client.CoreV1Api) -> None:
    """Failures carry a kind: Status body like the real API server's."""
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_service("nope", NS)
    assert json.loads(exc.value.body) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'services "nope" not found', "reason": "NotFound", "code": 404,
        "details": {"name": "nope", "kind": "services"}}
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_service(NS, label_selector="app in web")
    assert exc.value.status == 400 and json.loads(exc.value.body)["reason"] == "BadRequest"


def test_status_subresource(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """Main-resource writes keep the stored status; /status writes change only status."""
    fake_api.create(service("a"))
    lb = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
    updated = core.patch_namespaced_service_status("a", NS, {"status": lb, "metadata": {"labels": {"x": "y"}}})
    assert updated.status.load_balancer.ingress[0].ip == "203.0.113.7"
    assert fake_api.get("Service", NS, "a")["metadata"]["labels"] == {}
    core.patch_namespaced_service("a", NS, {"status": None, "spec": {"externalIPs": ["198.51.100.1"]}})
    stored = fake_api.get("Service", NS, "a")
    assert stored["status"] == lb and stored["spec"]["externalIPs"] == ["198.51.100.1"]


def test_driver_api_semantics(fake_api: FakeKubeAPI) -> None:
    """The in-process API enforces AlreadyExists/NotFound/Conflict and skips no-op updates."""
    a = fake_api.create(service("a"))
    assert a["metadata"]["uid"] and a["metadata"]["creationTimestamp"]
    with pytest.raises(FakeApiError) as err:
        fake_api.create(service("a"))
    assert err.value.code == 409 and err.value.reason == "AlreadyExists"

    changed = fake_api.update(dict(a, spec=dict(a["spec"], sessionAffinity="ClientIP")))
    assert int(changed["metadata"]["resourceVersion"]) == int(a["metadata"]["resourceVersion"]) + 1
    with pytest.raises(FakeApiError) as err:
        fake_api.update(a)  # stale resourceVersion
    assert err.value.code == 409 and err.value.reason == "Conflict"
    rv = fake_api.resource_version()
    assert fake_api.update(changed) == changed and fake_api.resource_version() == rv  # no-op

    assert fake_api.patch("Service", NS, "a", {"metadata": {"labels": {"p": "1"}}})["metadata"]["labels"] == {"p": "1"}
    deleted = fake_api.delete("Service", NS, "a")
    assert deleted["metadata"]["resourceVersion"] == str(fake_api.resource_version())
    assert fake_api.get("Service", NS, "a") is None
    with pytest.raises(FakeApiError) as err:
        fake_api.delete("Service", NS, "a")
    assert err.value.code == 404
    with pytest.raises(FakeApiError) as err:
        fake_api.update(service("a"))
    assert err.value.code == 404
    assert "namespace" not in fake_api.create(node("n1"))["metadata"]
    assert [o["metadata"]["name"] for o in fake_api.create_yaml(
        "kind: Node\napiVersion: v1\nmetadata: {name: n2}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: n3}\n"
    )] == ["n2", "n3"]


def test_namespaces_and_field_selectors_on_lists(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """Namespaced lists, all-namespace lists and metadata.namespace/name field selectors filter correctly."""
    fake_api.create(service("a"))
    fake_api.create(service("b", namespace="other"))
    assert [s.metadata.name for s in core.list_service_for_all_namespaces().items] == ["a", "b"]
    assert [s.metadata.name for s in core.list_namespaced_service("other").items] == ["b"]
    only_other = core.list_service_for_all_namespaces(field_selector="metadata.namespace=other")
    assert [s.metadata.name for s in only_other.items] == ["b"]
    assert core.list_service_for_all_namespaces(field_selector="metadata.name!=a").items[0].metadata.name == "b"
    with pytest.raises(ApiException) as exc:
        core.list_service_for_all_namespaces(field_selector="spec.type=ClusterIP")
    assert exc.value.status == 400


def test_list_pagination_is_a_consistent_snapshot(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """limit/continue pages through the list as of the first page; compaction expires the token (410)."""
    for name in "abcde":
        fake_api.create(service(name))
    page1 = core.list_namespaced_service(NS, limit=2)
    assert [s.metadata.name for s in page1.items] == ["a", "b"]
    assert page1.metadata.remaining_item_count == 3
    fake_api.create(service("zz"))  # after the snapshot: must not show up
    fake_api.delete("Service", NS, "c")  # after the snapshot: must still show up
    page2 = core.list_namespaced_service(NS, limit=2, _continue=page1.metadata._continue)
    assert [s.metadata.name for s in page2.items] == ["c", "d"]
    assert page2.metadata.resource_version == page1.metadata.resource_version
    page3 = core.list_namespaced_service(NS, limit=2, _continue=page2.metadata._continue)
    assert [s.metadata.name for s in page3.items] == ["e"] and page3.metadata._continue is None
    assert fake_api.list_count["services"] == 3

    fake_api.compact()
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_service(NS, limit=2, _continue=page1.metadata._continue)
    assert exc.value.status == 410 and json.loads(exc.value.body)["reason"] == "Expired"


# --------------------------------------------------------------------------- selectors


@pytest.mark.parametrize(("selector", "expected"), [
    ("", True), ("app", True), ("!app", False), ("!missing", True),
    ("app=web", True), ("app==web", True), ("app=db", False), ("app!=web", False), ("missing!=x", True),
    ("app in (web,db)", True), ("app in (db)", False), ("app notin (web, db)", False),
    ("missing notin (a)", True), ("missing in (a)", False),
    ("app=web,tier in (front, back)", True), ("app=web,!tier", False),
])
def test_label_selector_syntax(selector: str, expected: bool) -> None:
    """The label selector parser implements the real API's set- and equality-based syntax."""
    assert LabelSelector(selector).matches({"app": "web", "tier": "front"}) is expected


def test_label_selector_excludes_headless_and_foreign_proxy_services(fake_api: FakeKubeAPI,
                                                                     core: client.CoreV1Api) -> None:
    """kproxy's selector skips labelled Services in lists and watches, with transitions as ADDED/DELETED."""
    fake_api.create(service("plain"))
    fake_api.create(service("headless", labels={"service.kubernetes.io/headless": ""}))
    fake_api.create(service("foreign", labels={"service.kubernetes.io/service-proxy-name": "other-proxy"}))
    listed = core.list_namespaced_service(NS, label_selector=NOT_PROXIED)
    assert [s.metadata.name for s in listed.items] == ["plain"]
    initial = take(core.list_namespaced_service, 1, NS, label_selector=NOT_PROXIED, resource_version="0")
    assert summary(initial) == [("ADDED", "plain")]

    w = WatchThread(core.list_namespaced_service, NS, label_selector=NOT_PROXIED,
                    resource_version=listed.metadata.resource_version)
    assert fake_api.wait_for_watchers("services", 1)
    fake_api.patch("Service", NS, "foreign", {"metadata": {"annotations": {"x": "y"}}})  # invisible
    fake_api.patch("Service", NS, "plain", {"metadata": {"labels": {"service.kubernetes.io/headless": ""}}})
    fake_api.patch("Service", NS, "headless", {"metadata": {"labels": {"service.kubernetes.io/headless": None}}})
    fake_api.patch("Service", NS, "headless", {"metadata": {"annotations": {"x": "y"}}})
    fake_api.delete("Service", NS, "plain")  # already invisible
    assert summary([w.next() for _ in range(3)]) == [
        ("DELETED", "plain"), ("ADDED", "headless"), ("MODIFIED", "headless")]
    assert w.events.empty()
    w.watch.stop()


def test_field_selector_watches_a_single_node(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """fieldSelector=metadata.name=X limits a node list and watch to that node."""
    start = str(fake_api.resource_version())
    fake_api.create(node("node-1"))
    fake_api.create(node("node-2"))
    fake_api.patch("Node", None, "node-2", {"metadata": {"labels": {"zone": "b"}}})
    fake_api.patch("Node", None, "node-1", {"metadata": {"labels": {"zone": "a"}}})
    listed = core.list_node(field_selector="metadata.name=node-1")
    assert [n.metadata.name for n in listed.items] == ["node-1"]
    events = take(core.list_node, 2, field_selector="metadata.name=node-1", resource_version=start)
    assert summary(events) == [("ADDED", "node-1"), ("MODIFIED", "node-1")]
    assert events[1]["object"].metadata.labels == {"zone": "a"}


# --------------------------------------------------------------------------- watch protocol


def test_watch_from_list_resource_version_sees_live_changes_in_order(fake_api: FakeKubeAPI,
                                                                     core: client.CoreV1Api) -> None:
    """list, then watch from the list's rv: later ADDED/MODIFIED/DELETED arrive in order with their rvs."""
    fake_api.create(service("a"))
    listed = core.list_namespaced_service(NS)
    w = WatchThread(core.list_namespaced_service, NS, resource_version=listed.metadata.resource_version)
    assert fake_api.wait_for_watchers("services", 1)
    b = fake_api.create(service("b"))
    a = fake_api.patch("Service", NS, "a", {"spec": {"sessionAffinity": "ClientIP"}})
    fake_api.create(endpoint_slice("other-kind"))  # a different resource: not on this watch
    gone = fake_api.delete("Service", NS, "b")
    events = [w.next() for _ in range(3)]
    assert summary(events) == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert [e["object"].metadata.resource_version for e in events] == [
        o["metadata"]["resourceVersion"] for o in (b, a, gone)]
    assert isinstance(events[1]["object"], client.V1Service)
    assert events[1]["object"].spec.session_affinity == "ClientIP"
    assert w.watch.resource_version == gone["metadata"]["resourceVersion"]
    w.watch.stop()


def test_watch_replays_history_after_its_resource_version(fake_api: FakeKubeAPI, disco: client.DiscoveryV1Api) -> None:
    """A watch from an old rv replays every later change (also for EndpointSlices)."""
    start = str(fake_api.resource_version())
    fake_api.create(endpoint_slice("web-1"))
    fake_api.patch("EndpointSlice", NS, "web-1", {"endpoints": []})
    fake_api.create(endpoint_slice("web-2"))
    fake_api.delete("EndpointSlice", NS, "web-1")
    events = take(disco.list_namespaced_endpoint_slice, 4, NS, resource_version=start)
    assert summary(events) == [("ADDED", "web-1"), ("MODIFIED", "web-1"), ("ADDED", "web-2"), ("DELETED", "web-1")]
    assert isinstance(events[0]["object"], client.V1EndpointSlice)


def test_watch_without_resource_version_starts_with_synthetic_added(fake_api: FakeKubeAPI,
                                                                    core: client.CoreV1Api) -> None:
    """A watch without resourceVersion (or "0") first sends ADDED for every existing object."""
    for name in ("b", "a"):
        fake_api.create(service(name))
    fake_api.patch("Service", NS, "a", {"metadata": {"labels": {"v": "2"}}})
    assert summary(take(core.list_namespaced_service, 2, NS)) == [("ADDED", "a"), ("ADDED", "b")]
    assert summary(take(core.list_namespaced_service, 2, NS, resource_version="0")) == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_timeout_seconds_ends_stream_cleanly(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """timeoutSeconds ends the stream with a proper terminating chunk: the client just stops iterating."""
    assert list(watch.Watch().stream(core.list_namespaced_service, NS, timeout_seconds=1)) == []
    assert fake_api.watch_count["services"] == 1 and fake_api.open_watchers("services") == 0


@pytest.mark.parametrize(("func", "kind", "api_version"), [
    ("list_service_for_all_namespaces", "Service", "v1"),
    ("list_endpoint_slice_for_all_namespaces", "EndpointSlice", "discovery.k8s.io/v1"),
])
def test_bookmarks(func: str, kind: str, api_version: str, fake_api: FakeKubeAPI, core: client.CoreV1Api,
                   disco: client.DiscoveryV1Api) -> None:
    """allow_watch_bookmarks=True yields periodic BOOKMARK events whose raw dict carries the current rv."""
    fake_api.bookmark_interval = 0.05
    fake_api.create(service("a"))
    fake_api.create(endpoint_slice("a"))
    rv = str(fake_api.resource_version())
    api_func = getattr(core if kind == "Service" else disco, func)
    w = watch.Watch()
    stream = w.stream(api_func, allow_watch_bookmarks=True, resource_version=rv, timeout_seconds=5)
    try:
        event = next(stream)
    finally:
        stream.close()
    assert event["type"] == "BOOKMARK"
    expected = {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv}}
    assert event["raw_object"] == expected
    assert event["object"] == expected  # the client does not deserialize bookmarks into models
    assert w.resource_version == rv


def test_no_bookmarks_unless_asked(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """Without allow_watch_bookmarks the stream carries only object events."""
    fake_api.bookmark_interval = 0.01
    w = WatchThread(core.list_namespaced_service, NS, resource_version=str(fake_api.resource_version()),
                    timeout_seconds=1)
    assert fake_api.wait_for_watchers("services", 1)
    fake_api.create(service("a"))
    assert summary([w.next()]) == [("ADDED", "a")]
    w.join()
    assert w.events.empty() and w.error is None


# --------------------------------------------------------------------------- 410 Gone


def test_watch_from_compacted_rv_is_an_error_event_in_http_200(fake_api: FakeKubeAPI,
                                                               core: client.CoreV1Api) -> None:
    """On the wire, a too-old rv is an HTTP 200 watch with one ERROR event carrying a 410 Status."""
    old = fake_api.resource_version()
    fake_api.create(service("a"))
    fake_api.compact()
    resp = core.list_namespaced_service(NS, watch=True, resource_version=str(old), _preload_content=False)
    try:
        assert resp.status == 200
        lines = resp.data.decode().splitlines()
    finally:
        resp.release_conn()
    assert [json.loads(line) for line in lines] == [{"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {old} ({old + 2})", "reason": "Expired", "code": 410}}]


def test_compacted_rv_makes_watch_raise_410_after_one_silent_retry(fake_api: FakeKubeAPI,
                                                                   core: client.CoreV1Api) -> None:
    """Watch.stream retries a 410 once from the same rv, then raises ApiException(status=410)."""
    old = fake_api.resource_version()
    fake_api.create(service("a"))
    fake_api.compact()
    with pytest.raises(ApiException) as exc:
        list(watch.Watch().stream(core.list_namespaced_service, NS, resource_version=str(old)))
    assert exc.value.status == 410
    assert exc.value.reason.startswith(f"Expired: too old resource version: {old}")
    assert fake_api.watch_count["services"] == 2


def test_compacted_rv_with_timeout_seconds_raises_410_immediately() -> None:
    """With timeout_seconds the client skips its 410 retry; history_limit compacts like compact() does."""
    with FakeKubeAPI(history_limit=2) as small:
        old = small.resource_version()
        for name in "abc":
            small.create(node(name))
        with client.ApiClient(client_config(small)) as api, pytest.raises(ApiException) as exc:
            list(watch.Watch().stream(client.CoreV1Api(api).list_node, resource_version=str(old),
                                      timeout_seconds=5))
        assert exc.value.status == 410
        assert small.watch_count["nodes"] == 1


def test_forced_410_is_absorbed_by_the_client_retry(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """force_410_on_next_watch: the client's single retry from the same rv succeeds and hides the 410."""
    start = str(fake_api.resource_version())
    fake_api.create(service("a"))
    fake_api.force_410_on_next_watch("services")
    w = watch.Watch()
    stream = w.stream(core.list_namespaced_service, NS, resource_version=start)
    try:
        assert summary([next(stream)]) == [("ADDED", "a")]
    finally:
        stream.close()
    assert fake_api.watch_count["services"] == 2


# --------------------------------------------------------------------------- fault injection


def test_drop_watches_breaks_the_client_stream(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """drop_watches closes the connection mid-stream: Watch.stream raises urllib3 ProtocolError."""
    w = WatchThread(core.list_namespaced_service, NS)
    assert fake_api.wait_for_watchers("services", 1)
    assert fake_api.drop_watches() == 1
    w.join()
    assert isinstance(w.error, urllib3.exceptions.ProtocolError), repr(w.error)
    assert fake_api.open_watchers("services") == 0
    assert fake_api.watch_count["services"] == 1  # no reconnect by the client on a dropped connection


def test_client_side_stop_is_noticed(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """A watch closed by the client no longer counts as an open watcher."""
    fake_api.create(node("node-1"))
    w = WatchThread(core.list_node)
    assert summary([w.next()]) == [("ADDED", "node-1")]  # Watch.stop() needs a response to shut down
    assert fake_api.open_watchers("nodes") == 1
    w.watch.stop()
    w.join()
    assert fake_api.open_watchers("nodes") == 0


def test_set_failing_answers_500(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """set_failing(True) drops open watches and fails every request with 500 until switched off."""
    fake_api.create(service("a"))
    w = WatchThread(core.list_namespaced_service, NS)
    assert fake_api.wait_for_watchers("services", 1)
    fake_api.set_failing(True)
    w.join()
    assert isinstance(w.error, urllib3.exceptions.ProtocolError), repr(w.error)
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_service(NS)
    assert exc.value.status == 500 and json.loads(exc.value.body)["reason"] == "InternalError"
    with pytest.raises(ApiException) as exc:
        take(core.list_namespaced_service, 1, NS)
    assert exc.value.status == 500
    fake_api.set_failing(False)
    assert [s.metadata.name for s in core.list_namespaced_service(NS).items] == ["a"]


def test_stop_start_keeps_state_and_port(fake_api: FakeKubeAPI, core: client.CoreV1Api) -> None:
    """stop() refuses connections and drops watches; start() serves the same state on the same port."""
    start = str(fake_api.resource_version())
    created = fake_api.create(service("a"))
    url = fake_api.url
    w = WatchThread(core.list_namespaced_service, NS, resource_version=created["metadata"]["resourceVersion"])
    assert fake_api.wait_for_watchers("services", 1)
    fake_api.stop()
    w.join()
    assert isinstance(w.error, urllib3.exceptions.ProtocolError), repr(w.error)
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        core.read_namespaced_service("a", NS)
    fake_api.start()
    assert fake_api.url == url
    assert core.read_namespaced_service("a", NS).metadata.uid == created["metadata"]["uid"]
    assert core.list_namespaced_service(NS).metadata.resource_version == created["metadata"]["resourceVersion"]
    assert summary(take(core.list_namespaced_service, 1, NS, resource_version=start)) == [("ADDED", "a")]


def test_a_list_is_sent_chunked_item_by_item_as_a_real_server_sends_it(fake_api: FakeKubeAPI) -> None:
    """No Content-Length: Transfer-Encoding chunked, the chunks Go's 2 KiB buffer makes of writes item by item
    (a 1.34+ server's streaming list encoding), and a body that is the list."""
    for i in range(30):
        fake_api.create(endpoint_slice(f"web-{i:02}", {"pad": "x" * (i * 10)}))
    pool = urllib3.PoolManager()
    response = pool.request("GET", f"{fake_api.url}/apis/discovery.k8s.io/v1/endpointslices?resourceVersion=0",
                            preload_content=False)
    try:
        assert response.status == 200 and response.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in response.headers
        chunks = list(response.read_chunked())
    finally:
        response.release_conn()
    body = json.loads(b"".join(chunks))
    assert [item["metadata"]["name"] for item in body["items"]] == [f"web-{i:02}" for i in range(30)]
    assert len(chunks) > 1 and all(len(c) == 2048 for c in chunks[:-1])  # (the items are each under 2 KiB)
    small = pool.request("GET", f"{fake_api.url}/api/v1/nodes?resourceVersion=0")  # fits Go's buffer: counted
    assert small.status == 200 and small.headers.get("Content-Length") == str(len(small.data))
    assert json.loads(small.data)["items"] == []


@pytest.mark.parametrize(("writes", "chunks"), [
    ([b"a" * 10, b"b" * 10], [b"a" * 10 + b"b" * 10]),  # small writes: buffered, one final flush
    ([b"a" * 3000], [b"a" * 3000]),  # a large write on an empty buffer: passed on whole
    ([b"a" * 10, b"b" * 3000], [b"a" * 10 + b"b" * 2038, b"b" * 962]),  # the buffer filled, flushed, the rest kept
    ([b"a" * 10, b"b" * 5000], [b"a" * 10 + b"b" * 2038, b"b" * 2962]),  # ... and the rest, larger, passed on whole
    ([b"a" * 2048, b"b"], [b"a" * 2048, b"b"]),  # exactly the buffer: buffered, flushed by the next write
])
def test_list_chunks_follow_go_bufio_writer(writes: list[bytes], chunks: list[bytes]) -> None:
    from tests.harness.fakeapi import _go_chunks

    assert list(_go_chunks(writes, 2048)) == chunks
