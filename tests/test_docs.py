"""The documentation's references resolve: links, anchors, kproxy flags, repository paths, metric and alert names.

Covers README.md, CHANGELOG.md, docs/*.md and the READMEs of rules/,
dashboards/ and deploy/monitoring/:

* every relative link names a file or folder inside the repository, and its
  ``#anchor`` a heading of the target (GitHub's slugs);
* every ``--flag`` given to ``kproxy`` in a command, and every flag quoted
  alone in backticks, is one ``kproxy --help`` (or ``kproxy explain --help``)
  knows, apart from a short list of other tools' flags;
* every backticked path under a repository folder (``tests/...``,
  ``deploy/...``) exists;
* every ``kproxy_*`` / ``kubeproxy_*`` metric named is in docs/metrics.md, and
  every ``Kproxy*`` alert named is in deploy/monitoring/kproxy-alerts.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kproxy.cli import build_parser
from tests.harness.metricsdoc import SUFFIXES, documented

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md"), ROOT / "rules" / "README.md",
               ROOT / "dashboards" / "README.md", ROOT / "deploy" / "monitoring" / "README.md"])
IDS = [str(p.relative_to(ROOT)) for p in DOCS]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_DIRS = ("tests", "kproxy", "deploy", "docs", "rules", "dashboards", "image", "benchmarks", "examples")
FOREIGN_FLAGS = {
    "--profile",  # kubectl debug
    "--node-labels",  # the kubelet
    "--force", "--refresh-base", "--locked", "--update-lock",  # ./dev image (--force is kproxy's too)
}
"""Flags quoted alone in backticks that belong to other tools (kubectl, the kubelet, ./dev)."""


def prose(path: Path) -> str:
    """The document without its fenced code blocks."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", prose(path), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_relative_links_resolve(doc: Path) -> None:
    """Each relative link names something in the repository, and its anchor a heading there."""
    broken = []
    for target in LINK.findall(prose(doc)):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, broken


def kproxy_flags() -> set[str]:
    parser = build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    for action in parser._actions:  # subcommands (explain)
        for sub in getattr(action, "choices", None) or {}:
            sub_parser = action.choices[sub]
            if hasattr(sub_parser, "_actions"):
                flags |= {s for a in sub_parser._actions for s in a.option_strings}
    return flags


def flags_in_kproxy_commands(text: str) -> set[str]:
    """``--flags`` that follow ``kproxy`` on a command line or in a code span, up to a shell operator."""
    found = set()
    for match in re.finditer(r"(?<![\w./-])kproxy((?: +[^\s`|;&)]+)+)", text):
        found |= set(re.findall(r"(?<!\S)(--[a-z][\w-]*)", match.group(1)))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_kproxy_flags_exist(doc: Path) -> None:
    """Flags given to kproxy, and flags quoted alone, are kproxy's (``kproxy --help``)."""
    known = kproxy_flags()
    text = doc.read_text()
    used = flags_in_kproxy_commands(text)
    alone = {m.split("=")[0].split()[0] for m in CODE_SPAN.findall(text) if re.match(r"^--[a-z]", m)}
    unknown = (used | (alone - FOREIGN_FLAGS)) - known
    assert not unknown, f"{doc.name}: not kproxy flags: {sorted(unknown)}"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_repository_paths_exist(doc: Path) -> None:
    """Backticked paths under the repository's folders name files or folders that exist."""
    missing = []
    for span in CODE_SPAN.findall(doc.read_text()):
        for token in span.split():
            token = token.rstrip(".,:;)")
            if re.match(rf"^(?:{'|'.join(REPO_DIRS)})/[\w./-]*$", token) and "*" not in token:
                if not (ROOT / token).exists():
                    missing.append(token)
    assert not missing, f"{doc.name}: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_metric_and_alert_names_exist(doc: Path) -> None:
    """Metric names are in docs/metrics.md (histogram series included), alert names in the rule file."""
    rows = documented()
    listed = set(rows) | {name + suffix for name, row in rows.items() for suffix in SUFFIXES[row.type]}
    text = doc.read_text()
    named = set(re.findall(r"\b((?:kproxy|kubeproxy)_[a-z_]+[a-z])\b(?!\.)", text))  # not kubeproxy_cleanup.py
    # upstream's iptables-mode metrics, named as what kproxy does not export
    named = {n for n in named if "_iptables_" not in n}
    assert named <= listed, f"{doc.name}: {sorted(named - listed)}"
    rules = yaml.safe_load((ROOT / "deploy" / "monitoring" / "kproxy-alerts.yaml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    named_alerts = set(re.findall(r"\b(Kproxy[A-Z]\w+)\b", text))
    assert named_alerts <= alerts, f"{doc.name}: {sorted(named_alerts - alerts)}"


def test_slug_follows_github() -> None:
    """Headings with code, punctuation and numbers get GitHub's anchors."""
    assert slug("`--cleanup-kube-proxy` refuses") == "--cleanup-kube-proxy-refuses"
    assert slug("5. Roll the node back") == "5-roll-the-node-back"
    assert slug("Managed clusters (EKS, GKE, AKS)") == "managed-clusters-eks-gke-aks"
    assert slug("kproxy and upstream kube-proxy, rule by rule") == "kproxy-and-upstream-kube-proxy-rule-by-rule"
