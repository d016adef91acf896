from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.atomic import sha256_file
from slimkit.tasks import digits
from slimkit.tasks.digits import MLP300100, RECIPE_VERSION, DigitsLeNet, DigitsMLP, LeNet5


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path))
    return tmp_path / "tasks"


@pytest.fixture
def fake_fit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace training with a seeded random init; records each call's task name."""
    calls: list[str] = []

    def fit(self: digits.DigitsTask) -> dict[str, torch.Tensor]:
        calls.append(self.name)
        torch.manual_seed(len(calls))
        return self.arch().state_dict()

    monkeypatch.setattr(digits.DigitsTask, "_fit", fit)
    return calls


class Constant(nn.Module):
    """Predicts class ``k`` for every input; remembers its last forward's inference mode."""

    def __init__(self, k: int = 0) -> None:
        super().__init__()
        self.k = k
        self.inference: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inference = torch.is_inference_mode_enabled()
        return nn.functional.one_hot(torch.full((x.shape[0],), self.k), 10).float()


def test_cache_dir_follows_the_environment(cache: Path):
    assert digits.cache_dir() == cache
    weights, sidecar = DigitsLeNet().cache_paths()
    assert weights.parent == cache and f"v{RECIPE_VERSION}" in weights.name
    assert weights.suffix == ".safetensors" and sidecar.suffix == ".json"


def test_split_is_stratified_scaled_and_fixed():
    x_train, y_train, x_test, y_test = digits._split()
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == torch.float32 and 0.0 <= float(x_train.min()) < float(x_train.max())
    assert float(x_train.max()) <= 1.0
    per_class = torch.bincount(torch.cat([y_train, y_test]), minlength=10)
    test_share = torch.bincount(y_test, minlength=10) / per_class  # stratified: a quarter each
    assert torch.all((test_share - 0.25).abs() < 0.01)
    digits._split.cache_clear()
    assert torch.equal(digits._split()[2], x_test)  # rebuilt identically


def test_lenet_is_two_convs_and_three_linears():
    model = LeNet5()
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert kinds == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear, nn.Linear]
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_mlp_is_300_100_on_flat_inputs():
    model = MLP300100()
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(300, 64), (100, 300), (10, 100)]
    assert model(torch.zeros(5, 64)).shape == (5, 10)


@pytest.mark.parametrize(("task", "shape"), [(DigitsLeNet(), (1, 8, 8)), (DigitsMLP(), (64,))])
def test_batches_have_the_model_input_shape(task: digits.DigitsTask, shape: tuple[int, ...]):
    calibration = task.calibration_data()
    assert len(calibration) == 4 and all(b.shape == (64, *shape) for b in calibration)
    assert task.example_inputs().shape == (1, *shape)
    assert task.latency_inputs().shape == (256, *shape)
    train = task.train_data()
    assert sum(len(y) for _, y in train) == 1347
    assert all(x.shape[1:] == shape and len(x) == len(y) <= 64 for x, y in train)
    assert torch.equal(train[3][0], task.train_data()[3][0])  # fixed order


def test_latency_inputs_tile_the_test_set_past_its_size():
    big = DigitsLeNet().latency_inputs(500)
    assert isinstance(big, torch.Tensor) and big.shape == (500, 1, 8, 8)
    assert torch.equal(big[450:], big[:50])
    assert DigitsMLP().latency_inputs(3).shape == (3, 64)


def test_evaluate_is_top1_and_cross_entropy_on_the_test_split_in_eval_and_inference_mode():
    y_test = digits._split()[3]
    model = Constant(3).train()
    metrics = DigitsLeNet().evaluate(model)
    # one-hot logits: log-softmax is 1 - log(e + 9) on class 3, -log(e + 9) elsewhere
    hit = float((y_test == 3).float().mean())
    expected_ce = math.log(math.e + 9) - hit
    assert metrics == {
        "accuracy": pytest.approx(hit),
        "cross_entropy": pytest.approx(expected_ce, rel=1e-5),
    }
    assert not model.training and model.inference is True


def test_robustness_reports_each_noise_level():
    y_test = digits._split()[3]
    result = DigitsMLP().robustness(Constant(1))
    assert set(result) == {"gauss_0.1", "gauss_0.2", "gauss_0.4"}
    assert all(v == pytest.approx(float((y_test == 1).float().mean())) for v in result.values())


def test_first_model_call_trains_and_caches_then_loads(cache: Path, fake_fit: list[str]):
    task = DigitsMLP()
    first = task.model()
    assert fake_fit == ["digits-mlp"] and not first.training
    weights, sidecar = task.cache_paths()
    meta = json.loads(sidecar.read_text())
    assert meta["sha256"] == sha256_file(weights) and meta["recipe_version"] == RECIPE_VERSION
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    second = DigitsMLP().model()
    assert fake_fit == ["digits-mlp"]  # loaded, not retrained
    pairs = zip(first.parameters(), second.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert second is not first


def _corrupt_weights(weights: Path, sidecar: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)


def _drop_sidecar(weights: Path, sidecar: Path) -> None:
    sidecar.unlink()


def _old_version(weights: Path, sidecar: Path) -> None:
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "recipe_version": RECIPE_VERSION - 1}))


def _garbage_sidecar(weights: Path, sidecar: Path) -> None:
    sidecar.write_text("{not json")


@pytest.mark.parametrize(
    "damage", [_corrupt_weights, _drop_sidecar, _old_version, _garbage_sidecar]
)
def test_a_bad_cache_entry_is_retrained(cache: Path, fake_fit: list[str], damage):
    task = DigitsLeNet()
    task.model()
    weights, sidecar = task.cache_paths()
    damage(weights, sidecar)
    task.model()
    assert fake_fit == ["digits-lenet", "digits-lenet"]
    assert json.loads(sidecar.read_text())["sha256"] == sha256_file(weights)


def test_tasks_cache_separately(cache: Path, fake_fit: list[str]):
    DigitsLeNet().model()
    DigitsMLP().model()
    assert fake_fit == ["digits-lenet", "digits-mlp"]
    assert len(list(cache.glob("*.safetensors"))) == 2


@pytest.fixture(scope="module")
def trained() -> Iterator[dict[str, float]]:
    """Really train both tasks once into a temporary cache; their test accuracies."""
    with pytest.MonkeyPatch.context() as mp:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            mp.setenv("SLIMKIT_CACHE_DIR", tmp)
            state = torch.random.get_rng_state()
            results = {}
            for task in (DigitsLeNet(), DigitsMLP()):
                results[task.name] = task.evaluate(task.model())["accuracy"]
                results[f"{task.name} reloaded"] = task.evaluate(task.model())["accuracy"]
            results["rng untouched"] = float(torch.equal(state, torch.random.get_rng_state()))
            yield results


@pytest.mark.slow
def test_trained_lenet_reaches_97_percent(trained: dict[str, float]):
    assert trained["digits-lenet"] >= 0.97
    assert trained["digits-lenet reloaded"] == trained["digits-lenet"]
    assert trained["rng untouched"] == 1.0


@pytest.mark.slow
def test_trained_mlp_reaches_96_percent(trained: dict[str, float]):
    assert trained["digits-mlp"] >= 0.96
    assert trained["digits-mlp reloaded"] == trained["digits-mlp"]
