"""Reading Kubernetes manifests from files, as ``kubectl get -o yaml`` or ``-o json`` writes them.

A file may hold several YAML documents, and a document may be a ``List`` (or
any ``*List`` kind) whose ``items`` are the objects. This module only reads and
flattens; ``kproxy.cluster.convert`` decides what the objects mean.

Files are untrusted, so reading is bounded:

* a file whose first character is ``{`` or ``[`` is JSON, parsed with ``json``
  (a 10k-Service ``kubectl get -o json`` export in well under a second);
  anything else is YAML, parsed with libyaml (``CSafeLoader``: no Python
  objects, no tags beyond plain data);
* files larger than ``MAX_FILE_BYTES`` are refused before they are read;
* documents nested deeper than ``MAX_DEPTH`` are refused (libyaml itself stops
  at 1000 levels, and ``json`` at Python's recursion limit);
* YAML aliases may not expand a document to more than ``MAX_ALIAS_EXPANSION``
  times its own size (a few hundred bytes of aliases can stand for billions of
  values); ``kubectl`` never writes aliases.

Every breach, and every file that cannot be read or parsed, is one
``ManifestError`` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30
"""1 GiB: a 30k-Service export with managedFields is a few hundred MB."""
MAX_DEPTH = 100
"""Kubernetes objects nest about 15 levels deep (managedFields included)."""
MAX_ALIAS_EXPANSION = 10
"""Values a document may stand for, with its aliases expanded, per value it holds."""
_ALIAS_ALLOWANCE = 10_000
"""Expanded values allowed in any document on top of the ratio (small files with a few aliases are fine)."""


class ManifestError(Exception):
    """A file that cannot be read or parsed, or that breaks a limit. The message names the file, on one line."""


_Loader: Any = getattr(yaml, "CSafeLoader", None)
if _Loader is None:  # pragma: no cover - Debian's and PyPI's PyYAML both ship libyaml
    log.warning("PyYAML has no libyaml binding: YAML files are read with the slow pure-Python parser")
    _Loader = yaml.SafeLoader


def _flatten(document: Any, path: str, index: int) -> list[dict[str, Any]]:
    if document is None:
        return []
    if not isinstance(document, dict):
        raise ManifestError(f"{path}: document {index + 1} is a {type(document).__name__}, not a Kubernetes object")
    kind = document.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in document:
        items = document.get("items") or []
        if not isinstance(items, list):
            raise ManifestError(f"{path}: document {index + 1} is a {kind} whose items are not a list")
        return [item for item in items if isinstance(item, dict)]
    return [document]


def check_shape(document: Any, where: str, aliases: bool) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or, with ``aliases``, one whose aliases expand too far.

    Iterative (no recursion), and linear in the number of distinct values:
    each container is visited once, whatever refers to it.
    """
    expanded: dict[int, int] = {}  # id(container) -> values it stands for, expanded
    distinct = 0
    stack: list[tuple[Any, int, bool]] = [(document, 1, False)]
    while stack:
        value, depth, done = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        key = id(value)
        children = list(value.values()) if isinstance(value, dict) else value
        if done:
            expanded[key] = 1 + sum(expanded.get(id(c), 1) if isinstance(c, (dict, list)) else 1 for c in children)
            continue
        if key in expanded:
            if aliases:
                continue  # seen before: an alias, already counted
            raise ManifestError(f"{where}: a value refers to itself")
        if depth > MAX_DEPTH:
            raise ManifestError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        expanded[key] = 1
        distinct += 1 + len(children)
        stack.append((value, depth, True))
        stack.extend((c, depth + 1, False) for c in children if isinstance(c, (dict, list)))
    total = expanded.get(id(document), 1)
    if aliases and total > MAX_ALIAS_EXPANSION * distinct + _ALIAS_ALLOWANCE:
        raise ManifestError(
            f"{where}: YAML aliases expand {distinct} values to {total}; refusing more than {MAX_ALIAS_EXPANSION}x"
        )


def parse_manifests(text: str | bytes, path: str = "<input>") -> list[dict[str, Any]]:
    """Every object in a JSON or YAML text (multi-document YAML and Lists flattened)."""
    start = text.lstrip()[:1]
    if start in ("{", "[", b"{", b"["):
        return _parse_json(text, path)
    return _parse_yaml(text, path)


def _parse_json(text: str | bytes, path: str) -> list[dict[str, Any]]:
    try:
        document = json.loads(text)
    except RecursionError:
        raise ManifestError(f"{path}: nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    check_shape(document, path, aliases=False)
    return _flatten(document, path, 0)


def _yaml_error(exc: Exception, path: str) -> ManifestError:
    """One line for anything libyaml or the constructor raised."""
    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unknown error"])[0]
        return ManifestError(f"{path}: invalid YAML{where}: {problem}")
    if isinstance(exc, UnicodeDecodeError):
        return ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    # e.g. a mapping used as a mapping key (unhashable)
    return ManifestError(f"{path}: unusable YAML: {type(exc).__name__}: {str(exc)[:120]}".replace("\n", " "))


_YAML_FAILURES = (yaml.YAMLError, UnicodeDecodeError, ValueError, TypeError, RecursionError)


def _parse_yaml(text: str | bytes, path: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    try:
        for index, document in enumerate(yaml.load_all(text, Loader=_Loader)):
            check_shape(document, f"{path}: document {index + 1}", aliases=True)
            objects.extend(_flatten(document, path, index))
    except _YAML_FAILURES as exc:
        raise _yaml_error(exc, path) from None
    return objects


def read_limited(path: str) -> bytes:
    """The bytes of a file (``-`` is stdin), refusing more than MAX_FILE_BYTES."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with Path(path).open("rb") as handle:
                if os.fstat(handle.fileno()).st_size > MAX_FILE_BYTES:
                    raise ManifestError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
                data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
    if b"\0" in data[:8192]:
        raise ManifestError(f"{path}: a binary file, not YAML or JSON")
    return data


def load_manifest_files(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Read and parse each file in turn; the first failure raises ManifestError."""
    objects: list[dict[str, Any]] = []
    for path in paths:
        objects.extend(parse_manifests(read_limited(path), path))
    log.debug("read %d objects", len(objects))
    return objects


def load_yaml_file(path: str) -> Any:
    """One YAML (or JSON) document from a file, with the same limits (for the KubeProxyConfiguration)."""
    data = read_limited(path)
    try:
        document = yaml.load(data, Loader=_Loader)
    except _YAML_FAILURES as exc:
        raise _yaml_error(exc, path) from None
    check_shape(document, path, aliases=True)
    return document

