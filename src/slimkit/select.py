"""Module selection by name: glob patterns by default, ``re:`` prefix for a regex."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from slimkit.compressed import CompressedModule
from slimkit.errors import ConfigError, SelectionError


def matches(name: str, pattern: str) -> bool:
    """True when module ``name`` matches ``pattern`` (glob, or regex after ``re:``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def check_patterns(field: str, patterns: Iterable[str]) -> None:
    """Raise ConfigError for a regex pattern that does not compile."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ConfigError(f"{field}: bad regex {p!r}: {e}") from None


def select(
    model: nn.Module,
    targets: Sequence[str],
    ignore: Sequence[str],
    types: tuple[type[nn.Module], ...],
) -> list[str]:
    """Names of modules of exactly ``types`` matched by a target and by no ignore pattern.

    Subclasses are not selected: a layer such as MultiheadAttention's ``out_proj`` subclasses
    Linear but its owner reads its weight directly, so swapping it would break the model.
    A module registered under several names is selected under each of them.
    """
    return select_names(module_types(model), targets, ignore, types)


def module_types(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Every submodule name (shared modules under each of their names) and its type, leaving
    out what lies inside a compressed layer: it saves and rebuilds its own children, so no
    later stage may replace them."""
    out: dict[str, type[nn.Module]] = {}
    inside: list[str] = []  # names of compressed layers seen so far (parents come first)
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        out[name] = type(module)
        if isinstance(module, CompressedModule):
            inside.append(name)
    return out


def tied_weights(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Each module name whose own parameter another module also holds (``lm_head.weight =
    embed.weight``) -> (that parameter's name, the other module's name). One module
    registered under several names shares nothing with itself: that is not a tie."""
    owners: dict[int, list[tuple[str, int]]] = {}  # parameter -> (module name, module)
    own: list[tuple[str, int, str, int]] = []  # (module name, module, parameter name, parameter)
    for name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, id(module)))
            own.append((name, id(module), p_name, id(p)))
    tied: dict[str, tuple[str, str]] = {}
    for name, module_id, p_name, key in own:
        others = [n for n, m in owners[key] if m != module_id]
        if others and name not in tied:
            tied[name] = (p_name, others[0])
    return tied


def select_names(
    named: dict[str, type],
    targets: Sequence[str],
    ignore: Sequence[str],
    types: tuple[type[nn.Module], ...],
) -> list[str]:
    """``select`` over a name -> type mapping (lets the pipeline check stages ahead)."""
    candidates = [n for n, t in named.items() if t in types]
    kinds = "/".join(t.__name__ for t in types)
    for pattern in targets:
        if not any(matches(n, pattern) for n in candidates):
            sample = ", ".join(candidates[:4]) + (", ..." if len(candidates) > 4 else "")
            raise SelectionError(
                f"target {pattern!r} matches no {kinds} module"
                + (f" (modules of that type: {sample})" if candidates else " (the model has none)")
            )
    return [
        n
        for n in candidates
        if any(matches(n, p) for p in targets) and not any(matches(n, p) for p in ignore)
    ]


def swap_modules(
    model: nn.Module, names: Sequence[str], make: Callable[[str, nn.Module], nn.Module]
) -> None:
    """Replace each named module by ``make(name, module)``; a module shared under several
    names is converted once and the result stays shared."""
    done: dict[int, nn.Module] = {}
    for name in names:
        module = model.get_submodule(name)
        if id(module) not in done:
            done[id(module)] = make(name, module)
        set_module(model, name, done[id(module)])


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
