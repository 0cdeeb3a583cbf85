"""Every benchmark runs in its quick mode, so that none of them can rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compile as compile_bench

ROOT = Path(__file__).resolve().parent.parent


def test_compile_benchmark_quick(capsys) -> None:
    """benchmarks/compile.py --quick prints its table with a row per size."""
    rows = compile_bench.main(["--quick"])
    out = capsys.readouterr().out
    table_rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table_rows) == len(rows) + 1  # header and one row per size
    assert all(r["rules"] > 0 and r["total_s"] > 0 for r in rows)


def run_quick(script: str, *args: str) -> list[str]:
    """Run ``benchmarks/SCRIPT [ARGS] --quick``; return the data rows of the table it prints."""
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("| ")), len(lines))
    return [line for line in lines[header + 1 :] if line.startswith("| ")]


@pytest.mark.root
def test_programming_latency_benchmark_quick() -> None:
    """benchmarks/programming_latency.py --quick runs the daemon against the test API server and prints p50/p99."""
    rows = run_quick("programming_latency.py")
    assert len(rows) == 1 and rows[0].startswith("| 100 |"), rows


@pytest.mark.root
def test_datapath_benchmark_quick() -> None:
    """benchmarks/datapath.py --quick measures ClusterIP connection latency at both sizes and prints the table."""
    rows = run_quick("datapath.py")
    cluster_ip = [row for row in rows if "| ClusterIP 10.250.0.1:80 |" in row]
    assert [row.split(" | ")[0] for row in cluster_ip] == ["| 100", "| 1,000"], cluster_ip
    limited = [row.split(" | ") for row in rows if "| limited 10.250.0.2:80 (every limit) |" in row]
    assert [(row[0], row[3]) for row in limited] == [("| 100", "0"), ("| 1,000", "0")], limited


@pytest.mark.root
def test_scrape_benchmark_quick() -> None:
    """benchmarks/scrape.py --quick scrapes a daemon at 200 Services with each --service-metrics setting."""
    rows = run_quick("scrape.py")
    assert [row.split(" | ")[1] for row in rows] == ["none", "annotated", "all"], rows


@pytest.mark.root
@pytest.mark.parametrize("script", ["cold_start.py", "partial_sync.py"])
def test_kernel_benchmarks_quick(script: str) -> None:
    """The cold-start and partial-sync benchmarks run in quick mode and print their tables."""
    assert run_quick(script)


# --- the user's paths, as processes ---------------------------------------------------------------------


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


@pytest.mark.root
def test_user_daemon_benchmark_quick() -> None:
    """The daemon, exec'd as daemonset.yaml starts it against the test API server, programs 1,000 Services.

    The kernel holds every ClusterIP and endpoint (the script checks every
    element after timing it); the row has a time and a peak RSS.
    """
    (row,) = run_quick("user_paths.py", "daemon")
    columns = cells(row)
    assert columns[0] == "1,000", row
    assert float(columns[1].split()[0]) > 0 and float(columns[3].split()[0]) > 50, row
    assert columns[-1] == "1,000 / 11,520", row  # service-ips / endpoint-map elements in the kernel


@pytest.mark.root
def test_user_files_benchmark_quick() -> None:
    """kproxy --once (judged from the kernel) and --dry-run on a kubectl-style JSON export of 1,000 Services."""
    rows = run_quick("user_paths.py", "files")
    assert [cells(r)[:3] for r in rows] == [["--once", "json", "1,000"], ["--dry-run", "json", "1,000"]], rows
    assert "applied" in cells(rows[0])[-1] and "nft script" in cells(rows[1])[-1], rows


@pytest.mark.root
def test_packet_latency_benchmark_quick() -> None:
    """An endpoint removed and added back at the API server, timed by connections from a client namespace."""
    rows = run_quick("packet_latency.py")
    assert [cells(r)[:2] for r in rows] == [["1,000", "remove"], ["1,000", "add"]], rows
    assert cells(rows[0])[2] in ("refused", "refused, timeout", "timeout") and cells(rows[1])[2] == "ok", rows


def test_exports_are_what_kubectl_writes() -> None:
    """benchmarks/exports.py: a v1 List, keys sorted, JSON indented by four, YAML as go-yaml v2 (and the same data)."""
    import json

    import yaml

    from benchmarks import exports

    document = exports.export_list(exports.cluster_objects(30))
    text = exports.to_json(document)
    assert text.startswith('{\n    "apiVersion": "v1",\n    "items": [\n        {\n            "apiVersion": "v1",\n')
    assert text.endswith('    "kind": "List",\n    "metadata": {\n        "resourceVersion": ""\n    }\n}\n')
    as_yaml = exports.to_yaml(document)
    assert as_yaml.startswith("apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n")
    assert '    creationTimestamp: "2025-03-14T09:26:53Z"\n' in as_yaml  # a timestamp would read as one: quoted
    assert "    clusterIPs:\n    - 10.96.0.0\n" in as_yaml  # sequences not indented under their key
    assert "  status:\n    loadBalancer: {}\n" in as_yaml
    assert json.loads(text) == yaml.load(as_yaml, Loader=yaml.CSafeLoader) == document
    kinds = [(o["kind"], o["apiVersion"]) for o in document["items"]]
    assert kinds == [("Service", "v1")] * 30 + [("EndpointSlice", "discovery.k8s.io/v1")] * 30 + [("Node", "v1")] * 50
    slice_ = document["items"][30]
    assert slice_["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    assert all({"uid", "resourceVersion", "creationTimestamp"} <= set(o["metadata"]) for o in document["items"])
    assert not any("managedFields" in o["metadata"] for o in document["items"])


def test_the_api_server_serves_the_export_with_managed_fields() -> None:
    """The daemon benchmarks' API server lists the export's objects plus the managedFields a real server adds
    (kubectl hides them): the same cluster once converted, more to decode."""
    import copy

    from benchmarks import exports
    from kproxy.cluster.convert import build_cluster

    exported, served = exports.cluster_objects(40), exports.server_objects(40)
    stripped = copy.deepcopy(served)
    for obj in stripped:
        obj["metadata"].pop("managedFields", None)
    assert stripped == exported
    assert all(len(o["metadata"]["managedFields"]) == 1 for o in served if o["kind"] in ("Service", "EndpointSlice"))
    nodeport = next(o for o in served if o["kind"] == "Service" and o["spec"]["type"] == "NodePort")
    fields = nodeport["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:ports"]
    assert 'k:{"port":80,"protocol":"TCP"}' in fields and "f:nodePort" in fields['k:{"port":80,"protocol":"TCP"}']
    assert build_cluster(served, "node-0") == build_cluster(exported, "node-0")


def test_test_api_server_lists_as_the_real_one_does() -> None:
    """resourceVersion=0 is answered whole (watch cache: no limit); remainingItemCount only without selectors."""
    import json
    import urllib.request

    from benchmarks import exports
    from tests.harness.fakeapi import FakeKubeAPI

    with FakeKubeAPI() as api:
        api.load(exports.cluster_objects(7))

        def get(query: str) -> dict:
            with urllib.request.urlopen(f"{api.url}/api/v1/services?{query}") as response:
                return json.loads(response.read())

        whole = get("resourceVersion=0&limit=2")
        assert len(whole["items"]) == 7 and "continue" not in whole["metadata"]
        page = get("limit=2")
        assert len(page["items"]) == 2 and page["metadata"]["remainingItemCount"] == 5
        selected = get("limit=2&labelSelector=app.kubernetes.io/part-of")
        assert "remainingItemCount" not in selected["metadata"] and selected["metadata"]["continue"]
        names, token = [], ""
        while True:
            page = get("limit=3" + (f"&continue={token}" if token else ""))
            names += [i["metadata"]["name"] for i in page["items"]]
            token = page["metadata"].get("continue")
            if not token:
                break
        assert names == [i["metadata"]["name"] for i in whole["items"]]

@pytest.mark.root
def test_read_back_benchmark_quick() -> None:
    """benchmarks/read_back.py --quick reads 200 Services' tables both ways (they agree) and restarts over them."""
    rows = [row for row in run_quick("read_back.py") if not row.startswith("| Services")]
    assert [row.split(" | ")[0] for row in rows] == ["| 200", "| 200"], rows  # reading back, then the restart


@pytest.mark.slow
def test_the_user_path_benchmarks_run_kproxy_as_the_image_does() -> None:
    """Full runs exec kproxy under Debian's python3 in a virtualenv of exactly image/requirements.lock: no test
    extras (kubernetes-validate would add its import to every start), this checkout's code."""
    from benchmarks import user_paths

    script = user_paths.image_like_kproxy()
    python = script.with_name("python")
    assert python.resolve() == user_paths.IMAGE_PYTHON.resolve()
    env = user_paths.kproxy_env()
    version = subprocess.run([str(script), "--version"], env=env, capture_output=True, text=True, check=True)
    assert version.stdout.startswith("kproxy "), version
    where = subprocess.run([str(python), "-c", "import kproxy, kubernetes, nftables, pyroute2; print(kproxy.__file__)"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(user_paths.ROOT / "kproxy" / "__init__.py")
    extras = subprocess.run([str(python), "-c", "import kubernetes_validate"], env=env, capture_output=True, text=True)
    assert extras.returncode != 0 and "No module named 'kubernetes_validate'" in extras.stderr
