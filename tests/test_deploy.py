"""daemonset.yaml, the Dockerfile and kproxy/rbac.py, checked offline (no cluster, no root).

The manifests are validated against the Kubernetes OpenAPI schemas that the
``kubernetes-validate`` package bundles, in strict mode (an unknown field is an
error); the embedded KubeProxyConfiguration and the container's arguments go
through kproxy's own parsers; the ClusterRole is compared with kproxy/rbac.py,
and kproxy/rbac.py with the requests kproxy/watch.py actually makes.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from kproxy.cli import build_parser
from kproxy.cluster import rbac
from kproxy.cluster.watch import Watcher, api_resources
from kproxy.daemon.config import daemon_config, load_kube_proxy_configuration, parse_bind_address

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "kube-system"
HEALTH_PORT = 10256
MIGRATION_LABEL = "kproxy.io/proxy"
"""Nodes labelled kproxy.io/proxy=kube-proxy keep kube-proxy and get no kproxy pod (docs/migration.md)."""
RUNTIME_PACKAGES = {"python3", "libnftables1", "netbase"}
"""The Debian packages kproxy runs on (./dev installs them, and the image's base must have them too)."""
SCHEMA_VERSIONS = sorted({"1.31.0", kubernetes_validate.latest_version()})
"""The oldest Kubernetes kproxy supports (upstream's nftables mode went beta in 1.31) and the newest bundled."""


def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((ROOT / "daemonset.yaml").read_text()) if doc]


def one(kind: str) -> dict[str, Any]:
    found = [doc for doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in daemonset.yaml, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return one("DaemonSet")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert [c["name"] for c in containers] == ["kproxy"]
    return containers[0]


# --- the manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_manifests_valid_against_kubernetes_schemas(version: str) -> None:
    """Every document validates, strictly, against the Kubernetes OpenAPI schemas."""
    docs = manifests()
    assert sorted(doc["kind"] for doc in docs) == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")


def test_names_and_namespace_fit_together() -> None:
    """One namespace throughout; the binding, pod, ConfigMap and ServiceAccount refer to each other."""
    for doc in manifests():
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one("ClusterRole")["metadata"]["name"]}
    account = one("ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}]
    assert pod_spec()["serviceAccountName"] == account["name"]
    daemonset = one("DaemonSet")["spec"]
    assert daemonset["selector"]["matchLabels"].items() <= daemonset["template"]["metadata"]["labels"].items()
    config_map = one("ConfigMap")["metadata"]["name"]
    refs = [v["configMap"]["name"] for v in pod_spec()["volumes"] if "configMap" in v]
    refs += [e["valueFrom"]["configMapKeyRef"]["name"] for e in container()["env"]
             if "configMapKeyRef" in e.get("valueFrom", {})]
    assert refs and set(refs) == {config_map}


def config_file(tmp_path: Path) -> tuple[str, Path]:
    """(the --config path inside the container, a local copy of the file mounted there)."""
    mount = next(m for m in container()["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == "config")
    data = one("ConfigMap")["data"]
    local = tmp_path / "config.yaml"
    items = volume["configMap"].get("items") or [{"key": key, "path": key} for key in data]
    item = next(i for i in items if i["path"] == "config.yaml")
    local.write_text(data[item["key"]])
    return f"{mount['mountPath']}/{item['path']}", local


def test_configmap_holds_a_configuration_kproxy_accepts(tmp_path: Path) -> None:
    """The embedded KubeProxyConfiguration loads, in nftables mode, and sets the health port the probes use."""
    _, local = config_file(tmp_path)
    assert yaml.safe_load(local.read_text())["mode"] == "nftables"
    values = load_kube_proxy_configuration(str(local))
    assert values["cluster_cidrs"], "clusterCIDR must be set (masquerading depends on it)"
    assert values["sync_period"] >= values["min_sync_period"] > 0
    assert parse_bind_address(values["healthz_bind_address"]) == ("0.0.0.0", HEALTH_PORT)


def test_container_args_are_accepted_by_kproxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The args, with $(NODE_NAME) expanded as the kubelet does, parse into the daemon's configuration."""
    in_container, local = config_file(tmp_path)
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    args = [re.sub(r"\$\((\w+)\)", lambda m: {"NODE_NAME": "node-a"}[m.group(1)], a) for a in container()["args"]]
    assert f"--config={in_container}" in args
    args = [f"--config={local}" if a == f"--config={in_container}" else a for a in args]
    monkeypatch.delenv("NODE_NAME", raising=False)
    parsed = build_parser().parse_args(args)
    assert not (parsed.dry_run or parsed.once or parsed.cleanup), "the pod must run the daemon"
    config = daemon_config(parsed)
    assert config.node_name == "node-a"
    assert config.cluster_cidrs == load_kube_proxy_configuration(str(local))["cluster_cidrs"]
    assert config.kubeconfig is None, "in-cluster configuration: the ServiceAccount's token"


def test_api_server_address_is_optional_configuration() -> None:
    """KUBERNETES_SERVICE_HOST/PORT come from optional ConfigMap keys, so the file works unedited."""
    env = {e["name"]: e for e in container()["env"]}
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        assert env[name]["valueFrom"]["configMapKeyRef"]["optional"] is True, name


def test_probes_use_livez_and_readyz_on_the_health_port() -> None:
    """Liveness asks /livez, readiness /readyz (programmed once), both on 10256 over plain HTTP."""
    c = container()
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": HEALTH_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": HEALTH_PORT}


def test_named_ports_match_the_configured_addresses(tmp_path: Path) -> None:
    """The pod declares its health port and a port named metrics, on the ports the ConfigMap binds; metrics listen
    on every address (Prometheus scrapes the node), and /rules is not opened (no --expose-rules)."""
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    values = load_kube_proxy_configuration(str(config_file(tmp_path)[1]))
    assert ports == {"healthz": parse_bind_address(values["healthz_bind_address"])[1],
                     "metrics": parse_bind_address(values["metrics_bind_address"])[1]}
    assert parse_bind_address(values["metrics_bind_address"]) == ("0.0.0.0", 10249)
    assert not any(a.startswith("--expose-rules") for a in container()["args"])


def test_a_bad_rollout_stops_at_the_first_node() -> None:
    """One node at a time, and a new pod counts only after being ready (programmed) for minReadySeconds."""
    spec = one("DaemonSet")["spec"]
    assert spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    probe = container()["readinessProbe"]
    assert spec["minReadySeconds"] >= probe["periodSeconds"] * 2, "readiness must be seen more than once"


def test_security_context_grants_only_net_admin() -> None:
    """NET_ADMIN on top of nothing, unprivileged, read-only root with a writable /tmp, no privilege escalation."""
    context = container()["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert context.get("privileged", False) is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["runAsUser"] == 0
    assert context["readOnlyRootFilesystem"] is True
    assert "securityContext" not in pod_spec() or "sysctls" not in pod_spec()["securityContext"]
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "nft error reports write a temporary file"
    assert mounts["/lib/modules"]["readOnly"] is True
    assert volumes[mounts["/lib/modules"]["name"]]["hostPath"]["path"] == "/lib/modules"
    assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp")


def test_runs_on_every_node_as_a_critical_host_network_pod() -> None:
    """hostNetwork, node-critical priority, every taint tolerated, a rolling update without surge."""
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "Default", "the cluster DNS Service is not reachable without a proxy"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["terminationGracePeriodSeconds"] >= 20, "the daemon may take 4 x 5 s to stop its threads"
    strategy = one("DaemonSet")["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0, "two kproxy pods on a node would fight over its tables"
    assert strategy["rollingUpdate"]["maxUnavailable"] not in (0, "0%")


def test_kproxy_stays_off_nodes_that_keep_kube_proxy() -> None:
    """Nodes labelled kproxy.io/proxy=kube-proxy (mid-migration) get no kproxy pod; unlabelled nodes do."""
    affinity = pod_spec()["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert affinity["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": MIGRATION_LABEL, "operator": "NotIn", "values": ["kube-proxy"]}]}]


def test_migration_guide_matches_the_manifest() -> None:
    """docs/migration.md's patches, overlays, label, namespace, pod label and image are the manifests'."""
    text = (ROOT / "docs" / "migration.md").read_text()
    patches = [json.loads(p) for p in re.findall(r"-p '(.+?)'", text)]
    assert [{"op": "remove", "path": "/spec/template/spec/affinity"}] in patches
    assert set(re.findall(r"--patch-file (\S+)", text)) == {"deploy/canary/kube-proxy-patch.yaml"}
    overlays = set(re.findall(r"kubectl (?:apply|delete|kustomize) -k (\S+)", text))
    assert overlays == {"deploy/canary", "deploy/base"}
    assert all((ROOT / d / "kustomization.yaml").is_file() for d in overlays)
    assert f"{MIGRATION_LABEL}=kproxy" in text and f"{MIGRATION_LABEL}-" in text
    labels = one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    selectors = set(re.findall(r"-l (app\.kubernetes\.io/name=\S+)", text))
    assert selectors == {f"app.kubernetes.io/name={labels['app.kubernetes.io/name']}"}
    assert not re.findall(r"--image=(\S*kproxy\S*)", text), "the rollback Job takes the DaemonSet's image"
    assert set(re.findall(r"kubectl -n (\S+)", text)) == {NAMESPACE}


def _quantity(text: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_resources_have_requests_within_limits() -> None:
    """CPU and memory are requested and limited, and every request fits its limit."""
    resources = container()["resources"]
    for name in ("cpu", "memory"):
        assert _quantity(resources["requests"][name]) <= _quantity(resources["limits"][name]), name
    assert _quantity(resources["limits"]["memory"]) >= 512 * 2**20, "10,000 Services peak at about 400 MiB"


# --- RBAC -----------------------------------------------------------------------------------------


def test_cluster_role_grants_exactly_the_rbac_list() -> None:
    """The ClusterRole's rules are kproxy/rbac.py's list: nothing missing, nothing more, no wildcards."""
    granted = set()
    for rule in one("ClusterRole")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), rule
                    granted.add((group, resource, verb))
    assert granted == rbac.permissions()


class _Response:
    """A raw response as ``_preload_content=False`` returns it: an empty list, or an empty watch stream."""

    status = 200

    def __init__(self, watching: bool) -> None:
        self.data = b"" if watching else json.dumps({"items": [], "metadata": {"resourceVersion": "1"}}).encode()

    @property
    def response(self) -> _Response:
        return self

    def stream(self, *_args: Any, **_kwargs: Any) -> Any:
        return iter([self.data] if self.data else [])

    def release_conn(self) -> None:
        pass


class RecordingApiClient(client.ApiClient):
    """An ApiClient that records each request instead of sending it."""

    def __init__(self) -> None:
        super().__init__(client.Configuration(host="https://apiserver.invalid"))
        self.requests: list[tuple[str, str]] = []

    def call_api(self, method: str, url: str, *_args: Any, **_kwargs: Any) -> _Response:
        self.requests.append((method, url))
        return _Response(watching="watch=true" in url)


def _permission(method: str, url: str) -> tuple[str, str, str]:
    """(api group, resource, verb) an API request needs, from its method and URL."""
    parts = urlsplit(url)
    segments = parts.path.strip("/").split("/")
    if segments[0] == "api":
        group, rest = "", segments[2:]
    else:
        assert segments[0] == "apis", url
        group, rest = segments[1], segments[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    assert method == "GET" and len(rest) == 1, f"not a collection read: {method} {url}"
    watching = parse_qs(parts.query).get("watch") == ["true"]
    return group, rest[0], "watch" if watching else "list"


def test_rbac_list_is_what_watch_py_asks_for() -> None:
    """The permissions derived from watch.py's client calls, and from its real requests, equal API_ACCESS."""
    api = RecordingApiClient()
    resources = api_resources(api, "node-a")
    assert {r.kind for r in resources} == {a.kind for a in rbac.API_ACCESS}
    derived = set()
    for resource in resources:
        name = resource.list_call.__name__
        assert name.startswith("list_"), f"{resource.kind}: {name} is not a list call"
        access = rbac.access_for_kind(resource.kind)
        derived |= {(access.api_group, access.resource, verb) for verb in rbac.LIST_WATCH}
        watcher = Watcher(resource, lambda *_: None, lambda *_: None, threading.Event())
        watcher.list_all()
        assert list(watcher._stream()) == []
    requested = {_permission(method, url) for method, url in api.requests}
    assert requested == derived == rbac.permissions()
    node_reads = [parse_qs(urlsplit(url).query) for _, url in api.requests if "/nodes" in url]
    assert node_reads and all(q["fieldSelector"] == ["metadata.name=node-a"] for q in node_reads)


def test_only_watch_py_talks_to_the_api_server() -> None:
    """No other kproxy module sends API requests or builds an API class (so no Events, no writes)."""
    users = set()
    for path in sorted((ROOT / "kproxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "client"
                    and node.attr.endswith("Api")):
                users.add(str(path.relative_to(ROOT)))
            if isinstance(node, ast.Attribute) and node.attr in ("call_api", "param_serialize"):
                users.add(str(path.relative_to(ROOT)))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kubernetes"):
                if any(alias.name.endswith("Api") for alias in node.names):
                    users.add(str(path.relative_to(ROOT)))
    assert users == {"kproxy/cluster/watch.py"}


# --- the image ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def dev_apt_packages() -> set[str]:
    """Every Debian package ./dev installs, for any command (its *_PACKAGES=(...) lists)."""
    lists = re.findall(r"^[A-Z]+_PACKAGES=\(([^)]*)\)", (ROOT / "dev").read_text(), re.M)
    assert lists, "./dev has no *_PACKAGES=(...) lists"
    return {word for text in lists for word in text.split()}


def image_debian_packages() -> set[str]:
    """The packages the image's Debian base gets besides the essential set (image/debian.in)."""
    lines = (ROOT / "image" / "debian.in").read_text().splitlines()
    return {word for line in lines if (word := line.split("#", 1)[0].strip())}


def test_dockerfile_builds_offline_on_the_debian_base() -> None:
    """Both stages start FROM the local Debian base; nothing is fetched; kproxy and the locked wheels, hash-checked."""
    steps = dockerfile_instructions()
    assert steps[0] == ("ARG", "BASE")
    assert [args for instruction, args in steps if instruction == "FROM"] == ["${BASE} AS build", "${BASE}"]
    assert RUNTIME_PACKAGES <= image_debian_packages() <= dev_apt_packages()
    runs = " && ".join(args for instruction, args in steps if instruction == "RUN")
    assert not re.search(r"\b(apt-get|apt|curl|wget)\b", runs), "the build is offline: the base has the packages"
    commands = [shlex.split(c) for c in re.split(r"&&|;", runs)]
    pip = next(c for c in commands if any(word.endswith("/pip") for word in c) and "install" in c)
    assert {"--no-index", "--require-hashes", "--only-binary=:all:"} <= set(pip)
    assert "-e" not in pip and "--editable" not in pip
    requirements = [pip[i + 1] for i, word in enumerate(pip) if word == "-r"]
    assert requirements == ["/src/requirements.lock", "/src/kproxy.txt"]
    assert ("COPY", "--from=build /opt/kproxy /opt/kproxy") in steps
    assert dict(steps).get("ENTRYPOINT") == '["kproxy"]'


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context.

    As Docker does: a pattern matches a path or any directory above it
    (``**/`` at any depth), ``!`` re-includes, and the last match wins.
    """
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/")
        if body.startswith("**/"):
            candidates = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
            body = body[3:]
        else:
            candidates = ["/".join(parts[:j]) for j in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(c, body) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies() -> None:
    """Every path the Dockerfile copies is in the build context; the virtualenv, git and tests are not."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [src for instruction, args in dockerfile_instructions() if instruction == "COPY"
              and not args.startswith("--from=") for src in args.split()[:-1]]
    needed = [src.rstrip("/") for src in copied] + ["dist/wheels/kproxy-0.1.0-py3-none-any.whl"]
    assert "image/requirements.lock" in needed and "dist/wheels" in needed
    for path in needed:
        # dist/ is what ./dev image makes before it builds.
        assert path.startswith("dist/") or (ROOT / path).exists(), path
        assert not _ignored(path, patterns), f"{path} is excluded by .dockerignore"
    for path in (".venv", ".git", "tests/test_deploy.py", "kproxy/cli.py", "dist/base/0123/rootfs.tar",
                 "dist/kproxy-0.1.0.oci.tar", "dist/build-venv"):
        assert _ignored(path, patterns), f"{path} reaches the build context"
