"""``kproxy explain`` and ``kproxy --dry-run --diff`` against real tables in the test bed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.builders import endpoint, endpoint_slice, node, service
from tests.harness.netbed import NetBed

pytestmark = pytest.mark.root

FLAGS = ("--cluster-cidr", "10.244.0.0/16,fd00:244::/48")


def _objects(bed: NetBed, web_endpoints: int = 2) -> list[dict[str, Any]]:
    hinted = [endpoint(p.ip4, node=p.node_name, zone=p.zone, for_zones=[p.zone]) for p in bed.pods]
    return [
        node(bed.node_name, [bed.node_ip4, bed.node_ip6], zone=bed.zone),
        service("web", cluster_ip="10.96.0.10", trafficDistribution="PreferClose",
                annotations={"kproxy.io/rate-limit": "50/second"}),
        endpoint_slice("web-1", "web", hinted[:web_endpoints] + hinted[len(bed.local_pods):]),
        service("lb", cluster_ip="10.96.0.11", type="LoadBalancer", externalTrafficPolicy="Local",
                sessionAffinity="ClientIP", loadBalancerSourceRanges=[f"{bed.client_ip4}/32"],
                ports=[{"name": "http", "port": 80, "nodePort": 30011}],
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.11"}]}}),
        endpoint_slice("lb-1", "lb", [endpoint(p.ip4, node=p.node_name) for p in bed.pods]),
        service("idle", cluster_ip="10.96.0.12"),
    ]


def _write(tmp_path: Path, objects: list[dict[str, Any]], name: str = "cluster.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(objects))
    return str(path)


def _kproxy(bed: NetBed, *args: str):  # type: ignore[no-untyped-def]
    return bed.node.run(sys.executable, "-m", "kproxy", *args, check=False)


@pytest.fixture
def programmed(netbed: NetBed, tmp_path: Path) -> tuple[NetBed, str]:
    """The bed's node programmed with kproxy --once for the objects above."""
    path = _write(tmp_path, _objects(netbed))
    result = _kproxy(netbed, "--once", "--from-file", path, "--node-name", netbed.node_name, *FLAGS)
    assert result.returncode == 0, result.stderr
    return netbed, path


def test_explain_clusterip_topology_and_rate_limit(programmed: tuple[NetBed, str]) -> None:
    """A ClusterIP packet: the Service, the zone-narrowed endpoints, no masquerade, the rate limit."""
    bed, path = programmed
    result = _kproxy(bed, "explain", bed.local_pods[0].ip4, "10.96.0.10", "80", "--from-file", path,
                     "--node-name", bed.node_name, *FLAGS)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "service: default/web port http (tcp 80), type ClusterIP" in text
    assert "topology: PreferSameZone" in text
    assert "kernel: chain svc-" in text and "2 endpoint(s)" in text
    for pod in bed.local_pods[:2]:
        assert f"{pod.ip4}:8080  node node-a zone zone-a ready" in text
    assert bed.remote_pods[0].ip4 not in text
    assert "masquerade: no (source inside --cluster-cidr" in text
    assert "rate limit: 50/second" in text


def test_explain_load_balancer_policy_firewall_and_affinity(programmed: tuple[NetBed, str]) -> None:
    """A load-balancer packet: source ranges, Local policy with local endpoints only, affinity."""
    bed, path = programmed
    args = ("--from-file", path, "--node-name", bed.node_name, *FLAGS)
    allowed = _kproxy(bed, "explain", bed.client_ip4, "203.0.113.11", "80", *args).stdout
    assert "source allowed by" in allowed
    assert "externalTrafficPolicy Local: this node's endpoints only, client IP kept" in allowed
    assert f"{len(bed.local_pods)} endpoint(s)" in allowed
    assert all(p.ip4 not in allowed for p in bed.remote_pods)
    assert "affinity: ClientIP, 10800s" in allowed
    blocked = _kproxy(bed, "explain", bed.client2_ip4, "203.0.113.11", "80", *args).stdout
    assert "source NOT allowed: the packet is dropped" in blocked
    from_pod = _kproxy(bed, "explain", bed.local_pods[0].ip4, bed.node_ip4, "30011", *args).stdout
    assert "NodePort, externalTrafficPolicy Local, but source is in --cluster-cidr" in from_pod


def test_explain_no_endpoints_and_unknown(programmed: tuple[NetBed, str]) -> None:
    """A Service without endpoints is explained as rejected; an unknown address as untouched."""
    bed, path = programmed
    args = ("--from-file", path, "--node-name", bed.node_name, *FLAGS)
    idle = _kproxy(bed, "explain", bed.local_pods[0].ip4, "10.96.0.12", "80", *args).stdout
    assert "rejected" in idle and "none ready or serving" in idle
    unknown = _kproxy(bed, "explain", bed.local_pods[0].ip4, "10.99.0.1", "80", *args).stdout
    assert "kproxy does not touch the packet" in unknown
    bad = _kproxy(bed, "explain", "not-an-ip", "10.96.0.12", "80", *args)
    assert bad.returncode == 2 and "not-an-ip" in bad.stderr


def test_dry_run_diff(programmed: tuple[NetBed, str], tmp_path: Path) -> None:
    """--dry-run --diff prints nothing for the programmed input, and only the change for a new one."""
    bed, path = programmed
    same = _kproxy(bed, "--dry-run", "--diff", "--from-file", path, "--node-name", bed.node_name, *FLAGS)
    assert same.returncode == 0, same.stderr
    assert same.stdout == "" and "would send 0 operations" in same.stderr
    changed = _write(tmp_path, _objects(bed, web_endpoints=3), "changed.yaml")
    diff = _kproxy(bed, "--dry-run", "--diff", "--from-file", changed, "--node-name", bed.node_name, *FLAGS)
    assert diff.returncode == 0, diff.stderr
    lines = diff.stdout.splitlines()
    commands = [line for line in lines if not line.startswith(("\t\t", "\t}", "}", "table ip kproxy {"))]
    assert commands and all('"default/web:' in line or "default/web/" in line or "hairpin" in line for line in commands), commands
    assert any(bed.local_pods[2].ip4 in line for line in lines)
    after = _kproxy(bed, "--dry-run", "--diff", "--from-file", path, "--node-name", bed.node_name, *FLAGS)
    assert after.stdout == "", "the diff must not change the kernel"


def test_explain_names_what_was_skipped(netbed: NetBed, tmp_path: Path) -> None:
    """A Service port skipped for a bad value, and a Service skipped whole, are named by explain."""
    objects = _objects(netbed) + [
        service("odd", cluster_ip="10.96.0.13", ports=[{"name": "a", "port": 80, "protocol": "GRE"}]),
        service("broken", cluster_ip="10.96.0.300"),
    ]
    path = _write(tmp_path, objects)
    args = ("--from-file", path, "--node-name", netbed.node_name, *FLAGS)
    assert _kproxy(netbed, "--once", *args).returncode == 0
    odd = _kproxy(netbed, "explain", netbed.local_pods[0].ip4, "10.96.0.13", "80", *args)
    assert odd.returncode == 0, odd.stderr
    assert "skipped: skipping part of Service default/odd: spec.ports[0].protocol: 'GRE'" in odd.stdout, odd.stdout
    unknown = _kproxy(netbed, "explain", netbed.local_pods[0].ip4, "10.99.0.1", "80", *args).stdout
    assert "default/broken: spec.clusterIPs[0]: '10.96.0.300' is not an IP address (reason=invalid_ip)" in unknown
    assert "did not answer" in unknown, "no daemon runs here: explain says it could not ask it"
