from __future__ import annotations

import json
import operator
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import slimkit
from slimkit import tasks
from slimkit.atomic import sha256_file
from slimkit.tasks import digits
from slimkit.tasks.resnet import DigitsResNet, MiniResNet, upsample


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path))
    return tmp_path / "tasks"


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so eval outputs depend on them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def test_architecture_has_depthwise_grouped_and_batchnorm_after_every_conv():
    model = MiniResNet()
    convs = _convs(model)
    depthwise = [c for c in convs if c.groups == c.in_channels > 1]
    grouped = [c for c in convs if 1 < c.groups < c.in_channels]
    assert len(depthwise) == 1 and depthwise[0].out_channels == depthwise[0].in_channels
    assert len(grouped) == 1 and grouped[0].groups == 4
    assert model.block3.pointwise[0].kernel_size == (1, 1)  # the depthwise conv's partner
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == len(convs)
    assert all(c.bias is None for c in convs)  # BatchNorm supplies the shift
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10


def test_shortcuts_are_one_identity_and_one_strided_1x1_projection():
    model = MiniResNet()
    assert isinstance(model.block1.shortcut, nn.Identity)
    projection = model.block2.shortcut[0]
    assert isinstance(projection, nn.Conv2d)
    assert projection.kernel_size == (1, 1) and projection.stride == (2, 2)


def test_parameter_count_is_small():
    n = sum(p.numel() for p in MiniResNet().parameters())
    assert 50_000 <= n <= 150_000


def test_fx_traces_with_two_adds_and_one_concatenation():
    model = _randomize_batchnorm(MiniResNet())
    traced = fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    adds = [t for t in targets if t in (operator.add, torch.add)]
    assert len(adds) == 2  # the two residual blocks
    assert targets.count(torch.cat) == 1
    assert any(t is F.adaptive_avg_pool2d for t in targets)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("batch", [1, 5])
def test_output_is_batch_by_10_logits(batch: int):
    with torch.no_grad():
        assert MiniResNet().eval()(torch.zeros(batch, 1, 32, 32)).shape == (batch, 10)


def test_upsample_is_fixed_bilinear_to_32x32():
    x = digits._split()[2][:4]  # (4, 1, 8, 8)
    up = upsample(x)
    assert up.shape == (4, 1, 32, 32) and torch.equal(up, upsample(x.clone()))
    expected = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(up, expected)
    flat = upsample(torch.full((1, 1, 8, 8), 0.25))
    assert torch.allclose(flat, torch.full_like(flat, 0.25))  # constants stay constant


def test_batches_have_the_32x32_input_shape():
    task = DigitsResNet()
    shape = (1, 32, 32)
    calibration = task.calibration_data()
    assert len(calibration) == 4 and all(b.shape == (64, *shape) for b in calibration)
    assert task.example_inputs().shape == (1, *shape)
    assert task.latency_inputs().shape == (256, *shape)
    assert task.latency_inputs(3).shape == (3, *shape)
    train = task.train_data()
    assert sum(len(y) for _, y in train) == 1347
    assert all(x.shape[1:] == shape and len(x) == len(y) <= 64 for x, y in train)
    assert task.latency_description() == "batch 256 x 1x32x32 images"


def test_registered_by_name_with_a_round_tripping_source():
    task = tasks.get("digits-resnet")
    assert isinstance(task, DigitsResNet) and "digits-resnet" in tasks.names()
    assert task.source() == {"task": "digits-resnet"}
    assert type(tasks.from_source(task.source())) is DigitsResNet
    assert dict(tasks.describe())["digits-resnet"] == DigitsResNet.description


def test_cached_apart_from_the_other_digits_tasks(cache: Path):
    weights, _ = DigitsResNet().cache_paths()
    assert weights.parent == cache and weights.name.startswith("digits-resnet-v")
    assert weights != tasks.get("digits-lenet").cache_paths()[0]


@pytest.mark.slow
def test_training_is_deterministic(monkeypatch: pytest.MonkeyPatch):
    """Two short trainings on a slice of the split give identical weights."""
    x_train, y_train, x_test, y_test = digits._split()
    monkeypatch.setattr(digits, "_split", lambda: (x_train[:256], y_train[:256], x_test, y_test))

    class Short(DigitsResNet):
        epochs = 1

    first, second = Short()._fit(), Short()._fit()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    init = MiniResNet().state_dict()
    assert not torch.equal(first["fc.weight"], init["fc.weight"])  # it did train
    assert int(first["stem.1.num_batches_tracked"]) == 2  # 256 examples, batches of 128


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path):
    model = _randomize_batchnorm(MiniResNet())
    slimkit.save(model, tmp_path / "art")
    loaded = slimkit.load(tmp_path / "art")
    assert isinstance(loaded, MiniResNet) and not loaded.training
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.fixture(scope="module")
def trained() -> Iterator[dict[str, Any]]:
    """Really train the task once into a temporary cache, then reload it from there."""
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        mp.setenv("SLIMKIT_CACHE_DIR", tmp)
        state = torch.random.get_rng_state()
        task = DigitsResNet()
        first = task.model()
        rng_untouched = torch.equal(state, torch.random.get_rng_state())
        second = DigitsResNet().model()
        yield {
            "task": task,
            "first": first,
            "second": second,
            "rng untouched": rng_untouched,
            "meta": json.loads(task.cache_paths()[1].read_text()),
            "sha256": sha256_file(task.cache_paths()[0]),
        }


@pytest.mark.slow
def test_trained_resnet_reaches_97_percent(trained: dict[str, Any]):
    task, model = trained["task"], trained["first"]
    accuracy = task.evaluate(model)["accuracy"]
    assert accuracy >= 0.97
    assert trained["meta"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert trained["meta"]["sha256"] == trained["sha256"]
    assert trained["rng untouched"]


@pytest.mark.slow
def test_cached_weights_reload_identically(trained: dict[str, Any], tmp_path: Path):
    first, second = trained["first"], trained["second"]
    assert second is not first
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    slimkit.save(first, tmp_path / "art")
    loaded = slimkit.load(tmp_path / "art")
    x = trained["task"].example_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), first(x))
