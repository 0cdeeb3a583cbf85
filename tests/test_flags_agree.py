"""README.md's flag lists, ``kproxy --help`` and daemonset.yaml agree.

* README's Usage block lists every daemon flag (the "proxy" group of the
  parser, -v) and its One-shot modes block every mode flag; every flag either
  block names exists. A value README shows after a flag is its metavar or the
  default ``--help`` states; a flag whose value is optional is shown so.
* daemonset.yaml's container arguments are flags of the parser; every key of
  its KubeProxyConfiguration is a field kproxy applies or checks (none it
  ignores); a value that differs from the default README shows is explained
  in a comment that names that default.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.cli import build_explain_parser, build_parser
from kproxy.daemon.config import _FILE_FIELDS, _FLAGS, FIELDS, IGNORED, load_kube_proxy_configuration

ROOT = Path(__file__).resolve().parent.parent


def readme_block(heading: str) -> str:
    """The first ```sh block after a README heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, start)
    assert match, f"no sh block after {heading}"
    return match.group(1)


def _items(line: str) -> list[tuple[str, str]]:
    """A usage line's top-level items: ("group", text inside [...]) or ("word", text)."""
    items, i = [], 0
    while i < len(line):
        if line[i] == "[":
            depth, j = 0, i
            while j < len(line):
                depth += {"[": 1, "]": -1}.get(line[j], 0)
                j += 1
                if depth == 0:
                    break
            items.append(("group", line[i + 1:j - 1]))
            i = j
        elif line[i].isspace():
            i += 1
        else:
            j = i
            while j < len(line) and not line[j].isspace() and line[j] != "[":
                j += 1
            items.append(("word", line[i:j]))
            i = j
    return items


def readme_flags(block: str) -> dict[str, str]:
    """{flag: the value shown after it ("" if none)} for every long flag in a usage block."""
    out: dict[str, str] = {}
    for line in block.splitlines():
        items = _items(line)
        for k, (kind, text) in enumerate(items):
            flag, value = "", ""
            if kind == "group" and text.startswith("--"):
                flag, _, value = text.partition(" ")
            elif kind == "word" and text.startswith("--"):
                flag = text
                following = items[k + 1] if k + 1 < len(items) else ("", "")
                if following[0] == "word" and not following[1].startswith("-") and following[1] != "...":
                    value = following[1]
            if flag:
                out.setdefault(flag, value.removesuffix("...").strip())
    return out


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def group(parser: argparse.ArgumentParser, title: str) -> list[argparse.Action]:
    (found,) = [g for g in parser._action_groups if (g.title or "").startswith(title)]
    return list(found._group_actions)


def stated_default(action: argparse.Action) -> str | None:
    match = re.search(r"default: ([^;),\s]+)", action.help or "")
    return match.group(1) if match else None


def test_readme_usage_lists_every_daemon_flag() -> None:
    """Every flag of the proxy group (by its first name) and -v are in README's Usage block, and nothing else."""
    parser = build_parser()
    shown = readme_flags(readme_block("## Usage"))
    daemon = {a.option_strings[0] for a in group(parser, "proxy")}
    assert set(shown) == daemon, f"README lacks {daemon - set(shown)}, has extra {set(shown) - daemon}"
    assert "[-v]" in readme_block("## Usage")


def test_readme_one_shot_modes_list_every_mode_flag() -> None:
    """Every mode flag, --from-file and --version appear in README's One-shot modes block; every flag there exists."""
    parser = build_parser()
    shown = readme_flags(readme_block("### One-shot modes"))
    modes = {a.option_strings[0] for a in group(parser, "mode")} | {"--from-file", "--version"}
    assert modes <= set(shown), f"README's One-shot modes lack {modes - set(shown)}"
    known = set(actions(parser)) | set(actions(build_explain_parser()))
    assert set(shown) <= known, f"README names flags kproxy does not have: {set(shown) - known}"


def test_readme_values_are_metavars_or_the_defaults_help_states() -> None:
    """A value after a flag in README is the flag's metavar or the default --help states; optional values show so."""
    parser_actions = actions(build_parser())
    for heading in ("## Usage", "### One-shot modes"):
        for flag, value in readme_flags(readme_block(heading)).items():
            action = parser_actions.get(flag)
            if action is None:
                continue
            if action.nargs == "?":
                assert value == f"[{action.metavar}]", f"{flag} takes an optional value: show [{action.metavar}]"
            elif action.nargs == 0:
                assert value == "", f"{flag} takes no value, README shows {value!r}"
            elif value:
                assert value in (action.metavar, stated_default(action)), (
                    f"README shows {flag} {value}; --help says metavar {action.metavar}, "
                    f"default {stated_default(action)}")


def test_help_mentions_explain_and_every_mode() -> None:
    """kproxy --help names the explain subcommand."""
    text = build_parser().format_help()
    assert "kproxy explain SRC DST PORT" in text


# --- daemonset.yaml ---------------------------------------------------------------------------------


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "daemonset.yaml").read_text()) if d]


def _container() -> dict[str, Any]:
    (daemonset,) = [d for d in _docs() if d["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container


def _config_text() -> str:
    (config_map,) = [d for d in _docs() if d["kind"] == "ConfigMap"]
    return config_map["data"]["config.yaml"]


def _paths(doc: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        where = f"{prefix}.{key}" if prefix else key
        out += _paths(value, where) if isinstance(value, dict) and where not in FIELDS else [where]
    return out


def test_daemonset_args_are_flags_kproxy_has() -> None:
    known = actions(build_parser())
    for arg in _container()["args"]:
        assert arg.split("=", 1)[0] in known, arg


def test_shipped_config_uses_no_ignored_field(tmp_path: Path) -> None:
    """Every field of the ConfigMap's KubeProxyConfiguration takes effect (or is checked): no startup warning."""
    text = _config_text()
    for path in _paths(yaml.safe_load(text)):
        assert path in FIELDS and FIELDS[path].effect != IGNORED, path
    file = tmp_path / "config.yaml"
    file.write_text(text)
    warnings: list[str] = []
    load_kube_proxy_configuration(str(file), warnings)
    assert warnings == []


@pytest.mark.parametrize("field", sorted(_FILE_FIELDS))
def test_shipped_values_that_differ_from_readme_defaults_say_so(tmp_path: Path, field: str) -> None:
    """A ConfigMap value that overrides a default README's Usage shows is explained in a comment naming it."""
    path = _FILE_FIELDS[field]
    if field not in _FLAGS:
        return
    _, flag, parse = _FLAGS[field]
    shown = readme_flags(readme_block("## Usage")).get(flag, "")
    if not shown or shown.startswith("[") or shown == actions(build_parser())[flag].metavar:
        return
    file = tmp_path / "config.yaml"
    file.write_text(_config_text())
    values = load_kube_proxy_configuration(str(file))
    if field in values and values[field] != parse(shown):
        comments = [line for line in (ROOT / "daemonset.yaml").read_text().splitlines() if line.strip().startswith("#")]
        assert any(shown in line for line in comments), (
            f"daemonset.yaml sets {path} to {values[field]!r}, not README's default {shown}: say so in a comment")
