"""The planner against the fake backend, and the fake backend against the kernel."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import pytest

from kproxy.cluster.convert import build_cluster
from kproxy.nft.backend import NftablesBackend
from kproxy.nft.fake import FakeBackend
from kproxy.nft.kernel import NftError
from kproxy.nft.objects import Chain, Op, Ruleset, Transaction
from kproxy.nft.statements import Verdict
from kproxy.rules.compiler import NodeInfo, ProxyConfig, compile_ruleset
from kproxy.rules.plan import LAST_SETS, create, plan
from tests.harness.builders import endpoint, endpoint_slice, service

NODE = NodeInfo("node-a", "zone-a", ("192.168.50.1",), ("192.168.50.1",))
CONFIG = ProxyConfig(cluster_cidrs=("10.244.0.0/16",))


def _objects(n: int = 5, endpoints: int = 3, changed: dict[int, int] | None = None) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for i in range(n):
        count = (changed or {}).get(i, endpoints)
        objects.append(service(f"s{i}", "ns", f"10.96.0.{i + 1}", type="NodePort", sessionAffinity="ClientIP",
                               ports=[{"name": "http", "port": 80, "nodePort": 30000 + i}]))
        objects.append(endpoint_slice(f"s{i}-x", f"s{i}", [endpoint(f"10.244.{i}.{j + 1}") for j in range(count)],
                                      namespace="ns"))
    return objects


def _ruleset(objects: list[dict[str, Any]]) -> Ruleset:
    cluster, problems = build_cluster(objects, "node-a")
    assert not problems
    return compile_ruleset(cluster, NODE, CONFIG)


def test_converge_then_nothing_to_do() -> None:
    """After the converging transaction, the plan against the read-back state is empty."""
    fake = FakeBackend()
    desired = _ruleset(_objects())
    fake.apply(plan(fake.read(), desired))
    again = plan(fake.read(), desired)
    assert again.operations == 0 and not again


def test_one_endpoint_change_touches_only_that_service() -> None:
    """Adding an endpoint to one Service rewrites that Service's chain and nothing else."""
    fake = FakeBackend()
    fake.apply(plan(fake.read(), _ruleset(_objects())))
    tx = plan(fake.read(), _ruleset(_objects(changed={2: 4})))
    touched = {op.name for op in tx.ops if op.kind != "rules"} | {c.name for op in tx.ops for c in op.chains}
    assert all("ns/s2/" in name or name == "hairpin" for name in touched), touched
    assert [op.verb + " " + op.kind for op in tx.ops] == ["flush chain", "add rules", "add element"]
    fake.apply(tx)
    assert plan(fake.read(), _ruleset(_objects(changed={2: 4}))).operations == 0


def test_removed_service_leaves_nothing_behind() -> None:
    """Deleting a Service deletes its elements and its chains."""
    fake = FakeBackend()
    fake.apply(plan(fake.read(), _ruleset(_objects(3))))
    tx = plan(fake.read(), _ruleset(_objects(2)))
    fake.apply(tx)
    table = fake.tables["ip"]
    assert not [n for n in table.chains if "ns/s2/" in n]
    assert "10.96.0.3 . tcp . 80" not in table.elements["service-ips"]
    assert "tcp . 30002" not in table.elements["service-nodeports"]


def test_deferred_chain_deletes() -> None:
    """With delete_chains=False a removed chain is flushed and dereferenced, deleted later."""
    fake = FakeBackend()
    fake.apply(plan(fake.read(), _ruleset(_objects(2))))
    tx = plan(fake.read(), _ruleset(_objects(1)), delete_chains=False)
    fake.apply(tx)
    assert tx.deferred_chain_deletes and all("ns/s1/" in name for _, name in tx.deferred_chain_deletes)
    fake.apply(Transaction([Op("delete", "chain", f, n) for f, n in tx.deferred_chain_deletes]))
    assert not [n for n in fake.tables["ip"].chains if "ns/s1/" in n]


def test_fake_is_all_or_nothing() -> None:
    """A transaction with one bad command changes nothing and names the command."""
    fake = FakeBackend()
    fake.apply(plan(fake.read(), _ruleset(_objects(1))))
    before = fake.read()
    bad = plan(fake.read(), _ruleset(_objects(2)))
    bad.ops.append(Op("add", "rules", "ip", chains=(Chain("no-such-chain", ((Verdict("accept"),),)),)))
    with pytest.raises(NftError) as info:
        fake.apply(bad)
    assert "chain no-such-chain" in info.value.command
    assert fake.read().tables["ip"].chains.keys() == before.tables["ip"].chains.keys()


def test_fake_refuses_what_the_kernel_refuses() -> None:
    """Deleting a referenced chain, a dangling goto, and changing a map value in place all fail."""
    fake = FakeBackend()
    fake.apply(plan(fake.read(), _ruleset(_objects(1))))
    svc_chain = next(n for n in fake.tables["ip"].chains if n.startswith("svc-"))
    for op in (
        Op("delete", "chain", "ip", "masquerading"),
        Op("add", "rules", "ip", chains=(Chain("services", ((Verdict("goto", "nowhere"),),)),)),
        Op("delete", "chain", "ip", svc_chain),
    ):
        with pytest.raises(NftError):
            fake.apply(Transaction([op]))
    element = fake.tables["ip"].elements["service-ips"]["10.96.0.1 . tcp . 80"]
    changed = type(element)(element.key, "drop", element.comment)
    with pytest.raises(NftError):
        fake.apply(Transaction([Op("add", "element", "ip", "service-ips", elements=(changed,))]))


@pytest.mark.root
def test_fake_agrees_with_the_kernel() -> None:
    """The same sequence of transactions leaves the kernel and the fake in the same state."""
    name = f"kpt-plan-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        from tests.harness.netbed import Netns

        fake = FakeBackend()
        with Netns(name).entered():
            kernel = NftablesBackend()
            for objects in (_objects(4), _objects(4, changed={1: 5, 3: 1}), _objects(2), _objects(6, 2)):
                desired = _ruleset(objects)
                tx = plan(kernel.read(), desired)
                assert tx.operations == plan(fake.read(), desired).operations
                kernel.apply(tx)
                fake.apply(tx)
                for family in ("ip", "ip6"):
                    k, f = kernel.read().tables[family], fake.read().tables[family]
                    assert k.elements == f.elements
                    assert k.counters == f.counters
                    assert {n: c.fingerprint for n, c in k.chains.items()} == {
                        n: c.fingerprint for n, c in f.chains.items()
                    }
            bad = Transaction([Op("add", "chain", "ip", "x", chain=Chain("x", ())),
                               Op("add", "rules", "ip", chains=(Chain("x", ((Verdict("jump", "nowhere"),),)),))])
            with pytest.raises(NftError) as kernel_error:
                kernel.apply(bad)
            with pytest.raises(NftError):
                fake.apply(bad)
            assert "jump nowhere" in kernel_error.value.command
            assert "x" not in kernel.read().tables["ip"].chains
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_create_fills_dispatch_and_cluster_ips_last() -> None:
    """Building a table: nothing reaches a Service chain, and no ClusterIP is rejected, before the last piece.

    ``cluster-ips-check`` rejects a ClusterIP port no Service defines; with the
    ClusterIPs in place before dispatch, every connection would be reset.
    The other elements come in bounded pieces before it.
    """
    objects: list[dict[str, Any]] = []
    for i in range(200):
        objects.append(service(f"s{i}", "ns", f"10.96.{i // 250}.{i % 250 + 1}", type="NodePort",
                               ports=[{"name": "http", "port": 80, "nodePort": 30000 + i}]))
        objects.append(endpoint_slice(f"s{i}-x", f"s{i}", [endpoint(f"10.244.{i}.{j + 1}") for j in range(3)], namespace="ns"))
    table = _ruleset(objects).tables["ip"]
    pieces = create(table, max_rules=20, max_elements=1000)
    filled = [{op.name for op in piece.ops if op.kind == "element"} for piece in pieces]
    assert filled[-1] == set(LAST_SETS)
    assert not any(names & set(LAST_SETS) for names in filled[:-1])
    assert sum(1 for names in filled if "endpoints-4" in names) > 1, "elements in bounded pieces"
    assert all(piece.operations <= 1000 for piece in pieces[2:-1] if all(op.kind == "element" for op in piece.ops))


def test_fake_seeded_from_its_dump_holds_the_same_tables() -> None:
    """dump() then FakeBackend(seed): the same read-back, the same rules, and nothing for plan to do."""
    fake = FakeBackend()
    desired = _ruleset(_objects(3, 2))
    fake.apply(plan(fake.read(), desired))
    dumped = fake.dump()
    seeded = FakeBackend(dumped)
    assert seeded.read() == fake.read()
    assert plan(seeded.read(), desired).operations == 0
    for family, table in desired.tables.items():
        assert {n: c.rules for n, c in dumped.tables[family].chains.items()} == {n: c.rules for n, c in table.chains.items()}
    assert seeded.read_counters() == {(f, n): (0, 0) for f, t in desired.tables.items() for n in t.counters}


def test_fake_refuses_a_seed_the_kernel_could_not_hold() -> None:
    """A seeded chain that jumps nowhere is refused, as loading it would be."""
    table = _ruleset(_objects(1)).tables["ip"]
    table.chains["broken"] = Chain("broken", ((Verdict("goto", "nowhere"),),))
    with pytest.raises(NftError):
        FakeBackend(Ruleset({"ip": table}))


@pytest.mark.root
def test_fake_lists_text_that_nft_accepts(nft_check) -> None:  # type: ignore[no-untyped-def]
    """The fake's list_text is nft syntax: the kernel's parser takes the whole table back."""
    fake = FakeBackend()
    fake.apply(plan(fake.read(), _ruleset(_objects(2, 2))))
    for family in ("ip", "ip6"):
        text = fake.list_text(family)  # type: ignore[arg-type]
        assert text is not None and "kproxy-rules=" in text
        nft_check(text)
    assert FakeBackend().list_text("ip") is None
