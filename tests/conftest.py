"""Shared fixtures: the root-test guard, an nft syntax checker, and the root logger put back after each test.

Tests marked ``root`` need root and a kernel with nf_tables; CI runs them as
root. Run as another user, they fail with a clear message instead of being
skipped silently; deselect them with ``-m 'not root'`` if you must.
"""

from __future__ import annotations

import logging
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


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """A test that runs ``kproxy.cli.main`` in-process gets ``setup_logging``'s handler on the root logger,
    writing to that test's captured stderr; left there, every later log record hit a closed stream
    ("--- Logging error ---" in later tests' output). The root logger's handlers and level are put back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
