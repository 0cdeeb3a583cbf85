"""A list response read as a stream gives exactly what ``json.loads`` of the whole body gives, however it is cut."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.cluster.liststream import ListStream, ListStreamError

_scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                       max_leaves=20)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _read(chunks: list[bytes]) -> tuple[list[Any], dict[str, Any]]:
    stream = ListStream(chunks)
    return list(stream.items()), stream.members


@settings(max_examples=300, deadline=None)
@given(items=st.lists(_values, max_size=8), metadata=st.dictionaries(st.text(max_size=8), _scalars, max_size=3),
       indent=st.sampled_from([None, 0, 2, 4]), items_first=st.booleans(), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_cut_of_any_list_reads_as_json_loads(items: list[Any], metadata: dict[str, Any], indent: int | None,
                                                 items_first: bool, cuts: list[int]) -> None:
    """Members in either order, any indentation, chunks cut anywhere (inside numbers, strings, UTF-8 sequences)."""
    document = {"items": items, "kind": "ServiceList", "metadata": metadata} if items_first else \
        {"kind": "ServiceList", "metadata": metadata, "items": items}
    data = json.dumps(document, indent=indent, ensure_ascii=False).encode()
    read, members = _read(_cut(data, cuts))
    assert read == json.loads(data)["items"]
    assert members == {"kind": "ServiceList", "metadata": metadata}


@pytest.mark.parametrize(("body", "items", "members"), [
    (b'{}', [], {}),
    (b' { "items" : [ ] , "metadata" : {"continue": "x"} } ', [], {"metadata": {"continue": "x"}}),
    (b'{"items": null}', [], {"items": None}),
    (b'{"metadata": {"resourceVersion": "12"}, "items": [1, 22, 333]}', [1, 22, 333], {"metadata": {"resourceVersion": "12"}}),
])
def test_small_bodies(body: bytes, items: list[Any], members: dict[str, Any]) -> None:
    for size in (1, 2, 3, len(body)):
        assert _read([body[i:i + size] for i in range(0, len(body), size)]) == (items, members)


@pytest.mark.parametrize("body", [b"", b"[]", b'{"items": [1, 2}', b'{"items": [1] "x": 2}', b'{"items": [1]} x',
                                  b'{"items": [{"a": 1}', b'{"a": tru}', b'{"items": [1,]}', b"{} x", b"{}\xc3",
                                  b'{"items": ["\xff"]}'])
def test_what_is_not_a_list_is_an_error(body: bytes) -> None:
    with pytest.raises(ListStreamError):
        _read([body[i:i + 3] for i in range(0, len(body), 3)] or [b""])


def test_items_come_before_the_body_ends() -> None:
    """The first item is yielded while later reads of the body are still to come (the caller converts as the
    bytes arrive): a read is 64 KiB, whatever the chunks."""
    read: list[int] = []
    padding = "x" * (1 << 16)

    def chunks() -> Any:
        yield b'{"metadata": {}, "items": [{"n": 1, "pad": "' + padding.encode() + b'"}, '
        read.append(1)
        yield b'{"n": 2}]}'

    stream = ListStream(chunks())
    items = stream.items()
    assert next(items) == {"n": 1, "pad": padding} and read == []
    assert list(items) == [{"n": 2}] and read == [1]


def test_the_decoding_work_does_not_depend_on_how_the_server_chunks_the_body() -> None:
    """A 1.34+ API server sends a list in chunks of about 2 KiB (item by item through Go's buffer before
    chunking). Reads are gathered to 64 KiB before a decode: an item is decoded again only when a 64 KiB read
    cut it, so 2 KiB chunks and 100-byte ones take the same decode attempts, at most one more per 64 KiB than the whole body."""
    item = {"metadata": {"name": "web", "namespace": "default"}, "endpoints": [{"addresses": ["10.0.0.1"]}] * 40}
    body = json.dumps({"kind": "EndpointSliceList", "metadata": {}, "items": [item] * 1000}).encode()
    attempts = {}
    for size in (100, 2048, len(body)):
        stream = ListStream([body[i:i + size] for i in range(0, len(body), size)])
        scan = stream._scan
        calls = [0]

        def counted(text: str, pos: int, scan: Any = scan, calls: list[int] = calls) -> Any:
            calls[0] += 1
            return scan(text, pos)

        stream._scan = counted  # type: ignore[method-assign]
        assert len(list(stream.items())) == 1000
        attempts[size] = calls[0]
    assert len(body) > 16 * (1 << 16)
    assert attempts[len(body)] == 1005  # three names, two values ("kind", "metadata") and the 1000 items
    assert attempts[100] == attempts[2048] <= 1005 + len(body) // (1 << 16) + 1, attempts


def test_a_malformed_body_is_refused_without_reading_it_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invalid JSON is only seen at the end of a value: past the largest value a list can hold, the read stops
    there rather than taking the rest of the body into memory."""
    from kproxy.cluster import liststream

    monkeypatch.setattr(liststream, "_LARGEST_VALUE", 1 << 20)
    read = [0]

    def chunks() -> Any:
        yield b'{"metadata": {}, "items": [{"a": }, '  # broken: every later read fails to decode it again
        for _ in range(1000):
            read[0] += 1
            yield b'{"name": "' + b"x" * 8000 + b'"}, '
        yield b"{}]}"

    with pytest.raises(ListStreamError, match="longer than 1048576 characters"):
        _read(chunks())  # type: ignore[arg-type]
    assert read[0] < 200, "the 8 MB body was read past the limit"
