"""One version everywhere: ``kproxy --version``, pyproject.toml, CHANGELOG.md's newest entry and the image tag."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from kproxy import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_same_everywhere() -> None:
    """--version, the package metadata, the newest CHANGELOG.md entry and daemonset.yaml's image tag agree."""
    result = subprocess.run([sys.executable, "-m", "kproxy", "--version"], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, f"kproxy {__version__}\n")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
    entries = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert entries and entries[0] == __version__, f"CHANGELOG.md's newest entry is {entries[:1]}, not {__version__}"
    daemonset = next(d for d in yaml.safe_load_all((ROOT / "daemonset.yaml").read_text()) if d["kind"] == "DaemonSet")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["image"].rsplit(":", 1)[1] == __version__
