"""Channel dependency analysis for structured pruning: which channels of which layers must be
removed together, and which may not be removed at all.

The model is traced with ``torch.fx`` and run once on example inputs (``ShapeProp``) so every
tensor's shape is known. Each output channel of a Conv2d or Linear is an *atom*; a tensor
carries the atoms of its channel dimension (``Layout``). Ops pass atoms on (elementwise ops,
BatchNorm, pooling, transposes, reductions over other dims), join them (``add``/``mul``/...
of two tensors: the same position of both is one channel; ``cat`` along channels: the atoms
concatenated; ``flatten`` of (C, H, W) into a Linear: each channel repeated ``H*W`` times) or
cut them (``chunk``). Union-find over atoms yields *classes*: a class is one channel, removed
everywhere at once. The places that hold a class physically are *sites*: a layer's output
rows (``out``), a layer's input columns (``in``), a norm's entries (``norm``), a depthwise
conv's channels (``depthwise``). Classes linked through a site form a ``ChannelGroup``.

A class is *blocked* (never removed) when it reaches a model output, an op or a leaf module the
analysis does not know (GRU, LSTM, MultiheadAttention, ...: with a warning), a ``split`` or a
slice along channels or a reshape with constant sizes (the sizes are constants of the forward
code, which pruning does not rewrite).

Grouped convolutions (1 < groups < in_channels) and ``chunk`` along channels are *even*
sites (``Site.groups > 1``): pruning must remove the same number of channels from each of
their groups; the pruner selects per group and leaves a group whole (with a warning) when the
selection cannot be even. A depthwise conv (groups == in == out) passes its input's classes
through, its filters pruned with them.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimkit.data import Batch
from slimkit.errors import DataError, ModelError
from slimkit.model_info import eval_mode

OUTPUT = "reaches the model output"


@dataclasses.dataclass
class Layout:
    """The atoms along dimension ``dim`` (non-negative) of one tensor."""

    dim: int
    atoms: list[int]


Value = Union[Layout, tuple["Value", ...], None]  # noqa: UP007 (a recursive alias)


@dataclasses.dataclass
class Site:
    """Where a layer holds channels: ``atoms[i]`` is the atom at position ``i`` of ``role``'s
    dimension of ``module`` (``roots``: their classes, filled when the analysis ends).
    ``groups > 1``: the positions form that many equal consecutive groups that must keep
    equal sizes (grouped conv, ``chunk``; ``module`` is "" for a constraint of no layer)."""

    module: str
    role: str  # out | in | norm | depthwise | chunk
    atoms: list[int]
    groups: int = 1
    roots: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ChannelGroup:
    """Classes linked through sites; ``blocked`` maps a class that must stay to why."""

    classes: list[int]
    sites: list[Site]
    blocked: dict[int, str]


@dataclasses.dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    warnings: list[str]


class _DisjointSet:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while a != root:  # path compression
            self.parent[a], a = root, self.parent.get(a, a)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# -- tracing ---------------------------------------------------------------------------
class _Untraceable(Exception):
    """A traced tensor was used where symbolic tracing cannot follow it."""


def _describe(node: fx.Node) -> str:
    """``target(arg, ...)`` of a node, e.g. ``gt(sum_1, 0)``."""
    name = getattr(node.target, "__name__", str(node.target))
    args = ", ".join(a.name if isinstance(a, fx.Node) else repr(a) for a in node.args)
    return f"{name}({args})"


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that also keeps modules named by ``leaf`` whole and records the module
    whose forward failed."""

    def __init__(self, leaf: Callable[[str], bool]) -> None:
        super().__init__()
        self.leaf = leaf
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        named = bool(module_qualified_name) and self.leaf(module_qualified_name)
        return named or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise

    def to_bool(self, obj: fx.Proxy) -> bool:
        raise _Untraceable(f"data-dependent control flow on `{_describe(obj.node)}`")

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        raise _Untraceable(f"iteration over the traced value `{_describe(obj.node)}`")

    def keys(self, obj: fx.Proxy) -> Any:
        raise _Untraceable(f"`**` unpacking of the traced value `{_describe(obj.node)}`")


def trace(model: nn.Module, leaf: Callable[[str], bool] = lambda _name: False) -> fx.GraphModule:
    """The model as a GraphModule sharing its submodules; ModelError naming the failing op
    and module when it cannot be traced."""
    tracer = _Tracer(leaf)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        what = str(e) if isinstance(e, _Untraceable) else f"{type(e).__name__}: {_first_line(e)}"
        where = f"module {tracer.failed_in!r}" if tracer.failed_in else "the model's forward"
        raise ModelError(
            f"structured pruning cannot trace {type(model).__name__}: {what} in {where}; add "
            "that module to ignore (it is then kept whole) or make its forward traceable"
        ) from None
    return fx.GraphModule(model, graph, type(model).__name__)


def _first_line(e: Exception) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")


def propagate_shapes(gm: fx.GraphModule, example: Batch) -> None:
    """Run ``gm`` once in eval mode on ``example``, recording each node's output shape."""
    if isinstance(example, dict):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        missing = [str(n) for n in names if n not in example]
        if missing:
            raise DataError(f"example inputs lack the model's argument(s) {', '.join(missing)}")
        args: tuple[Any, ...] = tuple(example[str(n)] for n in names)
    else:
        args = tuple(example) if isinstance(example, tuple | list) else (example,)
    with eval_mode(gm), torch.no_grad():
        try:
            ShapeProp(gm).propagate(*args)
        except Exception as e:
            raise DataError(
                f"the model failed on the example inputs: {type(e).__name__}: {_first_line(e)}"
            ) from None


# -- analysis ---------------------------------------------------------------------------
OpRule = Callable[["_Analysis", fx.Node], Value]


class _Analysis:
    """Walks the graph once, building atoms, sites and blocks."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.modules = dict(gm.named_modules())
        self.atoms = _DisjointSet()
        self.count = 0
        self.sites: dict[tuple[str, str], Site] = {}
        self.constraints: list[Site] = []
        self.blocks: list[tuple[list[int], str]] = []
        self.warnings: list[str] = []
        self.values: dict[fx.Node, Value] = {}

    # atoms, sites, blocks
    def fresh(self, n: int) -> list[int]:
        self.count += n
        return list(range(self.count - n, self.count))

    def site(self, module: str, role: str, atoms: list[int], groups: int = 1) -> list[int]:
        """Record a layer's site; a layer called twice keeps one site (both calls' atoms
        joined position by position). Returns the site's atoms."""
        known = self.sites.get((module, role))
        if known is None:
            self.sites[(module, role)] = Site(module, role, atoms, groups)
            return atoms
        for a, b in zip(known.atoms, atoms, strict=True):
            self.atoms.union(a, b)
        return known.atoms

    def block(self, values: Any, reason: str, warn: bool = False) -> None:
        layouts = list(_layouts(values))
        for lay in layouts:
            self.blocks.append((lay.atoms, reason))
        if warn and layouts and reason not in self.warnings:
            self.warnings.append(reason)

    def union(self, a: Layout, b: Layout) -> None:
        for x, y in zip(a.atoms, b.atoms, strict=True):
            self.atoms.union(x, y)

    # node inputs
    def value(self, arg: Any) -> Value:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def layout(self, arg: Any) -> Layout | None:
        v = self.value(arg)
        return v if isinstance(v, Layout) else None

    def unknown(self, node: fx.Node, what: str) -> Value:
        """Block every tracked tensor ``node`` reads (warned); its output is untracked."""
        inputs = [self.value(a) for a in _nodes((node.args, node.kwargs))]
        self.block(
            inputs,
            f"{what} is unknown to structured pruning; the channels it reads are kept",
            warn=True,
        )
        return None

    def run(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            self.values[node] = self.visit(node)

    def visit(self, node: fx.Node) -> Value:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.block([self.value(a) for a in _nodes(node.args)], OUTPUT)
            return None
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            handler = _MODULES.get(type(module))
            if handler is None:
                what = f"module {node.target!r} ({type(module).__name__})"
                return self.unknown(node, what)
            return handler(self, node)
        table: dict[Any, OpRule] = _METHODS if node.op == "call_method" else _FUNCTIONS
        found = table.get(node.target)
        if found is None:
            return self.unknown(node, f"op {getattr(node.target, '__name__', node.target)}")
        return found(self, node)

    def result(self) -> ChannelGraph:
        sites = [*self.sites.values(), *self.constraints]
        for s in sites:
            s.roots = [self.atoms.find(a) for a in s.atoms]
        blocked: dict[int, str] = {}
        for atoms, reason in sorted(self.blocks, key=lambda b: b[1] != OUTPUT):
            for a in atoms:
                blocked.setdefault(self.atoms.find(a), reason)
        linked = _DisjointSet()
        for s in sites:
            for r in s.roots[1:]:
                linked.union(s.roots[0], r)
        groups: dict[int, ChannelGroup] = {}
        for s in sites:
            if s.roots:
                g = groups.setdefault(linked.find(s.roots[0]), ChannelGroup([], [], {}))
                g.sites.append(s)
        for g in groups.values():
            g.classes = list(dict.fromkeys(r for s in g.sites for r in s.roots))
            g.blocked = {r: blocked[r] for r in g.classes if r in blocked}
        return ChannelGraph(list(groups.values()), self.warnings)


def _nodes(args: Any) -> Iterator[fx.Node]:
    """Every Node inside nested args."""
    if isinstance(args, fx.Node):
        yield args
    elif isinstance(args, tuple | list):
        for a in args:
            yield from _nodes(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _nodes(a)


def _layouts(values: Any) -> Iterator[Layout]:
    if isinstance(values, Layout):
        yield values
    elif isinstance(values, tuple | list):
        for v in values:
            yield from _layouts(v)


def shape(node: Any) -> tuple[int, ...] | None:
    """The output shape ShapeProp recorded for a tensor-valued node, else None."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# -- op handlers -------------------------------------------------------------------------
def _same(a: _Analysis, node: fx.Node) -> Value:
    """Elementwise unary: the channels pass unchanged."""
    return a.layout(node.args[0])


def _inspect(a: _Analysis, node: fx.Node) -> Value:
    """``x.size()``, ``x.shape``, ``x.dim()``: reads no channel values."""
    return None


def _binary(a: _Analysis, node: fx.Node) -> Value:
    """``x op y`` elementwise with broadcasting: two tracked tensors become one channel space
    (aligned from the right); a scalar or a tensor of size 1 along channels passes."""
    out = shape(node)
    operands = [node.args[0], _arg(node, 1, "other")]
    tracked = [(lay, shape(o)) for o in operands if (lay := a.layout(o)) is not None]
    if not tracked or out is None:
        return a.unknown(node, f"op {getattr(node.target, '__name__', node.target)}")
    lays = [lay for lay, _ in tracked]
    from_right = {len(s) - lay.dim for lay, s in tracked if s is not None}
    reason = f"{node.name}: combined with a tensor whose channels are not tracked"
    if len(from_right) != 1:
        a.block(lays, reason, warn=True)
        return None
    r = from_right.pop()
    for o in operands:
        s = shape(o)
        if a.layout(o) is None and s is not None and len(s) >= r and s[-r] != 1:
            a.block(lays, reason, warn=True)
            return None
    if any(len(lay.atoms) != out[-r] for lay in lays):  # broadcast along channels
        a.block(lays, reason, warn=True)
        return None
    for lay in lays[1:]:
        a.union(lays[0], lay)
    return Layout(len(out) - r, lays[0].atoms)


def _cat(a: _Analysis, node: fx.Node) -> Value:
    tensors, out = list(node.args[0]), shape(node)  # type: ignore[arg-type]
    if out is None:
        return a.unknown(node, "op cat")
    dim = int(_arg(node, 1, "dim", 0)) % len(out)
    parts = [a.layout(t) for t in tensors]
    tracked = [p for p in parts if p is not None]
    if not tracked:
        return None
    if any(p.dim != dim for p in tracked):  # along another dim: the inputs share channels
        if len(tracked) == len(parts) and len({(p.dim, len(p.atoms)) for p in tracked}) == 1:
            for p in tracked[1:]:
                a.union(tracked[0], p)
            return Layout(tracked[0].dim, tracked[0].atoms)
        a.block(tracked, f"{node.name}: cat of tensors with untracked channels", warn=True)
        return None
    atoms: list[int] = []
    for t, given in zip(tensors, parts, strict=True):
        part = given if given is not None else Layout(dim, a.fresh((shape(t) or out)[dim]))
        if given is None:  # an untracked part: its channels are kept
            a.block(part, f"{node.name}: untracked part of a cat")
        atoms += part.atoms
    return Layout(dim, atoms)


def _pieces(a: _Analysis, node: fx.Node, dim: Any, even: bool) -> Value:
    """``chunk``/``split``: tracked pieces. Along channels, ``chunk`` adds an even
    constraint; ``split`` blocks (its sizes are constants of the forward code)."""
    x, in_shape = a.layout(node.args[0]), shape(node.args[0])
    metas = node.meta.get("tensor_meta")
    if x is None or in_shape is None or not isinstance(metas, tuple | list):
        return None
    d = int(dim) % len(in_shape)
    if d != x.dim:
        return tuple(Layout(x.dim, x.atoms) for _ in metas)
    sizes = [int(m.shape[d]) for m in metas]
    if even and len(set(sizes)) == 1:
        a.constraints.append(Site("", "chunk", x.atoms, len(sizes)))
    else:
        a.block(x, f"{node.name}: split/slice along channels with sizes fixed in the forward code")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(Layout(d, x.atoms[s : s + n]) for s, n in zip(starts, sizes, strict=True))


def _chunk(a: _Analysis, node: fx.Node) -> Value:
    return _pieces(a, node, _arg(node, 2, "dim", 0), even=True)


def _split(a: _Analysis, node: fx.Node) -> Value:
    return _pieces(a, node, _arg(node, 2, "dim", 0), even=False)


def _getitem(a: _Analysis, node: fx.Node) -> Value:
    v, index = a.value(node.args[0]), node.args[1]
    if isinstance(v, tuple):
        return v[index] if isinstance(index, int) else None
    if not isinstance(v, Layout):
        return None
    new = _index_dim(v.dim, index, len(shape(node.args[0]) or ()))
    if new is None:
        a.block(v, f"{node.name}: indexing along channels fixed in the forward code", warn=True)
        return None
    return Layout(new, v.atoms)


def _index_dim(ch: int, index: Any, ndim: int) -> int | None:
    """Where dim ``ch`` lands after ``x[index]``; None when the index touches it."""
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        i = items.index(Ellipsis)
        used = sum(1 for t in items if t is not None and t is not Ellipsis)
        items[i : i + 1] = [slice(None)] * (ndim - used)
    d = o = 0
    for item in items:
        if item is None:
            o += 1
            continue
        full = isinstance(item, slice) and item == slice(None)
        if d == ch:
            return o if full else None
        if isinstance(item, int):
            d += 1
        elif isinstance(item, slice):
            d, o = d + 1, o + 1
        else:
            return None
    return o + (ch - d)


def _transpose(a: _Analysis, node: fx.Node) -> Value:
    x, s = a.layout(node.args[0]), shape(node.args[0])
    if x is None or s is None:
        return None
    d0, d1 = (int(_arg(node, i, n)) % len(s) for i, n in ((1, "dim0"), (2, "dim1")))
    swap = {d0: d1, d1: d0}
    return Layout(swap.get(x.dim, x.dim), x.atoms)


def _permute(a: _Analysis, node: fx.Node) -> Value:
    x, s = a.layout(node.args[0]), shape(node.args[0])
    if x is None or s is None:
        return None
    dims = node.args[1] if isinstance(node.args[1], tuple | list) else node.args[1:]
    order = [int(cast(int, d)) % len(s) for d in dims]
    return Layout(order.index(x.dim), x.atoms)


def _unsqueeze(a: _Analysis, node: fx.Node) -> Value:
    x, out = a.layout(node.args[0]), shape(node)
    if x is None or out is None:
        return None
    d = int(_arg(node, 1, "dim")) % len(out)
    return Layout(x.dim + 1 if d <= x.dim else x.dim, x.atoms)


def _flatten_dims(a: _Analysis, node: fx.Node, x: Layout | None, start: int, end: int) -> Value:
    """flatten(start..end): channels before or after pass; channels leading the merged dims
    (after dims of size 1) repeat once per merged position (flatten into a Linear)."""
    s = shape(node.args[0])
    if x is None or s is None:
        return None
    lo, hi = start % len(s), end % len(s)
    if x.dim < lo:
        return x
    if x.dim > hi:
        return Layout(x.dim - (hi - lo), x.atoms)
    if all(s[d] == 1 for d in range(lo, x.dim)):
        rep = math.prod(s[x.dim + 1 : hi + 1])
        return Layout(lo, [t for t in x.atoms for _ in range(rep)])
    a.block(x, f"{node.name}: flatten mixing channels with leading dims", warn=True)
    return None


def _flatten(a: _Analysis, node: fx.Node) -> Value:
    start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    return _flatten_dims(a, node, a.layout(node.args[0]), int(start), int(end))


def _reshape(a: _Analysis, node: fx.Node) -> Value:
    """``view``/``reshape`` sized only by ``-1`` and traced sizes: a no-op or a flatten of the
    channel dim with everything after it; anything else blocks (constant sizes)."""
    x, s, out = a.layout(node.args[0]), shape(node.args[0]), shape(node)
    if x is None or s is None or out is None:
        return None
    literals = [v for v in _flat(node.args[1:]) if isinstance(v, int) and not isinstance(v, bool)]
    if all(v == -1 for v in literals):
        if out == s:
            return x
        if out == (*s[: x.dim], math.prod(s[x.dim :])):
            return _flatten_dims(a, node, x, x.dim, -1)
    a.block(x, f"{node.name}: reshape with sizes fixed in the forward code", warn=True)
    return None


def _flat(args: Any) -> Iterator[Any]:
    if isinstance(args, tuple | list):
        for v in args:
            yield from _flat(v)
    else:
        yield args


def _reduce(a: _Analysis, node: fx.Node) -> Value:
    """mean/sum/amax/amin over dims other than the channels'."""
    x, s = a.layout(node.args[0]), shape(node.args[0])
    dim, keep = _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False))
    if x is None or s is None:
        return None
    if dim is None:
        a.block(x, f"{node.name}: reduction over the channels", warn=True)
        return None
    dims = {int(d) % len(s) for d in (dim if isinstance(dim, tuple | list) else [dim])}
    if x.dim in dims:
        a.block(x, f"{node.name}: reduction over the channels", warn=True)
        return None
    return Layout(x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.atoms)


def _softmax(a: _Analysis, node: fx.Node) -> Value:
    return _along(a, node, _arg(node, 1, "dim"))


def _along(a: _Analysis, node: fx.Node, dim: Any) -> Value:
    """An op normalising along ``dim``: channels pass unless it is theirs."""
    x, s = a.layout(node.args[0]), shape(node.args[0])
    if x is None or s is None:
        return None
    if dim is None or int(dim) % len(s) == x.dim:
        a.block(x, f"{node.name}: normalisation across channels", warn=True)
        return None
    return x


def _spatial(a: _Analysis, node: fx.Node) -> Value:
    """Pooling / interpolation of (B, C, H, W): per channel."""
    x, s = a.layout(node.args[0]), shape(node.args[0])
    if x is None:
        return None
    if s is None or len(s) != 4 or x.dim != 1:
        a.block(x, f"{node.name}: spatial op over channels", warn=True)
        return None
    return x


# -- layer handlers ----------------------------------------------------------------------
def _conv(a: _Analysis, node: fx.Node) -> Value:
    name = str(node.target)
    m = cast(nn.Conv2d, a.modules[name])
    x = a.layout(node.args[0])
    if 1 < m.groups == m.in_channels == m.out_channels:  # depthwise: channels pass through
        if x is not None and x.dim == 1:
            return Layout(1, a.site(name, "depthwise", x.atoms))
        out = Layout(1, a.fresh(m.out_channels))
        a.block(out, f"{name}: depthwise conv on untracked channels")
        return out
    if x is not None:
        if x.dim == 1:
            a.site(name, "in", x.atoms, m.groups)
        else:
            a.block(x, f"{name}: conv over a dim other than the channels'", warn=True)
    return Layout(1, a.site(name, "out", a.fresh(m.out_channels), m.groups))


def _linear(a: _Analysis, node: fx.Node) -> Value:
    name = str(node.target)
    m = cast(nn.Linear, a.modules[name])
    x, s, out = a.layout(node.args[0]), shape(node.args[0]), shape(node)
    if x is not None and s is not None:
        if x.dim == len(s) - 1:
            a.site(name, "in", x.atoms)
        else:
            a.block(x, f"{name}: Linear over a dim other than the channels'", warn=True)
    dim = len(out) - 1 if out is not None else 1
    return Layout(dim, a.site(name, "out", a.fresh(m.out_features)))


def _batchnorm(a: _Analysis, node: fx.Node) -> Value:
    x = a.layout(node.args[0])
    if x is None:
        return None
    if x.dim != 1:
        a.block(x, f"{node.target}: BatchNorm over a dim other than the channels'", warn=True)
        return None
    a.site(str(node.target), "norm", x.atoms)
    return x


def _layernorm(a: _Analysis, node: fx.Node) -> Value:
    m = cast(nn.LayerNorm, a.modules[str(node.target)])
    x, s = a.layout(node.args[0]), shape(node.args[0])
    if x is None or s is None:
        return None
    normed = len(m.normalized_shape)
    if x.dim < len(s) - normed:  # normalises other dims: channels independent
        return x
    if normed == 1 and x.dim == len(s) - 1:
        a.site(str(node.target), "norm", x.atoms)
        return x
    a.block(x, f"{node.target}: LayerNorm over channels and other dims", warn=True)
    return None


def _flatten_module(a: _Analysis, node: fx.Node) -> Value:
    m = cast(nn.Flatten, a.modules[str(node.target)])
    return _flatten_dims(a, node, a.layout(node.args[0]), m.start_dim, m.end_dim)


def _softmax_module(a: _Analysis, node: fx.Node) -> Value:
    m = cast(nn.Softmax, a.modules[str(node.target)])
    return _along(a, node, m.dim)


_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
_SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_MODULES: dict[type, OpRule] = {
    nn.Conv2d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm2d: _batchnorm,
    nn.LayerNorm: _layernorm,
    nn.Flatten: _flatten_module,
    nn.Softmax: _softmax_module,
    nn.LogSoftmax: _softmax_module,
    **dict.fromkeys(_UNARY_MODULES, _same),
    **dict.fromkeys(_SPATIAL_MODULES, _spatial),
}

_UNARY_FUNCTIONS = (
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish, F.hardsigmoid,
    F.mish, F.dropout, F.dropout2d, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    operator.neg, torch.neg, torch.abs,
)  # fmt: skip
_BINARY_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div,
)  # fmt: skip
_SPATIAL_FUNCTIONS = (
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
)  # fmt: skip
_FUNCTIONS: dict[Any, OpRule] = {
    **dict.fromkeys(_UNARY_FUNCTIONS, _same),
    **dict.fromkeys(_BINARY_FUNCTIONS, _binary),
    **dict.fromkeys(_SPATIAL_FUNCTIONS, _spatial),
    torch.cat: _cat,
    torch.chunk: _chunk,
    torch.split: _split,
    operator.getitem: _getitem,
    getattr: _inspect,
    torch.flatten: _flatten,
    torch.transpose: _transpose,
    torch.permute: _permute,
    torch.unsqueeze: _unsqueeze,
    torch.reshape: _reshape,
    torch.mean: _reduce,
    torch.sum: _reduce,
    torch.amax: _reduce,
    torch.amin: _reduce,
    F.softmax: _softmax,
    F.log_softmax: _softmax,
    torch.softmax: _softmax,
}
_METHODS: dict[Any, OpRule] = {
    **dict.fromkeys(
        ("relu", "relu_", "sigmoid", "tanh", "abs", "neg", "contiguous", "clone", "detach"),
        _same,
    ),
    **dict.fromkeys(("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"), _binary),
    **dict.fromkeys(("size", "dim"), _inspect),
    "chunk": _chunk,
    "split": _split,
    "flatten": _flatten,
    "transpose": _transpose,
    "permute": _permute,
    "unsqueeze": _unsqueeze,
    "view": _reshape,
    "reshape": _reshape,
    "mean": _reduce,
    "sum": _reduce,
    "amax": _reduce,
    "amin": _reduce,
    "softmax": _softmax,
    "log_softmax": _softmax,
}


def analyze(
    model: nn.Module, example: Batch, leaf: Callable[[str], bool] = lambda _name: False
) -> ChannelGraph:
    """Trace ``model`` (modules named by ``leaf`` kept whole), run it on ``example`` and
    return its channel groups with the warnings of what blocks channels."""
    gm = trace(model, leaf)
    propagate_shapes(gm, example)
    analysis = _Analysis(gm)
    analysis.run(gm)
    return analysis.result()


def output_producers(graph: ChannelGraph) -> set[str]:
    """Layers whose output channels reach a model output."""
    return {
        s.module
        for g in graph.groups
        for s in g.sites
        if s.role == "out" and any(g.blocked.get(r) == OUTPUT for r in s.roots)
    }


def even_split(site: Site, kept: Sequence[int]) -> bool:
    """Whether the kept positions ``kept`` fall equally into ``site``'s groups (>= 1 each)."""
    per = len(site.atoms) // site.groups
    counts = [0] * site.groups
    for i in kept:
        counts[i // per] += 1
    return len(set(counts)) == 1 and counts[0] > 0
