"""Weight formats as values: layout against encode, error bounds of decode(encode(w)), the
unpack cache, integer streams and specs; bad specs; the layers that hold a format; and the
Huffman encode stage over them."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
from slimkit.compressed import count_params, stream_layers
from slimkit.config import Granularity
from slimkit.encode.stage import HuffmanCoded
from slimkit.formats import primitives as P
from slimkit.formats.affine import AffineFormat
from slimkit.formats.base import WeightFormat, check_format, format_from_spec
from slimkit.formats.bf16 import BFloat16Format
from slimkit.formats.bitmask import unpack_mask
from slimkit.formats.codebook import CodebookFormat, SparseCodebookFormat
from slimkit.formats.nf4 import LEVELS, NF4Format
from slimkit.formats.sparse import SparseFormat
from slimkit.layers.weight import FormatLinear, FormatWeight, format_layer

#: the formats drawn: 8-bit affine codes are stored unpacked, so they get a case of their own
KINDS = ["affine", "affine-int8", "nf4", "codebook", "sparse-codebook", "sparse", "bf16"]
GRANULARITIES = list(Granularity)
PROPERTY = settings(max_examples=15, deadline=None)
#: the largest distance between neighbouring NF4 levels (normalized units)
NF4_GAP = float(LEVELS.diff().max())


# -- drawing a format and a weight it can hold ------------------------------------------------
@st.composite
def weight_shapes(draw: st.DrawFn) -> tuple[int, ...]:
    """A Linear-like (C, K) or Conv2d-like (C, I, kh, kw) weight shape, tiny."""
    rows = draw(st.integers(1, 4))
    inner = draw(st.sampled_from([(1,), (2,), (6,), (8,), (12,), (2, 1, 1), (2, 3, 3), (1, 2, 2)]))
    return (rows, *inner)


@st.composite
def groupings(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[Granularity, int | None]:
    """A granularity and the group size that goes with it for ``shape``: any size up to a
    little past K, so that many do not divide K (the last group of a row is then shorter)."""
    granularity = draw(st.sampled_from(GRANULARITIES))
    if granularity is not Granularity.PER_GROUP:
        return granularity, None
    return granularity, draw(st.integers(1, math.prod(shape[1:]) + 2))


@st.composite
def weights(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 weight of ``shape``: values in [-1, 1] (exact zeros and repeats likely)
    times a magnitude between 1e-3 and 1e3."""
    value = st.floats(-1.0, 1.0, width=32, allow_subnormal=False)
    elements = st.one_of(st.just(0.0), st.sampled_from([0.5, -0.25, 1.0]), value)
    n = math.prod(shape)
    flat = draw(st.lists(elements, min_size=n, max_size=n))
    magnitude = 10.0 ** draw(st.integers(-3, 3))
    return torch.tensor(flat, dtype=torch.float32).reshape(shape) * magnitude


def _make_format(draw: st.DrawFn, kind: str, w: torch.Tensor) -> WeightFormat:
    shape = tuple(w.shape)
    if kind.startswith("affine"):
        granularity, group_size = draw(groupings(shape))
        bits = 8 if kind == "affine-int8" else draw(st.integers(2, 7))
        scaled = draw(st.booleans())
        return AffineFormat(shape, bits, draw(st.booleans()), granularity, group_size, scaled)
    if kind == "nf4":
        return NF4Format(shape, *draw(groupings(shape)))
    if kind == "sparse":
        return SparseFormat(shape, int((w != 0).sum()))
    if kind == "bf16":
        return BFloat16Format(shape)
    bits = draw(st.sampled_from([1, 2, 3, 4, 8]))  # 1, 2, 4: whole-byte packing; 3: bit planes
    if kind == "codebook":
        return CodebookFormat(shape, bits)
    return SparseCodebookFormat(shape, bits, int((w != 0).sum()))


@st.composite
def cases(draw: st.DrawFn, kind: str) -> tuple[WeightFormat, torch.Tensor]:
    """A format of ``kind`` and a weight for it (a sparse format keeps its nonzeros)."""
    w = draw(weights(draw(weight_shapes())))
    return _make_format(draw, kind, w), w


# -- layout, bounds, cache, streams, specs ---------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(data=st.data())
def test_layout_matches_encode(kind: str, data: st.DataObject) -> None:
    fmt, w = data.draw(cases(kind))
    layout = fmt.layout()
    t = fmt.encode(w)
    assert set(t) == {name for name, slot in layout.items() if slot is not None}
    for name, tensor in t.items():
        slot = layout[name]
        assert slot is not None
        assert (tuple(tensor.shape), tensor.dtype) == (slot.shape, slot.dtype), name
        empty = slot.empty()
        assert (tuple(empty.shape), empty.dtype) == (slot.shape, slot.dtype), name
        assert torch.equal(empty, torch.full(slot.shape, slot.fill, dtype=slot.dtype))


def _group_of(fmt: WeightFormat, p: torch.Tensor) -> torch.Tensor:
    """The column of a (R, G) parameter each input of a row uses: (K,)."""
    k = math.prod(fmt.shape) // p.shape[0]
    size = getattr(fmt, "group_size", None) or k  # one group a row (or a tensor)
    return torch.arange(k) // size


def _per_weight(p: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """A (R, G) parameter repeated for every weight of its group, shaped like the weight
    (per group: input ``j`` of a row in group ``j // group_size``, the last one shorter)."""
    return p[:, _group_of(fmt, p)].reshape(fmt.shape)


@pytest.mark.parametrize("kind", ["affine", "affine-int8"])
@PROPERTY
@given(data=st.data())
def test_affine_error_is_at_most_half_a_step(kind: str, data: st.DataObject) -> None:
    fmt, w = data.draw(cases(kind))
    assert isinstance(fmt, AffineFormat)
    t = fmt.encode(w)
    w_hat = fmt.decode(t)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    scale = _per_weight(t["scale"], fmt)  # (*shape)
    assert t["scale"].shape == (
        (fmt.shape[0], -(-math.prod(fmt.shape[1:]) // fmt.group_size))
        if fmt.group_size
        else ((fmt.shape[0], 1) if fmt.per_channel else (1, 1))
    )
    assert bool((t["scale"] > 0).all())
    tol = 1e-4 * scale + 1e-6 * w.abs()
    assert bool(((w - w_hat).abs() <= scale / 2 + tol).all())
    codes = fmt.unpack(t).to(torch.float32)  # (*shape)
    qmin, qmax = P.qrange(fmt.bits, fmt.symmetric)
    assert bool(((codes >= qmin) & (codes <= qmax)).all())
    zero = t.get("zero_point")
    if zero is not None:  # an integer zero point within the codes' range
        assert torch.equal(zero, zero.round()) and bool(((zero >= qmin) & (zero <= qmax)).all())
        codes = codes - _per_weight(zero, fmt)
    assert torch.equal(w_hat, codes * scale)  # on the grid of its scale and zero point
    assert bool((w_hat[w == 0] == 0).all())  # exact zeros stay exact


@PROPERTY
@given(data=st.data())
def test_nf4_error_is_at_most_half_the_widest_level_gap(data: st.DataObject) -> None:
    fmt, w = data.draw(cases("nf4"))
    assert isinstance(fmt, NF4Format)
    t = fmt.encode(w)
    w_hat = fmt.decode(t)
    assert w_hat.shape == w.shape
    scale = _per_weight(t["scale"], fmt)  # (*shape)
    tol = 1e-6 * scale
    assert bool(((w - w_hat).abs() <= scale * NF4_GAP / 2 + tol).all())
    levels = (w_hat / scale).reshape(-1, 1)  # (n, 1) each a level
    assert bool(((levels - LEVELS).abs().amin(dim=1) <= 1e-6).all())
    assert bool((w_hat[w == 0] == 0).all())
    rows, of = w.reshape(t["scale"].shape[0], -1).abs(), _group_of(fmt, t["scale"])  # (R, K)
    absmax = torch.stack([rows[:, of == j].amax(dim=1) for j in range(t["scale"].shape[1])], 1)
    assert torch.equal(t["scale"], torch.where(absmax > 0, absmax, 1.0))  # own absmax, or 1
    extremes = w.abs() == scale
    assert torch.equal(w_hat[extremes], w[extremes])  # the levels reach +-1 exactly


@pytest.mark.parametrize("kind", ["codebook", "sparse-codebook"])
@PROPERTY
@given(data=st.data())
def test_codebook_values_are_the_nearest_entries(kind: str, data: st.DataObject) -> None:
    fmt, w = data.draw(cases(kind))
    assert isinstance(fmt, CodebookFormat)
    t = fmt.encode(w)
    w_hat = fmt.decode(t)
    assert w_hat.shape == w.shape
    codebook = t["codebook"]  # (2**bits,)
    assert codebook.numel() == 2**fmt.bits
    flat, flat_hat = w.reshape(-1), w_hat.reshape(-1)  # (n,), (n,)
    if isinstance(fmt, SparseCodebookFormat):  # pruned weights stay exact zeros
        keep = unpack_mask(t["mask"], w.numel())  # (n,)
        assert torch.equal(keep, flat != 0)
        assert bool((flat_hat[~keep] == 0).all())
        flat, flat_hat = flat[keep], flat_hat[keep]  # (nnz,), (nnz,)
    entry_gap = (flat_hat.reshape(-1, 1) - codebook).abs().amin(dim=1)  # (n,)
    assert bool((entry_gap == 0).all())  # every coded value is an entry
    nearest = (flat.reshape(-1, 1) - codebook).abs().amin(dim=1)  # (n,)
    tol = 1e-6 * float(w.abs().max())
    assert bool(((flat - flat_hat).abs() <= nearest + tol).all())


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(data=st.data())
def test_decode_with_the_cached_unpack_is_the_same(kind: str, data: st.DataObject) -> None:
    fmt, w = data.draw(cases(kind))
    t = fmt.encode(w)
    assert torch.equal(fmt.decode(t), fmt.decode(t, fmt.unpack(t)))


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(data=st.data())
def test_streams_round_trip_bit_exactly(kind: str, data: st.DataObject) -> None:
    fmt, w = data.draw(cases(kind))
    t = fmt.encode(w)
    streams = fmt.streams(t)
    assert len(streams) == fmt.stream_count
    for s in streams:
        assert s.symbols.dtype == torch.uint8 and s.symbols.dim() == 1
        assert s.symbols.numel() == 0 or int(s.symbols.max()) < 2**s.bits
    back = fmt.from_streams(t, [s.symbols for s in streams])
    assert set(fmt.packed) <= set(back) <= set(t)
    for name, tensor in back.items():
        assert tensor.dtype == t[name].dtype and torch.equal(tensor, t[name]), name
    masks = [s for s in streams if s.bitmask]
    if isinstance(fmt, SparseCodebookFormat | SparseFormat):
        assert [s.name for s in masks] == ["mask"]
        assert masks[0].n_weights == w.numel() and masks[0].bits == 8
    else:
        assert masks == []


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(data=st.data())
def test_spec_round_trips_through_json(kind: str, data: st.DataObject) -> None:
    fmt, _ = data.draw(cases(kind))
    spec = json.loads(json.dumps(fmt.spec()))
    assert spec["kind"] == fmt.kind
    assert format_from_spec(fmt.shape, spec) == fmt
    assert check_format(fmt.shape, spec) is None


def test_decode_multiplies_each_input_channel_by_its_input_scale() -> None:
    """``in_scale`` (one factor per input channel, dim 1) is folded into the weight."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 4), (3, 4, 2, 2)]:
        fmt = AffineFormat(shape, 4, False, Granularity.PER_CHANNEL, None, input_scaling=True)
        t = fmt.encode(torch.randn(shape, generator=gen))
        in_scale = torch.rand(4, generator=gen) + 0.5  # (I,)
        view = (1, 4, *[1] * (len(shape) - 2))
        expected = fmt.decode(t) * in_scale.reshape(view)
        assert torch.equal(fmt.decode({**t, "in_scale": in_scale}), expected)


# -- bad specs and options -------------------------------------------------------------------
SHAPE = (4, 16)
BAD_SPECS = [
    ("not a mapping", "mapping"),
    (["affine"], "mapping"),
    ({"bits": 4}, "mapping"),
    ({"kind": 4}, "mapping"),
    ({"kind": "int3"}, "format kind 'int3' is not one of"),
    ({"kind": "affine", "bits": 9}, "bits"),
    ({"kind": "affine", "bits": 1}, "bits"),
    ({"kind": "affine", "bits": "4"}, "bits"),
    ({"kind": "affine", "granularity": "per_group", "group_size": 0}, "group_size=0"),
    ({"kind": "affine", "granularity": "per_channel", "group_size": 4}, "group_size"),
    ({"kind": "affine", "granularity": "per_group"}, "group_size"),
    ({"kind": "affine", "granularity": "per_row"}, "granularity"),
    ({"kind": "affine", "zero": 0}, "unknown key 'zero'"),
    ({"kind": "nf4", "group_size": 0}, "group_size=0"),
    ({"kind": "nf4", "granularity": "per_tensor"}, "group_size"),
    ({"kind": "nf4", "granularity": "per_channel", "group_size": 8}, "group_size"),
    ({"kind": "nf4", "bits": 4}, "unknown key 'bits'"),
    ({"kind": "codebook", "bits": 9}, "bits"),
    ({"kind": "sparse-codebook", "bits": 2, "nnz": 65}, "nnz"),
    ({"kind": "sparse", "nnz": 65}, "nnz"),
    ({"kind": "sparse", "nnz": 8, "pattern": "4:2"}, "pattern"),
    ({"kind": "sparse", "nnz": 8, "bits": 4}, "unknown key 'bits'"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_check_format_says_what_is_wrong(spec: Any, message: str) -> None:
    problem = check_format(SHAPE, spec)
    assert isinstance(problem, str) and message in problem


BAD_OPTIONS: list[tuple[Callable[[], WeightFormat], str]] = [
    (lambda: AffineFormat(SHAPE, bits=9), "bits"),
    (lambda: AffineFormat(SHAPE, bits=1), "bits"),
    (lambda: AffineFormat(SHAPE, 4, True, Granularity.PER_GROUP, 0), "group_size: got 0"),
    (lambda: AffineFormat(SHAPE, 4, True, Granularity.PER_GROUP, -3), "group_size: got -3"),
    (lambda: AffineFormat(SHAPE, 4, True, Granularity.PER_CHANNEL, 4), "group_size"),
    (lambda: AffineFormat(SHAPE, 4, True, Granularity.PER_GROUP, None), "group_size"),
    (lambda: NF4Format(SHAPE, Granularity.PER_GROUP, 0), "group_size: got 0"),
    (lambda: NF4Format(SHAPE, Granularity.PER_GROUP, None), "group_size"),
    (lambda: NF4Format(SHAPE, Granularity.PER_TENSOR, 64), "group_size"),
    (lambda: CodebookFormat(SHAPE, bits=0), "bits"),
    (lambda: SparseCodebookFormat(SHAPE, bits=2, nnz=65), "nnz"),
    (lambda: SparseFormat(SHAPE, nnz=-1), "nnz"),
    (lambda: SparseFormat(SHAPE, nnz=8, pattern="2:2"), "pattern"),
]


@pytest.mark.parametrize(("make", "message"), BAD_OPTIONS)
def test_constructors_refuse_bad_options(make: Callable[[], WeightFormat], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@PROPERTY
@given(data=st.data())
def test_sparse_format_is_exact_on_the_kept_weights(data: st.DataObject) -> None:
    fmt, w = data.draw(cases("sparse"))
    t = fmt.encode(w)
    assert torch.equal(fmt.decode(t), w)  # every nonzero kept, in place, bit for bit
    assert fmt.n_values() == int((w != 0).sum())
    fmt.verify(t)


@PROPERTY
@given(data=st.data())
def test_bf16_error_is_at_most_half_a_bf16_step(data: st.DataObject) -> None:
    fmt, w = data.draw(cases("bf16"))
    back = fmt.decode(fmt.encode(w))
    # round to nearest with 8 significant bits: a relative error of at most 2**-8; below
    # the smallest normal number, half of bf16's subnormal step (2**-133)
    assert bool(((back - w).abs() <= (w.abs() * 2**-8).clamp(min=2.0**-134)).all())
    assert torch.equal(back, w.to(torch.bfloat16).float())


def test_sparse_format_checks_counts_and_patterns() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]])
    fmt = SparseFormat((2, 4), 4, "2:4")
    t = fmt.encode(w)
    with pytest.raises(ValueError, match="3 weights kept, the format holds 4"):
        SparseFormat((2, 4), 4).encode(w, w.abs() > 1.5)
    with pytest.raises(ValueError, match="1:2 pattern"):
        SparseFormat((2, 4), 4, "1:2").encode(torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0] * 4]))
    with pytest.raises(ValueError, match="keeps 2 weights"):
        fmt.verify({**t, "mask": torch.tensor([0b0101], dtype=torch.uint8)})
    assert fmt.spec() == {"kind": "sparse", "nnz": 4, "pattern": "2:4"}
    assert SparseFormat((2, 4), 4).spec() == {"kind": "sparse", "nnz": 4}


@pytest.mark.parametrize("kind", ["affine", "nf4", "codebook"])
def test_check_format_reports_a_shape_key(kind: str) -> None:
    problem = check_format(SHAPE, {"kind": kind, "shape": list(SHAPE)})
    assert isinstance(problem, str)


def test_check_format_accepts_a_sparse_codebook_spec() -> None:
    spec = SparseCodebookFormat(SHAPE, bits=2, nnz=10).spec()
    assert check_format(SHAPE, spec) is None
    layer_spec = {"in_features": 16, "out_features": 4, "format": spec, "bias": True}
    assert FormatLinear.check_spec(layer_spec) is None


@pytest.mark.parametrize("cls", [AffineFormat, NF4Format])
def test_a_granularity_string_is_understood_or_refused(cls: type[WeightFormat]) -> None:
    try:
        fmt = cls(SHAPE, granularity="per_tensor", group_size=None)  # type: ignore[call-arg]
    except ValueError:
        return
    scale = fmt.layout()["scale"]
    assert scale is not None and scale.shape == (1, 1)
    assert fmt.spec()["granularity"] == "per_tensor"


def test_set_weight_resets_the_input_scale() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    fmt = AffineFormat((4, 8), 8, True, Granularity.PER_CHANNEL, None, input_scaling=True)
    q = format_layer(linear, fmt)
    q.store({"in_scale": torch.full((8,), 2.0)})  # as activation-aware scaling leaves it
    q.set_weight(linear.weight)
    scale = q.stored()["scale"]  # (4, 1)
    assert bool(((q.dense_weight() - linear.weight).abs() <= scale / 2 + 1e-6).all())


# -- the layers that hold a format -----------------------------------------------------------
GEN = torch.Generator().manual_seed(1)
LAYERS: dict[str, tuple[Callable[[], nn.Module], torch.Tensor, int]] = {
    # float layer, input, a group size dividing its inputs per output (K)
    "linear": (lambda: nn.Linear(16, 4), torch.randn(3, 16, generator=GEN), 8),
    "conv": (  # weight (4, 1, 3, 3): K = 9
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2),
        torch.randn(2, 2, 6, 6, generator=GEN),
        3,
    ),
    "embedding": (lambda: nn.Embedding(10, 8, padding_idx=0), torch.tensor([[0, 3, 9]]), 4),
}
LAYER_FORMATS: dict[str, Callable[[tuple[int, ...], int], WeightFormat]] = {
    "nf4": lambda shape, g: NF4Format(shape, Granularity.PER_GROUP, g),
    "affine": lambda shape, g: AffineFormat(shape, 4, False, Granularity.PER_GROUP, g),
    "affine-scaled": lambda shape, _: AffineFormat(
        shape, 8, True, Granularity.PER_CHANNEL, None, input_scaling=True
    ),
}


def float_reference(m: nn.Module, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The float layer ``m``'s operation with the weight ``w``."""
    if isinstance(m, nn.Linear):
        return F.linear(x, w, m.bias)
    if isinstance(m, nn.Conv2d):
        return F.conv2d(x, w, m.bias, stride=2, padding=1, dilation=2, groups=2)
    return F.embedding(x, w, padding_idx=0)


def float_model(layer: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(LAYERS[layer][0]()).eval()


def formatted(
    layer: str, kind: str, seed: int = 0
) -> tuple[nn.Sequential, nn.Module, WeightFormat]:
    """A one-layer model with its layer in a ``kind`` format, the float layer, the format."""
    model = float_model(layer, seed)
    m = model[0]
    fmt = LAYER_FORMATS[kind](tuple(m.weight.shape), LAYERS[layer][2])
    model[0] = format_layer(copy.deepcopy(m), fmt)
    return model, m, fmt


LAYER_CASES = [(layer, kind) for layer in LAYERS for kind in LAYER_FORMATS]


@pytest.mark.parametrize(("layer", "kind"), LAYER_CASES)
def test_layer_computes_with_the_decoded_weight(layer: str, kind: str) -> None:
    model, m, fmt = formatted(layer, kind)
    x = LAYERS[layer][1]
    with torch.no_grad():
        expected = float_reference(m, fmt.decode(fmt.encode(m.weight)), x)
        assert torch.equal(model(x), expected)
        assert torch.equal(model(x), expected)  # from the cached unpack
        model[0].set_weight(-m.weight)  # new codes: the cache must not serve the old ones
        assert torch.equal(model(x), float_reference(m, fmt.decode(fmt.encode(-m.weight)), x))
        other, _, _ = formatted(layer, kind, seed=2)
        model.load_state_dict(other.state_dict())  # copied in place: the cache notices too
        assert torch.equal(model(x), other(x))


@pytest.mark.parametrize(("layer", "kind"), LAYER_CASES)
def test_layer_saves_and_loads_bit_exactly(layer: str, kind: str, tmp_path: Path) -> None:
    model, _, _ = formatted(layer, kind)
    x = LAYERS[layer][1]
    back = slimkit.load(slimkit.save(model, tmp_path / "a"), model=float_model(layer, seed=1))
    assert type(back[0]) is type(model[0])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize(("layer", "kind"), LAYER_CASES)
def test_layer_describes_itself(layer: str, kind: str) -> None:
    model, m, fmt = formatted(layer, kind)
    q = model[0]
    assert isinstance(q, FormatWeight) and q.format == fmt
    spec = json.loads(json.dumps(q.spec()))
    assert spec["format"] == fmt.spec()
    assert type(q).check_spec(spec) is None
    ragged = {**spec, "format": {**spec["format"], "granularity": "per_group", "group_size": 5}}
    assert type(q).check_spec(ragged) is None  # a short last group is fine
    bad = {**spec, "format": {**spec["format"], "granularity": "per_group", "group_size": 0}}
    assert "group_size=0" in str(type(q).check_spec(bad))
    assert q.n_params() == m.weight.numel()
    assert fmt.describe() in q.describe()
    assert (f"int{fmt.bits}" if isinstance(fmt, AffineFormat) else "nf4") in q.describe()
    assert q.has_streams and type(q) in stream_layers()
    assert q.weight_shape == tuple(m.weight.shape)


# -- the encode stage over format layers -----------------------------------------------------
NF4_STAGE = {
    "quantize": {
        "method": "rtn",
        "format": "nf4",
        "bits": 4,
        "granularity": "per_group",
        "group_size": 16,
    }
}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


def test_huffman_coding_nf4_layers_changes_no_output(tmp_path: Path) -> None:
    plain = slimkit.compress(mlp(), {"name": "r", "stages": [NF4_STAGE]})
    stages = [NF4_STAGE, {"encode": {"method": "huffman"}}]
    coded = slimkit.compress(mlp(), {"name": "r", "stages": stages})
    for i in (0, 2):
        assert isinstance(plain[i], FormatLinear) and isinstance(plain[i].format, NF4Format)
        assert isinstance(coded[i], HuffmanCoded) and isinstance(coded[i].inner, FormatLinear)
    assert count_params(coded) == count_params(plain)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = plain(x)
        assert torch.equal(coded(x), y)
        back = slimkit.load(slimkit.save(coded, tmp_path / "a"), model=mlp())
        assert isinstance(back[0], HuffmanCoded)
        assert torch.equal(back(x), y)
    for i in (0, 2):  # the codes came back from the Huffman code bit for bit
        assert torch.equal(back[i].inner.stored()["indices"], plain[i].stored()["indices"])
