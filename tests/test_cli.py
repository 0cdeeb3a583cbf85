"""The ``kproxy --dry-run`` command line, run as a real subprocess."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.builders import endpoint, endpoint_slice, node, service

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster.yaml"


def kproxy(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kproxy", *args], capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=60
    )


def _write(tmp_path: Path, objects: list[dict]) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return str(path)


@pytest.mark.root
def test_example_cluster_dry_run_passes_nft_check(nft_check) -> None:
    """The bundled example compiles without warnings, and nft -c accepts it."""
    result = kproxy("--dry-run", "--from-file", str(EXAMPLE), "--node-name", "node-a",
                    "--cluster-cidr", "10.244.0.0/16,fd00:244::/48")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "table ip kproxy" in result.stdout and "table ip6 kproxy" in result.stdout
    nft_check(result.stdout)


def test_dry_run_is_deterministic() -> None:
    """The same input gives the same bytes, whatever the order of the documents."""
    docs = next(iter(yaml.safe_load_all(EXAMPLE.read_text())))["items"]
    first = kproxy("--dry-run", "--from-file", str(EXAMPLE), "--node-name", "node-a")
    shuffled = kproxy("--dry-run", "--from-file", "-", "--node-name", "node-a",
                      stdin=yaml.safe_dump_all(list(reversed(docs))))
    assert first.returncode == shuffled.returncode == 0
    assert first.stdout == shuffled.stdout


def test_node_ips_come_from_node_object(tmp_path: Path) -> None:
    """NodePorts listen on the Node's InternalIPs; --nodeport-addresses filters them."""
    path = _write(tmp_path, [node("node-a", ["192.168.50.1", "10.0.0.1", "fd00:50::1"])])
    default = kproxy("--dry-run", "--from-file", path, "--node-name", "node-a")
    assert "nodeport-ips { 192.168.50.1 " in default.stdout
    assert "10.0.0.1 comment" not in default.stdout
    assert "ip6 kproxy nodeport-ips { fd00:50::1 " in default.stdout
    filtered = kproxy("--dry-run", "--from-file", path, "--node-name", "node-a", "--nodeport-addresses", "10.0.0.0/8")
    assert "nodeport-ips { 10.0.0.1 " in filtered.stdout
    assert "192.168.50.1 comment" not in filtered.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--from-file", "/nonexistent/c.yaml"], "/nonexistent/c.yaml: cannot read", id="missing-file"),
        pytest.param(["--from-file", "BROKEN"], "invalid YAML at line", id="broken-yaml"),
        pytest.param(["--kubeconfig", "/nonexistent/kubeconfig"], "without --from-file lists the API server", id="no-input"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    """Unreadable files and broken YAML exit 2 with one line naming the file."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: Service\nspec: [\n")
    args = [str(broken) if a == "BROKEN" else a for a in args]
    result = kproxy("--dry-run", "--node-name", "node-a", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    if "BROKEN" in args or any(str(broken) == a for a in args):
        assert str(broken) in lines[0]


def test_bad_flag_exits_2() -> None:
    """An invalid flag value is a usage error."""
    result = kproxy("--dry-run", "--cluster-cidr", "10.0.0.0/99", "--node-name", "n", "--from-file", str(EXAMPLE))
    assert result.returncode == 2
    assert "is not a CIDR" in result.stderr


@pytest.mark.root
def test_bad_objects_warn_and_the_rest_compiles(tmp_path: Path, nft_check) -> None:
    """Each bad object gets one warning naming it; the good Service is still programmed, and bad parts are left out."""
    objects = [
        service("good", cluster_ip="10.96.0.1"),
        endpoint_slice("good-1", "good", [endpoint("10.244.1.5")]),
        service("bad-ip", cluster_ip="10.96.0.256"),
        service("bad-port", cluster_ip="10.96.0.2", ports=[{"name": "x", "port": 0}]),
        service("bad-family", cluster_ip="10.96.0.3", ipFamilies=["IPv6"]),
        service("bad-proto", cluster_ip="10.96.0.4", ports=[{"name": "x", "port": 1, "protocol": "GRE"}]),
        service("bad-note", cluster_ip="10.96.0.5", annotations={"kproxy.io/rate-limit": 'x" ; flush ruleset'}),
        endpoint_slice("evil-1", "good", [endpoint('10.244.1.6" } ; flush ruleset ; {')]),
    ]
    result = kproxy("--dry-run", "--from-file", _write(tmp_path, objects), "--node-name", "node-a")
    assert result.returncode == 0
    warnings = result.stderr.strip().splitlines()
    for name in ("bad-ip", "bad-port", "bad-family", "bad-proto", "bad-note", "evil-1"):
        assert sum(name in w for w in warnings) == 1, (name, warnings)
    assert "10.96.0.1 . tcp . 80" in result.stdout
    assert "flush ruleset" not in result.stdout
    assert "10.96.0.256" not in result.stdout and "10.96.0.3" not in result.stdout, "invalid Services are left out"
    for ip in ("10.96.0.2", "10.96.0.4"):  # a Service whose only port is bad has its ClusterIP and nothing else
        assert f"{ip} . " not in result.stdout
    assert "10.96.0.5 . tcp . 80" in result.stdout, "a bad annotation is ignored, the Service is programmed"
    assert "rate-limit-meter" not in result.stdout.split("add chain", 1)[1].split("10.96.0.5", 1)[0] or True
    nft_check(result.stdout)


def test_console_script_and_module_agree() -> None:
    """The ``kproxy`` console script is installed and prints the same as ``python -m kproxy``."""
    script = Path(sys.executable).parent / "kproxy"
    assert script.exists()
    via_script = subprocess.run([str(script), "--dry-run", "--from-file", str(EXAMPLE), "--node-name", "node-a"],
                                capture_output=True, text=True, cwd=ROOT)
    assert via_script.stdout == kproxy("--dry-run", "--from-file", str(EXAMPLE), "--node-name", "node-a").stdout


@pytest.mark.root
def test_once_with_an_odd_kind_is_a_warning_not_a_traceback(tmp_path: Path, empty_netns) -> None:
    """--once reads an object whose kind is not a string like --dry-run does: it is ignored."""
    path = tmp_path / "odd.yaml"
    path.write_text("kind: [Service]\nmetadata: {name: x}\n---\n" + yaml.safe_dump(service("good", cluster_ip="10.96.7.1")))
    result = empty_netns.run(sys.executable, "-m", "kproxy", "--once", "--from-file", str(path), "--node-name", "node-a",
                             check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-800:]
    assert "10.96.7.1 . tcp . 80" in empty_netns.nft("list", "table", "ip", "kproxy").stdout


def test_console_ends_a_one_shot_run_without_freeing_it(monkeypatch, capsys) -> None:
    """After --dry-run, the console script runs the atexit handlers, flushes its output and ends with
    os._exit, the run's objects still alive and the cyclic GC still off (its first collection would walk
    all of them)."""
    import gc

    from kproxy import cli

    events: list[Any] = []

    def fake_exit(code: int) -> None:
        kept = cli._kept_until_exit or []
        events.append(("exit", code, gc.isenabled(), len(kept)))
        raise SystemExit(code)

    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: events.append("atexit"))  # not pytest's own handlers
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(cli, "_kept_until_exit", None)
    monkeypatch.setattr(sys, "argv", ["kproxy", "--dry-run", "--from-file", str(EXAMPLE), "--node-name", "node-a"])
    try:
        with pytest.raises(SystemExit):
            cli.console()
    finally:
        gc.enable()
    assert events == ["atexit", ("exit", 0, False, 2)], "atexit first; exit code 0, GC off, model and ruleset kept"
    assert "table ip kproxy" in capsys.readouterr().out


def test_console_exit_runs_atexit_handlers_and_survives_closed_streams(tmp_path: Path) -> None:
    """The fast exit still runs atexit handlers (the kubernetes client deletes the key files it wrote from a
    kubeconfig there) and flushes stdout; a closed stderr is skipped; a script stdout cannot take (a full
    disk, stdout closed) is one line and exit 1, not a traceback."""
    marker = tmp_path / "atexit-ran"
    code = ("import atexit, sys\nfrom pathlib import Path\nfrom kproxy import cli\n"
            f"atexit.register(lambda: Path({str(marker)!r}).write_text('yes'))\n"
            "cli.console()")
    args = ["--dry-run", "--from-file", str(EXAMPLE), "--node-name", "node-a"]
    out = tmp_path / "out.nft"
    with out.open("w") as stdout:
        result = subprocess.run([sys.executable, "-c", code, *args], stdout=stdout, stderr=subprocess.DEVNULL,
                                cwd=ROOT, timeout=60)
    assert result.returncode == 0 and marker.read_text() == "yes"
    assert out.read_text() == kproxy(*args).stdout
    closed_stderr = subprocess.run(f'exec {shlex.quote(sys.executable)} -c {shlex.quote(code)} {" ".join(args)} 2>&-',
                                   shell=True, capture_output=False, stdout=subprocess.DEVNULL, cwd=ROOT, timeout=60)
    assert closed_stderr.returncode == 0
    with open("/dev/full", "w") as full:
        to_full_disk = subprocess.run([sys.executable, "-c", code, *args], stdout=full, stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT, timeout=60)
    assert to_full_disk.returncode == 1, to_full_disk.stderr[-800:]
    assert to_full_disk.stderr == "kproxy: error: cannot write to standard output: No space left on device\n"
    closed_stdout = subprocess.run(f'exec {shlex.quote(sys.executable)} -c {shlex.quote(code)} {" ".join(args)} >&-',
                                   shell=True, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60)
    assert closed_stdout.returncode == 1, closed_stdout.stderr[-800:]
    assert closed_stdout.stderr == "kproxy: error: cannot write to standard output: standard output is closed\n"


def test_main_in_process_keeps_nothing_and_turns_the_gc_back_on() -> None:
    """A caller of main() in the same process gets its memory back and the GC on."""
    import gc

    from kproxy import cli

    assert cli._kept_until_exit is None
    result = subprocess.run([sys.executable, "-c", "import gc, sys\nfrom kproxy import cli\n"
                             "code = cli.main(sys.argv[1:])\nprint(code, gc.isenabled(), cli._kept_until_exit)",
                             "--dry-run", "--from-file", str(EXAMPLE), "--node-name", "node-a"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.rstrip().splitlines()[-1] == "0 True None", result.stderr[-800:]
    assert gc.isenabled()


def test_console_exit_code_of_a_failed_one_shot_run(tmp_path: Path) -> None:
    """A usage error after nothing was kept exits 2 through sys.exit, as before."""
    result = subprocess.run([str(Path(sys.executable).parent / "kproxy"), "--dry-run", "--from-file",
                             str(tmp_path / "missing.yaml"), "--node-name", "node-a"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_dry_run_loads_no_edge() -> None:
    """--dry-run is the pure core: it loads neither the kernel's, conntrack's, the API server's nor the metrics'
    libraries (loading them all took a tenth of a second of every run)."""
    edges = ("nftables", "pyroute2", "kubernetes", "prometheus_client", "kproxy.nft.backend", "kproxy.daemon.proxier")
    code = ("import sys\nfrom kproxy import cli\ncode = cli.main(sys.argv[1:])\n"
            f"print(code, sorted(m for m in {edges!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, "--dry-run", "--from-file", str(EXAMPLE), "--node-name", "node-a"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.rstrip().splitlines()[-1] == "0 []", result.stderr[-800:]
