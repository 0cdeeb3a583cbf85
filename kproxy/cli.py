"""The ``kproxy`` command line.

Modes:

* ``--dry-run``: read manifests, print the nft script kproxy would program.

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
from kproxy.convert import build_cluster
from kproxy.manifests import ManifestError, load_manifest_files
from kproxy.model import Node
from kproxy.plan import render_ruleset

log = logging.getLogger("kproxy")
EXIT_USAGE = 2


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


def dry_run(args: argparse.Namespace) -> int:
    if not args.from_file:
        raise UsageError("--dry-run needs at least one --from-file")
    if not args.node_name:
        raise UsageError("--dry-run needs --node-name")
    try:
        objects = load_manifest_files(args.from_file)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    cluster, problems = build_cluster(objects, args.node_name)
    for problem in problems:
        log.warning("%s", problem)
    if cluster.node is None:
        log.warning("Node %s is not in the input; NodePorts will have no addresses", args.node_name)
    config = ProxyConfig(
        cluster_cidrs=args.cluster_cidr,
        nodeport_addresses=args.nodeport_addresses,
        masquerade_all=args.masquerade_all,
    )
    ruleset = compile_ruleset(cluster, node_info(args.node_name, cluster.node), config)
    sys.stdout.write(render_ruleset(ruleset))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.dry_run:
            return dry_run(args)
        parser.error("choose a mode: --dry-run")
    except UsageError as exc:
        print(f"kproxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
