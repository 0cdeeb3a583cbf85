"""The user's entry points, run as processes the way users run them, judged from the kernel.

    sudo .venv/bin/python benchmarks/user_paths.py daemon  [--quick] [--sizes N ...] [--repeats R] [--daemon-flag=--FLAG=V ...]
    sudo .venv/bin/python benchmarks/user_paths.py files   [--quick] [--sizes N ...] [--repeats R] [--formats json yaml]
    sudo .venv/bin/python benchmarks/user_paths.py metrics [--quick] [--sizes N ...] [--daemon-flag=--service-metrics=all]

Every run execs ``kproxy``, the console script the image's ENTRYPOINT runs
(this worktree's ``kproxy`` package, through PYTHONPATH), in a fresh network
namespace of its own, and times it from the exec. It runs as in the image:
Debian's python3 in a virtualenv of exactly image/requirements.lock, made once
(``image_like_kproxy``); ``--quick`` (the test suite) runs the test environment. The cluster is the one of
``benchmarks/synthetic.py`` (N Services x 10 endpoints: ClusterIPs, one in
five a NodePort, one in twenty with ClientIP affinity, one in twenty with
externalTrafficPolicy Local), as full manifests (``benchmarks/exports.py``:
uid, resourceVersion, labels, owner references, defaulted fields), and 50
Nodes.

* ``daemon``: the daemon as daemonset.yaml starts it: ``--config`` (the
  ConfigMap's config.yaml, clusterCIDR set to the synthetic pods'
  10.128.0.0/9: the ConfigMap's one field marked EDIT), ``--hostname-override``
  (and $NODE_NAME), plus ``--kubeconfig`` pointing at the test API server
  (tests/harness/fakeapi.py: real HTTP list and watch), which already holds
  the cluster and listens on the namespace's loopback. Measured: the time
  from exec until the kernel holds every ClusterIP and endpoint, the daemon's
  CPU time until then, and the peak RSS (VmHWM) of every process of its tree.
* ``files``: ``kproxy --once`` and ``kproxy --dry-run`` on the export files
  ``kubectl get svc,endpointslices,nodes -A -o json`` (and ``-o yaml``)
  writes, with the same config file and node name. ``--once`` runs in a fresh
  namespace and is judged from the kernel after it exits; ``--dry-run``
  writes its script to a file, checked for the last Service's ClusterIP.

**Judged from the kernel** (benchmarks/kernel_check.py, nf_tables netlink
point lookups; ``nft`` itself needs 11 s and 900 MB per query at 30k): every
10 ms the ClusterIPs of a sample of Services (the last two Services and the
Services of the last two EndpointSlices in the API server's listing order,
the first, the middle one; none with ClientIP affinity, whose endpoints are
rules) are looked up in ``service-ips``; once they are all there, in the same
poll, their ten endpoint slots in the ``endpoints-*`` maps, which must map to
exactly the Service's ten endpoints. That poll's time is the result (10 ms
resolution; about 0.2 ms of CPU per poll, 2% of a core). Then, outside the
timing, every element of ``service-ips`` and of the endpoint maps is dumped
and compared with the cluster: every Service's ClusterIP, and the exact
endpoint set of every Service's ClusterIP frontend but the affinity ones.

Peak RSS is VmHWM from /proc/PID/status, of the process and of every
descendant, sampled every 10-50 ms while it runs (ru_maxrss of a child is
not used: over a fork it carries the parent's peak, here the test API
server's gigabyte at 30k). The test API server runs in this process; its
objects are encoded once beforehand and kept out of the garbage collector,
and this process's CPU time during each cold start (serving the lists and
the watches, and the polls) is reported beside the daemon's.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import functools
import gc
import hashlib
import os
import py_compile
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import exports  # noqa: E402
from benchmarks.kernel_check import (  # noqa: E402
    Netlink,
    endpoint_data,
    endpoints_map,
    frontend_key,
    slot_key,
)
from benchmarks.synthetic import NODE_NAME, endpoint_address, service_manifest  # noqa: E402

TEST_KPROXY = Path(sys.executable).with_name("kproxy")
"""The console script of the test environment (.venv: this interpreter, the test extras installed)."""
IMAGE_PYTHON = Path("/usr/bin/python3")
"""Debian 12's python3, the interpreter of the image (image/debian.in): Debian's build, which runs Python
faster than a source build such as pyenv's (the 10M-step loop: 0.28-0.29 s against 0.34 s here)."""
INTERPRETER = {"which": "image"}
"""Which environment runs kproxy: ``image`` (full runs) or ``test`` (--quick, the test suite: no venv to build)."""
DAEMONSET = ROOT / "daemonset.yaml"
SYNTHETIC_CLUSTER_CIDR = "10.128.0.0/9"
ENDPOINTS = 10
FULL_SIZES = [1_000, 10_000, 30_000]
QUICK_SIZES = [1_000]
POLL = 0.01
"""Seconds between two kernel polls while a daemon starts."""
NODE_IP = "192.168.50.1"
"""node-0's InternalIP in the cluster; the namespace gets it on its eth0, as a node has its own address."""
TARGETS = {
    # (path, Services): (seconds, MB)
    ("daemon", 1_000): (None, None),
    ("daemon", 10_000): (3.0, 400),
    ("daemon", 30_000): (10.0, 1000),
    ("once", 10_000): (3.0, 400),
    ("dry-run", 10_000): (2.0, None),
}
QUIET = {"max_wait": 600.0}
"""How long ``wait_quiet`` waits for other processes to calm down before a measurement (0 with --quick)."""


# --- the daemon as daemonset.yaml starts it --------------------------------------------------------


def daemonset_config(cluster_cidr: str) -> str:
    """config.yaml of daemonset.yaml's ConfigMap, with its EDIT field (clusterCIDR) set."""
    import yaml

    for document in yaml.safe_load_all(DAEMONSET.read_text()):
        if document and document.get("kind") == "ConfigMap":
            text = document["data"]["config.yaml"]
            edited, count = re.subn(r"(?m)^(\s*clusterCIDR:\s*).*$", rf"\g<1>{cluster_cidr}", text)
            assert count == 1, "daemonset.yaml's config.yaml has no clusterCIDR line"
            return edited
    raise RuntimeError(f"{DAEMONSET} has no ConfigMap")


def daemonset_args(config_path: str, node_name: str) -> list[str]:
    """The kproxy container's args in daemonset.yaml, with the ConfigMap's path and $(NODE_NAME) filled in."""
    import yaml

    for document in yaml.safe_load_all(DAEMONSET.read_text()):
        if document and document.get("kind") == "DaemonSet":
            (container,) = [c for c in document["spec"]["template"]["spec"]["containers"] if c["name"] == "kproxy"]
            return [a.replace("/etc/kproxy/config.yaml", config_path).replace("$(NODE_NAME)", node_name)
                    for a in container["args"]]
    raise RuntimeError(f"{DAEMONSET} has no DaemonSet")


def kproxy_command() -> Path:
    """The ``kproxy`` console script the benchmarks exec: the image's environment unless --quick."""
    return image_like_kproxy() if INTERPRETER["which"] == "image" else TEST_KPROXY


def describe_interpreter() -> str:
    """Which environment ran kproxy, for the tables' notes."""
    if INTERPRETER["which"] != "image":
        return f"kproxy ran in the test environment ({sys.executable}, Python {sys.version.split()[0]}, test extras)"
    version = subprocess.run([str(IMAGE_PYTHON), "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return (f"kproxy ran as in the image: Debian's {IMAGE_PYTHON} (Python {version}) in a virtualenv of exactly "
            "image/requirements.lock, its own code from this checkout")


@functools.cache
def image_like_kproxy() -> Path:
    """kproxy's console script in a virtualenv like the image's /opt/kproxy.

    Debian's python3 and exactly the pinned packages of image/requirements.lock
    (hash-checked; no test extras: with kubernetes-validate installed, the
    ``kubernetes`` package imports it and jsonschema at start-up, 80 ms the
    image never pays), kproxy itself from this checkout through PYTHONPATH
    (``kproxy_env``). Made once per lock and interpreter, under the exports'
    cache directory.
    """
    lock = ROOT / "image" / "requirements.lock"
    if not IMAGE_PYTHON.exists():
        raise SystemExit(f"{IMAGE_PYTHON} (Debian's python3 and python3-venv, as in the image) is needed; "
                         "--quick runs the test environment instead")
    key = hashlib.sha256(lock.read_bytes() + str(IMAGE_PYTHON.resolve()).encode()).hexdigest()[:16]
    home = exports.CACHE / f"runtime-{key}"
    script = home / "bin" / "kproxy"
    if not script.exists():
        building = home.with_name(home.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([str(IMAGE_PYTHON), "-m", "venv", str(building)], check=True)
        subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--require-hashes", "--no-deps", "-r", str(lock)], check=True)
        # What pip writes for kproxy's [project.scripts] entry, with the interpreter's final path.
        (building / "bin" / "kproxy").write_text(
            f"#!{home}/bin/python\nimport sys\nfrom kproxy.cli import console\n\nif __name__ == '__main__':\n"
            "    sys.exit(console())\n")
        (building / "bin" / "kproxy").chmod(0o755)
        building.rename(home)
    return script


def kproxy_env(node_name: str = NODE_NAME) -> dict[str, str]:
    ensure_bytecode()
    return dict(os.environ, PYTHONPATH=str(ROOT), NODE_NAME=node_name)


@functools.cache
def ensure_bytecode() -> None:
    """Compile kproxy's bytecode (the .pyc files), as pip and the image do when they install kproxy.

    The checkout's package is imported from source, and where
    PYTHONDONTWRITEBYTECODE is set (this machine's environment, and the
    image's, which compiles at install) Python never writes the .pyc it
    compiles: each process started would compile all of kproxy's modules
    again, 0.1 s of a daemon's cold start that an installed kproxy does not
    pay. The .pyc files are checked against a hash of their source, not its
    mtime: a file edited twice within one second, at one size, is not taken
    for compiled (compileall then rewrites every file: 0.3 s, once per
    benchmark process and before any time is measured).
    """
    compileall.compile_dir(str(ROOT / "kproxy"), quiet=1, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)


# --- namespaces -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_netns(node_ip: str | None = NODE_IP) -> Iterator[Any]:
    """A new network namespace (lo up, an eth0 with the node's address, a veth whose peer stays inside), deleted afterwards."""
    from tests.harness.netbed import Netns, teardown_namespaces

    ns = Netns(f"kpt-ub-{secrets.token_hex(3)}")
    try:
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        lines = ["link set lo up"]
        if node_ip:
            lines += ["link add eth0 type veth peer name eth0-peer", f"addr add {node_ip}/24 dev eth0",
                      "link set eth0-peer up", "link set eth0 up"]
        ns.ip_batch(lines)
        yield ns
    finally:
        teardown_namespaces([ns.name])


# --- what the kernel must hold ---------------------------------------------------------------------------


def _affinity(i: int) -> bool:
    return service_manifest(i)["spec"].get("sessionAffinity") == "ClientIP"


@dataclass
class Expected:
    """The ClusterIP frontends and endpoints of a synthetic cluster, and the sample the polls look up."""

    services: int
    sample: list[int] = field(init=False)

    def __post_init__(self) -> None:
        n = self.services
        by_service = sorted(range(n), key=lambda i: (f"ns-{i % 100}", f"svc-{i}"))
        by_slice = sorted(range(n), key=lambda i: (f"ns-{i % 100}", f"svc-{i}-abcde"))
        plain = [i for i in by_service if not _affinity(i)]
        plain_slices = [i for i in by_slice if not _affinity(i)]
        picks = [*plain[-2:], *plain_slices[-2:], plain[0], plain[len(plain) // 2]]
        self.sample = list(dict.fromkeys(picks))

    def frontend(self, i: int) -> bytes:
        return frontend_key(service_manifest(i)["spec"]["clusterIP"], "tcp", 80)

    def endpoints(self, i: int) -> set[bytes]:
        return {endpoint_data(endpoint_address(i, j, ENDPOINTS), 8080) for j in range(ENDPOINTS)}

    def probe(self, netlink: Netlink) -> KernelPoll:
        return KernelPoll(self, netlink)

    def full_check(self, netlink: Netlink) -> tuple[list[str], dict[str, int]]:
        """Every element of service-ips and of the endpoint maps against the cluster: (problems, counts)."""
        service_ips = netlink.dump("service-ips")
        by_frontend: dict[bytes, set[bytes]] = {}
        counts = {"service-ips": len(service_ips)}
        band = 4
        while band <= 256:
            name = f"endpoints-{band}"
            elements = netlink.dump(name)
            counts[name] = len(elements)
            for key, data in elements.items():
                if data is not None:
                    by_frontend.setdefault(key[:12], set()).add(data)
            band *= 2
        problems, short = [], []
        for i in range(self.services):
            frontend = self.frontend(i)
            if frontend not in service_ips:
                problems.append(f"svc-{i}: ClusterIP not in service-ips")
                short.append(i)
            elif not _affinity(i) and (found := by_frontend.get(frontend, set())) != self.endpoints(i):
                problems.append(f"svc-{i}: endpoints {len(found)} of {ENDPOINTS}")
                if found < self.endpoints(i):
                    short.append(i)
        if problems and len(short) == len(problems) and len(short) <= RECHECK_MAX:
            # A dump is not a snapshot: each of its messages walks the set anew, skipping what earlier ones sent,
            # so a set the kernel rehashes meanwhile (it grows hash tables after a commit, in a worker) can come
            # back short. When the dumps only lack elements, and few, point lookups of them decide. (The kproxy
            # daemon adds every ClusterIP in one transaction, after the endpoints: an element landing between
            # the dump and the lookups would not make the timing, taken when the sample's ClusterIPs were in,
            # too early.)
            lacking = set()
            for at in range(0, len(short), 100):  # one datagram of lookups per 100 Services: under SO_SNDBUF
                lacking |= KernelPoll(self, netlink, short[at:at + 100]).missing()
            if len(lacking) < len(short):
                print(f"the dumps missed elements of {len(short) - len(lacking)} Services that point lookups found",
                      file=sys.stderr)
            problems = [text for i, text in zip(short, problems, strict=True) if i in lacking]
        return problems, counts


RECHECK_MAX = 2000
"""The most Services whose elements a full check looks up one by one after the dumps lacked them."""


class KernelPoll:
    """One poll: the sample's ClusterIPs, then (if all there) their endpoint slots, in one round trip each."""

    def __init__(self, expected: Expected, netlink: Netlink, services: list[int] | None = None) -> None:
        from benchmarks.kernel_check import Element

        self.netlink = netlink
        self.expected = expected
        self.services = expected.sample if services is None else services
        self.ips = netlink.prepare([Element("service-ips", expected.frontend(i), None) for i in self.services])
        slots = []
        self.groups: list[tuple[int, list[Element], set[bytes]]] = []
        for i in self.services:
            if services is not None and _affinity(i):
                continue  # the sample has none; their endpoints are rules, not slots
            group = [Element(endpoints_map(k), slot_key(expected.frontend(i), k << 16), None)
                     for k in range(1, ENDPOINTS + 1)]
            slots += group
            self.groups.append((i, group, expected.endpoints(i)))
        self.slots = netlink.prepare(slots)

    def holds(self) -> bool:
        if not all(v is not False for v in self.netlink.lookup(self.ips).values()):
            return False
        found = self.netlink.lookup(self.slots)
        return all({found.get(e) for e in group} == want for _, group, want in self.groups)

    def missing(self) -> set[int]:
        """The Services whose ClusterIP or endpoint slots the kernel lacks (or holds with other data)."""
        by_seq, _ = self.ips
        ips = self.netlink.lookup(self.ips)
        lacking = {i for i, element in zip(self.services, by_seq.values(), strict=True) if ips.get(element) is False}
        found = self.netlink.lookup(self.slots)
        lacking |= {i for i, group, want in self.groups if {found.get(e) for e in group} != want}
        return lacking


# --- processes: CPU and peak RSS --------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _kb(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (/proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (all its threads) and of its reaped children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


class TreeMemory(threading.Thread):
    """Samples VmHWM of a process and its descendants until stopped; keeps each process's peak."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True, name=f"vmhwm-{pid}")
        self.pid, self.interval = pid, interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._done = threading.Event()

    def sample(self) -> None:
        for p in descendants(self.pid):
            status = _status(p)
            if status:
                kb = _kb(status.get("VmHWM"))
                if kb >= self.peaks.get(p, ("", 0))[1]:
                    self.peaks[p] = (status.get("Name", "?").strip(), kb)

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def finish(self) -> TreeMemory:
        self.sample()
        self._done.set()
        if self.is_alive():
            self.join()
        return self

    @property
    def main_mb(self) -> float:
        return self.peaks.get(self.pid, ("", 0))[1] / 1024

    @property
    def tree_mb(self) -> float:
        return sum(kb for _, kb in self.peaks.values()) / 1024

    def describe(self) -> str:
        return ", ".join(f"{name}[{pid}] {kb / 1024:.0f} MB" for pid, (name, kb) in sorted(self.peaks.items()))


def _machine_busy() -> float:
    """CPU seconds the machine has spent busy so far, all cores (user, nice, system, irq, softirq; not steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / CLOCK_TICKS


def _own_cpu() -> float:
    """CPU seconds of this process and every process below it, live or reaped."""
    return sum(cpu_seconds(p) for p in descendants(os.getpid()))


class OtherLoad:
    """How many cores other processes kept busy meanwhile (others work on this machine too)."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), _machine_busy(), _own_cpu()

    def cores(self) -> float:
        wall = time.monotonic() - self.t0
        others = (_machine_busy() - self.busy0) - (_own_cpu() - self.own0)
        return max(0.0, others / wall) if wall > 0 else 0.0


def wait_quiet(max_wait: float | None = None, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other processes keep less than ``threshold`` cores busy for 2 s in a row.

    Returns the seconds waited. The development machine is shared; a
    measurement started in the middle of someone else's test run says little.
    """
    max_wait = QUIET["max_wait"] if max_wait is None else max_wait
    started = time.monotonic()
    quiet = 0
    while quiet < 2 and time.monotonic() - started < max_wait:
        load = OtherLoad()
        time.sleep(1.0)
        quiet = quiet + 1 if load.cores() < threshold else 0
    return time.monotonic() - started


def reset_peak(pid: int) -> None:
    """Reset the process's VmHWM to its current RSS (Linux: 5 > /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# --- the test API server ----------------------------------------------------------------------------------


class ApiServer:
    """The test API server in this process, holding a synthetic cluster as full manifests."""

    def __init__(self, services: int, extra: list[dict[str, Any]] | None = None) -> None:
        from tests.harness.fakeapi import FakeKubeAPI

        self.api = FakeKubeAPI(bookmark_interval=60.0)
        self.api.load(exports.server_objects(services, ENDPOINTS))
        self.api.load(extra or [])
        self.api.warm()
        gc.collect()
        gc.freeze()  # the cluster's million objects stay out of this process's garbage collections
        self.dir = tempfile.TemporaryDirectory(prefix="kproxy-userbench-")
        self.kubeconfig = Path(self.dir.name) / "kubeconfig"

    @contextlib.contextmanager
    def serving_in(self, ns: Any) -> Iterator[None]:
        """Listen on 127.0.0.1 in ``ns`` (the daemon's loopback), for the with-block."""
        import yaml

        with ns.entered():
            self.api.start()
        try:
            self.kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "bench",
                "clusters": [{"name": "bench", "cluster": {"server": self.api.url}}],
                "users": [{"name": "bench", "user": {"token": "benchmark"}}],
                "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
            }))
            yield
        finally:
            self.api.stop()

    def close(self) -> None:
        if self.api.running:
            self.api.stop()
        self.dir.cleanup()
        gc.unfreeze()


class Daemon:
    """``kproxy`` (the daemon) with daemonset.yaml's args, exec'd in ``ns``; stderr to a file."""

    def __init__(self, ns: Any, api: ApiServer, cluster_cidr: str, extra: list[str], node_name: str = NODE_NAME) -> None:
        self.dir = Path(api.dir.name)
        config = self.dir / "config.yaml"
        config.write_text(daemonset_config(cluster_cidr))
        self.args = [*daemonset_args(str(config), node_name), f"--kubeconfig={api.kubeconfig}", *extra]
        self.log = (self.dir / "kproxy.log").open("w+b")
        env = kproxy_env(node_name)  # (compiles the bytecode first, outside the time measured)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, str(kproxy_command()), *self.args],
                                     env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log, cwd="/")

    def tail(self, lines: int = 30) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"kproxy exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_programmed(daemon: Daemon, poll: KernelPoll, timeout: float) -> float:
    """Poll the kernel every POLL seconds until it holds the sample; the seconds from exec to that poll."""
    deadline = daemon.started + timeout
    while True:
        now = time.monotonic()
        if poll.holds():
            return now - daemon.started
        daemon.alive()
        if now > deadline:
            raise RuntimeError(f"the kernel did not hold the cluster {timeout:.0f} s after exec:\n{daemon.tail()}")
        time.sleep(max(0.0, POLL - (time.monotonic() - now)))


def process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def daemon_cold_start(api: ApiServer, expected: Expected, extra: list[str], timeout: float) -> dict[str, Any]:
    """One cold start of the daemon in a fresh namespace; the namespace and daemon are gone afterwards."""
    waited = wait_quiet()
    with fresh_netns() as ns, api.serving_in(ns):
        with ns.entered():
            netlink = Netlink()
        try:
            poll = expected.probe(netlink)
            load = OtherLoad()
            own0 = process_cpu()
            daemon = Daemon(ns, api, SYNTHETIC_CLUSTER_CIDR, extra)
            memory = TreeMemory(daemon.proc.pid, 0.05)
            memory.start()
            try:
                seconds = wait_programmed(daemon, poll, timeout)
                cpu = cpu_seconds(daemon.proc.pid)
                own = process_cpu() - own0
                others = load.cores()
                problems, counts = expected.full_check(netlink)
                if problems:
                    raise RuntimeError(f"the kernel lacks {len(problems)} Services' elements once the sample is there, "
                                       f"{time.monotonic() - daemon.started - seconds:.2f} s later: {problems[:5]}\n"
                                       f"the daemon's log:\n{daemon.tail(60)}")
                daemon.alive()
            finally:
                memory.finish()
                daemon.stop()
        finally:
            netlink.close()
    return {"services": expected.services, "seconds": seconds, "cpu_s": cpu, "rss_mb": memory.main_mb,
            "tree_mb": memory.tree_mb, "tree": memory.describe(), "bench_cpu_s": own, "others_cores": others,
            "waited_s": waited, **counts}


def median_row(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key``, plus the range of every numeric column over the runs."""
    ordered = sorted(runs, key=lambda r: r[key])
    row = dict(ordered[len(ordered) // 2])
    row["runs"] = len(runs)
    for name, value in list(row.items()):
        if isinstance(value, float):
            values = [r[name] for r in runs]
            row[f"{name}_min"], row[f"{name}_max"] = min(values), max(values)
            row[f"{name}_median"] = statistics.median(values)
    return row


def _target(path: str, services: int) -> tuple[float | None, float | None]:
    return TARGETS.get((path, services), (None, None))


def _verdict(seconds: float, mb: float | None, target: tuple[float | None, float | None]) -> str:
    t_s, t_mb = target
    if t_s is None and t_mb is None:
        return "-"
    misses = []
    if t_s is not None and seconds > t_s:
        misses.append("time")
    if t_mb is not None and mb is not None and mb > t_mb:
        misses.append("memory")
    return "missed: " + " and ".join(misses) if misses else "met"


def _target_text(target: tuple[float | None, float | None]) -> str:
    t_s, t_mb = target
    parts = ([f"<= {t_s:g} s"] if t_s is not None else []) + ([f"<= {t_mb:g} MB"] if t_mb is not None else [])
    return ", ".join(parts) or "-"


def main_daemon(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parser("daemon", repeats=5).parse_args(argv)
    quick_mode(args.quick)
    rows = []
    for services in args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES):
        api = ApiServer(services)
        try:
            expected = Expected(services)
            runs = [daemon_cold_start(api, expected, args.daemon_flag, timeout=60 + services / 100)
                    for _ in range(1 if args.quick else args.repeats)]
        finally:
            api.close()
        rows.append(median_row(runs, "seconds"))
    command = " ".join(["kproxy", *daemonset_args("config.yaml", NODE_NAME), "--kubeconfig=...", *args.daemon_flag])
    print(f"_The daemon (`{command}`) "
          "exec'd on an empty node namespace, the test API server already holding the cluster; each figure the median "
          f"of {rows[0]['runs'] if rows else 0} cold starts, range in brackets; others' load: the most over a run; "
          f"{describe_interpreter()}._\n")
    print("| Services x 10 endpoints | exec to kernel programmed, s | daemon CPU s | peak RSS MB (VmHWM) | target | "
          "| test API server + polls CPU s | others' load, cores | kernel: service-ips / endpoint elements |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = _target("daemon", r["services"])
        elements = sum(v for k, v in r.items() if k.startswith("endpoints-") and isinstance(v, int))
        print(f"| {r['services']:,} | {r['seconds']:.2f} [{r['seconds_min']:.2f}-{r['seconds_max']:.2f}] | "
              f"{r['cpu_s_median']:.2f} | {r['rss_mb_median']:.0f} [{r['rss_mb_min']:.0f}-{r['rss_mb_max']:.0f}] | "
              f"{_target_text(target)} | {_verdict(r['seconds'], r['rss_mb_median'], target)} | "
              f"{r['bench_cpu_s_median']:.2f} | "
              f"{r['others_cores_max']:.2f} | {r['service-ips']:,} / {elements:,} |")
    if any(r["tree_mb"] != r["rss_mb"] for r in rows):
        print(f"\n_The daemon's process tree (peak of each process): {'; '.join(r['tree'] for r in rows)}._")
    else:
        print("\n_The daemon's process tree is the one kproxy process (`ip netns exec` execs it): no child processes._")
    return rows


# --- --once and --dry-run on kubectl exports --------------------------------------------------------------


def run_file_mode(mode: str, path: Path, expected: Expected, out_dir: str) -> dict[str, Any]:
    """``kproxy --once`` (in a fresh namespace, then judged from the kernel) or ``--dry-run`` (to a file)."""
    config = Path(out_dir) / "config.yaml"
    config.write_text(daemonset_config(SYNTHETIC_CLUSTER_CIDR))
    args = [f"--{mode}", f"--config={config}", f"--hostname-override={NODE_NAME}", "--from-file", str(path)]
    output = Path(out_dir) / f"{mode}.out"
    wait_quiet()
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(fresh_netns()) if mode == "once" else None
        prefix = ["ip", "netns", "exec", ns.name] if ns else []
        # /usr/bin/time forks kproxy from a small process: its %M (ru_maxrss) is then kproxy's own peak,
        # which a fork of this big process would not give (VmHWM, sampled every 10 ms, is the cross-check).
        timed = Path(out_dir) / "time.out"
        with output.open("wb") as out, tempfile.TemporaryFile() as err:
            env = kproxy_env()  # (compiles the bytecode first, outside the time measured)
            load = OtherLoad()
            started = time.monotonic()
            proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(timed), *prefix, str(kproxy_command()), *args],
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd="/")
            memory = TreeMemory(proc.pid, 0.01)
            memory.start()
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.monotonic() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            others = load.cores()
            memory.finish()
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"kproxy {' '.join(args)} exited with {proc.returncode}:\n{stderr[-3000:]}")
        sampled = max((kb for name, kb in memory.peaks.values() if name == "kproxy"), default=0) / 1024
        row: dict[str, Any] = {"mode": mode, "services": expected.services, "seconds": seconds,
                               "cpu_s": usage.ru_utime + usage.ru_stime,  # of time and kproxy: time's is nil
                               "rss_mb": max(sampled, int(timed.read_text().split()[-1]) / 1024),
                               "sampled_mb": sampled, "tree": memory.describe(), "file_mb": path.stat().st_size / 1e6,
                               "others_cores": others}
        if ns is not None:
            with ns.entered():
                netlink = Netlink()
            with contextlib.closing(netlink):
                if not expected.probe(netlink).holds():
                    raise RuntimeError("--once exited 0 but the kernel lacks the sample's elements")
                problems, counts = expected.full_check(netlink)
            if problems:
                raise RuntimeError(f"--once: the kernel lacks {len(problems)} Services' elements: {problems[:5]}")
            row["elements"] = sum(v for k, v in counts.items() if k.startswith("endpoints-"))
            row["output"] = output.read_text().strip().splitlines()[-1][:80]
        else:
            last = service_manifest(expected.sample[0])["spec"]["clusterIP"]
            size = output.stat().st_size
            with output.open("rb") as f:
                text = f.read()
            if f" {last} . tcp . 80 ".encode() not in text:
                raise RuntimeError(f"--dry-run: no element for {last} in its {size} bytes of output")
            row["output"] = f"{size / 1e6:.1f} MB of nft script"
    return row


def main_files(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = _parser("files", repeats=3)
    parser.add_argument("--formats", nargs="+", choices=("json", "yaml"), default=None)
    parser.add_argument("--modes", nargs="+", choices=("once", "dry-run"), default=["once", "dry-run"])
    args = parser.parse_args(argv)
    quick_mode(args.quick)
    formats = args.formats or (["json"] if args.quick else ["json", "yaml"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="kproxy-userbench-") as out_dir:
        for services in args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES):
            expected = Expected(services)
            for fmt in formats:
                path = exports.export_file(services, fmt, ENDPOINTS)
                for mode in args.modes:
                    runs = []
                    for _ in range(1 if args.quick else args.repeats):
                        run = run_file_mode(mode, path, expected, out_dir)
                        run["format"] = fmt
                        runs.append(run)
                    rows.append(median_row(runs, "seconds"))
    print("_`kproxy --once` (in a fresh namespace, judged from the kernel after it exits) and `kproxy --dry-run` "
          "(script to a file) on `kubectl get svc,endpointslices,nodes -A -o json|yaml` exports (benchmarks/exports.py), "
          f"with daemonset.yaml's config file and `--hostname-override={NODE_NAME}`; each figure the median of "
          f"{rows[0]['runs'] if rows else 0} runs, range in brackets; time from exec to exit; others' load: the most "
          f"over a run; {describe_interpreter()}._\n")
    print("| mode | export | Services x 10 endpoints | file MB | exec to exit, s | CPU s | peak RSS MB | target | | "
          "others' load, cores | output |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = _target(r["mode"], r["services"]) if r["format"] == "json" else (None, None)
        print(f"| --{r['mode']} | {r['format']} | {r['services']:,} | {r['file_mb']:.0f} | {r['seconds']:.2f} "
              f"[{r['seconds_min']:.2f}-{r['seconds_max']:.2f}] | {r['cpu_s_median']:.2f} | {r['rss_mb_median']:.0f} | "
              f"{_target_text(target)} | {_verdict(r['seconds'], r['rss_mb_median'], target)} | "
              f"{r['others_cores_max']:.2f} | "
              f"{r['output']} |")
    return rows


# --- /metrics -----------------------------------------------------------------------------------------------


def wait_idle(pid: int, timeout: float = 120.0) -> None:
    """Until the process used under 2% of a core for a whole second."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - before < 0.02:
            return
        before = now


def _parser(name: str, repeats: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"user_paths.py {name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 Services, one run (the test suite runs this)")
    parser.add_argument("--sizes", nargs="+", type=int, help=f"Services (default: {FULL_SIZES})")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"runs per row, the median reported (default {repeats})")
    parser.add_argument("--daemon-flag", action="append", default=[], metavar="--FLAG=VALUE",
                        help="an extra flag for the daemon (repeatable; flags win over the config file)")
    return parser


COMMANDS = {"daemon": main_daemon, "files": main_files}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/user_paths.py needs root (network namespaces, nftables)")
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: user_paths.py {{{','.join(COMMANDS)}}} [--quick] [options]; -h for help")
    COMMANDS[argv[0]](argv[1:])


def quick_mode(quick: bool) -> None:
    """--quick (the test suite): do not wait for the machine to be quiet, and run kproxy in the test environment."""
    if quick:
        QUIET["max_wait"] = 0.0
        INTERPRETER["which"] = "test"


if __name__ == "__main__":
    main()
