"""Reading Kubernetes manifests from files, as ``kubectl get -o yaml`` or ``-o json`` writes them.

A file may hold several YAML documents, and a document may be a ``List`` (or
any ``*List`` kind) whose ``items`` are the objects. This module only reads and
flattens; ``kproxy.cluster.convert`` decides what the objects mean.

Files are untrusted, so reading is bounded:

* a file whose first character is ``{`` or ``[`` is JSON, parsed with ``json``
  (a 10k-Service ``kubectl get -o json`` export in about a second); anything
  else, and JSON that does not parse as one document (flow-style YAML, JSON
  documents separated by ``---``), is YAML, built from libyaml's events
  (``kproxy.cluster.yamlstream``: plain data only, no node graph);
* files larger than ``MAX_FILE_BYTES``, or holding more than ``MAX_VALUES``
  values, are refused (memory follows the values, not the bytes: ``[],`` is
  three bytes and a list);
* YAML nested deeper than ``MAX_DEPTH`` is refused (JSON stops at Python's
  recursion limit);
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
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from kproxy.cluster.yamlstream import StreamError, load_all
from kproxy.memory import gc_paused

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30
"""1 GiB: a 30k-Service export with managedFields is a few hundred MB."""
MAX_DEPTH = 100
"""Kubernetes objects nest about 15 levels deep (managedFields included)."""
MAX_VALUES = 50_000_000
"""Values (scalars and containers) in one file: about five times a 30k-Service export with managedFields."""
MAX_ALIAS_EXPANSION = 10
"""Values a YAML document may stand for, with its aliases expanded, per value it holds."""


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


_SPACE_S = re.compile(r"\s*")
_SPACE_B = re.compile(rb"\s*")
_JSON_START = re.compile(rb"(?:\xef\xbb\xbf)?\s*[{\[]")


def _first_character(text: str | bytes) -> str | bytes:
    """The first character after white space, found without copying the text (``lstrip`` copies it)."""
    if isinstance(text, bytes):
        space_b = _SPACE_B.match(text)  # (``\s*`` always matches)
        skip = space_b.end() if space_b else 0
        return text[skip:skip + 1]
    space_s = _SPACE_S.match(text)
    skip = space_s.end() if space_s else 0
    return text[skip:skip + 1]


def parse_manifests(text: str | bytes, path: str = "<input>") -> list[dict[str, Any]]:
    """Every object in a JSON or YAML text (multi-document YAML and Lists flattened)."""
    start = _first_character(text)
    if start in ("{", "[", b"{", b"["):
        try:
            return _parse_json(text, path)
        except json.JSONDecodeError:
            pass  # flow-style YAML, or JSON documents separated by "---": YAML reads both
    return _parse_yaml(text, path)


def _parse_json(text: str | bytes, path: str) -> list[dict[str, Any]]:
    # A JSON text holds at most one value per two characters ("[1,1]", "[[],[]]"), so only a text longer than
    # twice the cap is counted (three passes over it: 0.17 s of a 97 MB export that cannot reach the cap).
    if len(text) > 2 * MAX_VALUES:
        # at least the values the document holds (counted in place: an encoded copy stayed alive through the parse)
        if isinstance(text, str):
            values = text.count(",") + text.count("{") + text.count("[")
        else:
            values = text.count(b",") + text.count(b"{") + text.count(b"[")
        if values > MAX_VALUES:
            raise ManifestError(f"{path}: more than {MAX_VALUES} values")
    try:
        document = json.loads(text)
    except RecursionError:
        raise ManifestError(f"{path}: nested too deep") from None
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise ManifestError(f"{path}: unusable JSON: {str(exc)[:120]}") from None
    return _flatten(document, path, 0)


def _yaml_error(exc: Exception, path: str) -> ManifestError:
    """One line for anything libyaml or the stream reader raised."""
    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unknown error"])[0]
        return ManifestError(f"{path}: invalid YAML{where}: {problem}")
    if isinstance(exc, UnicodeDecodeError):
        return ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    if isinstance(exc, StreamError):
        return ManifestError(f"{path}: {exc}")
    return ManifestError(f"{path}: unusable YAML: {type(exc).__name__}: {str(exc)[:120]}".replace("\n", " "))


_YAML_FAILURES = (yaml.YAMLError, UnicodeDecodeError, ValueError, TypeError, RecursionError)


def _parse_yaml(text: str | bytes, path: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    try:
        for index, document in enumerate(load_all(text, MAX_VALUES, MAX_DEPTH, MAX_ALIAS_EXPANSION)):
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


def _as_text(data: bytes) -> str | bytes:
    """A file's text, so that its bytes are gone before the parse (the parsers decode bytes into a second copy:
    a 97 MB export peaked 95 MB higher); a UTF-8 byte order mark is dropped. Bytes that are not UTF-8 stay
    bytes, for the parser to name the problem."""
    if not _JSON_START.match(data):
        return data  # YAML: libyaml reads bytes in place (and skips a BOM); a str is encoded again into a copy
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data


def load_manifest_files(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Read and parse each file in turn; the first failure raises ManifestError."""
    objects: list[dict[str, Any]] = []
    for path in paths:
        text = _as_text(read_limited(path))
        with gc_paused():  # a 10k-Service export is millions of dicts, lists and strings, none cyclic
            objects.extend(parse_manifests(text, path))
        del text
    log.debug("read %d objects", len(objects))
    return objects


def load_yaml_file(path: str) -> Any:
    """One YAML (or JSON) document from a file, with the same limits (for the KubeProxyConfiguration)."""
    data = read_limited(path)
    try:
        documents = list(load_all(data, MAX_VALUES, MAX_DEPTH, MAX_ALIAS_EXPANSION))
    except _YAML_FAILURES as exc:
        raise _yaml_error(exc, path) from None
    if len(documents) > 1:
        raise ManifestError(f"{path}: holds {len(documents)} YAML documents; expected one")
    return documents[0] if documents else None
