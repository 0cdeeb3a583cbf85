"""The same cluster in upstream kube-proxy's nftables layout, as the cold-start baseline.

Upstream (pkg/proxy/nftables/proxier.go) gives every Service port a chain that
picks an endpoint with an inline ``numgen random mod N vmap { ... }``, and
every endpoint a chain of its own (hairpin masquerade, then DNAT). External
traffic goes through an ``external-`` chain. The dispatch maps are the same
shape as kproxy's. This renders that layout for a ``Cluster`` as one nft
script in block syntax (the fastest form for nft to read), to be loaded with
``nft -f`` on the same kernel and nft as kproxy.
"""

from __future__ import annotations

import base64
import hashlib

from kproxy.cluster.model import Cluster
from kproxy.rules.compiler import NodeInfo, ProxyConfig
from kproxy.rules.endpoints import port_endpoints, select


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[:5]).decode()


def render_upstream(cluster: Cluster, node: NodeInfo, config: ProxyConfig) -> str:
    cidr = config.cluster_cidrs[0] if config.cluster_cidrs else "10.0.0.0/8"
    chains: list[str] = []
    service_ips: list[str] = []
    nodeports: list[str] = []
    by_service = cluster.slices_by_service()
    for key in sorted(cluster.services):
        svc = cluster.services[key]
        cluster_ip = next((ip for ip in svc.cluster_ips if ":" not in ip), None)
        if cluster_ip is None:
            continue
        for port in svc.ports:
            label = f"{svc.namespace}/{svc.name}/{port.protocol}/{port.name or port.port}"
            digest = _hash(label)
            selection = select(svc, port_endpoints(port, by_service.get(key, ()), 4), node.name, node.zone)
            endpoints = selection.cluster
            if not endpoints:
                continue
            service_chain = f"service-{digest}-{label}"
            vmap = []
            for i, pe in enumerate(endpoints):
                endpoint_chain = f"endpoint-{_hash(label + pe.address)}-{label}__{pe.address}/{pe.port}"
                chains.append(
                    f"\tchain {endpoint_chain} {{\n"
                    f"\t\tip saddr {pe.address} jump mark-for-masquerade\n"
                    f"\t\tmeta l4proto {port.protocol} dnat to {pe.address}:{pe.port}\n\t}}"
                )
                vmap.append(f"{i} : goto {endpoint_chain}")
            chains.append(
                f"\tchain {service_chain} {{\n"
                f"\t\tip daddr {cluster_ip} {port.protocol} dport {port.port} ip saddr != {cidr} jump mark-for-masquerade\n"
                f"\t\tnumgen random mod {len(endpoints)} vmap {{ {', '.join(vmap)} }}\n\t}}"
            )
            service_ips.append(f"{cluster_ip} . {port.protocol} . {port.port} : goto {service_chain}")
            if port.node_port:
                external = f"external-{digest}-{label}"
                chains.append(f"\tchain {external} {{\n\t\tjump mark-for-masquerade\n\t\tgoto {service_chain}\n\t}}")
                nodeports.append(f"{port.protocol} . {port.node_port} : goto {external}")
    lines = [
        "table ip kube-proxy {",
        "\tmap service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }",
        "\tmap service-nodeports { type inet_proto . inet_service : verdict; }",
        "\tset nodeport-ips { type ipv4_addr; }",
        "\tchain mark-for-masquerade {\n\t\tmeta mark set meta mark | 0x4000\n\t}",
        "\tchain masquerading {\n\t\tmeta mark & 0x4000 == 0 return\n\t\tmeta mark set meta mark ^ 0x4000\n"
        "\t\tmasquerade fully-random\n\t}",
        "\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n"
        "\t\tip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\t}",
        "\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}",
        "\tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}",
        "\tchain nat-postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading\n\t}",
        *chains,
        "}",
    ]
    for name, elements in (("service-ips", service_ips), ("service-nodeports", nodeports)):
        for i in range(0, len(elements), 1000):
            lines.append(f"add element ip kube-proxy {name} {{ {', '.join(elements[i:i + 1000])} }}")
    v4 = [a for a in node.primary_ips if ":" not in a]
    lines += [f"add element ip kube-proxy nodeport-ips {{ {', '.join(v4)} }}"] if v4 else []
    return "\n".join(lines) + "\n"
