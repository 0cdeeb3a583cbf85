"""A Kubernetes list response read as a stream: its items one at a time, as the bytes arrive. Pure.

A list of 10k Services and their EndpointSlices is tens of megabytes of JSON.
Decoded whole, it is several times that in dicts, all alive until the last
one is converted. ``ListStream`` decodes one item at a time from the chunks
of the HTTP body, so the caller converts each and drops it while the rest is
still on the wire, and memory holds one chunk and one item.

It reads the top-level object's members in any order: ``items`` is an array
whose elements are yielded; every other member (``metadata``, ``kind``, ...)
is kept in ``members``, complete once ``items()`` is exhausted.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from typing import Any

_WHITE_SPACE = " \t\n\r"
_AFTER_A_NUMBER = frozenset(_WHITE_SPACE + ",]}")
_TRIM_AT = 1 << 16
"""Drop the consumed start of the buffer once it is this long. Small: each appended chunk copies the
buffer, and an item cut by a chunk's end is retried after a JSONDecodeError whose message counts the
buffer's lines up to it (with 1 MiB, reading 10k EndpointSlices took 0.39 s; with 64 KiB, 0.25 s)."""


class ListStreamError(ValueError):
    """The body is not a JSON object of the shape a list has."""


class ListStream:
    """The members and the items of one list response, read from its body's chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._decode = codecs.getincrementaldecoder("utf-8")()
        self._scan = json.JSONDecoder().raw_decode
        self._buffer = ""
        self._pos = 0
        self._eof = False
        self.members: dict[str, Any] = {}
        """The top-level members other than ``items`` (``metadata`` holds ``continue`` and ``resourceVersion``)."""

    # -- the buffer ------------------------------------------------------------------------

    def _more(self) -> bool:
        """Read one more chunk into the buffer; False at the end of the body."""
        if self._eof:
            return False
        for chunk in self._chunks:
            text = self._decode.decode(chunk)
            if text:
                if self._pos >= _TRIM_AT:
                    self._buffer, self._pos = self._buffer[self._pos:], 0
                self._buffer += text
                return True
        self._buffer += self._decode.decode(b"", final=True)
        self._eof = True
        return False

    def _peek(self) -> str:
        """The next character that is not white space ("" at the end of the body)."""
        while True:
            buffer, pos = self._buffer, self._pos
            while pos < len(buffer) and buffer[pos] in _WHITE_SPACE:
                pos += 1
            self._pos = pos
            if pos < len(buffer):
                return buffer[pos]
            if not self._more():
                return ""

    def _expect(self, char: str) -> None:
        found = self._peek()
        if found != char:
            raise ListStreamError(f"expected {char!r} at character {self._pos}, found {found or 'the end'!r}")
        self._pos += 1

    def _value(self) -> Any:
        """The next JSON value, read whole (reading more of the body while it is cut off)."""
        self._peek()
        while True:
            try:
                value, end = self._scan(self._buffer, self._pos)
            except json.JSONDecodeError as exc:
                if not self._more():
                    raise ListStreamError(f"invalid JSON at character {exc.pos}: {exc.msg}") from None
                continue
            if isinstance(value, (int, float)) and not self._eof and (
                    end == len(self._buffer) or self._buffer[end] not in _AFTER_A_NUMBER):
                if self._more():  # the chunk may have cut the number ("1.5" of "1.5e3")
                    continue
            self._pos = end
            return value

    # -- the object --------------------------------------------------------------------------

    def items(self) -> Iterator[Any]:
        """Each element of ``items``, in order; afterwards ``members`` holds the rest of the object."""
        self._expect("{")
        if self._peek() == "}":
            self._pos += 1
            return
        while True:
            key = self._value()
            if not isinstance(key, str):
                raise ListStreamError(f"expected a member name, found {key!r}")
            self._expect(":")
            if key == "items" and self._peek() == "[":
                self._pos += 1
                if self._peek() == "]":
                    self._pos += 1
                else:
                    while True:
                        yield self._value()
                        separator = self._peek()
                        self._pos += 1
                        if separator == "]":
                            break
                        if separator != ",":
                            raise ListStreamError(f"expected ',' or ']' in items, found {separator or 'the end'!r}")
            else:
                self.members[key] = self._value()
            separator = self._peek()
            self._pos += 1
            if separator == "}":
                break
            if separator != ",":
                raise ListStreamError(f"expected ',' or '}}', found {separator or 'the end'!r}")
        if self._peek():
            raise ListStreamError(f"trailing data after the object at character {self._pos}")

    @property
    def metadata(self) -> dict[str, Any]:
        value = self.members.get("metadata")
        return value if isinstance(value, dict) else {}
