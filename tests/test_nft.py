"""The libnftables backend in a private network namespace: capabilities, isolation, errors."""

from __future__ import annotations

import pytest

from kproxy import nft
from kproxy.nft import Capability, CapabilityError, NftablesBackend, NftError
from kproxy.plan import Op, Transaction
from tests.netbed import Netns

pytestmark = pytest.mark.root


@pytest.fixture
def netns(empty_netns: Netns) -> Netns:
    """A fresh, empty network namespace (the shared ``empty_netns`` fixture)."""
    return empty_netns


def test_capabilities_present_and_probe_leaves_nothing(netns: Netns) -> None:
    """This kernel has every capability kproxy needs, and the probes leave no table behind."""
    with netns.entered():
        NftablesBackend().check_capabilities()
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
