"""Model classes that loading may construct, registered by name.

An artifact records how to rebuild its base architecture. Loading never imports a module
path or calls a name written in a manifest: it looks the recorded name up here, among
classes registered in Python by slimkit itself (its task and search models) or by the user
(``slimkit.register_constructible(MyNet)`` before ``slimkit.load``). A class registered
with ``kwargs=True`` is built with the JSON scalars and lists recorded by its
``rebuild_kwargs()``; otherwise it is built without arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar, overload

from torch import nn

C = TypeVar("C", bound=type[nn.Module])


@dataclasses.dataclass(frozen=True)
class Constructible:
    cls: type[nn.Module]
    kwargs: bool  # built from recorded JSON arguments (rebuild_kwargs) rather than none


_CLASSES: dict[str, Constructible] = {}


def key_of(cls: type) -> str:
    """The name a class is recorded under: ``module:QualName``."""
    return f"{cls.__module__}:{cls.__qualname__}"


@overload
def register_constructible(cls: C, *, kwargs: bool = False, former: tuple[str, ...] = ()) -> C: ...


@overload
def register_constructible(
    cls: None = None, *, kwargs: bool = False, former: tuple[str, ...] = ()
) -> Callable[[C], C]: ...


def register_constructible(
    cls: C | None = None, *, kwargs: bool = False, former: tuple[str, ...] = ()
) -> C | Callable[[C], C]:
    """Allow ``slimkit.load`` to construct ``cls`` (an ``nn.Module`` subclass) when an
    artifact names it. ``kwargs``: the class records its constructor arguments with a
    ``rebuild_kwargs()`` method returning JSON scalars and lists. ``former``: other
    ``module:QualName`` keys older artifacts recorded for the same class (it moved); they
    load, new artifacts record the current key. Usable as a decorator, bare or as
    ``@register_constructible(kwargs=True)``."""
    if cls is None:
        return lambda c: register_constructible(c, kwargs=kwargs, former=former)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_constructible needs an nn.Module subclass, got {cls!r}")
    if kwargs and not callable(getattr(cls, "rebuild_kwargs", None)):
        raise TypeError(f"{cls.__qualname__} has no rebuild_kwargs() method")
    entry = Constructible(cls, kwargs)
    for key in (key_of(cls), *former):
        _CLASSES[key] = entry
    return cls


def lookup(key: str) -> Constructible | None:
    """The registered class recorded as ``key``, or None (nothing is imported)."""
    return _CLASSES.get(key)


def registered(cls: type) -> Constructible | None:
    """The registration of ``cls`` itself (not of a subclass), or None."""
    entry = _CLASSES.get(key_of(cls))
    return entry if entry is not None and entry.cls is cls else None
