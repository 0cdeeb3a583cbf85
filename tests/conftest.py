"""Shared fixtures: the root-test guard and an nft syntax checker.

Tests marked ``root`` need root and a kernel with nf_tables; CI runs them as
root. Run as another user, they fail with a clear message instead of being
skipped silently; deselect them with ``-m 'not root'`` if you must.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.harness.netbed import Netns


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, nft); deselect with -m 'not root'")


NftCheck = Callable[[str], None]


@pytest.fixture(scope="session")
def nft_check() -> Iterator[NftCheck]:
    """``nft_check(script)`` asserts that ``nft -c -f -`` accepts the script.

    It runs in a private network namespace, so nothing on the host is read or
    touched. ``-c`` only checks: nothing is committed even there.
    """
    if os.geteuid() != 0:
        pytest.fail("nft -c needs root (CAP_NET_ADMIN); deselect with -m 'not root'")
    name = f"kpt-check-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:

        def check(script: str) -> None:
            result = subprocess.run(
                ["ip", "netns", "exec", name, "nft", "-c", "-f", "-"],
                input=script,
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, f"nft -c rejected the script:\n{result.stderr[:4000]}"

        yield check
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
pytest_plugins = ["tests.harness.fakeapi", "tests.harness.netbed", "tests.harness.daemonbed"]
"""Fixtures shared by many modules: ``netbed`` (network namespaces), ``api_in_node`` and ``fake_api`` (the test API server)."""


@pytest.fixture
def empty_netns() -> Iterator[Netns]:
    """A fresh, empty network namespace, deleted afterwards (also on failure)."""
    from tests.harness.netbed import Netns

    name = f"kpt-ns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Netns(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
