"""The libnftables backend in a private network namespace: capabilities, isolation, errors."""

from __future__ import annotations

import pytest

from kproxy.nft import backend as nft
from kproxy.nft.backend import Capability, NftablesBackend
from kproxy.nft.kernel import CapabilityError, NftError
from kproxy.nft.objects import Op, Transaction
from tests.harness.netbed import Netns

pytestmark = pytest.mark.root


@pytest.fixture
def netns(empty_netns: Netns) -> Netns:
    """A fresh, empty network namespace (the shared ``empty_netns`` fixture)."""
    return empty_netns


def test_capabilities_present_and_probe_leaves_nothing(netns: Netns, caplog: pytest.LogCaptureFixture) -> None:
    """This kernel has every capability kproxy needs (the optional ones too), and the probes leave no table behind."""
    with netns.entered(), caplog.at_level("WARNING", logger="kproxy.nft.backend"):
        NftablesBackend().check_capabilities()
    assert netns.nft("list", "ruleset").stdout.strip() == ""
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_missing_optional_capability_warns_and_runs(netns: Netns, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A capability only an annotation needs is one warning naming it, not a refusal to start."""
    bogus = Capability("frobnication, for kproxy.io/frob", "module nft_frob", ("meta frob 1 counter",))
    monkeypatch.setattr(nft, "OPTIONAL_CAPABILITIES", (nft.OPTIONAL_CAPABILITIES[0], bogus))
    with netns.entered(), caplog.at_level("WARNING", logger="kproxy.nft.backend"):
        NftablesBackend().check_capabilities()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "frobnication, for kproxy.io/frob" in messages[0] and "nft_frob" in messages[0]
    assert netns.nft("list", "ruleset").stdout.strip() == ""


def test_missing_capability_is_named(netns: Netns, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capability the kernel refuses is named in the error, with its hint."""
    bogus = Capability("frobnication", "module nft_frob", ("meta frob 1 counter",))
    monkeypatch.setattr(nft, "CAPABILITIES", (nft.CAPABILITIES[0], bogus))
    with netns.entered(), pytest.raises(CapabilityError) as info:
        NftablesBackend().check_capabilities()
    message = str(info.value)
    assert "frobnication" in message and "nft_frob" in message
    assert "nf_tables" not in message.split("missing nftables capabilities:")[1].split("frobnication")[0]
    assert netns.nft("list", "ruleset").stdout.strip() == ""


def test_reads_and_deletes_only_its_own_tables(netns: Netns) -> None:
    """Another table is never read, changed or deleted."""
    netns.nft("add", "table", "inet", "other")
    netns.nft("add", "chain", "inet", "other", "c", "{", "type", "filter", "hook", "input", "priority", "0", ";", "}")
    netns.nft("add", "table", "ip", "kproxy-lookalike")
    with netns.entered():
        backend = NftablesBackend()
        assert backend.read().tables == {}
        backend.apply(Transaction([Op("add", "table", "ip")]))
        assert set(backend.read().tables) == {"ip"}
        assert backend.delete_tables() == ["ip"]
    tables = netns.nft("list", "tables").stdout
    assert "inet other" in tables and "ip kproxy-lookalike" in tables and "ip kproxy\n" not in tables


def test_error_names_the_refused_command_and_changes_nothing(netns: Netns) -> None:
    """A refused transaction is reported with the command, and none of it is applied."""
    with netns.entered():
        backend = NftablesBackend()
        tx = Transaction([Op("add", "table", "ip"), Op("flush", "chain", "ip", "missing")])
        with pytest.raises(NftError) as info:
            backend.apply(tx)
    assert info.value.command == "flush chain ip kproxy missing"
    assert netns.nft("list", "ruleset").stdout.strip() == ""


def test_partial_syncs_across_pick_chain_sizes(netns: Netns) -> None:
    """Growing and shrinking a Service across pick chain sizes (new pick chains, both families) in partial syncs."""
    from kproxy.daemon.proxier import Proxier
    from kproxy.rules.compiler import ProxyConfig, compile_ruleset, node_info
    from kproxy.rules.plan import plan
    from tests.harness.builders import endpoint, endpoint_slice, node, service

    config = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"))

    def slices(count: int) -> list[dict]:
        return [
            endpoint_slice("web-4", "web", [endpoint(f"10.244.1.{i + 1}") for i in range(count)], namespace="ns"),
            endpoint_slice("web-6", "web", [endpoint(f"fd00:244::{i + 1}") for i in range(count)],
                           namespace="ns", address_type="IPv6"),
        ]

    with netns.entered():
        backend = NftablesBackend()
        proxier = Proxier(backend, "node-a", config)
        proxier.on_relist("Node", [node("node-a")])
        proxier.on_relist("Service", [service("web", "ns", ["10.96.0.10", "fd00:96::10"])])
        proxier.on_relist("EndpointSlice", slices(1))
        assert proxier.sync().full
        for count in (6, 20, 3, 40, 1):
            for item in slices(count):
                proxier.on_slice("MODIFIED", item)
            assert not proxier.sync().full
            cluster = proxier.cluster()
            expected = compile_ruleset(cluster, node_info("node-a", cluster.node), config)
            kernel = backend.read()
            # Chains no Service uses any more are emptied now and deleted a little later, as upstream does.
            pending = {name for t in kernel.tables.values() for name, c in t.chains.items() if c.fingerprint == ("", 0)}
            left = [op for op in plan(kernel, expected).ops if not (op.kind == "chain" and op.name in pending)]
            assert left == [], count
            assert len(kernel.tables["ip6"].elements["endpoints-4"]) == min(count, 4)


def test_a_node_programmed_by_the_previous_skeleton_converges(netns: Netns) -> None:
    """A base chain an earlier kproxy had (filter-output, since folded into filter-output-pre-dnat) is emptied, then deleted."""
    from kproxy.daemon.proxier import CHAIN_DELETE_DELAY, Proxier
    from kproxy.rules.compiler import ProxyConfig
    from tests.harness.builders import endpoint, endpoint_slice, node, service

    now = [1000.0]
    with netns.entered():
        backend = NftablesBackend()
        proxier = Proxier(backend, "node-a", ProxyConfig(cluster_cidrs=("10.244.0.0/16",)), clock=lambda: now[0])
        proxier.on_relist("Node", [node("node-a")])
        proxier.on_relist("Service", [service("web", cluster_ip="10.96.0.10")])
        proxier.on_relist("EndpointSlice", [endpoint_slice("web-1", "web", [endpoint("10.244.1.10")])])
        proxier.sync()
    for family in ("ip", "ip6"):  # what the previous skeleton held
        netns.nft("add", "chain", family, "kproxy", "filter-output",
                  "{ type filter hook output priority filter - 10; policy accept; }")
        netns.nft("add", "rule", family, "kproxy", "filter-output", "ct", "state", "new", "jump", "endpoints-check")
    with netns.entered():
        proxier.request_full_sync()
        proxier.sync()
        assert all(not backend.read().tables[f].chains["filter-output"].fingerprint[1] for f in ("ip", "ip6"))
        now[0] += 2 * CHAIN_DELETE_DELAY
        proxier.request_full_sync()
        proxier.sync()
        assert all("filter-output" not in backend.read().tables[f].chains for f in ("ip", "ip6"))


def test_a_node_with_the_previous_no_endpoint_maps_converges(netns: Netns) -> None:
    """The verdict maps an earlier kproxy had for Services without endpoints are deleted once nothing reads them."""
    from kproxy.daemon.proxier import Proxier
    from kproxy.rules.compiler import ProxyConfig
    from tests.harness.builders import node, service

    with netns.entered():
        backend = NftablesBackend()
        proxier = Proxier(backend, "node-a", ProxyConfig(cluster_cidrs=("10.244.0.0/16",)), clock=lambda: 1000.0)
        proxier.on_relist("Node", [node("node-a")])
        proxier.on_relist("Service", [service("idle", cluster_ip="10.96.0.10")])
        proxier.on_relist("EndpointSlice", [])
        proxier.sync()
    for family, addr in (("ip", "ipv4_addr"), ("ip6", "ipv6_addr")):  # what the previous skeleton held
        netns.nft("add", "map", family, "kproxy", "no-endpoint-services",
                  f"{{ type {addr} . inet_proto . inet_service : verdict; }}")
        netns.nft("add", "rule", family, "kproxy", "endpoints-check", family, "daddr", ".", "meta", "l4proto", ".",
                  "th", "dport", "vmap", "@no-endpoint-services")
    with netns.entered():
        proxier.request_full_sync()
        proxier.sync()
        for family in ("ip", "ip6"):
            table = backend.read().tables[family]
            assert "no-endpoint-services" not in table.sets
            assert "10.96.0.10 . tcp . 80" in backend.read().tables["ip"].elements["no-endpoint-reject"]


def test_a_value_the_encoder_cannot_take_is_an_nft_error(netns: Netns) -> None:
    """An element whose address inet_pton refuses is reported as the kernel's refusals are (NftError), not raised as
    the OSError that inet_pton raises: the sync's refusal handling (isolation, quarantine) takes it from there."""
    from kproxy.nft.objects import Element
    from kproxy.rules.plan import create
    from kproxy.rules.skeleton import skeleton_table

    skeleton = skeleton_table("ip")
    with netns.entered():
        backend = NftablesBackend()
        backend.apply(create(skeleton)[0])
        for key in ("10.0.0.300 . 10.0.0.1", "10.0.0.1 . fd00::1"):
            tx = Transaction([Op("add", "element", "ip", "hairpin", set_decl=skeleton.sets["hairpin"],
                                 elements=(Element(key),))])
            with pytest.raises(NftError, match="cannot encode"):
                backend.apply(tx)
    assert "10.0.0.1" not in netns.nft("list", "set", "ip", "kproxy", "hairpin").stdout
