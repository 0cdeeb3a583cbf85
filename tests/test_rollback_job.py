"""deploy/rollback/job.yaml: the rollback Job validates, runs kproxy --rollback-to-kube-proxy, and is the DaemonSet's pod.

Offline (no cluster, no root): the Job is validated against the API schemas,
its args go through kproxy's parser, its security context and volumes are
compared with daemonset.yaml's, and docs/migration.md's command (one sed) is
run on it and the result validated again.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kproxy.cli import build_parser
from kproxy.daemon.config import parse_duration

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "deploy" / "rollback" / "job.yaml"
MIGRATION = ROOT / "docs" / "migration.md"
PLACEHOLDER = "ROLLBACK_NODE"
SCHEMA_VERSIONS = sorted({"1.31.0", kubernetes_validate.latest_version()})


def job(text: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(JOB.read_text() if text is None else text) if d]
    return doc


def daemonset_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "daemonset.yaml").read_text()) if d]


def daemonset_pod() -> dict[str, Any]:
    (ds,) = [d for d in daemonset_docs() if d["kind"] == "DaemonSet"]
    return ds["spec"]["template"]["spec"]


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (found,) = pod["containers"]
    return found


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_job_validates(version: str) -> None:
    """Strictly valid against the API schemas (an unknown field is an error)."""
    kubernetes_validate.validate(job(), version, strict=True)


def test_job_runs_the_rollback_once_on_one_node() -> None:
    """kube-system, pinned to the node by nodeName (the placeholder), one try, and args kproxy's parser accepts."""
    doc = job()
    assert doc["metadata"]["namespace"] == "kube-system"
    assert doc["metadata"]["generateName"] and "name" not in doc["metadata"], "kubectl create: a new name per run"
    assert doc["spec"]["backoffLimit"] == 0
    pod = doc["spec"]["template"]["spec"]
    assert pod["nodeName"] == PLACEHOLDER and pod["restartPolicy"] == "Never"
    args = build_parser().parse_args(container(pod)["args"])
    assert args.rollback_to_kube_proxy and not (args.dry_run or args.once or args.cleanup or args.cleanup_kube_proxy)
    wait = parse_duration(args.wait_for_kube_proxy)
    assert 0 < wait < doc["spec"]["activeDeadlineSeconds"], "the Job's deadline leaves the wait room"


def test_job_is_the_daemonsets_pod_cut_down() -> None:
    """Same image, security context, host network, priority and tolerations; the volumes it mounts are the
    DaemonSet's; its ServiceAccount exists and mounts no token (it needs no API); not selected by the DaemonSet."""
    pod, ds_pod = job()["spec"]["template"]["spec"], daemonset_pod()
    c, ds_c = container(pod), container(ds_pod)
    assert c["image"] == ds_c["image"]
    assert c["securityContext"] == ds_c["securityContext"]
    for key in ("hostNetwork", "dnsPolicy", "priorityClassName", "tolerations"):
        assert pod[key] == ds_pod[key], key
    ds_mounts = {m["name"]: m for m in ds_c["volumeMounts"]}
    ds_volumes = {v["name"]: v for v in ds_pod["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} == {"lib-modules", "tmp"}
    for mount in c["volumeMounts"]:
        assert mount == ds_mounts[mount["name"]]
    assert pod["volumes"] == [ds_volumes[m["name"]] for m in c["volumeMounts"]]
    accounts = {d["metadata"]["name"] for d in daemonset_docs() if d["kind"] == "ServiceAccount"}
    assert pod["serviceAccountName"] in accounts and pod["automountServiceAccountToken"] is False
    (ds,) = [d for d in daemonset_docs() if d["kind"] == "DaemonSet"]
    labels = job()["spec"]["template"]["metadata"]["labels"]
    assert not ds["spec"]["selector"]["matchLabels"].items() <= labels.items()


def migration_sed() -> list[str]:
    """The sed expressions docs/migration.md applies to the Job."""
    text = MIGRATION.read_text()
    (command,) = re.findall(r"sed ((?:-e \"[^\"]+\" )+)deploy/rollback/job\.yaml", text)
    return re.findall(r"-e \"([^\"]+)\"", command)


@pytest.mark.skipif(shutil.which("sed") is None, reason="no sed")
def test_migration_command_sets_node_and_image() -> None:
    """docs/migration.md's sed, run as written: nodeName and the image are the given ones, and it still validates."""
    expressions = migration_sed()
    assert any(PLACEHOLDER in e for e in expressions)
    env = {"NODE": "worker-1.example.com", "IMAGE": "registry.example.com/kproxy@sha256:" + "0" * 64, "PATH": "/usr/bin:/bin"}
    script = "sed " + " ".join(f'-e "{e}"' for e in expressions) + f" {JOB}"
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    doc = job(out)
    pod = doc["spec"]["template"]["spec"]
    assert pod["nodeName"] == env["NODE"] and container(pod)["image"] == env["IMAGE"]
    assert PLACEHOLDER not in out
    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)
