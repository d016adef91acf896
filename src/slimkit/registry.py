"""Config type -> handler. ``@register(ConfigCls)`` on a handler ``apply(model, config, ctx)``.

The pipeline looks handlers up by the config's type; the recipe parser looks config types up
by ``(kind, method)``. Nothing here knows any technique: ``slimkit.builtin`` imports the
built-in ones (their decorators fill the tables) when ``slimkit`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

if TYPE_CHECKING:
    from slimkit.config import Config
    from slimkit.context import Context, StageResult

#: a stage handler: ``(model, config, ctx)`` -> the model, or a ``StageResult`` with it
Handler = Callable[[nn.Module, "Config", "Context"], "nn.Module | StageResult"]
H = TypeVar("H", bound=Callable[..., "nn.Module | StageResult"])

#: every recipe stage kind the format knows, in the order they usually run
KINDS = ("quantize", "prune", "distill", "finetune", "factorize", "separable", "nas", "encode")
#: method used when a stage names none
DEFAULT_METHOD = {
    "quantize": "rtn",
    "prune": "magnitude",
    "encode": "huffman",
    "finetune": "supervised",
}

_HANDLERS: dict[type, Handler] = {}
_CONFIGS: dict[tuple[str, str], type[Config]] = {}
Types = tuple[type[nn.Module], ...]
_TYPES: dict[type, Types | Callable[[], Types]] = {}


def register(config_cls: type[Config], types: Types | Callable[[], Types] = ()) -> Callable[[H], H]:
    """Register ``handler`` for ``config_cls`` (and the config under its kind/method).

    ``types`` are the module types the stage's ``targets`` select among, or a function
    returning them when a stage is looked up (for types known only once every layer module
    is imported: the layers that hold integer streams).
    """
    if config_cls.kind not in KINDS:
        raise ValueError(f"{config_cls.__name__}.kind={config_cls.kind!r} is not one of {KINDS}")

    def deco(handler: H) -> H:
        _HANDLERS[config_cls] = handler
        _TYPES[config_cls] = types
        _CONFIGS[(config_cls.kind, config_cls.method)] = config_cls
        return handler

    return deco


def handler_for(config: Config) -> Handler:
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise KeyError(f"no handler registered for {type(config).__name__}") from None


def config_class(kind: str, method: str) -> type[Config] | None:
    return _CONFIGS.get((kind, method))


def methods(kind: str) -> list[str]:
    return sorted(m for (k, m) in _CONFIGS if k == kind)


def available_kinds() -> list[str]:
    return [k for k in KINDS if any(kk == k for (kk, _) in _CONFIGS)]


def target_types(config: Config) -> Types:
    types = _TYPES.get(type(config), ())
    return types() if callable(types) else types
