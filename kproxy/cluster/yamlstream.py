"""YAML documents built straight from libyaml's event stream, with bounds on what a file may hold.

PyYAML's loaders first compose a graph of nodes (about 700 bytes each), then
construct Python values from it: a 6 MB file of empty lists held 1.4 GB. Here
values are built from the parser's events as they come, so a document costs
only the values it holds, and limits are checked on the way:

* at most ``max_values`` values (scalars and containers) in the whole stream;
* at most ``max_depth`` levels of nesting;
* aliases (which stand for their anchored value, not a copy) may not make a
  document stand for more than ``max_alias_expansion`` times the values it holds.

Scalars are resolved as YAML 1.1 (PyYAML's safe resolver): null, booleans,
integers and floats; timestamps stay strings, as kubectl quotes them anyway.
Only the standard tags of plain data are accepted (no Python objects, no
``!!binary``). Merge keys (``<<``) are applied. Errors are ``StreamError``
with a position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import ScalarNode

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STANDARD = "tag:yaml.org,2002:"
_SCALARS = {f"{_STANDARD}{name}" for name in ("str", "int", "float", "bool", "null", "timestamp")}
_CONTAINERS = {f"{_STANDARD}map", f"{_STANDARD}seq", f"{_STANDARD}omap"}
_MERGE_TAG = f"{_STANDARD}merge"
_MERGE = object()
"""The merge key ``<<``."""


class StreamError(ValueError):
    """A YAML stream that breaks a limit or holds something other than plain data."""


@dataclass(slots=True)
class _Open:
    """A container being built."""

    value: dict[Any, Any] | list[Any]
    anchor: str | None
    weight: int = 1
    """How many values it stands for, aliases expanded."""
    key: Any = None
    has_key: bool = False
    merging: bool = False


class _Reader:
    def __init__(self, text: str | bytes, max_values: int, max_depth: int, max_alias_expansion: int) -> None:
        self.loader = _Loader(text)
        self.max_values = max_values
        self.max_depth = max_depth
        self.max_alias_expansion = max_alias_expansion
        self.values = 0
        self.held = 0
        """Values held by the current document."""
        self.weight = 0
        """Values the aliases of the current document stand for, beyond the one each is."""
        self.anchors: dict[str, tuple[Any, int]] = {}
        """anchor -> (value, how many values it stands for, aliases expanded)."""

    def _where(self, event: Any) -> str:
        mark = getattr(event, "start_mark", None)
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    def _count(self, event: Any) -> None:
        self.values += 1
        self.held += 1
        if self.values > self.max_values:
            raise StreamError(f"more than {self.max_values} values{self._where(event)}")

    def _weigh(self, weight: int, event: Any) -> None:
        """A value standing for ``weight`` values was added to the document (more than 1: an alias)."""
        self.weight += weight
        if self.weight > self.max_alias_expansion * self.held + 10_000:
            raise StreamError(f"aliases expand {self.held} values to more than {self.weight}; refusing more than "
                              f"{self.max_alias_expansion}x{self._where(event)}")

    def _scalar(self, event: Any) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.loader.resolve(ScalarNode, event.value, event.implicit)
        if tag == _MERGE_TAG:
            return _MERGE
        if tag not in _SCALARS:
            raise StreamError(f"unsupported tag {tag!r}{self._where(event)}")
        if tag.endswith(":str") or tag.endswith(":timestamp"):
            return event.value
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        return self.loader.yaml_constructors[tag](self.loader, node)

    def documents(self) -> Iterator[Any]:
        loader = self.loader
        while True:
            event = loader.get_event()
            if isinstance(event, yaml.StreamEndEvent):
                return
            if isinstance(event, yaml.DocumentStartEvent):
                self.anchors.clear()
                self.held = self.weight = 0
                value = self._document()
                loader.get_event()  # DocumentEndEvent
                yield value

    def _document(self) -> Any:
        stack: list[_Open] = []
        result: Any = None
        done = False
        while not done:
            event = self.loader.get_event()
            anchor = getattr(event, "anchor", None)
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if event.tag not in (None, "!") and event.tag not in _CONTAINERS:
                    raise StreamError(f"unsupported tag {event.tag!r}{self._where(event)}")
                self._count(event)
                if len(stack) >= self.max_depth:
                    raise StreamError(f"nested more than {self.max_depth} levels deep{self._where(event)}")
                container: dict[Any, Any] | list[Any] = {} if isinstance(event, yaml.MappingStartEvent) else []
                stack.append(_Open(container, anchor))
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                closed = stack.pop()
                value, weight = closed.value, closed.weight
                if closed.anchor is not None:
                    self.anchors[closed.anchor] = (value, weight)
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in self.anchors:
                    raise StreamError(f"alias *{event.anchor} is not defined (or refers to itself){self._where(event)}")
                value, weight = self.anchors[event.anchor]
                self._count(event)
                self._weigh(weight, event)
            elif isinstance(event, yaml.ScalarEvent):
                self._count(event)
                value, weight = self._scalar(event), 1
                if anchor is not None:
                    self.anchors[anchor] = (value, 1)
            else:
                raise StreamError(f"unexpected {type(event).__name__}{self._where(event)}")
            if not stack:
                result, done = value, True
            else:
                stack[-1].weight += weight
                self._add(stack[-1], value, event)
        return result

    def _add(self, parent: _Open, value: Any, event: Any) -> None:
        if isinstance(parent.value, list):
            parent.value.append("<<" if value is _MERGE else value)
            return
        if not parent.has_key:
            if isinstance(value, (dict, list)):
                raise StreamError(f"a mapping key that is not a scalar{self._where(event)}")
            parent.key, parent.has_key = value, True
            parent.merging = value is _MERGE
            return
        if value is _MERGE:
            value = "<<"
        if parent.merging:
            for source in value if isinstance(value, list) else [value]:
                if not isinstance(source, dict):
                    raise StreamError(f"a merge key (<<) takes mappings{self._where(event)}")
                for k, v in source.items():
                    parent.value.setdefault(k, v)
        else:
            parent.value[parent.key] = value
        parent.has_key = parent.merging = False


def load_all(text: str | bytes, max_values: int, max_depth: int, max_alias_expansion: int) -> Iterator[Any]:
    """Every document of a YAML stream, built within the limits (``StreamError``, or ``yaml.YAMLError``)."""
    return _Reader(text, max_values, max_depth, max_alias_expansion).documents()
