"""Network-namespace test bed for kproxy end-to-end datapath tests.

Use the ``netbed`` fixture (import it into the test module or a conftest:
``from tests.harness.netbed import netbed``) or the ``build_netbed()`` context manager.
Both need root; the fixture fails otherwise (as tests/conftest.py does for tests
marked ``root``).  Mark tests with ``pytest.mark.root``.

Topology (every namespace is named ``kpt-<6 hex>-<role>``; all addresses are private
and exist only inside these namespaces)::

    client  eth0 192.168.50.100/24 fd00:50::100/64 --+
    client2 eth0 192.168.50.101/24 fd00:50::101/64 --+-- vcl1/vcl2 (bridge ports)
                                                         |
    +--------------- node ns ("node-a", zone-a) ------------------------------------+
    | br-ext  192.168.50.1/24 fd00:50::1/64   (the node IP)                         |
    | veth-aN 10.244.1.1/32 fd00:244:0:1::1/128 fe80::1/64 --- pod-aN eth0          |
    |                     10.244.1.(10+N)/32 fd00:244:0:1::(10+N)/128               |
    | veth-rt 172.30.0.1/30 fd00:30::1/64                                           |
    +----------|--------------------------------------------------------------------+
               |
    +--------- router ns ("node-b", zone-b) ----------------------------------------+
    | eth0    172.30.0.2/30 fd00:30::2/64                                           |
    | veth-bN 10.244.2.1/32 fd00:244:0:2::1/128 fe80::1/64 --- pod-bN eth0          |
    |                     10.244.2.(10+N)/32 fd00:244:0:2::(10+N)/128               |
    +-------------------------------------------------------------------------------+

IPv6 pod addresses are ``fd00:244:0:<n>::<10+N>``: one /64 per node inside the cluster
pod CIDR fd00:244::/48 (``fd00:244:1::/64`` would lie outside that /48).

Pods use *routed* veths (Calico-like, no bridge, no br_netfilter): the pod has a /32
(/128) address and ``default via 10.244.1.1 dev eth0 onlink`` / ``default via
fe80::1 dev eth0``; the host side of every pod veth carries the same gateway addresses
(10.244.1.1/32, fd00:244:0:1::1/128, fe80::1/64) and the host routes each pod /32
(/128) to its veth.  So *all* pod traffic, also pod-to-pod on the same node and
hairpin, is routed through the node's IP stack (prerouting/forward/postrouting).  Note
that a hairpinned packet (pod -> service -> same pod) is dropped by the pod as a
martian unless the proxy masquerades it, as on a real node.

The node routes 10.244.2.0/24 and fd00:244:0:2::/64 via the router (172.30.0.2 /
fd00:30::2); the router routes each remote pod to its veth and everything else via
the node.  Clients have a default route via the node (192.168.50.1 /
fd00:50::1) plus ``unreachable`` routes for the pod CIDRs (10.244.0.0/16,
fd00:244::/48), so they reach pods only through Service IPs / the node IP.  The node
and the router forward IPv4 and IPv6; rp_filter is 0 and IPv6 DAD is off everywhere.

Traffic: ``trafficd.py serve`` runs in the namespaces as servers answering
``ID <peer-ip>``; clients use ``Netns.connect_many`` (in-process: the calling thread enters the
namespace with setns(2) for the duration of the call, no process per call),
``Netns.start_loop`` and ``Netns.start_udp_flow`` (long-running trafficd processes).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    from . import trafficd
except ImportError:  # imported as a top-level module
    import trafficd  # type: ignore[no-redef]

from_dict = trafficd.Result.from_dict
Result = trafficd.Result

TRAFFICD = Path(__file__).resolve().with_name("trafficd.py")
PYTHON = sys.executable
NETNS_RUN_DIR = Path("/run/netns")
NS_PREFIX = "kpt-"

root = pytest.mark.root

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 30.0) -> subprocess.CompletedProcess:
    cp = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise RuntimeError(f"command failed ({cp.returncode}): {' '.join(argv)}\n"
                           f"stdin:\n{input or ''}stdout:\n{cp.stdout}stderr:\n{cp.stderr}")
    return cp


def _ip_batch(lines: Iterable[str], netns: str | None = None, force: bool = False,
              check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip"] + (["-n", netns] if netns else []) + (["-force"] if force else []) + ["-batch", "-"]
    return _run(argv, input="".join(line + "\n" for line in lines), check=check)


# ----------------------------------------------------------------------------- results

class Results(list):
    """A list of trafficd.Result with a few summaries for assertions."""

    @property
    def ok(self) -> list[Result]:
        return [r for r in self if r.ok]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self if not r.ok]

    @property
    def all_ok(self) -> bool:
        return all(r.ok for r in self)

    @property
    def by_server(self) -> collections.Counter:
        return collections.Counter(r.server for r in self if r.ok)

    @property
    def by_error(self) -> collections.Counter:
        return collections.Counter(r.error for r in self if not r.ok)

    @property
    def servers(self) -> set[str]:
        return {r.server for r in self if r.ok}

    @property
    def peers(self) -> set[str]:
        return {r.peer for r in self if r.ok}

    def summary(self) -> str:
        return f"{len(self)} attempts: ok={dict(self.by_server)} failed={dict(self.by_error)}"


@dataclass
class LoopSummary:
    total: int
    ok: int
    failed: int
    by_server: dict[str, int]
    by_error: dict[str, int]
    failures: list[dict]
    first_t: float | None = None
    last_t: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> LoopSummary:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- processes

class _ProcReader:
    """Reads a child's stdout line by line in a thread; waiters poll shared state."""

    def __init__(self, proc: subprocess.Popen, what: str) -> None:
        self.proc = proc
        self.what = what
        self.cond = threading.Condition()
        self.lines: list[str] = []
        self.ready: dict | None = None
        self.results: list[Result] = []
        self.final: object = None
        self.eof = False
        self.thread = threading.Thread(target=self._read, name=f"reader-{what}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
                if line == "READY":
                    self.ready = {}
                elif line.startswith(("{", "[")):
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        obj = None
                    if isinstance(obj, dict) and obj.get("event") == "ready":
                        self.ready = obj
                    elif isinstance(obj, dict) and obj.get("event") == "result":
                        self.results.append(from_dict(obj))
                    elif obj is not None:
                        self.final = obj
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], object], timeout: float, desc: str):
        """Wait until predicate() (called under the lock) is truthy; return its value."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    break
                self.cond.wait(left)
        raise TimeoutError(f"{self.what}: {'process exited' if self.eof else 'timed out'} "
                           f"waiting for {desc} (rc={self.proc.poll()})\n"
                           f"stdout tail: {self.lines[-5:]}\nstderr: {_stderr_of(self.proc)}")


def _stderr_of(proc: subprocess.Popen) -> str:
    f = getattr(proc, "_netbed_stderr", None)
    if f is None:
        return ""
    try:
        f.seek(0)
        return f.read().decode(errors="replace")[-2000:]
    except (OSError, ValueError):
        return ""


def _stop_proc(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        except ProcessLookupError:
            pass
    for f in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError, ValueError):
            if f:
                f.close()


@dataclass(eq=False)
class Server:
    """A ``trafficd.py serve`` process."""

    netns: Netns
    name: str
    tcp_ports: tuple[int, ...]
    udp_ports: tuple[int, ...]
    bind: str
    proc: subprocess.Popen = field(repr=False)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 3.0) -> None:
        _stop_proc(self.proc, timeout)


class TrafficLoop:
    """A ``trafficd.py loop`` process: one attempt per interval until stopped."""

    def __init__(self, netns: Netns, proc: subprocess.Popen, desc: str) -> None:
        self.netns = netns
        self.proc = proc
        self.reader = _ProcReader(proc, desc)
        self.summary: LoopSummary | None = None

    @property
    def results(self) -> Results:
        with self.reader.cond:
            return Results(self.reader.results)

    def ok_count(self) -> int:
        with self.reader.cond:
            return sum(1 for r in self.reader.results if r.ok)

    def wait_ok(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` successful attempts in total have completed."""
        self.reader.wait(lambda: sum(1 for r in self.reader.results if r.ok) >= n, timeout,
                         f"{n} successful attempts")

    def wait_more_ok(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait for ``n`` more successful attempts than have completed so far."""
        self.wait_ok(self.ok_count() + n, timeout)

    def stop(self, timeout: float = 10.0) -> LoopSummary:
        """Close stdin (the loop finishes in-flight attempts) and return the summary."""
        if self.summary is not None:
            return self.summary
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            final = self.reader.wait(lambda: isinstance(self.reader.final, dict) and self.reader.final,
                                     timeout, "loop summary")
        finally:
            _stop_proc(self.proc)
        self.summary = LoopSummary.from_dict(final)
        return self.summary

    def __enter__(self) -> TrafficLoop:
        return self

    def __exit__(self, *exc) -> None:
        if self.summary is None:
            with contextlib.suppress(Exception):
                self.stop()


class UdpFlow:
    """A ``trafficd.py udp-flow`` process: one UDP 5-tuple, one result per interval."""

    def __init__(self, netns: Netns, proc: subprocess.Popen, desc: str, timeout: float) -> None:
        self.netns = netns
        self.proc = proc
        self.reader = _ProcReader(proc, desc)
        ready = self.reader.wait(lambda: self.reader.ready, timeout, "udp-flow ready")
        self.local: str = ready["local"]
        self.local_port: int = ready["local_port"]
        self._pos = 0

    @property
    def results(self) -> Results:
        with self.reader.cond:
            return Results(self.reader.results)

    def next_result(self, timeout: float = 5.0) -> Result:
        """The next result not consumed yet (in order)."""
        return self.wait_for(lambda r: True, timeout)

    def wait_for(self, predicate: Callable[[Result], bool], timeout: float = 5.0) -> Result:
        """Consume results until one matches ``predicate``; return it."""
        def find():
            while self._pos < len(self.reader.results):
                r = self.reader.results[self._pos]
                self._pos += 1
                if predicate(r):
                    return r
            return None
        return self.reader.wait(find, timeout, "matching udp-flow result")

    def wait_server(self, server: str | Iterable[str], timeout: float = 5.0) -> Result:
        """Consume results until a reply from ``server`` (or one of several) arrives."""
        names = {server} if isinstance(server, str) else set(server)
        return self.wait_for(lambda r: r.ok and r.server in names, timeout)

    def stop(self) -> Results:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(3)
        _stop_proc(self.proc)
        self.reader.thread.join(3)
        return self.results

    def __enter__(self) -> UdpFlow:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- Netns

class Netns:
    """A named network namespace (``/run/netns/NAME``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> str:
        return str(NETNS_RUN_DIR / self.name)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    # -- commands
    def run(self, *argv: str, check: bool = True, input: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a command in the namespace (``ip netns exec``); text output captured."""
        return _run(["ip", "netns", "exec", self.name, *map(str, argv)],
                    input=input, check=check, timeout=timeout)

    def popen(self, *argv: str, track: bool = True, **kwargs) -> subprocess.Popen:
        """Start a command in the namespace.  Tracked processes are stopped at teardown.

        Defaults: stdin/stdout are binary pipes, stderr goes to a temp file (see
        ``_stderr_of``) so a chatty child can never block on a full pipe.
        """
        kwargs.setdefault("stdin", subprocess.PIPE)
        kwargs.setdefault("stdout", subprocess.PIPE)
        errf = None
        if "stderr" not in kwargs:
            errf = tempfile.TemporaryFile()
            kwargs["stderr"] = errf
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *map(str, argv)], **kwargs)
        proc._netbed_stderr = errf  # type: ignore[attr-defined]
        if track:
            self._procs.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``ip -n NAME ARGS...``"""
        return _run(["ip", "-n", self.name, *map(str, args)], check=check)

    def ip_batch(self, lines: Iterable[str], force: bool = False) -> subprocess.CompletedProcess:
        """``ip -n NAME -batch -`` with the given command lines."""
        return _ip_batch(lines, self.name, force=force)

    def nft(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """``nft ARGS...`` in the namespace (use ``nft('-f', '-', input=rules)`` for a ruleset)."""
        return self.run("nft", *args, input=input, check=check)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the *calling thread* into this namespace for the with-block (setns).

        Sockets created inside stay in this namespace after leaving the block.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def sysctl(self, settings: dict[str, object]) -> None:
        """Write sysctls (``{"net.ipv4.ip_forward": 1}``) of this namespace (in-process)."""
        with self.entered():
            for key, value in settings.items():
                with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                    f.write(f"{value}\n")

    def read_sysctl(self, key: str) -> str:
        with self.entered():
            with open("/proc/sys/" + key.replace(".", "/")) as f:
                return f.read().strip()

    # -- traffic
    def trafficd(self, mode: str, *args: object, **popen_kwargs) -> subprocess.Popen:
        """Start ``trafficd.py MODE ARGS...`` in this namespace."""
        return self.popen(PYTHON, "-u", str(TRAFFICD), mode, *map(str, args), **popen_kwargs)

    def start_server(self, name: str, tcp_ports: Iterable[int] = (80,), udp_ports: Iterable[int] = (),
                     bind: str = "::", timeout: float = 10.0) -> Server:
        """Start a ``trafficd serve --name NAME`` here and wait for READY."""
        server = self._spawn_server(name, tcp_ports, udp_ports, bind)
        _wait_ready([server], timeout)
        return server

    def _spawn_server(self, name: str, tcp_ports: Iterable[int], udp_ports: Iterable[int],
                      bind: str) -> Server:
        tcp_ports, udp_ports = tuple(tcp_ports), tuple(udp_ports)
        args: list[object] = ["--name", name, "--bind", bind]
        for p in tcp_ports:
            args += ["--tcp", p]
        for p in udp_ports:
            args += ["--udp", p]
        proc = self.trafficd("serve", *args, stdin=subprocess.DEVNULL)
        server = Server(self, name, tcp_ports, udp_ports, bind, proc)
        server._reader = _ProcReader(proc, f"server {name} in {self.name}")  # type: ignore[attr-defined]
        return server

    def connect_many(self, dst: str, port: int, count: int = 1, proto: str = "tcp",
                     timeout: float = 1.0, *, parallel: int = 32, rate: float | None = None,
                     src: str | None = None, src_port: int | None = None,
                     same_source_port: bool = False, in_process: bool = True) -> Results:
        """Make ``count`` attempts from this namespace to ``dst``:``port``.

        Returns Results ordered by attempt index; each Result is ``ok`` with the
        server ID and the peer IP the server saw, or has ``error`` in
        refused/timeout/unreachable/prohibited/reset/eof/error.  Attempts run
        concurrently (up to ``parallel``, paced to ``rate``/s if given); every attempt
        uses a fresh socket (new source port) unless ``same_source_port``.
        ``in_process=False`` runs ``trafficd.py connect`` in the namespace instead.
        Note: ICMP errors are rate limited by the kernel (burst ~6 per peer), so many
        UDP attempts to a closed port may yield "timeout" rather than "refused".
        """
        kw = dict(proto=proto, count=count, timeout=timeout, parallel=parallel, rate=rate,
                  src=src, src_port=src_port, same_source_port=same_source_port)
        if in_process:
            with self.entered():
                results = list(trafficd.run_attempts(dst, port, **kw))
        else:
            args: list[object] = ["--dst", dst, "--port", port, "--count", count, "--proto", proto,
                                  "--timeout", timeout, "--parallel", parallel]
            if rate:
                args += ["--rate", rate]
            if src:
                args += ["--src", src]
            if src_port:
                args += ["--src-port", src_port]
            if same_source_port:
                args.append("--same-source-port")
            cp = self.run(PYTHON, str(TRAFFICD), "connect", *args,
                          timeout=30 + count * timeout)
            results = [from_dict(d) for d in json.loads(cp.stdout)]
        return Results(sorted(results, key=lambda r: r.i))

    def connect(self, dst: str, port: int, proto: str = "tcp", timeout: float = 1.0, **kw) -> Result:
        """One attempt; see connect_many."""
        return self.connect_many(dst, port, 1, proto, timeout, **kw)[0]

    def start_loop(self, dst: str, port: int, proto: str = "tcp", interval_ms: float = 20.0,
                   timeout: float = 1.0, parallel: int = 16, src: str | None = None,
                   ready_timeout: float = 10.0) -> TrafficLoop:
        """Start ``trafficd.py loop --progress``: an attempt every interval_ms until stop()."""
        args: list[object] = ["--dst", dst, "--port", port, "--proto", proto, "--interval-ms",
                              interval_ms, "--timeout", timeout, "--parallel", parallel, "--progress"]
        if src:
            args += ["--src", src]
        loop = TrafficLoop(self, self.trafficd("loop", *args), f"loop {proto} {dst}:{port} from {self.name}")
        loop.reader.wait(lambda: loop.reader.ready is not None, ready_timeout, "loop READY")
        return loop

    def start_udp_flow(self, dst: str, port: int, interval_ms: float = 50.0, src: str | None = None,
                       src_port: int | None = None, ready_timeout: float = 10.0) -> UdpFlow:
        """Start ``trafficd.py udp-flow``: one socket, a datagram every interval_ms."""
        args: list[object] = ["--dst", dst, "--port", port, "--interval-ms", interval_ms]
        if src:
            args += ["--src", src]
        if src_port:
            args += ["--src-port", src_port]
        return UdpFlow(self, self.trafficd("udp-flow", *args), f"udp-flow {dst}:{port} from {self.name}",
                       ready_timeout)

    def stop_processes(self, timeout: float = 3.0) -> None:
        """Stop every process started with popen() (servers, loops, flows)."""
        procs, self._procs = self._procs, []
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        for p in procs:
            _stop_proc(p, timeout)
            f = getattr(p, "_netbed_stderr", None)
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _wait_ready(servers: Sequence[Server], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for s in servers:
        reader: _ProcReader = s._reader  # type: ignore[attr-defined]
        reader.wait(lambda: reader.ready is not None, max(0.0, deadline - time.monotonic()),
                    "READY")


# ----------------------------------------------------------------------------- topology

@dataclass(eq=False)
class Pod:
    name: str
    netns: Netns
    ip4: str
    ip6: str
    node_name: str
    zone: str
    host_veth: str = ""  # interface name of the pod's veth on its node (node ns / router ns)

    @property
    def ips(self) -> tuple[str, str]:
        return (self.ip4, self.ip6)


@dataclass(eq=False)
class NetBed:
    node: Netns
    client: Netns
    client2: Netns
    router: Netns
    local_pods: list[Pod]
    remote_pods: list[Pod]
    suffix: str = ""
    node_ip4: str = "192.168.50.1"
    node_ip6: str = "fd00:50::1"
    client_ip4: str = "192.168.50.100"
    client_ip6: str = "fd00:50::100"
    client2_ip4: str = "192.168.50.101"
    client2_ip6: str = "fd00:50::101"
    ext_cidr4: str = "192.168.50.0/24"
    ext_cidr6: str = "fd00:50::/64"
    node_ext_if: str = "br-ext"
    pod_cidr4: str = "10.244.0.0/16"
    pod_cidr6: str = "fd00:244::/48"
    node_pod_cidr4: str = "10.244.1.0/24"
    node_pod_cidr6: str = "fd00:244:0:1::/64"
    node_pod_gw4: str = "10.244.1.1"
    node_pod_gw6: str = "fd00:244:0:1::1"
    remote_pod_cidr4: str = "10.244.2.0/24"
    remote_pod_cidr6: str = "fd00:244:0:2::/64"
    remote_pod_gw4: str = "10.244.2.1"
    remote_pod_gw6: str = "fd00:244:0:2::1"
    node_transit_ip4: str = "172.30.0.1"
    node_transit_ip6: str = "fd00:30::1"
    node_transit_if: str = "veth-rt"
    router_ip4: str = "172.30.0.2"
    router_ip6: str = "fd00:30::2"
    node_name: str = "node-a"
    zone: str = "zone-a"
    remote_node_name: str = "node-b"
    remote_zone: str = "zone-b"
    servers: list[Server] = field(default_factory=list, repr=False)

    def namespaces(self) -> list[Netns]:
        return [self.node, self.client, self.client2, self.router,
                *(p.netns for p in self.local_pods), *(p.netns for p in self.remote_pods)]

    def ns_names(self) -> list[str]:
        return [ns.name for ns in self.namespaces()]

    @property
    def pods(self) -> list[Pod]:
        return [*self.local_pods, *self.remote_pods]

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def start_server(self, netns: Netns, name: str, tcp_ports: Iterable[int] = (80,),
                     udp_ports: Iterable[int] = (), bind: str = "::", timeout: float = 10.0) -> Server:
        """Start ``trafficd serve --name NAME`` in ``netns``; stopped at teardown."""
        server = netns.start_server(name, tcp_ports, udp_ports, bind, timeout)
        self.servers.append(server)
        return server

    def start_servers(self, tcp_ports: Iterable[int] = (80, 8080), udp_ports: Iterable[int] = (53, 5353),
                      pods: Iterable[Pod] | None = None, timeout: float = 10.0) -> dict[str, Server]:
        """Start a server named after the pod in every pod (or the given ones), concurrently."""
        tcp_ports, udp_ports = tuple(tcp_ports), tuple(udp_ports)
        servers = {p.name: p.netns._spawn_server(p.name, tcp_ports, udp_ports, "::")
                   for p in (self.pods if pods is None else pods)}
        self.servers.extend(servers.values())
        _wait_ready(list(servers.values()), timeout)
        return servers

    def diagnostics(self) -> str:
        """Addresses, routes, nft ruleset and conntrack of node and router (for failure messages)."""
        out = []
        cmds = [(self.node, ["ip", "-br", "addr"]), (self.node, ["ip", "route"]),
                (self.node, ["ip", "-6", "route"]), (self.node, ["nft", "list", "ruleset"]),
                (self.node, ["conntrack", "-L"]), (self.router, ["ip", "route"]),
                (self.router, ["ip", "-6", "route"])]
        for ns, argv in cmds:
            cp = ns.run(*argv, check=False)
            out.append(f"--- {ns.name}: {' '.join(argv)}\n{cp.stdout}{cp.stderr}")
        return "\n".join(out)

    def close(self) -> None:
        """Stop all processes in the bed and delete its namespaces."""
        for ns in self.namespaces():
            ns.stop_processes()
        self.servers.clear()
        teardown_namespaces(self.ns_names())


def _kill_processes_in(names: Sequence[str]) -> None:
    """SIGKILL any process whose netns is one of ours (started by a test inside it)."""
    inodes = set()
    for n in names:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(NETNS_RUN_DIR / n).st_ino)
    if not inodes:
        return
    me = os.getpid()
    victims = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                victims.append(int(pid))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in victims:  # reap our own children; others vanish on their own
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def teardown_namespaces(names: Sequence[str]) -> None:
    """Delete the named namespaces (ignoring missing ones); raise if any survive."""
    _kill_processes_in(names)
    existing = [n for n in names if (NETNS_RUN_DIR / n).exists()]
    if existing:
        _ip_batch([f"netns del {n}" for n in existing], force=True, check=False)
    left = [n for n in names if (NETNS_RUN_DIR / n).exists()]
    for n in left:
        _run(["ip", "netns", "del", n], check=False)
    left = [n for n in names if (NETNS_RUN_DIR / n).exists()]
    if left:
        raise RuntimeError(f"could not delete namespaces: {left}")


_COMMON_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": 0,
    "net.ipv6.conf.default.accept_dad": 0,
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
}
# Forwarders send no IPv4 ICMP redirects: a hairpinned or same-subnet packet leaves by the interface it came in on,
# and the redirect it triggers resets the sender's per-peer ICMP budget, so the reject of a Service without
# endpoints that follows within a second is not sent and the client sees a timeout instead of "refused" (as on a
# real node, with any proxy). IPv6 has no such switch: its forwarding path spends the same per-peer budget on a
# redirect check, so an IPv6 test should not expect "refused" right after a hairpin from the same client.
_FORWARDING_SYSCTLS = {
    "net.ipv4.ip_forward": 1,
    "net.ipv6.conf.all.forwarding": 1,
    "net.ipv6.conf.default.forwarding": 1,
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
}


def _host_side(gw4: str, gw6: str, veth: str, pod: Pod) -> list[str]:
    return [
        f"addr add {gw4}/32 dev {veth}",
        f"addr add {gw6}/128 dev {veth} nodad",
        f"addr add fe80::1/64 dev {veth} nodad",
        f"link set {veth} up",
        f"route add {pod.ip4}/32 dev {veth} scope link",
        f"route add {pod.ip6}/128 dev {veth}",
    ]


def _pod_side(gw4: str, pod: Pod) -> list[str]:
    return [
        "link set lo up",
        f"addr add {pod.ip4}/32 dev eth0",
        f"addr add {pod.ip6}/128 dev eth0 nodad",
        "link set eth0 up",
        f"route add default via {gw4} dev eth0 onlink",
        "route add default via fe80::1 dev eth0",
    ]


def _client_side(ip4: str, ip6: str, gw4: str, gw6: str, pod_cidr4: str, pod_cidr6: str) -> list[str]:
    return [
        "link set lo up",
        f"addr add {ip4}/24 dev eth0",
        f"addr add {ip6}/64 dev eth0 nodad",
        "link set eth0 up",
        f"route add default via {gw4}",
        f"route add default via {gw6}",
        # External clients cannot address pods directly (only Service IPs / node IP).
        f"route add unreachable {pod_cidr4}",
        f"route add unreachable {pod_cidr6}",
    ]


def _parallel_batches(batches: dict[str, list[str]]) -> None:
    procs = {}
    for ns, lines in batches.items():
        p = subprocess.Popen(["ip", "-n", ns, "-batch", "-"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[ns] = (p, lines)
    errors = []
    for ns, (p, lines) in procs.items():
        _out, err = p.communicate("".join(line + "\n" for line in lines), timeout=30)
        if p.returncode != 0:
            errors.append(f"ip -n {ns} -batch failed ({p.returncode}): {err.strip()}\n" + "\n".join(lines))
    if errors:
        raise RuntimeError("\n".join(errors))


def _create(bed: NetBed, created: list[str]) -> None:
    names = bed.ns_names()
    clash = [n for n in names if (NETNS_RUN_DIR / n).exists()]
    if clash:
        raise RuntimeError(f"namespaces already exist: {clash}")
    # 1. namespaces (recorded for teardown before creation: a partial batch is cleaned up)
    created.extend(names)
    _ip_batch([f"netns add {n}" for n in names])
    # 2. sysctls before any interface exists, so new interfaces inherit the defaults
    for ns in bed.namespaces():
        ns.sysctl(_COMMON_SYSCTLS)
    bed.node.sysctl(_FORWARDING_SYSCTLS)
    bed.router.sysctl(_FORWARDING_SYSCTLS)
    # 3. all veth pairs, created directly in their namespaces
    node, router = bed.node.name, bed.router.name
    links = [
        f"link add name vcl1 netns {node} type veth peer name eth0 netns {bed.client.name}",
        f"link add name vcl2 netns {node} type veth peer name eth0 netns {bed.client2.name}",
        f"link add name {bed.node_transit_if} netns {node} type veth peer name eth0 netns {router}",
    ]
    for p in bed.local_pods:
        links.append(f"link add name {p.host_veth} netns {node} type veth peer name eth0 netns {p.netns.name}")
    for p in bed.remote_pods:
        links.append(f"link add name {p.host_veth} netns {router} type veth peer name eth0 netns {p.netns.name}")
    _ip_batch(links)
    # 4. addresses and routes, one batch per namespace, all concurrently
    br = bed.node_ext_if
    node_lines = [
        "link set lo up",
        f"link add name {br} type bridge forward_delay 0 mcast_snooping 0",
        f"link set vcl1 master {br}",
        f"link set vcl2 master {br}",
        "link set vcl1 up",
        "link set vcl2 up",
        f"addr add {bed.node_ip4}/24 dev {br}",
        f"addr add {bed.node_ip6}/64 dev {br} nodad",
        f"link set {br} up",
        f"addr add {bed.node_transit_ip4}/30 dev {bed.node_transit_if}",
        f"addr add {bed.node_transit_ip6}/64 dev {bed.node_transit_if} nodad",
        f"link set {bed.node_transit_if} up",
        f"route add {bed.remote_pod_cidr4} via {bed.router_ip4}",
        f"route add {bed.remote_pod_cidr6} via {bed.router_ip6}",
    ]
    for p in bed.local_pods:
        node_lines += _host_side(bed.node_pod_gw4, bed.node_pod_gw6, p.host_veth, p)
    router_lines = [
        "link set lo up",
        f"addr add {bed.router_ip4}/30 dev eth0",
        f"addr add {bed.router_ip6}/64 dev eth0 nodad",
        "link set eth0 up",
        f"route add default via {bed.node_transit_ip4}",
        f"route add default via {bed.node_transit_ip6}",
    ]
    remote_gw4, remote_gw6 = bed.remote_pod_gw4, bed.remote_pod_gw6
    for p in bed.remote_pods:
        router_lines += _host_side(remote_gw4, remote_gw6, p.host_veth, p)
    batches = {
        node: node_lines,
        router: router_lines,
        bed.client.name: _client_side(bed.client_ip4, bed.client_ip6, bed.node_ip4, bed.node_ip6,
                                      bed.pod_cidr4, bed.pod_cidr6),
        bed.client2.name: _client_side(bed.client2_ip4, bed.client2_ip6, bed.node_ip4, bed.node_ip6,
                                       bed.pod_cidr4, bed.pod_cidr6),
    }
    for p in bed.local_pods:
        batches[p.netns.name] = _pod_side(bed.node_pod_gw4, p)
    for p in bed.remote_pods:
        batches[p.netns.name] = _pod_side(remote_gw4, p)
    _parallel_batches(batches)


def new_netbed(local_pods: int = 3, remote_pods: int = 2, prefix: str = NS_PREFIX) -> NetBed:
    """The NetBed description with fresh unique namespace names (nothing created yet)."""
    if not (1 <= local_pods <= 200 and 1 <= remote_pods <= 200):
        raise ValueError("pod counts must be within 1..200")
    suffix = secrets.token_hex(3)
    base = f"{prefix}{suffix}-"

    def pod(kind: str, i: int, third: int, node_name: str, zone: str) -> Pod:
        name = f"pod-{kind}{i}"
        return Pod(name=name, netns=Netns(base + name), ip4=f"10.244.{third}.{10 + i}",
                   ip6=f"fd00:244:0:{third}::{10 + i}", node_name=node_name, zone=zone,
                   host_veth=f"veth-{kind}{i}")

    return NetBed(
        node=Netns(base + "node"), client=Netns(base + "client"), client2=Netns(base + "client2"),
        router=Netns(base + "router"),
        local_pods=[pod("a", i, 1, "node-a", "zone-a") for i in range(1, local_pods + 1)],
        remote_pods=[pod("b", i, 2, "node-b", "zone-b") for i in range(1, remote_pods + 1)],
        suffix=suffix,
    )


@contextlib.contextmanager
def build_netbed(local_pods: int = 3, remote_pods: int = 2, prefix: str = NS_PREFIX) -> Iterator[NetBed]:
    """Build the topology, yield it, and always tear it down (also on errors in setup)."""
    bed = new_netbed(local_pods, remote_pods, prefix)
    created: list[str] = []
    try:
        _create(bed, created)
        yield bed
    finally:
        try:
            for ns in bed.namespaces():
                ns.stop_processes()
        finally:
            if created:
                teardown_namespaces(created)


def require_root() -> None:
    """Fail the current test (like tests/conftest.py does for ``root`` tests) unless we
    can create network namespaces; deselect such tests with ``-m 'not root'``."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces); deselect with -m 'not root'")
    if shutil.which("ip") is None:
        pytest.fail("this test needs iproute2 'ip'")


@pytest.fixture
def netbed(request) -> Iterator[NetBed]:
    """A fresh NetBed per test (root only; fails otherwise -- mark tests ``root``).

    Pod counts can be changed with indirect parametrisation:
    ``@pytest.mark.parametrize("netbed", [{"local_pods": 4, "remote_pods": 3}], indirect=True)``.
    """
    require_root()
    opts = dict(getattr(request, "param", None) or {})
    with build_netbed(**opts) as bed:
        yield bed
