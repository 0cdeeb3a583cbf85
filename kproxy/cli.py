"""The ``kproxy`` command line.

Modes:

* ``--dry-run``: read manifests, print the nft script kproxy would program.
* ``--once``: read manifests, bring this network namespace's kernel to that
  ruleset (creating or updating kproxy's tables), print the operation count.
* ``--cleanup``: delete kproxy's tables, and nothing else.

Flags keep kube-proxy's names where they mean the same thing. Usage errors and
unreadable input exit with code 2 and a one-line message; a single bad object
is a warning and never stops the others.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from typing import Sequence

from kproxy.compiler import NodeInfo, ProxyConfig, compile_ruleset
from kproxy.conntrack import PyrouteConntrack, cleanup_stale_udp, udp_cleanup_targets
from kproxy.convert import build_cluster
from kproxy.manifests import ManifestError, load_manifest_files
from kproxy.model import Cluster, Node
from kproxy.nft import CapabilityError, NftablesBackend, NftError
from kproxy.nodeaddr import interface_addresses
from kproxy.plan import Op, Transaction, plan, render_ruleset

log = logging.getLogger("kproxy")
EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """Bad flags or input files: exit code 2, one line on stderr."""


def _cidr_list(value: str) -> tuple[str, ...]:
    cidrs = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            cidrs.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a CIDR") from None
    return tuple(cidrs)


def _nodeport_addresses(value: str) -> tuple[str, ...]:
    if value.strip() == "primary":
        return ()
    return _cidr_list(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kproxy",
        description="A Kubernetes service proxy on nftables sets, verdict maps and meters.",
    )
    mode = parser.add_argument_group("mode")
    mode.add_argument("--dry-run", action="store_true", help="print the nft script for the input and exit")
    mode.add_argument("--once", action="store_true", help="program the kernel for the input once and exit")
    mode.add_argument("--cleanup", action="store_true", help="delete kproxy's nftables tables and exit")
    source = parser.add_argument_group("input")
    source.add_argument(
        "--from-file",
        action="append",
        default=[],
        metavar="FILE",
        help="Kubernetes manifests (multi-document YAML or a List); repeatable; '-' is stdin",
    )
    node = parser.add_argument_group("node")
    node.add_argument("--node-name", "--hostname-override", dest="node_name", help="this node's name")
    proxy = parser.add_argument_group("proxy (kube-proxy compatible)")
    proxy.add_argument(
        "--cluster-cidr",
        type=_cidr_list,
        default=(),
        metavar="CIDR[,CIDR]",
        help="pod CIDRs; ClusterIP traffic from elsewhere is masqueraded",
    )
    proxy.add_argument(
        "--nodeport-addresses",
        type=_nodeport_addresses,
        default=(),
        metavar="CIDR[,CIDR]|primary",
        help="node addresses that accept NodePorts (default: primary, the node's primary IPs)",
    )
    proxy.add_argument("--masquerade-all", action="store_true", help="masquerade all traffic to ClusterIPs")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat for debug)")
    return parser


def node_info(node_name: str, node: Node | None) -> NodeInfo:
    """NodeInfo from the Node object: primary = first InternalIP per family, else ExternalIP."""
    if node is None:
        return NodeInfo(name=node_name)
    primary: list[str] = []
    for family_sep in (".", ":"):
        candidates = [a for a in node.internal_ips if family_sep in a] or [
            a for a in node.external_ips if family_sep in a
        ]
        if candidates:
            primary.append(candidates[0])
    return NodeInfo(
        name=node.name,
        zone=node.zone,
        primary_ips=tuple(primary),
        addresses=node.internal_ips + node.external_ips,
    )


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kproxy: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _proxy_config(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(
        cluster_cidrs=args.cluster_cidr,
        nodeport_addresses=args.nodeport_addresses,
        masquerade_all=args.masquerade_all,
    )


def _load_input(args: argparse.Namespace, mode: str) -> Cluster:
    if not args.from_file:
        raise UsageError(f"{mode} needs at least one --from-file")
    if not args.node_name:
        raise UsageError(f"{mode} needs --node-name")
    try:
        objects = load_manifest_files(args.from_file)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    cluster, problems = build_cluster(objects, args.node_name)
    for problem in problems:
        log.warning("%s", problem)
    return cluster


def dry_run(args: argparse.Namespace) -> int:
    cluster = _load_input(args, "--dry-run")
    if cluster.node is None:
        log.warning("Node %s is not in the input; NodePorts will have no addresses", args.node_name)
    ruleset = compile_ruleset(cluster, node_info(args.node_name, cluster.node), _proxy_config(args))
    sys.stdout.write(render_ruleset(ruleset))
    return 0


def once(args: argparse.Namespace) -> int:
    """Program the kernel of this network namespace once, then exit."""
    cluster = _load_input(args, "--once")
    node = node_info(args.node_name, cluster.node)
    if cluster.node is None:
        _, addresses = interface_addresses()
        node = NodeInfo(name=args.node_name, primary_ips=addresses, addresses=addresses)
        log.info("Node %s is not in the input; NodePorts use this namespace's addresses %s", args.node_name, addresses)
    backend = NftablesBackend()
    backend.check_capabilities()
    config = _proxy_config(args)
    desired = compile_ruleset(cluster, node, config)
    tx = plan(backend.read(), desired, delete_chains=False)
    backend.apply(tx)
    if tx.deferred_chain_deletes:
        backend.apply(
            Transaction([Op("delete", "chain", family, name) for family, name in tx.deferred_chain_deletes])
        )
    with PyrouteConntrack() as conntrack:
        deleted = cleanup_stale_udp(conntrack, udp_cleanup_targets(cluster, node, config))
    print(
        f"kproxy: applied {tx.operations + len(tx.deferred_chain_deletes)} operations"
        f" ({len(tx.ops)} commands), removed {deleted} stale UDP conntrack entries"
    )
    return 0


def cleanup(args: argparse.Namespace) -> int:
    """Delete kproxy's tables (ip and ip6 kproxy) and nothing else."""
    deleted = NftablesBackend().delete_tables()
    print(f"kproxy: deleted {', '.join(f'{f} kproxy' for f in deleted) or 'nothing (no kproxy tables)'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    modes = [m for m in ("dry_run", "once", "cleanup") if getattr(args, m)]
    if len(modes) != 1:
        parser.error("choose one mode: --dry-run, --once or --cleanup")
    try:
        if args.dry_run:
            return dry_run(args)
        if args.once:
            return once(args)
        return cleanup(args)
    except UsageError as exc:
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CapabilityError, NftError) as exc:
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
