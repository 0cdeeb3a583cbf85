"""kube-proxy's rules for one ClusterIP, as its nftables and iptables modes lay them out.

The migration tests (kube-proxy -> kproxy) and the rollback tests (kproxy ->
kube-proxy) install these in the node namespace to stand for a kube-proxy
that has synced: a ClusterIP port 80 to the pods' 8080, masquerading traffic
from outside the pod CIDR.
"""

from __future__ import annotations

from tests.harness.netbed import Pod

CLUSTER_IP = "10.96.0.30"
POD_CIDR = "10.244.0.0/16"


def kube_proxy_table(endpoints: list[Pod], cluster_ip: str = CLUSTER_IP, pod_cidr: str = POD_CIDR) -> str:
    """``ip kube-proxy`` (and an ``ip6`` one) laid out as upstream's nftables mode does, for one ClusterIP."""
    svc = "service-HV3GBAUT-default/web/tcp/http"
    eps = [(p.ip4, f"endpoint-{i:08d}-default/web/tcp/http__{p.ip4}/8080") for i, p in enumerate(endpoints)]
    endpoint_chains = "\n".join(
        f"""    chain {chain} {{
        ip saddr {ip} jump mark-for-masquerade
        meta l4proto tcp dnat to {ip}:8080
    }}""" for ip, chain in eps)
    choices = ", ".join(f"{i} : goto {chain}" for i, (_, chain) in enumerate(eps))
    return f"""table ip kube-proxy {{
    comment "rules for kube-proxy"
    chain mark-for-masquerade {{
        meta mark set meta mark | 0x4000
    }}
    chain masquerading {{
        meta mark & 0x4000 == 0 return
        meta mark set meta mark ^ 0x4000
        masquerade fully-random
    }}
{endpoint_chains}
    chain {svc} {{
        counter
        ip daddr {cluster_ip} tcp dport 80 ip saddr != {pod_cidr} jump mark-for-masquerade
        numgen random mod {len(eps)} vmap {{ {choices} }}
    }}
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {cluster_ip} . tcp . 80 : goto {svc} }}
    }}
    set cluster-ips {{
        type ipv4_addr
        elements = {{ {cluster_ip} }}
    }}
    chain services {{
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain cluster-ips-check {{
        ip daddr @cluster-ips reject
    }}
    chain nat-prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
    chain nat-postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump masquerading
    }}
    chain filter-forward {{
        type filter hook forward priority -110; policy accept;
        ct state new jump cluster-ips-check
    }}
}}
table ip6 kube-proxy {{
    comment "rules for kube-proxy"
    chain nat-prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
    }}
}}
"""


def iptables_kube_proxy_rules(endpoints: list[Pod], cluster_ip: str = CLUSTER_IP, pod_cidr: str = POD_CIDR) -> str:
    """kube-proxy's iptables-mode chains for one ClusterIP, as ``iptables-restore --noflush`` input."""
    seps = [(f"KUBE-SEP-{i:016d}", p.ip4) for i, p in enumerate(endpoints)]
    svc = "KUBE-SVC-HV3GBAUTWEBHTTP"
    lines = ["*mangle", ":KUBE-PROXY-CANARY - [0:0]", "COMMIT", "*filter"]
    lines += [f":{c} - [0:0]" for c in ("KUBE-FORWARD", "KUBE-PROXY-FIREWALL", "KUBE-SERVICES",
                                        "KUBE-NODEPORTS", "KUBE-PROXY-CANARY")]
    lines += [
        "-I INPUT 1 -m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL",
        "-A INPUT -j KUBE-NODEPORTS",
        "-I FORWARD 1 -j KUBE-FORWARD",
        "-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES",
        "-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        "-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT",
        "COMMIT",
        "*nat",
    ]
    lines += [f":{c} - [0:0]" for c in ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", svc)]
    lines += [f":{chain} - [0:0]" for chain, _ in seps]
    lines += [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -j KUBE-SERVICES",
        "-I POSTROUTING 1 -j KUBE-POSTROUTING",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        f"-A KUBE-SERVICES -d {cluster_ip}/32 -p tcp --dport 80 -j {svc}",
        f"-A {svc} ! -s {pod_cidr} -d {cluster_ip}/32 -p tcp --dport 80 -j KUBE-MARK-MASQ",
    ]
    for i, (chain, _) in enumerate(seps):
        left = len(seps) - i
        choose = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
        lines.append(f"-A {svc} {choose}-j {chain}")
    for chain, ip in seps:
        lines += [f"-A {chain} -s {ip}/32 -j KUBE-MARK-MASQ", f"-A {chain} -p tcp -j DNAT --to-destination {ip}:8080"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
