"""deploy/canary/: the opt-in canary renders, validates, and admits kproxy on exactly the labelled nodes.

* The overlay is rendered here in Python (kustomize's resources and
  strategic-merge patches, for the shapes it uses), and, where ``kubectl`` is
  installed, compared with ``kubectl kustomize`` and ``kubectl patch --local``.
* Node selection is evaluated as the DaemonSet controller does it
  (``nodeSelector`` and required ``nodeAffinity``, with the In, NotIn, Exists,
  DoesNotExist, Gt and Lt operators) over a set of Nodes: with the canary,
  kproxy is admitted exactly on the Linux nodes labelled
  ``kproxy.io/proxy=kproxy`` and kube-proxy, patched, exactly on the other
  Linux nodes.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "base"
CANARY = ROOT / "deploy" / "canary"
KUBE_PROXY = Path(__file__).resolve().parent / "data" / "kubeadm" / "kube-proxy-daemonset.yaml"
KUBE_PROXY_PATCH = CANARY / "kube-proxy-patch.yaml"
LABEL = "kproxy.io/proxy"
SCHEMA_VERSIONS = sorted({"1.31.0", kubernetes_validate.latest_version()})
ATOMIC_LISTS = {"nodeSelectorTerms", "matchExpressions", "values"}
"""The lists the patches set: strategic merge replaces them whole (the API gives them no merge key)."""


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- rendering, as kustomize does for these files ----------------------------------------------------


def strategic_merge(target: Any, patch: Any, key: str = "") -> Any:
    """Maps merge key by key (null deletes); the only lists allowed are atomic ones, which replace."""
    if isinstance(patch, dict) and isinstance(target, dict):
        out = dict(target)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(target.get(k), v, k)
        return out
    if isinstance(patch, list):
        assert key in ATOMIC_LISTS, f"{key}: a list with a merge key; this renderer only replaces atomic lists"
        return [strategic_merge(None, item, key) if isinstance(item, dict) else item for item in patch]
    if isinstance(patch, dict):
        return {k: strategic_merge(None, v, k) for k, v in patch.items() if v is not None}
    return patch


def _identity(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def build(directory: Path) -> list[dict[str, Any]]:
    """A kustomization with ``resources`` (files or directories) and ``patches`` (paths to strategic-merge patches)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches", "images"}, kustomization
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        assert path.is_relative_to(directory.resolve()) or path.is_dir(), f"{resource}: kustomize refuses it"
        docs += build(path) if path.is_dir() else load_all(path)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, entry
        (patch,) = load_all(directory / entry["path"])
        (index,) = [i for i, d in enumerate(docs) if _identity(d) == _identity(patch)]
        docs[index] = strategic_merge(docs[index], patch)
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag", "digest"}, image
        for doc in docs:
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    suffix = f"@{image['digest']}" if "digest" in image else f":{image.get('newTag', tag)}"
                    container["image"] = image.get("newName", name) + suffix
    return docs


def daemonset(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"] == name]
    return found


def patched_kube_proxy() -> dict[str, Any]:
    (patch,) = load_all(KUBE_PROXY_PATCH)
    (kube_proxy,) = load_all(KUBE_PROXY)
    return strategic_merge(kube_proxy, patch)


def without_affinity(ds: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(ds)
    out["spec"]["template"]["spec"].pop("affinity", None)
    return out


# -- node selection, as the DaemonSet controller evaluates it ----------------------------------------


def expression_matches(expr: dict[str, Any], labels: dict[str, str]) -> bool:
    """One NodeSelectorRequirement (k8s.io/component-helpers nodeaffinity, via labels.Selector)."""
    key, op, values = expr["key"], expr["operator"], expr.get("values", [])
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt"):
        (bound,) = values
        try:
            value = int(labels[key])
        except (KeyError, ValueError):
            return False
        return value > int(bound) if op == "Gt" else value < int(bound)
    raise AssertionError(f"unknown operator {op}")


def term_matches(term: dict[str, Any], labels: dict[str, str]) -> bool:
    """A NodeSelectorTerm: all its expressions; an empty term matches no node. (No matchFields here.)"""
    assert "matchFields" not in term
    expressions = term.get("matchExpressions") or []
    return bool(expressions) and all(expression_matches(e, labels) for e in expressions)


def admits(ds: dict[str, Any], node: dict[str, Any]) -> bool:
    """Whether the DaemonSet runs a pod on the node: its nodeSelector, and any one term of its required affinity."""
    spec = ds["spec"]["template"]["spec"]
    labels = node["metadata"].get("labels", {})
    if not spec.get("nodeSelector", {}).items() <= labels.items():
        return False
    required = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return True
    return any(term_matches(t, labels) for t in required["nodeSelectorTerms"])


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": name, **labels}}}


NODES = [
    node("control-plane", **{"node-role.kubernetes.io/control-plane": ""}),
    node("worker-1"),
    node("canary-1", **{LABEL: "kproxy"}),
    node("canary-2", **{LABEL: "kproxy", "pool": "canary"}),
    node("autoscaled-new"),
    node("kept-back", **{LABEL: "kube-proxy"}),
    node("typo", **{LABEL: "Kproxy"}),
    node("empty-value", **{LABEL: ""}),
    node("windows-1", **{"kubernetes.io/os": "windows"}),
    node("windows-labelled", **{"kubernetes.io/os": "windows", LABEL: "kproxy"}),
]


def names(ds: dict[str, Any]) -> set[str]:
    return {n["metadata"]["name"] for n in NODES if admits(ds, n)}


def labelled_linux() -> set[str]:
    return {n["metadata"]["name"] for n in NODES
            if n["metadata"]["labels"]["kubernetes.io/os"] == "linux" and n["metadata"]["labels"].get(LABEL) == "kproxy"}


def linux() -> set[str]:
    return {n["metadata"]["name"] for n in NODES if n["metadata"]["labels"]["kubernetes.io/os"] == "linux"}


# -- tests -----------------------------------------------------------------------------------------------


def test_base_is_daemonset_yaml() -> None:
    """deploy/base/daemonset.yaml is byte for byte the repository's daemonset.yaml (cp it after an edit)."""
    assert (BASE / "daemonset.yaml").read_bytes() == (ROOT / "daemonset.yaml").read_bytes(), \
        "deploy/base/daemonset.yaml differs: cp daemonset.yaml deploy/base/daemonset.yaml"
    assert build(BASE) == load_all(ROOT / "daemonset.yaml")


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_canary_and_patched_kube_proxy_validate(version: str) -> None:
    """Every rendered object, and kube-proxy's patched DaemonSet, is valid against the API schemas (strict)."""
    for doc in [*build(CANARY), patched_kube_proxy()]:
        kubernetes_validate.validate(doc, version, strict=True)


def config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kproxy-config"]
    return found


def test_canary_changes_only_kproxys_node_affinity() -> None:
    """The overlay keeps every object of the base, and changes nothing in them but the DaemonSet's affinity.

    Its ConfigMap (deploy/canary/kproxy-config.yaml, the one file to edit) says,
    as shipped, what the base's says, in other comments.
    """
    base, canary = build(BASE), build(CANARY)
    assert [_identity(d) for d in base] == [_identity(d) for d in canary]
    assert yaml.safe_load(config_map(base)["data"]["config.yaml"]) == yaml.safe_load(
        config_map(canary)["data"]["config.yaml"])
    assert config_map(base)["data"]["config.yaml"] != config_map(canary)["data"]["config.yaml"], "the patch applies"
    ignore_config = [d for d in base + canary if d["kind"] == "ConfigMap"]
    for doc in ignore_config:
        doc["data"] = {k: v for k, v in doc["data"].items() if k != "config.yaml"}
    assert [d for d in base if d["kind"] != "DaemonSet"] == [d for d in canary if d["kind"] != "DaemonSet"]
    assert without_affinity(daemonset(base, "kproxy")) == without_affinity(daemonset(canary, "kproxy"))
    (kube_proxy,) = load_all(KUBE_PROXY)
    assert without_affinity(patched_kube_proxy()) == without_affinity(kube_proxy)


def test_canary_admits_kproxy_exactly_on_labelled_nodes() -> None:
    """kproxy: the Linux nodes labelled kproxy.io/proxy=kproxy; kube-proxy: every other Linux node; never both."""
    kproxy, kube_proxy = daemonset(build(CANARY), "kproxy"), patched_kube_proxy()
    assert names(kproxy) == labelled_linux() == {"canary-1", "canary-2"}
    assert names(kube_proxy) == linux() - labelled_linux()
    assert "autoscaled-new" in names(kube_proxy), "a new, unlabelled node must keep kube-proxy"
    assert names(kproxy) | names(kube_proxy) == linux() and not names(kproxy) & names(kube_proxy)


def test_kube_proxy_unpatched_would_share_labelled_nodes() -> None:
    """Without its patch, kube-proxy also runs on the canary nodes: the patch is what keeps them apart."""
    (kube_proxy,) = load_all(KUBE_PROXY)
    assert names(kube_proxy) == linux()


def test_labelled_nodes_run_kproxy_in_both_layouts() -> None:
    """A node labelled kproxy keeps kproxy when the cluster moves from the canary to daemonset.yaml's opt-out.

    And the order matters: with daemonset.yaml's opt-out and the patched
    kube-proxy, an unlabelled node would be admitted by both (two proxies, one
    port 10256). So docs/migration.md labels every node, or deletes
    kube-proxy, before leaving the canary overlay.
    """
    fleet, canary = daemonset(build(BASE), "kproxy"), daemonset(build(CANARY), "kproxy")
    assert labelled_linux() <= names(fleet) and names(canary) <= names(fleet)
    assert names(fleet) & names(patched_kube_proxy()) == linux() - labelled_linux() - {"kept-back"}


@pytest.mark.parametrize(("expr", "labels", "expected"), [
    pytest.param({"key": "a", "operator": "In", "values": ["x"]}, {}, False, id="in-absent"),
    pytest.param({"key": "a", "operator": "NotIn", "values": ["x"]}, {}, True, id="notin-absent"),
    pytest.param({"key": "a", "operator": "NotIn", "values": ["x"]}, {"a": "x"}, False, id="notin-present"),
    pytest.param({"key": "a", "operator": "Exists"}, {"a": ""}, True, id="exists-empty-value"),
    pytest.param({"key": "a", "operator": "DoesNotExist"}, {"a": "x"}, False, id="doesnotexist-present"),
    pytest.param({"key": "a", "operator": "Gt", "values": ["3"]}, {"a": "4"}, True, id="gt"),
    pytest.param({"key": "a", "operator": "Lt", "values": ["3"]}, {"a": "x"}, False, id="lt-not-a-number"),
])
def test_expression_semantics(expr: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    """The harness's operators behave as Kubernetes' node affinity does."""
    assert expression_matches(expr, labels) is expected


def test_empty_term_matches_no_node() -> None:
    """An empty nodeSelectorTerm selects nothing, as in Kubernetes."""
    assert not term_matches({}, {"a": "b"}) and not term_matches({"matchExpressions": []}, {})


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (the Python rendering above stands alone)")
def test_kubectl_renders_the_same() -> None:
    """kubectl's own kustomize and strategic merge give what the Python rendering gives."""
    assert KUBECTL is not None
    rendered = subprocess.run([KUBECTL, "kustomize", str(CANARY)], capture_output=True, text=True, timeout=60, check=True)
    assert sorted(load_all_text(rendered.stdout), key=_identity) == sorted(build(CANARY), key=_identity)
    patched = subprocess.run([KUBECTL, "patch", "--local", "-o", "yaml", "-f", str(KUBE_PROXY),
                              "--patch-file", str(KUBE_PROXY_PATCH)], capture_output=True, text=True, timeout=60, check=True)
    assert yaml.safe_load(patched.stdout) == patched_kube_proxy()


def load_all_text(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]
