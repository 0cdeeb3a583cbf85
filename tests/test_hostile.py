"""A corpus of hostile and odd manifests, each read by ``kproxy --dry-run`` beside a good Service.

Every case is a file the API server could hand out, or a user could export,
or an attacker could write. For each, ``kproxy --dry-run`` (a real process,
with a timeout) either exits 0 with the good Service compiled into a script
that ``nft -c`` accepts, or exits 2 with one line naming an unreadable file.
Never a traceback, a hang, or hostile text in the script.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.builders import endpoint, endpoint_slice, node, service

ROOT = Path(__file__).resolve().parent.parent
MARK = "HOSTILE"
"""In every injected string: it must never reach the script."""
INJECT = f'x" }} ; flush ruleset ; add rule ip filter input accept comment "{MARK}'

GOOD = [
    service("good", "corpus", "10.96.200.1"),
    endpoint_slice("good-1", "good", [endpoint("10.244.200.1")], namespace="corpus"),
    node("node-a", ["192.168.50.1", "fd00:50::1"]),
]
GOOD_LINES = ("10.96.200.1 . tcp . 80", "10.244.200.1 . 8080")


def _svc(**spec: Any) -> dict[str, Any]:
    return service("victim", "ns", "10.96.100.1", **spec)


def _with(obj: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


SVC = _svc()
SLICE = endpoint_slice("victim-1", "victim", [endpoint("10.244.100.1"), endpoint("10.244.100.2")], namespace="ns")
NODEPORT = _svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30100}])
LB = _svc(type="LoadBalancer", ports=[{"name": "http", "port": 80, "nodePort": 30100}],
          status={"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}})


def _objects(*objects: dict[str, Any]) -> Callable[[], str]:
    return lambda: yaml.safe_dump_all(list(objects))


def _text(text: str) -> Callable[[], str | bytes]:
    return lambda: text


def _bytes(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _deep_yaml(depth: int) -> str:
    return "apiVersion: v1\nkind: Service\nmetadata:\n  name: deep\n  annotations:\n    a: x\nspec:\n  x: " + "[" * depth + "]" * depth + "\n"


def _deep_json(depth: int) -> str:
    return '{"kind": "Service", "metadata": {"name": "deep"}, "spec": {"x": ' + "[" * depth + "]" * depth + "}}"


ALIAS_BOMB = "\n".join(
    ["apiVersion: v1", "kind: Service", "metadata: {name: bomb, namespace: ns}", "spec:",
     '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"  {chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
) + "\n"

LONG_NS, LONG_NAME = "n" * 63, "s" + "x" * 62
MANY_PORTS = [{"name": f"p{i}", "port": 1 + i, "protocol": ("TCP", "UDP", "SCTP")[i % 3]} for i in range(3000)]

# (id, content, expected exit code): content is a function returning the hostile file's text or bytes.
CORPUS: list[tuple[str, Callable[[], str | bytes], int]] = [
    # -- injection through every string field -------------------------------------------------------
    ("inject-namespace", _objects(_with(SVC, ["metadata", "namespace"], INJECT)), 0),
    ("inject-name", _objects(_with(SVC, ["metadata", "name"], INJECT)), 0),
    ("inject-port-name", _objects(_with(SVC, ["spec", "ports", 0, "name"], INJECT)), 0),
    ("inject-cluster-ip", _objects(_with(_with(SVC, ["spec", "clusterIP"], INJECT), ["spec", "clusterIPs"], [INJECT])), 0),
    ("inject-second-cluster-ip", _objects(_with(SVC, ["spec", "clusterIPs"], ["10.96.100.1", INJECT])), 0),
    ("inject-external-ip", _objects(_with(SVC, ["spec", "externalIPs"], [f"198.51.100.1 {MARK}", INJECT])), 0),
    ("inject-lb-ip", _objects(_with(LB, ["status", "loadBalancer", "ingress"], [{"ip": INJECT}])), 0),
    ("inject-lb-ip-mode", _objects(_with(LB, ["status", "loadBalancer", "ingress", 0, "ipMode"], INJECT)), 0),
    ("inject-source-range", _objects(_with(LB, ["spec", "loadBalancerSourceRanges"], [f"10.0.0.0/8 {MARK}"])), 0),
    ("inject-source-range-annotation", _objects(_with(LB, ["metadata", "annotations"], {
        "service.beta.kubernetes.io/load-balancer-source-ranges": f"10.0.0.0/8,{INJECT}"})), 0),
    ("inject-rate-limit", _objects(_with(SVC, ["metadata", "annotations"], {"kproxy.io/rate-limit": INJECT})), 0),
    ("inject-rate-burst", _objects(_with(SVC, ["metadata", "annotations"], {
        "kproxy.io/rate-limit": "5/second", "kproxy.io/rate-limit-burst": INJECT})), 0),
    ("inject-traffic-distribution", _objects(_with(SVC, ["spec", "trafficDistribution"], INJECT)), 0),
    ("inject-internal-policy", _objects(_with(SVC, ["spec", "internalTrafficPolicy"], INJECT)), 0),
    ("inject-external-policy", _objects(_with(NODEPORT, ["spec", "externalTrafficPolicy"], INJECT)), 0),
    ("inject-session-affinity", _objects(_with(SVC, ["spec", "sessionAffinity"], INJECT)), 0),
    ("inject-type", _objects(_with(SVC, ["spec", "type"], INJECT)), 0),
    ("inject-protocol", _objects(_with(SVC, ["spec", "ports", 0, "protocol"], INJECT)), 0),
    ("inject-endpoint-address", _objects(SVC, _with(SLICE, ["endpoints", 0, "addresses"], [INJECT])), 0),
    ("inject-endpoint-node-name", _objects(SVC, _with(SLICE, ["endpoints", 0, "nodeName"], INJECT)), 0),
    ("inject-endpoint-zone", _objects(SVC, _with(SLICE, ["endpoints", 0, "zone"], INJECT)), 0),
    ("inject-hint-zone", _objects(SVC, _with(SLICE, ["endpoints", 0, "hints"], {"forZones": [{"name": INJECT}]})), 0),
    ("inject-hint-node", _objects(SVC, _with(SLICE, ["endpoints", 0, "hints"], {"forNodes": [{"name": INJECT}]})), 0),
    ("inject-slice-port-name", _objects(SVC, _with(SLICE, ["ports", 0, "name"], INJECT)), 0),
    ("inject-slice-service-label", _objects(SVC, _with(SLICE, ["metadata", "labels"],
                                                      {"kubernetes.io/service-name": INJECT})), 0),
    ("inject-slice-address-type", _objects(SVC, _with(SLICE, ["addressType"], INJECT)), 0),
    ("inject-trigger-time", _objects(SVC, _with(SLICE, ["metadata", "annotations"], {
        "endpoints.kubernetes.io/last-change-trigger-time": INJECT})), 0),
    ("inject-node-address", _objects(_with(node("node-a"), ["status", "addresses"], [
        {"type": "InternalIP", "address": INJECT}, {"type": "InternalIP", "address": "192.168.50.1"}])), 0),
    ("inject-node-zone", _objects(_with(node("node-a"), ["metadata", "labels"], {
        "topology.kubernetes.io/zone": INJECT})), 0),
    ("inject-kind", _objects(_with(SVC, ["kind"], INJECT)), 0),
    # -- IPv6 zone ids in every address field ---------------------------------------------------
    ("zone-cluster-ip", _objects(_with(_with(SVC, ["spec", "clusterIP"], "fd00::1%x\n}{"), ["spec", "clusterIPs"],
                                       ["fd00::1%x\n}{"])), 0),
    ("zone-external-ip", _objects(_with(SVC, ["spec", "externalIPs"], ["fd00:51::1%eth0"])), 0),
    ("zone-lb-ip", _objects(_with(LB, ["status", "loadBalancer", "ingress"], [{"ip": "2001:db8::1%1"}])), 0),
    ("zone-endpoint", _objects(SVC, _with(_with(SLICE, ["addressType"], "IPv6"), ["endpoints", 0, "addresses"],
                                          ["fd00:244::5%lo } drop"])), 0),
    ("zone-node-address", _objects(_with(node("node-a"), ["status", "addresses"], [
        {"type": "InternalIP", "address": "fd00:50::1%x\n{ }"}, {"type": "InternalIP", "address": "192.168.50.1"}])), 0),
    ("zone-source-range", _objects(_with(LB, ["spec", "loadBalancerSourceRanges"], ["fe80::%1/64"])), 0),
    # -- trailing newlines and whitespace ---------------------------------------------------------
    ("newline-name", _objects(_with(SVC, ["metadata", "name"], "web\n")), 0),
    ("newline-namespace", _objects(_with(SVC, ["metadata", "namespace"], "ns\n")), 0),
    ("newline-port-name", _objects(_with(SVC, ["spec", "ports", 0, "name"], "http\n")), 0),
    ("newline-cluster-ip", _objects(_with(_with(SVC, ["spec", "clusterIP"], "10.96.1.2\n"), ["spec", "clusterIPs"],
                                          ["10.96.1.2\n"])), 0),
    ("space-external-ip", _objects(_with(SVC, ["spec", "externalIPs"], [" 198.51.100.1"])), 0),
    ("newline-protocol", _objects(_with(SVC, ["spec", "ports", 0, "protocol"], "TCP\n")), 0),
    # -- addresses the API server refuses for Services and endpoints ---------------------------------
    ("unspecified-external-ip", _objects(_with(SVC, ["spec", "externalIPs"], ["0.0.0.0", "::"])), 0),
    ("loopback-external-ip", _objects(_with(SVC, ["spec", "externalIPs"], ["127.0.0.1", "::1"])), 0),
    ("multicast-external-ip", _objects(_with(SVC, ["spec", "externalIPs"], ["224.0.0.1", "ff02::1"])), 0),
    ("loopback-lb-ip", _objects(_with(LB, ["status", "loadBalancer", "ingress"], [{"ip": "127.0.0.1"}])), 0),
    ("loopback-endpoint", _objects(SVC, _with(SLICE, ["endpoints", 0, "addresses"], ["127.0.0.1"])), 0),
    ("metadata-endpoint", _objects(SVC, _with(SLICE, ["endpoints", 0, "addresses"], ["169.254.169.254"])), 0),
    ("unspecified-cluster-ip", _objects(_with(_with(SVC, ["spec", "clusterIP"], "0.0.0.0"), ["spec", "clusterIPs"],
                                              ["0.0.0.0"])), 0),
    ("mapped-cluster-ip", _objects(_with(_with(SVC, ["spec", "clusterIP"], "::ffff:10.96.1.1"), ["spec", "clusterIPs"],
                                         ["::ffff:10.96.1.1"])), 0),
    ("leading-zero-cluster-ip", _objects(_with(_with(SVC, ["spec", "clusterIP"], "010.096.001.001"),
                                               ["spec", "clusterIPs"], ["010.096.001.001"])), 0),
    # -- wrong types --------------------------------------------------------------------------------
    ("protocol-list", _objects(_with(SVC, ["spec", "ports", 0, "protocol"], ["TCP"])), 0),
    ("port-string", _objects(_with(SVC, ["spec", "ports", 0, "port"], "80")), 0),
    ("port-float", _objects(_with(SVC, ["spec", "ports", 0, "port"], 80.5)), 0),
    ("port-huge", _objects(_with(SVC, ["spec", "ports", 0, "port"], 2**70)), 0),
    ("ports-mapping", _objects(_with(SVC, ["spec", "ports"], {"http": 80})), 0),
    ("spec-list", _objects(_with(SVC, ["spec"], ["clusterIP"])), 0),
    ("metadata-string", _objects(_with(SVC, ["metadata"], "victim")), 0),
    ("cluster-ips-string", _objects(_with(SVC, ["spec", "clusterIPs"], "10.96.100.1")), 0),
    ("ip-families-string", _objects(_with(SVC, ["spec", "ipFamilies"], "IPv4")), 0),
    ("node-port-bool", _objects(_with(NODEPORT, ["spec", "ports", 0, "nodePort"], True)), 0),
    ("affinity-timeout-string", _objects(_svc(sessionAffinity="ClientIP",
                                              sessionAffinityConfig={"clientIP": {"timeoutSeconds": "9"}})), 0),
    ("annotations-list", _objects(_with(SVC, ["metadata", "annotations"], ["kproxy.io/rate-limit"])), 0),
    ("annotation-value-int", _objects(_with(SVC, ["metadata", "annotations"], {"kproxy.io/rate-limit": 5})), 0),
    ("labels-value-dict", _objects(_with(SVC, ["metadata", "labels"], {"a": {"b": "c"}})), 0),
    ("endpoints-mapping", _objects(SVC, _with(SLICE, ["endpoints"], {"a": 1})), 0),
    ("endpoint-addresses-string", _objects(SVC, _with(SLICE, ["endpoints", 0, "addresses"], "10.244.100.1")), 0),
    ("condition-string", _objects(SVC, _with(SLICE, ["endpoints", 0, "conditions"], {"ready": "yes"})), 0),
    ("hints-string", _objects(SVC, _with(SLICE, ["endpoints", 0, "hints"], {"forZones": "zone-a"})), 0),
    ("address-type-int", _objects(SVC, _with(SLICE, ["addressType"], 4)), 0),
    ("node-addresses-mapping", _objects(_with(node("node-a"), ["status", "addresses"], {"InternalIP": "1.2.3.4"})), 0),
    ("object-is-a-list-item", _text("apiVersion: v1\nkind: List\nitems:\n- 42\n- [1, 2]\n- kind: Service\n"), 0),
    ("unicode-name", _objects(_with(SVC, ["metadata", "name"], "w\u0435b")), 0),
    ("nan-port", _text('{"kind": "Service", "metadata": {"name": "nan", "namespace": "ns"}, '
                       '"spec": {"clusterIP": "10.96.100.7", "ports": [{"port": NaN}]}}'), 0),
    # -- limits ------------------------------------------------------------------------------------
    ("longest-names", _objects(service(LONG_NAME, LONG_NS, "10.96.100.2",
                                       ports=[{"name": "p" * 63, "port": 80}]),
                               endpoint_slice("x" * 253, LONG_NAME, [endpoint("10.244.100.3", node="n" * 253)],
                                              namespace=LONG_NS, ports=[{"name": "p" * 63, "port": 8080}])), 0),
    ("thousands-of-ports", _objects(service("many", "ns", "10.96.100.3", ports=MANY_PORTS)), 0),
    ("a-thousand-endpoints", _objects(SVC, _with(SLICE, ["endpoints"],
                                                 [endpoint(f"10.245.{i // 250}.{i % 250 + 1}") for i in range(1000)])), 0),
    ("affinity-with-300-endpoints", _objects(_with(SVC, ["spec", "sessionAffinity"], "ClientIP"), _with(
        SLICE, ["endpoints"], [endpoint(f"10.245.{i // 250}.{i % 250 + 1}") for i in range(300)])), 0),
    ("many-external-ips", _objects(_with(SVC, ["spec", "externalIPs"],
                                         [f"198.51.{i // 250}.{i % 250 + 1}" for i in range(1000)])), 0),
    ("huge-annotation", _objects(_with(SVC, ["metadata", "annotations"], {"x": "y" * 2_000_000})), 0),
    # -- duplicates and conflicts ---------------------------------------------------------------------
    ("duplicate-service", _objects(SVC, service("victim", "ns", "10.96.100.9")), 0),
    ("shared-cluster-ip", _objects(SVC, service("twin", "ns", "10.96.100.1")), 0),
    ("shared-node-port", _objects(NODEPORT, service("twin", "ns", "10.96.100.8", type="NodePort",
                                                    ports=[{"name": "http", "port": 80, "nodePort": 30100}])), 0),
    ("good-service-claimed", _objects(service("aaa", "corpus", "10.96.100.10", externalIPs=["10.96.200.1"])), 0),
    # -- unreadable files: one line, exit 2 ---------------------------------------------------------
    ("deep-yaml", _text(_deep_yaml(500)), 2),
    ("deep-yaml-past-libyaml", _text(_deep_yaml(5000)), 2),
    ("deep-json", _text(_deep_json(100_000)), 2),
    ("alias-bomb", _text(ALIAS_BOMB), 2),
    ("binary", _bytes(bytes(range(256)) * 64), 2),
    ("not-utf8", _bytes(b"kind: Service\nmetadata: {name: \xff\xfe}\n"), 2),
    ("python-tag", _text("!!python/object/apply:os.system ['echo HOSTILE']\n"), 2),
    ("broken-yaml", _text("kind: [Service\n"), 2),
    ("broken-json", _text('{"kind": "Service", '), 2),
    ("scalar-document", _text("just a string\n"), 2),
    ("list-items-not-a-list", _text("kind: List\nitems: 5\n"), 2),
    ("unhashable-key", _text("? [a, b]\n: c\n"), 2),
    ("json-integer-of-5000-digits", _text('{"kind": "Service", "spec": {"ports": [{"port": 1' + "0" * 5000 + "}]}}"), 2),
    ("yaml-binary-tag", _text("kind: Service\nmetadata: {name: x}\nspec: !!binary aGVsbG8=\n"), 2),
    ("flow-style-yaml", _text("{apiVersion: v1, kind: Service, metadata: {name: flow, namespace: ns}, "
                              "spec: {clusterIP: 10.96.100.20, clusterIPs: [10.96.100.20], ports: [{port: 80}]}}\n"), 0),
    ("json-documents-in-a-yaml-stream", _text(json.dumps(SVC) + "\n---\n" + json.dumps(SLICE) + "\n"), 0),
]


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kproxy", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.root
@pytest.mark.parametrize("content, expected", [pytest.param(c, e, id=i) for i, c, e in CORPUS])
def test_hostile_manifest_beside_a_good_service(tmp_path: Path, nft_check, content, expected: int) -> None:
    """The hostile file never stops the good Service, never reaches the script, never crashes kproxy."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump_all(GOOD))
    hostile = tmp_path / "hostile"
    data = content()
    hostile.write_bytes(data if isinstance(data, bytes) else data.encode())
    result = _run(["--dry-run", "--from-file", str(good), "--from-file", str(hostile), "--node-name", "node-a",
                   "--cluster-cidr", "10.244.0.0/16"])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == expected, result.stderr[-2000:]
    if expected == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(hostile) in lines[0], lines
        assert result.stdout == ""
        return
    for line in GOOD_LINES:
        assert line in result.stdout, f"the good Service is compiled: {line}"
    assert MARK not in result.stdout and "flush ruleset" not in result.stdout and "%" not in result.stdout
    nft_check(result.stdout)


def test_corpus_is_large_enough() -> None:
    """The issue asks for at least 60 hostile or odd manifests."""
    assert len(CORPUS) >= 60 and len({case[0] for case in CORPUS}) == len(CORPUS)


def test_a_small_yaml_flood_stays_within_bounded_memory(tmp_path: Path) -> None:
    """A 3 MB YAML file of a million empty lists costs the values it holds, not a node graph (it was 700 MB)."""
    flood = tmp_path / "flood.yaml"
    flood.write_text("kind: Foo\nx: [" + ",".join(["[]"] * 1_000_000) + "]\n")
    # VmHWM, the peak of this process's own memory: ru_maxrss would carry over pytest's, the parent's, at fork.
    code = (f"import re, kproxy.cluster.manifests as m; m.load_manifest_files([{str(flood)!r}]); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert int(out.stdout) < 250_000, f"peak RSS {int(out.stdout) // 1024} MB"


@pytest.fixture
def no_yaml_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """The YAML reader (kproxy.cluster.yamlstream's load_all, as manifests calls it) fails the test if called."""
    from kproxy.cluster import manifests

    def no_yaml(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("JSON input went to the YAML parser")

    monkeypatch.setattr(manifests, "load_all", no_yaml)


def test_json_goes_through_json(no_yaml_reader: None) -> None:
    """A JSON export is parsed as JSON (seconds for 10k Services), never through the YAML parser (minutes)."""
    from kproxy.cluster import manifests

    export = json.dumps({"apiVersion": "v1", "kind": "List", "items": [SVC, SLICE]}, indent=4)
    assert [o["kind"] for o in manifests.parse_manifests("\n  " + export, "export.json")] == ["Service", "EndpointSlice"]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_json_over_the_value_cap_is_refused(monkeypatch: pytest.MonkeyPatch, as_bytes: bool) -> None:
    """The JSON reader refuses a text with more values than MAX_VALUES (here 10) before building it, and lets a
    counted text within the cap through; only texts longer than twice the cap are counted, as a JSON text holds
    at most one value per two characters."""
    from kproxy.cluster import manifests

    monkeypatch.setattr(manifests, "MAX_VALUES", 10)

    def text(items: str) -> str | bytes:
        return items.encode() if as_bytes else items

    flood = '{"kind": "FooList", "items": [' + ",".join(["[]"] * 11) + "]}"
    with pytest.raises(manifests.ManifestError, match="more than 10 values"):
        manifests.parse_manifests(text(flood), "flood.json")
    densest = "[" + ",".join(["1"] * 11) + "]"  # 12 values in 23 characters
    with pytest.raises(manifests.ManifestError, match="more than 10 values"):
        manifests.parse_manifests(text(densest), "dense.json")
    within = '{"kind":"List","items":[]}'  # 3 values in 26 characters: more than 20, so counted, and let through
    assert manifests.parse_manifests(text(within), "within.json") == []


def test_a_json_export_with_a_byte_order_mark_goes_through_json(tmp_path: Path, no_yaml_reader: None) -> None:
    """A UTF-8 byte order mark (Windows editors write one) does not send a JSON export to the YAML parser."""
    from kproxy.cluster import manifests

    export = tmp_path / "export.json"
    export.write_bytes(b"\xef\xbb\xbf" + json.dumps({"apiVersion": "v1", "kind": "List", "items": [SVC]}).encode())
    assert [o["kind"] for o in manifests.load_manifest_files([str(export)])] == ["Service"]


@pytest.mark.parametrize(("form", "counted", "wide", "limit"), [
    ("json", False, False, 2.5), ("json", True, False, 2.5), ("yaml", False, False, 2.5),
    # one character beyond the BMP makes the decoded text 4 bytes a character (160 MB here): it and the objects
    # are 5x the file; stripping the leading newline by copying the text made it 9x
    ("json", False, True, 6.5)], ids=["json", "json-values-counted", "yaml", "json-wide-after-a-newline"])
def test_an_export_is_held_once_while_it_is_parsed(tmp_path: Path, form: str, counted: bool, wide: bool,
                                                   limit: float) -> None:
    """Reading an export costs its text and the objects, not also a copy: a 40 MB export of long strings (its
    objects about as big as its text) raises the peak by about twice its size; three times when the bytes stayed
    beside the decoded JSON, when the values of a long JSON text were counted in an encoded copy, or when YAML
    was handed to libyaml as text (which encodes it again)."""
    export = tmp_path / f"export.{form}"
    if form == "json":
        items = [{"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": f"s{i}", "annotations": {"x": "y" * 100_000}}} for i in range(400)]
        if wide:
            items[0]["metadata"]["annotations"]["emoji"] = "\U0001F600"
        text = json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, ensure_ascii=False)
        export.write_text(("\n" if wide else "") + text, encoding="utf-8")
    else:
        export.write_text("apiVersion: v1\nkind: List\nitems:\n" + "".join(
            f"- apiVersion: v1\n  kind: Service\n  metadata:\n    name: s{i}\n    annotations:\n      x: {'y' * 100_000}\n"
            for i in range(400)))
    size = export.stat().st_size
    code = ("import re, kproxy.cluster.manifests as m\n"
            "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            + ("m.MAX_VALUES = 10_000\n" if counted else "")  # texts over 20,000 characters are counted
            + f"before = peak(); objects = m.load_manifest_files([{str(export)!r}]); print(before, peak(), len(objects))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    before, after, count = (int(v) for v in out.stdout.split())
    assert count == 400
    assert (after - before) * 1024 < limit * size, f"the peak grew by {(after - before) * 1024 / size:.2f} x the file"
