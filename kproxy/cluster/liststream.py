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
"""Drop the consumed start of the buffer once it is this long. Small: each read appended copies the
buffer, and an item cut by a read's end is retried after a JSONDecodeError whose message counts the
buffer's lines up to it (with 1 MiB, reading 10k EndpointSlices took 0.39 s; with 64 KiB, 0.25 s)."""
_READ_AT_LEAST = 1 << 16
"""Bytes read from the body before the next decode attempt, however the server cut it into chunks. An API
server of 1.34 or later encodes a list item by item (StreamingCollectionEncodingToJSON, locked on), and Go's
HTTP server sends each write of 2 KiB or more, and each 2 KiB of smaller ones, as its own chunk: read one
chunk at a time, most items of 10k EndpointSlices were cut, decoded twice and appended in 2-4 KiB
copies of the buffer (1.1-1.8 s against 0.5 s with 64 KiB reads)."""


_LARGEST_VALUE = 64 << 20
"""No item (or other member) of a list is longer: the API server stores objects of at most 1.5 MiB by
default (etcd's request limit). Invalid JSON is otherwise only found at the end of the body, so a
malformed body would be read whole into memory first."""


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
        """Read at least ``_READ_AT_LEAST`` more bytes of the body (or the rest of it) into the buffer; False at
        its end."""
        while not self._eof:
            pieces: list[bytes] = []
            size = 0
            for chunk in self._chunks:
                pieces.append(chunk)
                size += len(chunk)
                if size >= _READ_AT_LEAST:
                    break
            else:
                self._eof = True
            try:
                text = self._decode.decode(pieces[0] if len(pieces) == 1 else b"".join(pieces), final=self._eof)
            except UnicodeDecodeError as exc:
                raise ListStreamError(f"the body is not UTF-8: {exc.reason}") from None
            if text:
                if self._pos >= _TRIM_AT:
                    self._buffer, self._pos = self._buffer[self._pos:], 0
                self._buffer += text
                return True
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
                if len(self._buffer) - self._pos > _LARGEST_VALUE:
                    raise ListStreamError(f"a value of the list longer than {_LARGEST_VALUE} characters, or invalid "
                                          f"JSON at character {exc.pos}: {exc.msg}") from None
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
        else:
            yield from self._members()
        if self._peek():
            raise ListStreamError(f"trailing data after the object at character {self._pos}")

    def _members(self) -> Iterator[Any]:
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
                return
            if separator != ",":
                raise ListStreamError(f"expected ',' or '}}', found {separator or 'the end'!r}")

    @property
    def metadata(self) -> dict[str, Any]:
        value = self.members.get("metadata")
        return value if isinstance(value, dict) else {}
