"""Reading Kubernetes manifests from files, as ``kubectl get -o yaml`` writes them.

A file may hold several YAML documents, and a document may be a ``List`` (or
any ``*List`` kind) whose ``items`` are the objects. This module only reads and
flattens; ``kproxy.convert`` decides what the objects mean.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import yaml

log = logging.getLogger(__name__)


class ManifestError(Exception):
    """A file that cannot be read or parsed. The message names the file."""


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


def parse_manifests(text: str, path: str = "<input>") -> list[dict[str, Any]]:
    """Every object in a YAML text (multi-document and Lists flattened)."""
    objects: list[dict[str, Any]] = []
    try:
        for index, document in enumerate(yaml.safe_load_all(text)):
            objects.extend(_flatten(document, path, index))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(f"{path}: invalid YAML{where}: {problem}") from None
    return objects


def load_manifest_files(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Read and parse each file in turn; the first failure raises ManifestError."""
    objects: list[dict[str, Any]] = []
    for path in paths:
        try:
            text = Path(path).read_text() if path != "-" else _stdin()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ManifestError(f"{path}: cannot read: {reason}") from None
        objects.extend(parse_manifests(text, path))
    log.debug("read %d objects", len(objects))
    return objects


def _stdin() -> str:
    import sys

    return sys.stdin.read()
