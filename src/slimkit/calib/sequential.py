"""Block-by-block calibration: quantize a model's repeated blocks one at a time.

Methods that need statistics of each layer's input (a Hessian, activation magnitudes) get
them cheaply, and from the partly quantized model, by walking its repeated blocks (BERT's
``encoder.layer``, a ResNet stage, ...):

1. find the blocks: the ``nn.ModuleList`` / ``nn.Sequential`` of two or more children of
   one type holding the most selected layers (none of the children a selected layer);
2. run the model over the calibration batches up to the first block (a pre-hook raises a
   private exception that ends the forward) and keep that block's inputs, positional and
   keyword (attention masks, ...);
3. for each block in order: the caller's ``step`` hooks the block's selected layers, runs
   the block on the kept inputs, then quantizes and swaps those layers; the quantized block
   then turns the kept inputs into the next block's (the hidden state is the block's
   output, or element 0 of a tuple output; the other inputs stay as they are).

Each block runs twice; the whole model never reruns per layer. Selected layers outside the
blocks are handled in model passes of their own: those that run before the first block
first (that pass stops at the block), the others last (a full pass), and all layers in one
full pass when the model has no repeated blocks. The first batch checks the chain: the
second block must receive the first block's output and the same other inputs; otherwise the
whole model is calibrated in one full pass.

Padding: when a batch is a dict with a 2-D ``attention_mask`` (the Hugging Face convention),
the rows of a 3-D layer input ``(B, T, D)`` whose mask is 0 are left out of the statistics.

Enough rows: a Hessian ``X^T X`` over fewer rows than the layer has input columns is
singular and the methods built on it (GPTQ, SparseGPT) fit the calibration rows, not the
layer. ``check_rows`` warns, naming the layer and the rows needed (a DataError when the
stage is ``strict``); ``count_rows`` counts every layer's rows in one forward pass so that
a strict stage can refuse before any layer changes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from slimkit.calib.capture import Watcher, check_finite_input
from slimkit.context import Progress
from slimkit.data import Batch, call
from slimkit.errors import DataError
from slimkit.select import set_module


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass early (never escapes this module)."""


def _raise_stop(*_: Any) -> None:
    raise _Stop


@dataclasses.dataclass
class Inputs:
    """What one calibration batch passes to a block, and which of its tokens count."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    keep: torch.Tensor | None = None  # (B, T) bool: real tokens, None when all rows count


def token_mask(batch: Batch) -> torch.Tensor | None:
    """The batch's 2-D ``attention_mask`` as booleans (real tokens), if it has one."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask != 0
    return None


class Feed:
    """The token mask of the batch being run; layer hooks read it to drop padded rows."""

    def __init__(self) -> None:
        self.keep: torch.Tensor | None = None

    def run_batches(self, model: nn.Module, data: Sequence[Batch], stop_at: Any = None) -> None:
        """Every batch through ``model`` (up to the module ``stop_at`` when given)."""
        handle = None if stop_at is None else stop_at.register_forward_pre_hook(_raise_stop)
        try:
            for batch in data:
                self.keep = token_mask(batch)
                with suppress(_Stop):
                    call(model, batch)
        finally:
            self.keep = None
            if handle is not None:
                handle.remove()

    def run_block(self, block: nn.Module, inputs: Sequence[Inputs]) -> None:
        """``block`` on every kept input (for the hooks attached to its layers)."""
        try:
            for item in inputs:
                self.keep = item.keep
                block(*item.args, **item.kwargs)
        finally:
            self.keep = None

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` without its padded rows: (N_real, D) for a (B, T, D) input, else ``x``."""
        keep = self.keep
        if keep is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(keep.shape):
            return x[keep]  # (N_real, D)
        return x


@dataclasses.dataclass
class Group:
    """Layers quantized together: ``names`` relative to ``root``; ``run()`` feeds ``root``
    the calibration inputs once."""

    root: nn.Module
    prefix: str  # the model-level name of ``root`` and a dot, or "" for the model
    names: list[str]
    run: Callable[[], None]
    n_batches: int
    feed: Feed = dataclasses.field(default_factory=Feed)

    def full_name(self, name: str) -> str:
        return self.prefix + name

    @contextmanager
    def watching(self, watch: Watcher, names: Sequence[str] | None = None) -> Iterator[None]:
        """While open, each forward of a layer (of ``names``, default all) calls
        ``watch(name, x)``, ``name`` relative to ``root`` and ``x`` its input without padded
        rows, after a DataError check (naming the layer) for NaN/Inf in ``x``. Layers fed
        the same tensor get the same ``x`` object."""
        last: list[Any] = [None, -1, None]  # input, its version, its real rows

        def hook_for(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                if last[0] is not x or last[1] != x._version:
                    real = self.feed.rows_of(x)
                    check_finite_input(self.full_name(name), real)
                    last[:] = [x, x._version, real]
                watch(name, last[2])

            return hook

        chosen = self.names if names is None else names
        handles = [
            self.root.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in chosen
        ]
        try:
            yield
        finally:
            last[:] = [None, -1, None]
            for handle in handles:
                handle.remove()


Step = Callable[[Group], None]


# -- finding blocks ----------------------------------------------------------------------
def _prefix(container: str) -> str:
    return container + "." if container else ""


def find_blocks(model: nn.Module, names: Sequence[str]) -> str | None:
    """Name of the container of repeated blocks holding the most selected layers ("" for
    the model itself), or None when there is none.

    A candidate is an ``nn.ModuleList`` or ``nn.Sequential`` of at least two children, all
    of one type, none of them a selected layer itself.
    """
    best: tuple[int, int, str] | None = None
    for cname, container in model.named_modules():
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            continue
        children = list(container.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        inner = [n[len(_prefix(cname)) :] for n in names if n.startswith(_prefix(cname))]
        if not inner or any("." not in n for n in inner):
            continue  # nothing selected inside, or a child is itself a selected layer
        if best is None or (len(inner), len(children)) > best[:2]:
            best = (len(inner), len(children), cname)
    return None if best is None else best[2]


def block_of(name: str, container: str) -> int | None:
    """Index of the block holding layer ``name`` (None when outside ``container``)."""
    prefix = _prefix(container)
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _entries(container: nn.Module) -> list[nn.Module]:
    """The blocks in call order, a block listed twice included (``children()`` would not)."""
    return list(iter(container))  # type: ignore[call-overload]


# -- running blocks ------------------------------------------------------------------------
def hidden_state(output: Any) -> torch.Tensor:
    """The hidden state a block passes on: its output, or a tuple output's element 0."""
    if isinstance(output, tuple | list) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a block returned {type(output).__name__}, not a tensor")
    return output


def advance(block: nn.Module, inputs: Sequence[Inputs]) -> list[Inputs]:
    """The next block's inputs: each hidden state replaced by ``block``'s output."""
    out = []
    for item in inputs:
        hidden = hidden_state(block(*item.args, **item.kwargs))
        out.append(Inputs((hidden, *item.args[1:]), item.kwargs, item.keep))
    return out


def _same(a: Any, b: Any) -> bool:
    """True when two block inputs are the same object or equal tensors / values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # objects without a usable equality
        return False


def chained(first: Inputs, output: Any, second: Inputs) -> bool:
    """Whether the second block received the first block's hidden state and the same
    other inputs."""
    if not first.args or len(first.args) != len(second.args):
        return False
    if first.kwargs.keys() != second.kwargs.keys():
        return False
    try:
        hidden = hidden_state(output)
    except TypeError:
        return False
    return (
        _same(hidden, second.args[0])
        and all(_same(a, b) for a, b in zip(first.args[1:], second.args[1:], strict=True))
        and all(_same(first.kwargs[k], second.kwargs[k]) for k in first.kwargs)
    )


# -- capturing the first block's inputs --------------------------------------------------
@dataclasses.dataclass
class Capture:
    inputs: list[Inputs]  # the first block's inputs, one per batch
    before: list[str]  # selected outside layers that ran before the first block
    chained: bool  # the first block fed the second (checked on the first batch)


def capture(
    model: nn.Module,
    blocks: nn.Module,
    block_name: str,
    outside: Sequence[str],
    data: Sequence[Batch],
    check: bool = True,
) -> Capture | None:
    """Run each batch up to the first block and keep that block's inputs.

    With ``check`` the first batch runs on to the second block, to see whether the first
    fed it (``chained``; False without ``check``). Tensors entering the first block are
    checked for NaN/Inf (DataError naming it), and so are the inputs of the ``outside``
    layers that run before it. None when a batch does not reach the first block.
    """
    first, second = _entries(blocks)[:2]
    state = {"inside": False, "check": False}
    before: dict[str, None] = {}
    kept: list[Inputs] = []
    seen: list[Any] = []  # the first batch: the first block's output, the second's inputs
    keep: list[torch.Tensor | None] = [None]  # the token mask of the batch being run

    def on_outside(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if not state["inside"]:
                check_finite_input(name, args[0])
                before[name] = None

        return hook

    def on_first(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if state["inside"]:  # called again in one forward: not a chain of blocks
            seen.append(None)
            raise _Stop
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                check_finite_input(f"{_prefix(block_name)}0", value)
        kept.append(Inputs(tuple(args), dict(kwargs), keep[0]))
        state["inside"] = True
        if not state["check"]:
            raise _Stop

    def on_first_out(_m: nn.Module, _args: Any, output: Any) -> None:
        seen.append(output)

    def on_second(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(Inputs(tuple(args), dict(kwargs)))
        raise _Stop

    handles = [model.get_submodule(n).register_forward_pre_hook(on_outside(n)) for n in outside]
    handles.append(first.register_forward_pre_hook(on_first, with_kwargs=True))
    handles.append(first.register_forward_hook(on_first_out))
    handles.append(second.register_forward_pre_hook(on_second, with_kwargs=True))
    try:
        for i, batch in enumerate(data):
            state["inside"], state["check"] = False, check and i == 0
            keep[0] = token_mask(batch)
            with suppress(_Stop):
                call(model, batch)
            if len(kept) != i + 1:
                return None
    finally:
        for handle in handles:
            handle.remove()
    linked = check and len(seen) == 2 and chained(kept[0], seen[0], seen[1])
    return Capture(kept, list(before), linked)


# -- the driver ----------------------------------------------------------------------------
class _Shared:
    """Layers shared between groups are quantized once: later groups reuse the result."""

    def __init__(self) -> None:
        self.done: dict[int, nn.Module] = {}

    def run(self, step: Step, group: Group) -> None:
        todo = []
        for name in group.names:
            module = group.root.get_submodule(name)
            if id(module) in self.done:
                set_module(group.root, name, self.done[id(module)])
            else:
                todo.append((name, module))
        if not todo:
            return
        group.names = [name for name, _ in todo]
        step(group)
        for name, old in todo:
            self.done[id(old)] = group.root.get_submodule(name)


def whole_model(model: nn.Module, names: Sequence[str], data: Sequence[Batch]) -> Group:
    """The group of ``names`` calibrated by full passes of ``model`` over ``data``."""
    feed = Feed()
    run = functools.partial(feed.run_batches, model, data)
    return Group(model, "", list(names), run, len(data), feed)


def quantize_sequential(
    model: nn.Module,
    names: Sequence[str],
    data: Sequence[Batch],
    step: Step,
    progress: Progress | None = None,
) -> None:
    """Quantize the selected layers ``names`` of ``model`` with ``step``, block by block
    where the model has repeated blocks (see the module docstring)."""
    if not data:
        raise DataError("calibration needs at least one batch of model inputs")
    report = progress or (lambda _message: None)
    shared = _Shared()
    container = find_blocks(model, names)
    with torch.no_grad():
        plan = None
        if container is not None:
            blocks = model.get_submodule(container)
            outside = [n for n in names if block_of(n, container) is None]
            plan = capture(model, blocks, container, outside, data)
            if plan is not None and not plan.chained:
                report(f"{container or 'the model'}: blocks not chained; one full pass instead")
                plan = None
        if container is None or plan is None:
            shared.run(step, whole_model(model, names, data))
            return
        _quantize_blocks(model, container, names, data, plan, step, shared, report)


def _quantize_blocks(
    model: nn.Module,
    container: str,
    names: Sequence[str],
    data: Sequence[Batch],
    plan: Capture,
    step: Step,
    shared: _Shared,
    report: Progress,
) -> None:
    blocks = _entries(model.get_submodule(container))
    inputs, plan.inputs = plan.inputs, []
    if plan.before:
        feed = Feed()
        run = functools.partial(feed.run_batches, model, data, blocks[0])
        shared.run(step, Group(model, "", plan.before, run, len(data), feed))
        recaptured = capture(model, model.get_submodule(container), container, [], data, False)
        assert recaptured is not None  # the same batches reached the first block just now
        inputs = recaptured.inputs
    for index, block in enumerate(blocks):
        start = time.perf_counter()
        prefix = f"{_prefix(container)}{index}."
        inner = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        if inner:
            feed = Feed()
            run = functools.partial(feed.run_block, block, inputs)
            shared.run(step, Group(block, prefix, inner, run, len(data), feed))
        if index + 1 < len(blocks):
            inputs = advance(block, inputs)
        report(
            f"block {index + 1}/{len(blocks)} ({prefix[:-1]}): {len(inner)} layer(s), "
            f"{time.perf_counter() - start:.1f} s"
        )
    del inputs
    after = [n for n in names if block_of(n, container) is None and n not in plan.before]
    if after:
        shared.run(step, whole_model(model, after, data))


# -- layer inputs ----------------------------------------------------------------------------
def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as (N, K) rows matching the columns of ``weight.reshape(O, K)``:
    tokens for a Linear, unfolded patches (C_in * kh * kw) for a Conv2d with groups=1."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError("input rows of a grouped convolution")
        batched = x if x.dim() == 4 else x.unsqueeze(0)  # (B, C, H, W)
        patches = torch.nn.functional.unfold(
            batched.float(),
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,  # type: ignore[arg-type]
            stride=module.stride,
        )  # (B, C * kh * kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B * L, C * kh * kw)
    return x.reshape(-1, x.shape[-1]).float()  # (N, K)


class PerInput:
    """Remembers what was computed from the latest input tensor, so that layers fed the
    very same tensor (BERT's query, key and value) compute their statistics once."""

    def __init__(self) -> None:
        self._x: torch.Tensor | None = None
        self._key: tuple[Any, ...] = ()
        self._value: Any = None

    def get(self, x: torch.Tensor, kind: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """``compute()``, or its remembered value when ``x`` and ``kind`` are unchanged."""
        key = (x._version, *kind)
        if self._x is not x or self._key != key:
            # keeping a reference to x keeps its identity from being reused
            self._x, self._key, self._value = x, key, compute()
        return self._value

    def clear(self) -> None:
        self._x, self._key, self._value = None, (), None


def geometry(module: nn.Module) -> tuple[Any, ...]:
    """What ``input_rows`` depends on besides the input: the memo key of a layer kind."""
    if isinstance(module, nn.Conv2d):
        return ("conv", module.kernel_size, module.stride, module.padding, module.dilation)
    return ("rows",)


# -- enough rows for a Hessian ---------------------------------------------------------------
def columns(module: nn.Module) -> int:
    """The number of input columns of a layer's Hessian: the length of one weight row."""
    weight: Any = module.weight
    return int(weight[0].numel())


def check_rows(name: str, rows: int, n_columns: int, method: str, strict: bool) -> None:
    """Warn (DataError when ``strict``) when a layer's Hessian saw fewer calibration rows
    than it has input columns."""
    if rows >= n_columns:
        return
    message = (
        f"layer {name!r}: {rows} calibration rows for {n_columns} input columns; {method} "
        f"needs at least {n_columns}, give more calibration data"
    )
    if strict:
        raise DataError(message)
    warnings.warn(message, stacklevel=2)


def _row_count(module: nn.Module, x: torch.Tensor, output: Any, feed: Feed) -> int:
    """Rows ``input_rows`` would give: unfolded patches (one per output position) of a
    Conv2d, real tokens of a Linear."""
    if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
        images = output.shape[0] if output.dim() == 4 else 1
        return images * output.shape[-2] * output.shape[-1]
    real = feed.rows_of(x)
    return real.numel() // max(1, real.shape[-1])


def count_rows(model: nn.Module, names: Sequence[str], data: Sequence[Batch]) -> dict[str, int]:
    """Calibration rows each named layer sees over ``data`` (one forward pass, no grad)."""
    feed = Feed()
    counts = dict.fromkeys(names, 0)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            counts[name] += _row_count(module, args[0], output, feed)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            feed.run_batches(model, data)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def require_rows(
    model: nn.Module, names: Sequence[str], data: Sequence[Batch], method: str
) -> None:
    """DataError before any work naming the first layer of ``names`` whose Hessian would see
    fewer calibration rows over ``data`` than it has input columns."""
    for name, rows in count_rows(model, names, data).items():
        if rows:  # a layer the data never reaches is reported by the method itself
            check_rows(name, rows, columns(model.get_submodule(name)), method, strict=True)
