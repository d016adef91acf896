"""The rules a layer spec read from an artifact must follow, checked before anything is built.

A spec is a layer's constructor arguments as JSON. Each argument name has one rule here
(its type and range), whatever the layer; a layer's accepted keys are its constructor's
parameters, and those without a default are required. Cross-field arithmetic (groups that
divide channels, a kept count within the weight) is checked by :func:`check_spec` too;
shapes are checked against the stored tensors afterwards, by the loader.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

#: the largest size any one dimension may claim (2**31: tensors beyond are refused)
MAX_DIM = 1 << 31

Rule = Callable[[Any], str | None]  # a value -> None when valid, else what is wrong


def _int(lo: int, hi: int = MAX_DIM) -> Rule:
    def rule(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            return f"must be an integer in {lo}..{hi}"
        return None

    return rule


def _optional(inner: Rule) -> Rule:
    def rule(v: Any) -> str | None:
        return None if v is None else inner(v)

    return rule


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _pair(lo: int) -> Rule:
    def rule(v: Any) -> str | None:
        ok = isinstance(v, list) and len(v) == 2
        ok = ok and all(not isinstance(x, bool) and isinstance(x, int) for x in v)
        ok = ok and all(lo <= x <= 1 << 16 for x in v)
        return None if ok else f"must be a list of two integers in {lo}..65536"

    return rule


def _float(lo: float, hi: float, open_lo: bool = False) -> Rule:
    def rule(v: Any) -> str | None:
        ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)
        ok = ok and (v > lo if open_lo else v >= lo) and v <= hi
        return None if ok else f"must be a number in {'(' if open_lo else '['}{lo}, {hi}]"

    return rule


def spec_choice(*allowed: str) -> Rule:
    def rule(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(allowed)}"

    return rule


def _pattern(v: Any) -> str | None:
    m = re.fullmatch(r"([1-9][0-9]?):([1-9][0-9]?)", v) if isinstance(v, str) else None
    return None if m and int(m[1]) < int(m[2]) else "must be 'N:M' with 0 < N < M < 100"


def _shape(v: Any) -> str | None:
    ok = isinstance(v, list) and 1 <= len(v) <= 8
    ok = ok and all(not isinstance(x, bool) and isinstance(x, int) and x >= 1 for x in v)
    return None if ok and math.prod(v) <= MAX_DIM else "must be a list of 1..8 positive integers"


def _padding_idx(v: Any) -> str | None:
    if v is None:
        return None
    return _int(-MAX_DIM, MAX_DIM)(v)


def _streams(v: Any) -> str | None:
    keys = {"n", "n_symbols", "n_bytes", "n_chunks"}
    ok = isinstance(v, list) and 1 <= len(v) <= 4
    ok = ok and all(isinstance(s, dict) and set(s) == keys for s in v)
    ok = ok and all(_int(0)(x) is None for s in v for x in s.values())
    ok = ok and all(s["n_symbols"] <= 256 for s in v)
    return None if ok else "must be a list of 1..4 {n, n_symbols, n_bytes, n_chunks} sizes"


def _dict(v: Any) -> str | None:
    return None if isinstance(v, dict) else "must be a mapping"


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) and 0 < len(v) <= 100 else "must be a short string"


_POSITIVE = _int(1)
RULES: dict[str, Rule] = {
    **dict.fromkeys(
        (
            "in_features",
            "out_features",
            "in_channels",
            "out_channels",
            "num_embeddings",
            "embedding_dim",
            "groups",
            "rank",
            "rank_in",
            "rank_out",
            "depth_multiplier",
            "num_features",
        ),
        _POSITIVE,
    ),
    "nnz": _int(0),
    "bits": _int(1, 8),
    "act_bits": _int(2, 8),
    "group_size": _optional(_POSITIVE),
    "padding_idx": _padding_idx,
    **dict.fromkeys(
        (
            "bias",
            "symmetric",
            "per_channel",
            "input_scaling",
            "act_symmetric",
            "smoothquant",
            "affine",
            "elementwise_affine",
        ),
        _bool,
    ),
    "kernel_size": _pair(1),
    "stride": _pair(1),
    "dilation": _pair(1),
    "padding": _pair(0),
    "pattern": _optional(_pattern),
    "fit_error": _float(0.0, 1e6),
    "eps": _float(0.0, 0.1, open_lo=True),
    "momentum": _optional(_float(0.0, 1.0)),
    "normalized_shape": _shape,
    "inner_type": _str,
    "inner_spec": _dict,
    "format": _dict,
    "granularity": spec_choice("per_tensor", "per_channel", "per_group"),
    "streams": _streams,
    "positions": spec_choice("gaps", "bytes"),
    "floats": _optional(spec_choice("float32", "float16")),
    "escape": _int(1, 255),
}


def check_spec(
    spec: Any,
    init: Callable[..., Any],
    overrides: dict[str, Rule] | None = None,
    cross: bool = True,
) -> str | None:
    """What is wrong with ``spec`` as the arguments of ``init`` (a class or function), or
    None. ``overrides``: rules of this layer for keys whose meaning is its own. A class whose
    ``__init__`` takes ``**kwargs`` accepts the arguments of the next ``__init__`` too.
    ``cross``: check the arithmetic between a layer's shape keys too (not for a spec that
    has none of them, such as a weight format's)."""
    if not isinstance(spec, dict):
        return "the spec must be a mapping"
    params = _params(init)
    for key in spec:
        if key not in params:
            return f"unknown key {key!r}"
    for name, p in params.items():
        if p.default is p.empty and name not in spec:
            return f"missing key {name!r}"
    rules = {**RULES, **(overrides or {})}
    for key, value in spec.items():
        rule = rules.get(key)
        problem = "has no known rule" if rule is None else rule(value)
        if problem is not None:
            return f"{key}={_short(value)} {problem}"
    return _cross(spec) if cross else None


def _params(init: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``init`` accepts. For a class whose ``__init__`` takes
    ``**name``: those of its ``_init_name`` (after ``shape``) when it has one (a compressed
    layer passes the rest of its arguments on so, see ``slimkit.layers.shapes``), else those
    of the next ``__init__`` up its MRO."""
    if isinstance(init, type):
        inits = [vars(c)["__init__"] for c in init.__mro__ if "__init__" in vars(c)]
    else:
        inits = [init]
    params: dict[str, inspect.Parameter] = {}
    skip = {"self"}
    while inits:
        signature = inspect.signature(inits.pop(0)).parameters
        for name, p in signature.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in skip:
                params.setdefault(name, p)
        rest = [p.name for p in signature.values() if p.kind == p.VAR_KEYWORD]
        if not rest:
            break
        passed_to = getattr(init, f"_init_{rest[0]}", None)
        if passed_to is not None:
            inits, skip = [passed_to], {"self", "shape"}
    return params


def _cross(spec: dict[str, Any]) -> str | None:
    """Arithmetic between keys: groups divide channels, a kept count fits the weight."""
    groups = spec.get("groups", 1)
    for key in ("in_channels", "out_channels"):
        if key in spec and spec[key] % groups:
            return f"groups={groups} does not divide {key}={spec[key]}"
    dims = [
        spec[k] for k in ("in_features", "out_features", "in_channels", "out_channels") if k in spec
    ]
    numel = math.prod(dims) * math.prod(spec.get("kernel_size", [1, 1])) // groups
    if numel > MAX_DIM * 8:
        return f"a weight of {numel} elements is larger than any slimkit stores"
    if "nnz" in spec and spec["nnz"] > numel:
        return f"nnz={spec['nnz']} is more than the weight's {numel} elements"
    rank = [spec[k] for k in ("rank", "rank_in", "rank_out") if k in spec]
    if rank and max(rank) > max(dims, default=0) * max(spec.get("kernel_size", [1, 1])):
        return f"rank {max(rank)} is larger than the layer allows"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
