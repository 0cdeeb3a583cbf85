"""What kproxy needs from the kernel: the ``Backend`` protocol, and the errors every backend raises. Pure.

Two backends implement it fully: ``kproxy.nft.backend.NftablesBackend`` (the
kernel, over netlink and libnftables) and ``kproxy.nft.fake.FakeBackend``
(in memory, for tests without root). Everything above the ``nft`` layer holds
a ``Backend`` and never names either class, except where one is created.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from kproxy.nft.objects import Family, Op, Ruleset, Transaction


class NftError(Exception):
    """The kernel or libnftables refused a transaction; the refused batch changed nothing.

    ``op`` is the refused command when it is known (netlink says which message
    it refused), so the sync engine can tell whose objects it touched.
    """

    def __init__(self, message: str, command: str | None = None, op: Op | None = None) -> None:
        super().__init__(f"{message}: {command}" if command else message)
        self.reason = message
        self.command = command
        self.op = op


class CapabilityError(Exception):
    """Something the ruleset needs is missing; the message says exactly what."""


Counters = dict[tuple[Family, str], tuple[int, int]]
"""(family, counter name) -> (packets, bytes)."""


class Backend(Protocol):
    """kproxy's two tables (``ip kproxy``, ``ip6 kproxy``) in one network namespace, and nothing else."""

    commits: int
    """How many transactions it committed (at most: one that changed nothing may not count in the kernel)."""
    committers: set[int]
    """The process and thread ids that committed them (the kernel names the thread in its notifications)."""

    def apply(self, tx: Transaction) -> None:
        """Apply one transaction atomically; NftError (naming the refused command) changes nothing."""
        ...

    def apply_in_order(self, transactions: Iterable[Transaction]) -> None:
        """Apply each transaction atomically, in order; stop at the first refused (those before it stay)."""
        ...

    def read(self) -> Ruleset:
        """The tables as they are: elements of the static sets, counters, chains with their digests."""
        ...

    def read_counters(self) -> Counters:
        """Every named counter of kproxy's tables."""
        ...

    def read_named_counters(self, names: Iterable[tuple[Family, str]]) -> Counters:
        """Those of the named counters that exist."""
        ...

    def list_text(self, family: Family) -> str | None:
        """The table as nft text, for people (None if it does not exist)."""
        ...

    def delete_tables(self) -> list[Family]:
        """Delete kproxy's tables (only those); return the families that had one."""
        ...

    def check_capabilities(self) -> None:
        """Raise CapabilityError naming everything the ruleset needs that is missing."""
        ...
