"""The image ``./dev image`` builds, run the way daemonset.yaml runs it (as far as this machine can).

Containers cannot run here (no cgroups), so the tests mount the image's root
filesystem and run its entrypoint with ``chroot``, set up as a container
runtime would: a mount namespace of its own holding the image read-only, with
``/etc/kproxy`` (the DaemonSet's ConfigMap) laid over it read-only, /proc, a
fresh /dev, a tmpfs /tmp (the DaemonSet's emptyDir), and the image's
environment; all inside a network namespace. What runs is the image's own
Python, libnftables and kproxy. The mounts live only in that mount namespace:
they are gone when the process ends, whatever happens to the test.

The session fixture builds the image through ``./dev image``, which rebuilds it
whenever its inputs (Dockerfile, image/, pyproject.toml, README.md, kproxy/,
rules/) differ from those dist/kproxy-<version>.json records: the image under
test is never stale. A fresh build takes about a minute; later runs reuse it.

The first tests need neither root nor the image: the test virtualenv runs the
versions the image ships, and daemonset.yaml names the image ./dev image tags.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import kproxy
from tests.harness.builders import endpoint, endpoint_slice, node, service
from tests.harness.daemonbed import ApiInNode, wait_until
from tests.harness.netbed import NetBed, Netns

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/48"
SETUP = r"""
set -e
image=$1 files=$2 root=$3
shift 3
mount -t overlay overlay -o "lowerdir=$files:$image" "$root"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=755,size=64k tmpfs "$root/dev"
for node in null zero full random urandom; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o mode=1777,size=16m tmpfs "$root/tmp"
exec chroot "$root" "$@"
"""
"""Runs in a new mount namespace (``unshare --mount``): lays out the container's root, then execs in it."""


def load_build() -> ModuleType:
    """image/build.py, which ./dev image runs."""
    spec = importlib.util.spec_from_file_location("kproxy_image_build", ROOT / "image" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def locked_versions(path: Path) -> dict[str, str]:
    """{normalized name: version} of a pip-compile lock file."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", path.read_text(), re.M)
    return {normalize(name): version for name, version in pins}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- no root, no image ------------------------------------------------------------------------------


def test_tests_run_the_versions_the_image_ships() -> None:
    """Every pin of image/requirements.lock is in the test lock unchanged, and installed in this virtualenv."""
    runtime = locked_versions(ROOT / "image" / "requirements.lock")
    test = locked_versions(ROOT / "image" / "requirements-test.lock")
    assert runtime and {name: test.get(name) for name in runtime} == runtime
    installed = {name: importlib.metadata.version(name) for name in runtime}
    assert installed == runtime, "the test virtualenv differs from image/requirements.lock: run ./dev test again"


def test_daemonset_runs_the_tag_dev_image_builds() -> None:
    """daemonset.yaml's image is the name and version ./dev image tags."""
    build = load_build()
    docs = [d for d in yaml.safe_load_all((ROOT / "daemonset.yaml").read_text()) if d]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{build.REPOSITORY}:{kproxy.__version__}" == f"{build.REPOSITORY}:{build.version()}"


# -- the image ----------------------------------------------------------------------------------------


@dataclass
class Image:
    """The built image, mounted read-only: its root filesystem, configuration and build record."""

    rootfs: Path
    env: dict[str, str]
    entrypoint: list[str]
    record: dict[str, Any]

    def command(self, argv: Sequence[str], files: Path, root: Path, entrypoint: Sequence[str] | None = None) -> list[str]:
        """The command line that runs ``entrypoint argv`` in the image, with ``files`` laid over its root."""
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", SETUP, "setup",
                str(self.rootfs), str(files), str(root), *(self.entrypoint if entrypoint is None else entrypoint),
                *argv]


class Pod:
    """What a test hands the image: files under /etc/kproxy, a scratch root to mount on."""

    def __init__(self, image: Image, tmp: Path) -> None:
        self.image = image
        self.files = tmp / "files"
        self.root = tmp / "root"
        (self.files / "etc" / "kproxy").mkdir(parents=True)
        self.root.mkdir()

    def put(self, name: str, content: str) -> str:
        """Write /etc/kproxy/NAME (read-only in the image); return its path there."""
        (self.files / "etc" / "kproxy" / name).write_text(content)
        return f"/etc/kproxy/{name}"

    def command(self, *argv: str, entrypoint: Sequence[str] | None = None) -> list[str]:
        return self.image.command(argv, self.files, self.root, entrypoint)

    def run(self, netns: Netns, *argv: str, entrypoint: Sequence[str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the image's entrypoint (or ``entrypoint``) with ``argv`` in ``netns``; output captured."""
        return subprocess.run(["ip", "netns", "exec", netns.name, *self.command(*argv, entrypoint=entrypoint)],
                              env=self.image.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def image() -> Iterator[Image]:
    """The image of the current inputs, built (or found current) by ./dev image, mounted read-only."""
    missing = [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        reason = f"building the image needs {' and '.join(missing)} (./dev test and .ci/run install them)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the image tests")
        pytest.skip(reason)
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "dev"), "image"], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        pytest.fail(f"./dev image failed ({result.returncode}):\n{result.stderr[-6000:]}")
    print(f"./dev image: {time.monotonic() - started:.0f} s", file=sys.stderr)
    build = load_build()
    record = json.loads((ROOT / "dist" / f"kproxy-{build.version()}.json").read_text())
    assert record["inputs"] == build.inputs_hash(), "./dev image left a record for other inputs"
    ref = record["tags"][0]
    (config,) = json.loads(subprocess.run([*build.PODMAN, "image", "inspect", ref], capture_output=True,
                                          text=True, check=True).stdout)
    assert config["Id"] == record["image_id"]
    env = dict(item.split("=", 1) for item in config["Config"]["Env"])
    rootfs = Path(subprocess.run([*build.PODMAN, "image", "mount", ref], capture_output=True, text=True,
                                 check=True).stdout.strip())
    try:
        yield Image(rootfs, env, config["Config"]["Entrypoint"], record)
    finally:
        subprocess.run([*build.PODMAN, "image", "unmount", ref], capture_output=True)


@pytest.fixture
def pod(image: Image, tmp_path: Path) -> Pod:
    return Pod(image, tmp_path)


def run_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


@pytest.mark.root
@pytest.mark.slow
def test_version_and_packages(pod: Pod, empty_netns: Netns) -> None:
    """``kproxy --version`` answers; /opt/kproxy holds exactly the lock's versions and this kproxy; no pip, no apt."""
    assert run_ok(pod.run(empty_netns, "--version")) == f"kproxy {kproxy.__version__}\n"
    listing = "import importlib.metadata as m, json; print(json.dumps({d.name: d.version for d in m.distributions()}))"
    installed = json.loads(run_ok(pod.run(empty_netns, "-c", listing, entrypoint=["python"])))
    expected = {**locked_versions(ROOT / "image" / "requirements.lock"), "kproxy": kproxy.__version__}
    assert {normalize(name): version for name, version in installed.items()} == expected
    rootfs = pod.image.rootfs
    assert not list(rootfs.glob("opt/kproxy/lib/python3*/site-packages/pip"))
    assert not (rootfs / "usr" / "bin" / "apt-get").exists() and not (rootfs / "usr" / "sbin" / "nft").exists()
    assert any(rootfs.glob("usr/lib/*-linux-gnu/libnftables.so.1"))


@pytest.mark.root
@pytest.mark.slow
def test_dry_run_prints_what_the_tested_kproxy_prints(pod: Pod, empty_netns: Netns, nft_check) -> None:
    """``kproxy --dry-run`` on examples/cluster.yaml: the image's script is the tested kproxy's, byte for byte."""
    path = pod.put("cluster.yaml", (ROOT / "examples" / "cluster.yaml").read_text())
    flags = ["--dry-run", "--node-name", "node-a", "--cluster-cidr", CLUSTER_CIDRS]
    script = run_ok(pod.run(empty_netns, *flags, "--from-file", path))
    tested = subprocess.run([sys.executable, "-m", "kproxy", *flags, "--from-file",
                             str(ROOT / "examples" / "cluster.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert script == run_ok(tested)
    assert "add table ip kproxy" in script
    nft_check(script)


def web_objects(bed: NetBed, endpoints: list) -> list[dict[str, Any]]:
    """The bed's Node, a ClusterIP Service web (10.96.0.10:80) and its EndpointSlice (port 8080)."""
    return [
        node(bed.node_name, [bed.node_ip4, bed.node_ip6], zone=bed.zone),
        service("web", cluster_ip="10.96.0.10"),
        endpoint_slice("web-abc", "web", [endpoint(p.ip4, node=p.node_name, zone=p.zone) for p in endpoints]),
    ]


@pytest.fixture
def bed(netbed: NetBed) -> NetBed:
    """The bed with a default route on the node and servers in every pod (TCP 8080)."""
    netbed.node.ip("route", "add", "default", "via", netbed.router_ip4)
    netbed.start_servers(tcp_ports=[8080], udp_ports=[])
    return netbed


@pytest.mark.root
@pytest.mark.slow
def test_once_programs_a_clusterip(pod: Pod, bed: NetBed) -> None:
    """``kproxy --once`` from the image programs the node: a pod and an external client reach the endpoints."""
    client, endpoints = bed.local_pods[-1], bed.local_pods[:-1] + bed.remote_pods
    path = pod.put("cluster.yaml", yaml.safe_dump_all(web_objects(bed, endpoints)))
    flags = ["--once", "--from-file", path, "--node-name", bed.node_name, "--cluster-cidr", CLUSTER_CIDRS]
    first = run_ok(pod.run(bed.node, *flags))
    assert re.match(r"kproxy: applied [1-9]\d* operations", first), first
    results = client.netns.connect_many("10.96.0.10", 80, 120)
    assert results.all_ok, f"{results.summary()}\n{bed.diagnostics()}"
    assert results.servers == {p.name for p in endpoints}
    external = bed.client.connect_many("10.96.0.10", 80, 60, timeout=2.5)
    assert external.all_ok and external.servers <= {p.name for p in endpoints}, external.summary()
    assert run_ok(pod.run(bed.node, *flags)).startswith("kproxy: applied 0 operations")


def http_get(netns: Netns, url: str) -> tuple[int, str]:
    """GET ``url`` from inside ``netns``: (status, body); (0, reason) if nothing answers."""
    with netns.entered():
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)


def daemonset_pod() -> tuple[list[str], str]:
    """The DaemonSet container's arguments and its ConfigMap's config.yaml, from daemonset.yaml."""
    docs = [d for d in yaml.safe_load_all((ROOT / "daemonset.yaml").read_text()) if d]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container["args"], configmap["data"]["config.yaml"]


@pytest.mark.root
@pytest.mark.slow
def test_daemon_answers_healthz_against_the_api_server(pod: Pod, daemon_bed: NetBed, api_in_node: ApiInNode) -> None:
    """The daemon from the image, with daemonset.yaml's arguments and config, syncs from the test API server.

    /healthz on 10256 turns 200, a ClusterIP created in the API server carries
    traffic, /metrics answers, and SIGTERM stops it with exit code 0.
    """
    bed = daemon_bed
    args, config = daemonset_pod()
    assert pod.put("config.yaml", config) == "/etc/kproxy/config.yaml"
    assert "--config=/etc/kproxy/config.yaml" in args
    kubeconfig = pod.put("kubeconfig", api_in_node.kubeconfig.read_text())
    argv = [a.replace("$(NODE_NAME)", bed.node_name) for a in args] + [f"--kubeconfig={kubeconfig}"]
    api_in_node.api.create(service("web", cluster_ip="10.96.0.10"))
    api_in_node.api.create(web_objects(bed, bed.remote_pods)[2])
    with tempfile.TemporaryFile("w+") as log:
        daemon = bed.node.popen(*pod.command(*argv), env=pod.image.env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)

        def output() -> str:
            log.seek(0)
            return log.read()[-5000:]

        try:
            wait_until(lambda: daemon.poll() is not None or http_get(bed.node, "http://127.0.0.1:10256/healthz")[0] == 200,
                       30, "/healthz 200")
            assert daemon.poll() is None, f"the daemon exited ({daemon.returncode}):\n{output()}"
            status, body = http_get(bed.node, "http://127.0.0.1:10256/healthz")
            assert status == 200 and json.loads(body)["healthy"] is True, body
            seen = wait_until(lambda: bed.client.connect_many("10.96.0.10", 80, 40, timeout=2.5).servers, 15,
                              "traffic through the ClusterIP")
            assert seen <= {p.name for p in bed.remote_pods}
            status, metrics = http_get(bed.node, "http://127.0.0.1:10249/metrics")
            assert status == 200 and "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in metrics
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(15) == 0, output()
        except BaseException:
            with contextlib.suppress(Exception):
                print(output(), file=sys.stderr)
            raise
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(5)
