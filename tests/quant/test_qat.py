"""Quantization-aware training (LSQ): gradients, training, conversion, ternary, bad input."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.compressed import is_simulated
from slimkit.data import Batch
from slimkit.errors import ConfigError, DataError
from slimkit.formats import primitives as P
from slimkit.layers.quantized import QuantConv2d, QuantLinear
from slimkit.quant.qat import (
    LSQQuantizer,
    QATConfig,
    QATConv2d,
    QATLinear,
    convert_layers,
    grad_scale,
    train,
    wrap_layers,
)
from slimkit.quant.static import StaticQuantConv2d, StaticQuantLinear
from slimkit.recipe import Recipe, shipped_dir
from slimkit.tasks.base import Task

NAMES = ["conv", "fc1", "fc2"]


def recipe(**options: Any) -> dict[str, Any]:
    opts = {"method": "qat", "epochs": 5, "lr": 1e-2, **options}
    return {"name": "qat", "stages": [{"quantize": opts}]}


class TinyNet(nn.Module):
    """A convolution (signed inputs) and two linears (inputs after ReLU) on (B, 1, 4, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 4, 4)
        h = F.relu(self.conv(x)).flatten(1)  # (B, 64)
        return self.fc2(F.relu(self.fc1(h)))  # (B, 3)


def blobs(n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three classes: a fixed random 4x4 pattern per class plus noise."""
    protos = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (16,), generator=g)
        x = protos[y] + 0.8 * torch.randn(16, 1, 4, 4, generator=g)  # (16, 1, 4, 4)
        out.append((x, y))
    return out


class Blobs(Task):
    """A synthetic labelled task for TinyNet; ``labelled=False`` has no training data."""

    name = "blobs"
    description = "synthetic 3-class 4x4 patterns"
    primary_metric = "accuracy"
    modality = "image"
    default_batch = 16

    def __init__(self, labelled: bool = True) -> None:
        self.labelled = labelled

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return TinyNet().eval()

    def calibration_data(self) -> list[Batch]:
        return [x for x, _ in blobs(2, seed=1)]

    def train_data(self) -> list[tuple[Batch, torch.Tensor]] | None:
        return list(blobs(8, seed=1)) if self.labelled else None

    def example_inputs(self) -> Batch:
        return blobs(1, seed=2)[0][0][:1]

    def latency_inputs(self, batch: int | None = None) -> Batch:
        return blobs(1, seed=2)[0][0]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            hits = [float((model(x).argmax(1) == y).float().mean()) for x, y in blobs(4, 3)]
        return {"accuracy": sum(hits) / len(hits)}

    def robustness(self, model: nn.Module) -> dict[str, float]:
        return {}


def mean_loss(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the LSQ quantizer ---------------------------------------------------------------------
def test_lsq_straight_through_and_step_gradient() -> None:
    q = LSQQuantizer(4, signed=True, init=torch.tensor(0.5))  # codes [-7, 7]
    assert (q.qmin, q.qmax) == (-7, 7)
    x = torch.tensor([[-5.0, -1.26, 0.1, 0.74, 3.3, 4.0]], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([[-3.5, -1.5, 0.0, 0.5, 3.5, 3.5]]), rtol=0, atol=1e-7)
    y.sum().backward()
    v = x.detach() / 0.5  # (1, 6)
    inside = (v >= -7) & (v <= 7)
    assert x.grad is not None and q.step.grad is not None
    # straight through inside the range, nothing outside
    assert torch.equal(x.grad, inside.float())
    # d x_hat / d s = round(v) - v inside, the clamp bound outside; scaled by 1/sqrt(n * qmax)
    per_value = torch.where(inside, torch.round(v) - v, torch.clamp(v, -7, 7))
    expected = per_value.sum() / math.sqrt(6 * 7)
    assert abs(float(q.step.grad) - float(expected)) <= 1e-6
    assert float(q.step.grad) != 0.0


def test_lsq_per_channel_step_gradient() -> None:
    w = torch.tensor([[0.3, -0.2, 0.05, 0.9], [1.0, 2.0, -3.0, 0.1], [0.0, 0.0, 0.0, 0.01]])
    q = LSQQuantizer(3, signed=True, channels=3)  # codes [-3, 3]
    q.start(w)
    mean = w.abs().mean(dim=1, keepdim=True)  # (3, 1)
    assert torch.allclose(q.step, 2 * mean / math.sqrt(3), rtol=1e-6)
    wp = w.clone().requires_grad_(True)
    q(wp).sum().backward()
    assert q.step.grad is not None and q.step.grad.shape == (3, 1)
    v = w / q.step.detach()  # (3, 4)
    per_value = torch.where(v.abs() <= 3, torch.round(v) - v, torch.clamp(v, -3, 3))
    expected = per_value.sum(dim=1, keepdim=True) / math.sqrt(4 * 3)  # (3, 1)
    assert torch.allclose(q.step.grad, expected, atol=1e-6)


def test_lsq_init_and_range_from_first_batch() -> None:
    x = torch.rand(8, 5)  # non-negative: unsigned codes
    q = LSQQuantizer(4, signed=None)
    q(x)
    assert (q.qmin, q.qmax) == (0, 15) and q.unsigned
    assert torch.allclose(q.step, 2 * x.mean() / math.sqrt(15) * torch.ones(1), rtol=1e-6)
    assert q.grad_factor == pytest.approx(1 / math.sqrt(5 * 15))
    first = q.step.detach().clone()
    q(x * 10)  # later batches change neither the range nor the step
    assert (q.qmin, q.qmax) == (0, 15) and torch.equal(q.step.detach(), first)
    s = LSQQuantizer(4, signed=None)
    s(x - 0.5)
    assert (s.qmin, s.qmax) == (-8, 7) and not s.unsigned
    u = LSQQuantizer(4, signed=False)
    u(x - 0.5)  # a fixed unsigned range is kept whatever the data
    assert (u.qmin, u.qmax) == (0, 15)


def test_lsq_output_on_the_grid() -> None:
    q = LSQQuantizer(3, signed=None)
    x = torch.randn(4, 6) * 3
    y = q(x)
    step = float(q.step.detach())
    codes = y.detach() / step
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert float(codes.min()) >= -4 - 1e-5 and float(codes.max()) <= 3 + 1e-5
    assert torch.equal(q.codes(x) * q.step.detach(), y.detach())


def test_grad_scale_is_exact_identity() -> None:
    x = torch.tensor([0.1, 1e-7, 3.3], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.full((3,), 0.25))


def test_ternary_wrapper_init_from_twn() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    wrapper = QATLinear(layer, 2, True, None)
    assert (wrapper.weight_quant.qmin, wrapper.weight_quant.qmax) == (-1, 1)
    _, twn_scale = P.ternarize(layer.weight.detach())
    assert torch.equal(wrapper.weight_quant.step.detach(), twn_scale)
    values = torch.unique(wrapper.quantized_weight().detach() / twn_scale)
    assert set(values.round().tolist()) <= {-1.0, 0.0, 1.0}


# -- training and conversion ---------------------------------------------------------------
def test_training_reduces_loss_and_conversion_matches() -> None:
    model = Blobs().model()
    data = blobs(8, seed=1)
    config = QATConfig(weight_bits=4, act_bits=4)
    wrap_layers(model, NAMES, config)
    assert type(model.conv) is QATConv2d and type(model.fc1) is QATLinear
    before = mean_loss(model, data)  # the first batch fixes the input ranges
    with torch.enable_grad():
        last_epoch = train(model, data, epochs=6, lr=1e-2)
    after = mean_loss(model, data)
    assert not model.training
    assert after <= 0.5 * before and after <= 0.3
    assert last_epoch <= 0.5 * before
    fake = copy.deepcopy(model)
    convert_layers(model, NAMES)
    assert type(model.conv) is StaticQuantConv2d and type(model.fc1) is StaticQuantLinear
    assert float(model.conv.act_zero) == 0.0  # signed input: codes [-8, 7]
    assert float(model.fc1.act_zero) == -8.0  # after ReLU: [0, 15] stored as [-8, 7] + 8
    held_out = torch.cat([x for x, _ in blobs(4, seed=5)])
    with torch.no_grad():
        y_fake, y_int = fake(held_out), model(held_out)
    assert float((y_fake - y_int).abs().max()) <= 1e-6 * float(y_fake.abs().max())
    assert torch.equal(y_fake.argmax(1), y_int.argmax(1))


def test_compress_end_to_end(tmp_path: Path) -> None:
    task = Blobs()
    model = task.model()
    base = task.evaluate(model)["accuracy"]
    messages: list[str] = []
    out = slimkit.compress(model, recipe(), task=task, progress=messages.append)
    assert out is model and not model.training
    assert not any(m.training for m in model.modules())
    assert any("qat epoch 5/5" in m for m in messages)
    assert type(model.conv) is StaticQuantConv2d
    assert type(model.fc1) is StaticQuantLinear and type(model.fc2) is StaticQuantLinear
    assert not is_simulated(model)
    for layer in (model.conv, model.fc1, model.fc2):
        assert layer.bits == 4 and layer.act_bits == 4
        assert layer.qweight.dtype == torch.uint8  # 4-bit packed
        assert int(layer.codes.abs().max()) <= 7
    accuracy = task.evaluate(model)["accuracy"]
    assert accuracy >= 0.9 and accuracy >= base
    x = task.latency_inputs()
    with torch.no_grad():
        y = model(x)
    slimkit.save(model, tmp_path / "qat")
    loaded = slimkit.load(tmp_path / "qat", model=TinyNet())
    assert same_weights(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_float_activations_give_weight_only_layers() -> None:
    task = Blobs()
    model = slimkit.compress(task.model(), recipe(act_bits=None, epochs=2), task=task)
    assert type(model.conv) is QuantConv2d and type(model.fc1) is QuantLinear
    assert model.fc1.bits == 4 and model.fc1.symmetric


def test_ternary_codes_only() -> None:
    task = Blobs()
    model = slimkit.compress(
        task.model(), recipe(weights="ternary", weight_bits=2, act_bits=8), task=task
    )
    for layer in (model.conv, model.fc1, model.fc2):
        assert type(layer) in (StaticQuantConv2d, StaticQuantLinear)
        assert layer.bits == 2 and layer.symmetric and layer.zero_point is None
        assert set(torch.unique(layer.codes).tolist()) == {-1, 0, 1}
        assert layer.qweight.numel() == math.ceil(layer.codes.numel() * 2 / 8)
        assert bool((layer.scale > 0).all()) and layer.scale.shape == (layer.codes.shape[0], 1)
    assert task.evaluate(model)["accuracy"] >= 0.8


def test_compress_under_inference_mode() -> None:
    task = Blobs()
    model = task.model()
    with torch.inference_mode():  # the task's data are then inference tensors
        slimkit.compress(model, recipe(epochs=1), task=task)
    assert type(model.fc2) is StaticQuantLinear


def test_targets_subset_keeps_other_layers_float() -> None:
    task = Blobs()
    model = slimkit.compress(task.model(), recipe(targets=["fc*"], epochs=1), task=task)
    assert type(model.conv) is nn.Conv2d  # trained with the rest, but not quantized
    assert type(model.fc1) is StaticQuantLinear


def test_shipped_recipes_parse() -> None:
    w4a4 = Recipe.from_file(shipped_dir() / "qat-w4a4.yaml").stages
    assert w4a4 == (QATConfig(weight_bits=4, act_bits=4, epochs=5, lr=3e-4),)
    ternary = Recipe.from_file(shipped_dir() / "ternary-qat.yaml").stages
    assert ternary == (QATConfig(weights="ternary", weight_bits=2, act_bits=8, lr=1e-3),)


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("task", [None, Blobs(labelled=False)], ids=["no-task", "unlabelled"])
def test_no_training_data_refused_before_work(task: Task | None) -> None:
    model = Blobs().model()
    ref = copy.deepcopy(model)
    data = [torch.zeros(2, 1, 4, 4)]
    with pytest.raises(DataError, match="qat needs labelled training data"):
        slimkit.compress(model, recipe(), data=data, task=task)
    assert type(model.conv) is nn.Conv2d and type(model.fc1) is nn.Linear
    assert same_weights(model, ref)


class BadLabels(Blobs):
    def train_data(self) -> list[tuple[Batch, torch.Tensor]] | None:
        return [(x, y.float()) for x, y in blobs(2, seed=1)]


def test_float_labels_refused_before_work() -> None:
    model = Blobs().model()
    ref = copy.deepcopy(model)
    with pytest.raises(DataError, match=r"train_data\(\)\[0\]: labels"):
        slimkit.compress(model, recipe(), task=BadLabels())
    assert same_weights(model, ref)


@pytest.mark.parametrize(
    "options,field",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"act_bits": 1}, "act_bits"),
        ({"weights": "binary"}, "weights"),
        ({"weights": "ternary"}, "weight_bits"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"batch_limit": 0}, "batch_limit"),
    ],
)
def test_bad_config_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"quantize\.qat\.{field}"):
        QATConfig(**options)


def test_batch_limit_uses_fewer_batches() -> None:
    model = Blobs().model()
    steps: list[int] = []
    model.register_forward_pre_hook(lambda m, a: steps.append(1) if m.training else None)
    slimkit.compress(model, recipe(batch_limit=3, epochs=2), task=Blobs())
    assert len(steps) == 6  # 3 batches x 2 epochs, of the 8 the task has


class Branchy(TinyNet):
    """``spare`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(3, 3)


def test_unused_layer_refused() -> None:
    task = Blobs()
    torch.manual_seed(0)
    with pytest.raises(DataError, match="layer 'spare' saw no training input"):
        slimkit.compress(Branchy(), recipe(epochs=1), task=task)


# -- digits --------------------------------------------------------------------------------
@pytest.mark.slow
def test_digits_lenet_qat_w4a4_drop() -> None:
    from slimkit.tasks import get

    task = get("digits-lenet")
    base = task.evaluate(task.model())["accuracy"]
    quantized = slimkit.compress(task.model(), shipped_dir() / "qat-w4a4.yaml", task=task)
    assert isinstance(quantized.fc1, StaticQuantLinear) and quantized.fc1.act_bits == 4
    assert isinstance(quantized.conv1, StaticQuantConv2d) and quantized.conv1.bits == 4
    assert base - task.evaluate(quantized)["accuracy"] <= 0.01  # at most 1 point
