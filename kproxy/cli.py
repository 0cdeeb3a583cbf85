"""The ``kproxy`` command line.

Modes:

* ``--dry-run``: read manifests, print the nft script kproxy would program.
* ``--once``: read manifests, bring this network namespace's kernel to that
  ruleset (creating or updating kproxy's tables), print the operation count.
* ``--cleanup``: delete kproxy's tables, and nothing else.
* ``--cleanup-kube-proxy``: remove upstream kube-proxy's rules once kproxy's are in place.
* ``--rollback-to-kube-proxy``: delete kproxy's tables once kube-proxy's rules serve its Services.
* ``--dry-run --diff``: print only what the next sync would change in the kernel.
* ``explain SRC DST PORT``: where a packet would go, from the live tables, and why.
* no mode flag: run the daemon.

Flags keep kube-proxy's names where they mean the same thing. Usage errors and
unreadable input exit with code 2 and a one-line message; a single bad object
is a warning and never stops the others.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import ipaddress
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from kproxy import __version__
from kproxy.cluster.convert import Problem, build_cluster, object_key, summarize
from kproxy.cluster.manifests import ManifestError, load_manifest_files
from kproxy.cluster.model import Cluster, ServiceKey
from kproxy.daemon.config import ConfigError, DaemonConfig, add_daemon_flags, daemon_config, parse_duration
from kproxy.daemon.errors import StartupError
from kproxy.daemon.inspect import KernelTables, daemon_skipped
from kproxy.daemon.logs import setup_logging
from kproxy.nft.kernel import CapabilityError, NftError
from kproxy.nft.objects import Ruleset
from kproxy.node.addresses import interface_addresses
from kproxy.rules.compiler import NodeInfo, compile_ruleset, node_info
from kproxy.rules.explain import Packet, explain
from kproxy.rules.plan import plan, render_ruleset

# Each mode imports the edges it uses (the kernel's, conntrack's, kube-proxy's rules) when it runs: --dry-run
# needs none of them, and loading them all took a tenth of a second of every run.

log = logging.getLogger("kproxy")
EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """Bad flags or input files: exit code 2, one line on stderr."""


class OutputError(Exception):
    """Standard output cannot take the script (a full disk, its reader gone): exit code 1, one line on stderr."""


def _write_out(text: str) -> None:
    if sys.stdout is None:  # closed before the process started
        raise OutputError("cannot write to standard output: standard output is closed")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "standard output is closed"
        raise OutputError(f"cannot write to standard output: {reason}") from None


_kept_until_exit: list[object] | None = None
"""Under the console script (``console``): what a one-shot run built, never freed object by object."""


def _keep_until_exit(*objects: object) -> None:
    """Let the process end with ``objects`` alive, when run as the console script.

    Freeing a 10k-Service run's model and ruleset one object at a time took
    0.4 s of ``--dry-run`` after the script was written; the kernel frees the
    whole process at once. A caller of ``main()`` in the same process keeps
    nothing: ``objects`` are freed as usual.
    """
    if _kept_until_exit is not None:
        _kept_until_exit.extend(objects)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kproxy",
        description="A Kubernetes service proxy on nftables sets, verdict maps and meters. "
        "Without a mode flag it runs as the node's proxy daemon.",
        epilog="Also: kproxy explain SRC DST PORT [--proto tcp|udp|sctp] shows which Service and endpoints a packet "
        "would go to, from the live tables, and why (kproxy explain --help). Docs: README.md, docs/.",
    )
    mode = parser.add_argument_group("mode (default: run the daemon)")
    mode.add_argument("--dry-run", action="store_true", help="print the nft script for the input and exit")
    mode.add_argument(
        "--diff", action="store_true", help="with --dry-run: print only what the next sync would change in the kernel"
    )
    mode.add_argument("--once", action="store_true", help="program the kernel for the input once and exit")
    mode.add_argument("--cleanup", action="store_true", help="delete kproxy's nftables tables and exit")
    mode.add_argument(
        "--cleanup-kube-proxy",
        action="store_true",
        help="remove upstream kube-proxy's nftables tables and iptables-nft KUBE-* chains "
        "(refused until kproxy's own rules are in place), and exit",
    )
    mode.add_argument(
        "--rollback-to-kube-proxy",
        action="store_true",
        help="hand this node back to kube-proxy: delete kproxy's tables once kube-proxy's rules (nftables, "
        "iptables-nft or IPVS) serve every Service frontend kproxy serves (refused, exit code 1, until they do), "
        "and exit; run it after kproxy's pod has left the node and kube-proxy has started",
    )
    mode.add_argument(
        "--wait-for-kube-proxy",
        metavar="DURATION",
        default="0s",
        help="with --rollback-to-kube-proxy: wait up to this long for kube-proxy's rules, e.g. 2m (default: 0s, "
        "check once)",
    )
    mode.add_argument(
        "--force",
        action="store_true",
        help="with --cleanup-kube-proxy: even before kproxy's rules are in place; with --rollback-to-kube-proxy: "
        "even before kube-proxy's rules serve every Service",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(parser)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("input for --dry-run, --once and explain")
    source.add_argument(
        "--from-file",
        action="append",
        default=[],
        metavar="FILE",
        help="Kubernetes manifests (multi-document YAML or a List); repeatable; '-' is stdin; "
        "without it, --dry-run and explain list the API server (--kubeconfig or in-cluster)",
    )
    add_daemon_flags(parser.add_argument_group("proxy (kube-proxy compatible)"))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (debug)")


def build_explain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kproxy explain",
        description="Show which Service and endpoints a packet would go to, from the live tables, and why.",
    )
    parser.add_argument("source", help="the packet's source address")
    parser.add_argument("destination", help="the packet's destination address (ClusterIP, node IP, LB IP, ...)")
    parser.add_argument("port", type=int, help="the destination port")
    parser.add_argument("--proto", choices=("tcp", "udp", "sctp"), default="tcp")
    _add_common(parser)
    return parser


def _load_objects(args: argparse.Namespace, mode: str) -> list[dict[str, Any]]:
    """The raw manifests of every --from-file, as read (exit 2 on an unreadable file)."""
    if not args.from_file:
        raise UsageError(f"{mode} needs at least one --from-file")
    if not args.hostname_override:
        raise UsageError(f"{mode} needs --node-name")
    try:
        return load_manifest_files(args.from_file)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None


def _model(args: argparse.Namespace, mode: str, config: DaemonConfig) -> tuple[Cluster, list[Problem]]:
    """The cluster from --from-file, or from one list of the API server; what was skipped is logged and returned."""
    if args.from_file:
        cluster, problems = build_cluster(_drained(_load_objects(args, mode)), config.node_name)  # freed as converted
    else:
        from kproxy.daemon.inspect import cluster_from_api

        try:
            cluster, problems = cluster_from_api(config.kubeconfig, config.node_name)
        except Exception as exc:  # no kubeconfig, no in-cluster config, API server down
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if config.kubeconfig:
                from kproxy.daemon.run import client_failure

                reason = client_failure(config, exc)
            raise UsageError(f"{mode} without --from-file lists the API server, which failed: {reason}") from None
    for line in summarize(problems):
        log.warning("%s", line)
    return cluster, problems


def _node_info(config: DaemonConfig, cluster: Cluster, here: bool) -> NodeInfo:
    """The node to compile for; ``here``: this network namespace is that node (its interfaces count)."""
    return node_info(config.node_name, cluster.node, interface_addresses()[1] if here else None)


def _compile(cluster: Cluster, node: NodeInfo, config: DaemonConfig) -> Ruleset:
    failed: dict[ServiceKey, str] = {}
    ruleset = compile_ruleset(cluster, node, config.proxy_config(), failed)
    for key, error in sorted(failed.items()):
        log.warning("skipping Service %s: it cannot be compiled: %s (reason=compile_error)", key, error)
    return ruleset


def dry_run(args: argparse.Namespace, config: DaemonConfig) -> int:
    cluster, _ = _model(args, "--dry-run", config)
    if cluster.node is None and not args.diff:
        log.warning("Node %s is not in the input; NodePorts will have no addresses", config.node_name)
    node = _node_info(config, cluster, here=args.diff)
    ruleset = _compile(cluster, node, config)
    _keep_until_exit(cluster, ruleset)
    if not args.diff:
        _write_out(render_ruleset(ruleset))
        return 0
    from kproxy.nft.backend import NftablesBackend

    tx = plan(NftablesBackend().read(), ruleset, delete_chains=False)
    _write_out(str(tx) + "".join(f"# later: delete chain {family} kproxy {name}\n"
                                  for family, name in tx.deferred_chain_deletes))
    print(f"kproxy: the next sync would send {tx.operations} operations", file=sys.stderr)
    return 0


def explain_main(argv: Sequence[str]) -> int:
    args = build_explain_parser().parse_args(argv)
    try:
        config = daemon_config(args)
        packet = Packet(str(ipaddress.ip_address(args.source)), str(ipaddress.ip_address(args.destination)),
                        args.port, args.proto)
    except (ConfigError, ValueError) as exc:
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.log_format, "debug" if args.verbose else "warning")
    for warning in config.warnings:
        log.warning("%s", warning)
    try:
        cluster, problems = _model(args, "explain", config)
        node = _node_info(config, cluster, here=True)
        from_daemon = daemon_skipped(config.metrics_bind_address)
        skipped = sorted({(p.kind, p.key, p.message): p for p in problems + (from_daemon or [])}.values(),
                         key=lambda p: (p.kind, p.key, p.message))
        from kproxy.nft.backend import NftablesBackend

        for line in explain(packet, cluster, node, config.proxy_config(), KernelTables(NftablesBackend()), skipped):
            print(line)
        if from_daemon is None:
            print(f"note: the daemon's /skipped on {config.metrics_bind_address} did not answer; "
                  "Services it quarantined are not shown")
    except UsageError as exc:
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CapabilityError, NftError) as exc:
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _drained(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The items in order, each dropped from the list as it is handed out (the list holds a 10k export's dicts)."""
    items.reverse()
    while items:
        yield items.pop()


def once(args: argparse.Namespace, config: DaemonConfig) -> int:
    """Program the kernel of this network namespace once, then exit.

    It is the daemon's own sync engine, fed from the files instead of the API
    server: the same netlink pipeline, the same per-Service isolation.
    """
    objects = _load_objects(args, "--once")
    by_kind: dict[str, list[dict[str, Any]]] = {"Service": [], "EndpointSlice": [], "Node": [], "ServiceCIDR": []}
    for obj in objects:
        kind = obj.get("kind")
        if isinstance(kind, str) and kind in by_kind:
            by_kind[kind].append(obj)
    by_kind["Node"] = [n for n in by_kind["Node"] if object_key(n) == config.node_name]
    del objects  # each kind's list is handed over drained: a manifest is freed once converted
    from kproxy.daemon.proxier import Proxier, TallyObserver
    from kproxy.nft.backend import NftablesBackend
    from kproxy.node.conntrack import PyrouteConntrack

    backend = NftablesBackend()
    backend.check_capabilities()
    observer = TallyObserver()
    with PyrouteConntrack() as conntrack:
        proxier = Proxier(backend, config.node_name, config.proxy_config(), conntrack=conntrack, observer=observer,
                          interfaces=interface_addresses)
        for kind in ("Node", "ServiceCIDR", "Service", "EndpointSlice"):
            proxier.on_relist(kind, _drained(by_kind.pop(kind)))
        _keep_until_exit(proxier)
        proxier.sync()
        deleted = proxier.delete_dereferenced_chains()
    if not proxier.tracker.node or not (proxier.tracker.node.internal_ips or proxier.tracker.node.external_ips):
        log.info("Node %s has no addresses in the input; NodePorts use this namespace's addresses", config.node_name)
    print(f"kproxy: applied {observer.operations + deleted} operations, "
          f"removed {observer.conntrack} stale UDP conntrack entries"
          + (f" and {observer.untranslated} untranslated TCP attempts" if observer.untranslated else ""))
    return 0


def cleanup_kube_proxy_mode(force: bool) -> int:
    """Remove upstream kube-proxy's rules, once kproxy's are in place."""
    from kproxy.node.kubeproxy_cleanup import cleanup_kube_proxy

    report = cleanup_kube_proxy(force=force)
    for line in report.lines():
        print(line)
    return 0


def rollback_mode(args: argparse.Namespace) -> int:
    """Delete kproxy's tables once kube-proxy's rules serve what they served."""
    try:
        wait = parse_duration(args.wait_for_kube_proxy)
    except ConfigError as exc:
        raise UsageError(f"--wait-for-kube-proxy: {exc}") from None
    if wait < 0:
        raise UsageError("--wait-for-kube-proxy: must not be negative")
    from kproxy.node.rollback import rollback_to_kube_proxy

    report = rollback_to_kube_proxy(wait=wait, force=args.force)
    for line in report.lines():
        print(line)
    return 0


def cleanup(args: argparse.Namespace) -> int:
    """Delete kproxy's tables (ip and ip6 kproxy) and nothing else."""
    from kproxy.nft.backend import NftablesBackend

    deleted = NftablesBackend().delete_tables()
    print(f"kproxy: deleted {', '.join(f'{f} kproxy' for f in deleted) or 'nothing (no kproxy tables)'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["explain"]:
        return explain_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.diff and not args.dry_run:
        parser.error("--diff goes with --dry-run")
    modes = [m for m in ("dry_run", "once", "cleanup", "cleanup_kube_proxy", "rollback_to_kube_proxy")
             if getattr(args, m)]
    if len(modes) > 1:
        parser.error("choose one mode: --dry-run, --once, --cleanup, --cleanup-kube-proxy, --rollback-to-kube-proxy, "
                     "or none to run the daemon")
    if args.force and not (args.cleanup_kube_proxy or args.rollback_to_kube_proxy):
        parser.error("--force goes with --cleanup-kube-proxy or --rollback-to-kube-proxy")
    if args.wait_for_kube_proxy != "0s" and not args.rollback_to_kube_proxy:
        parser.error("--wait-for-kube-proxy goes with --rollback-to-kube-proxy")
    try:
        config = daemon_config(args)
    except ConfigError as exc:
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    daemon_mode = not modes
    setup_logging(config.log_format, config.log_level if daemon_mode or args.verbose else "warning")
    for warning in config.warnings:
        log.warning("%s", warning)
    if args.dry_run or args.once:
        # A one-shot run builds millions of acyclic objects (the export's manifests, the model, the ruleset) and
        # exits: the cyclic GC finds nothing in them, and each collection re-enabled between phases walked all of
        # them (0.4 s of a 10k-Service --dry-run). Refcounting still frees all acyclic garbage as it goes; the
        # little cyclic garbage (pyroute2's conntrack messages, bounded by the conntrack table) waits for exit.
        gc.disable()
    try:
        if args.dry_run:
            return dry_run(args, config)
        if args.once:
            return once(args, config)
        if args.cleanup:
            return cleanup(args)
        if args.cleanup_kube_proxy:
            return cleanup_kube_proxy_mode(args.force)
        if args.rollback_to_kube_proxy:
            return rollback_mode(args)
        from kproxy.daemon.run import run

        return run(config)
    except UsageError as exc:
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from kproxy.node.kubeproxy_cleanup import KubeProxyCleanupError
        from kproxy.node.rollback import RollbackError

        failures = (OutputError, CapabilityError, NftError, KubeProxyCleanupError, RollbackError, StartupError)
        if not isinstance(exc, failures):
            raise
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if not _kept_until_exit:
            # For a caller of main() in the same process. With a one-shot run's objects kept, the cyclic GC
            # stays off until os._exit: its first collection would walk every one of them.
            gc.enable()


def console() -> NoReturn:
    """The ``kproxy`` console script: ``main()``, then, after a one-shot run, an exit that frees nothing."""
    global _kept_until_exit
    _kept_until_exit = []
    code = main()
    if not _kept_until_exit:
        sys.exit(code)
    _exit_without_freeing(code)


def _exit_without_freeing(code: int) -> NoReturn:
    """End the process as the interpreter's exit would, except for freeing its objects one by one.

    What an exit must do runs first: the atexit handlers (the kubernetes
    client deletes the certificate and key files it wrote from a
    kubeconfig's ``*-data`` fields; logging flushes its handlers), then the
    standard streams are flushed. A stream that cannot take the rest (its
    reader gone, a full disk) makes the exit code 120, as the interpreter's
    own exit does; a stream closed from the start (None) is skipped.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)


if __name__ == "__main__":
    console()
