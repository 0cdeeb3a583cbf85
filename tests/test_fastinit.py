"""kproxy.fastinit: the quicker __init__ behaves as the dataclass's own (arguments, defaults, errors, frozenness)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from kproxy.cluster.model import Endpoint, EndpointSlice, Service, ServicePort
from kproxy.fastinit import quick_init
from kproxy.nft.objects import Chain, Element, Op
from kproxy.rules.endpoints import PortEndpoint

QUICK = [Endpoint, EndpointSlice, Service, ServicePort, Element, Op, Chain, PortEndpoint]


frozen_slots = dataclasses.dataclass(frozen=True, slots=True)


@quick_init
@frozen_slots
class Quick:
    first: str
    second: int = 2
    third: tuple[int, ...] = ()


@frozen_slots
class Plain:
    first: str
    second: int = 2
    third: tuple[int, ...] = ()


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__name__)
def test_the_model_classes_use_it(cls: type) -> None:
    init = vars(cls)["__init__"]
    assert init.__code__.co_filename == "<string>" and init.__code__.co_freevars[0] == "_set_0"


@pytest.mark.parametrize("args,kwargs", [(("a",), {}), (("a", 5), {}), (("a",), {"third": (1,)}),
                                         ((), {"first": "a", "second": 7, "third": (2, 3)})])
def test_same_objects_as_the_dataclass_init(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    quick, plain = Quick(*args, **kwargs), Plain(*args, **kwargs)  # type: ignore[arg-type]
    assert dataclasses.astuple(quick) == dataclasses.astuple(plain)
    assert repr(quick).replace("Quick", "Plain") == repr(plain)
    assert quick == Quick(*args, **kwargs) and hash(quick) == hash(Quick(*args, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("args,kwargs", [((), {}), (("a", 1, (), 4), {}), (("a",), {"nope": 1}),
                                         (("a",), {"first": "b"})])
def test_same_errors_as_the_dataclass_init(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError) as plain:
        Plain(*args, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError) as quick:
        Quick(*args, **kwargs)  # type: ignore[arg-type]
    assert str(quick.value).replace("Quick", "Plain") == str(plain.value)


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__name__)
def test_annotations_resolve_in_the_class_module(cls: type) -> None:
    init = vars(cls)["__init__"]
    assert init.__module__ == cls.__module__
    hints = typing.get_type_hints(init)
    assert hints.pop("return") is type(None) and hints == typing.get_type_hints(cls)


def test_still_frozen() -> None:
    quick = Quick("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.first = "b"  # type: ignore[misc]
    endpoint = Endpoint("10.0.0.1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        endpoint.ready = False  # type: ignore[misc]
    assert endpoint == Endpoint("10.0.0.1", True, True, False) and endpoint.hint_zones == frozenset()


def test_refuses_what_it_cannot_keep_the_same() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: dataclasses.InitVar[int] = 0

    @dataclasses.dataclass(frozen=True, slots=True, init=False)
    class OwnInit:
        a: int

        def __init__(self, b: int) -> None:
            object.__setattr__(self, "a", b * 2)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Clash:
        _set_0: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class KeywordOnly:
        a: int = dataclasses.field(kw_only=True)

    for cls in (NoSlots, NotFrozen, Factory, PostInit, WithInitVar, OwnInit, Clash, KeywordOnly):
        with pytest.raises(TypeError, match="frozen slotted dataclass"):
            quick_init(cls)
