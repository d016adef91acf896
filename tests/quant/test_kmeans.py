"""K-means weight sharing: Lloyd's algorithm, codebook layers, artifacts, codebook fine-tuning."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.compressed import count_params, module_class
from slimkit.data import Batch
from slimkit.errors import ConfigError, DataError
from slimkit.formats import packing
from slimkit.formats.codebook import cluster_sse, kmeans_1d, storage_bytes
from slimkit.layers.codebook import KMeansConv2d, KMeansLinear
from slimkit.quant.kmeans import KMeansConfig, finetune_codebooks
from slimkit.recipe import Recipe, shipped_dir
from slimkit.tasks.base import Task
from slimkit.train.optim import Adam


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def kmeans_recipe(**options: Any) -> dict[str, Any]:
    return {"name": "k", "stages": [{"quantize": {"method": "kmeans", **options}}]}


class Net(nn.Module):
    """A conv layer and two linear layers: (B, 2, 6, 6) -> (B, 3) logits."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 3 * 3, width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, 6, 6)
        h = F.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)  # (B, 36)
        return self.fc2(torch.relu(self.fc1(h)))  # (B, 3)


class ToyTask(Task):
    """Labelled random images for ``Net``: the labels come from a fixed random teacher."""

    name = "toy"
    description = "random images labelled by a random Net"
    primary_metric = "accuracy"
    modality = "image"
    default_batch = 8

    def __init__(self, labelled: bool = True) -> None:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(96, 2, 6, 6, generator=g)  # (96, 2, 6, 6)
        torch.manual_seed(5)
        with torch.no_grad():
            y = Net()(x).argmax(1)  # (96,)
        self.batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
        self.labelled = labelled

    def model(self) -> nn.Module:
        return Net().eval()

    def calibration_data(self) -> list[Batch]:
        return [x for x, _ in self.batches]

    def train_data(self) -> list[tuple[Batch, torch.Tensor]] | None:
        return self.batches if self.labelled else None

    def example_inputs(self) -> Batch:
        return self.batches[0][0][:1]

    def latency_inputs(self, batch: int | None = None) -> Batch:
        return self.batches[0][0]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"accuracy": 0.0}

    def robustness(self, model: nn.Module) -> dict[str, float]:
        return {}


def train_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- kmeans_1d ----------------------------------------------------------------------------
def test_kmeans_1d_recovers_clear_clusters() -> None:
    centers = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0])
    truth = torch.arange(5).repeat_interleave(torch.tensor([40, 7, 100, 13, 2]))  # (162,)
    values = centers[truth] + 0.05 * torch.rand(truth.numel()) - 0.025
    perm = torch.randperm(values.numel())
    values, truth = values[perm], truth[perm]
    centroids, idx = kmeans_1d(values, 5)
    assert centroids.dtype == torch.float32 and centroids.shape == (5,)
    assert idx.dtype == torch.int64 and idx.shape == values.shape
    assert torch.equal(idx, truth)
    means = torch.stack([values[truth == j].double().mean() for j in range(5)]).float()
    assert torch.allclose(centroids, means, atol=1e-6)


def test_kmeans_1d_exact_when_values_take_k_levels() -> None:
    levels = torch.tensor([-0.7, -0.01, 0.003, 0.25, 1.5])
    values = levels[torch.randint(0, 5, (500,))]
    centroids, idx = kmeans_1d(values, 5)
    assert torch.equal(centroids[idx], values)  # bit-exact reconstruction
    assert cluster_sse(values, centroids, idx) == 0.0


def test_kmeans_1d_empty_clusters_and_more_clusters_than_values() -> None:
    values = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 10.0])  # linear init leaves middle empty
    centroids, idx = kmeans_1d(values, 16)
    assert bool(torch.isfinite(centroids).all())
    assert bool((centroids.diff() >= 0).all())  # still ordered
    assert torch.equal(centroids[idx], values)
    assert int(idx.max()) < 16
    c1, i1 = kmeans_1d(torch.tensor([2.5]), 4)  # k > N, constant input
    assert torch.equal(c1[i1], torch.tensor([2.5]))


def test_kmeans_1d_sse_never_increases_and_beats_the_linear_grid() -> None:
    values = torch.randn(1500) ** 3  # heavy tails: linear init is far from optimal
    sse = [cluster_sse(values, *kmeans_1d(values, 8, iters=t)) for t in range(20)]
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(sse))
    assert sse[-1] < 0.5 * sse[0]
    # the linear grid (iters=0) errs by at most half a step on each value
    step = float(values.max() - values.min()) / 7
    assert sse[0] <= values.numel() * (step / 2) ** 2


def test_kmeans_1d_converged_is_a_fixed_point() -> None:
    values = torch.randn(2000)
    centroids, idx = kmeans_1d(values, 6, iters=500)
    nearest = (values[:, None] - centroids[None, :]).abs().argmin(1)  # (N,)
    assert torch.equal(centroids[idx], centroids[nearest])  # every value at a nearest centroid
    for j in range(6):
        members = values[idx == j].double()
        assert float((members.mean() - centroids[j]).abs()) <= 1e-6
    again = kmeans_1d(values, 6, iters=500)
    assert torch.equal(again[0], centroids) and torch.equal(again[1], idx)  # deterministic


def test_kmeans_1d_density_init_also_converges() -> None:
    values = torch.randn(1000)
    lin = cluster_sse(values, *kmeans_1d(values, 4, iters=0))
    dens = cluster_sse(values, *kmeans_1d(values, 4, iters=100, init="density"))
    assert dens < lin


@pytest.mark.parametrize(
    ("values", "k", "kwargs", "match"),
    [
        (torch.zeros(0), 4, {}, "non-empty"),
        (torch.tensor([1.0, float("nan")]), 4, {}, "NaN"),
        (torch.arange(4), 4, {}, "float"),
        (torch.ones(3), 0, {}, "k: got 0"),
        (torch.ones(3), 2, {"iters": -1}, "iters"),
        (torch.ones(3), 2, {"init": "random"}, "init: got 'random'"),
    ],
)
def test_kmeans_1d_rejects_bad_input(
    values: torch.Tensor, k: int, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans_1d(values, k, **kwargs)


# -- layers --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_linear_shares_at_most_2_pow_bits_values(bits: int) -> None:
    m = nn.Linear(40, 30)
    q = KMeansLinear.from_float(m, bits=bits)
    w = q.dense_weight()
    assert w.shape == m.weight.shape and w.dtype == torch.float32
    assert torch.unique(w).numel() <= 2**bits
    assert q.codebook.shape == (2**bits,) and q.codebook.dtype == torch.float32
    # error within the linear grid's half step on every weight's cluster (SSE bound)
    w0 = m.weight.detach()
    step = float(w0.max() - w0.min()) / (2**bits - 1)
    err = float(((w - w0) ** 2).sum())
    assert err <= m.weight.numel() * (step / 2) ** 2
    x = torch.randn(5, 40)
    assert torch.equal(q(x), F.linear(x, w, m.bias))
    assert torch.equal(q.bias, m.bias) and not q.bias.requires_grad


@pytest.mark.parametrize("bits", [2, 3, 4, 7])
def test_indices_are_packed_and_round_trip(bits: int) -> None:
    m = nn.Linear(13, 11)  # 143 weights: a partial last byte for every width but 8
    centroids, idx = kmeans_1d(m.weight.detach().reshape(-1), 2**bits)
    q = KMeansLinear.from_float(m, bits=bits)
    n = m.weight.numel()
    assert q.indices.dtype == torch.uint8 and q.indices.shape == (packing.packed_bytes(n, bits),)
    assert torch.equal(packing.unpack(q.indices, bits, n).long(), idx)
    assert torch.equal(q.index_tensor(), idx)
    assert torch.equal(q.codebook, centroids)
    assert set(q.state_dict()) == {"codebook", "indices", "bias"}


def test_index_cache_follows_the_buffer() -> None:
    a, b = KMeansLinear.from_float(nn.Linear(8, 5)), KMeansLinear.from_float(nn.Linear(8, 5))
    before = a.dense_weight().clone()  # fills a's cache
    a.load_state_dict(b.state_dict())  # in-place copy into a's buffers
    assert not torch.equal(a.dense_weight(), before)
    assert torch.equal(a.dense_weight(), b.dense_weight())
    c = copy.deepcopy(a)
    assert torch.equal(c.dense_weight(), a.dense_weight())


CONVS = [
    pytest.param(dict(in_channels=3, out_channels=5, kernel_size=3), id="plain"),
    pytest.param(
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
        id="groups2-stride2-pad1",
    ),
    pytest.param(
        dict(in_channels=2, out_channels=4, kernel_size=(1, 3), padding=(0, 2), dilation=2),
        id="rect-dilated",
    ),
    pytest.param(dict(in_channels=2, out_channels=2, kernel_size=2, bias=False), id="no-bias"),
]


@pytest.mark.parametrize("conv_args", CONVS)
def test_conv_runs_the_shared_weight(conv_args: dict[str, Any]) -> None:
    m = nn.Conv2d(**conv_args)
    q = KMeansConv2d.from_float(m, bits=3)
    w = q.dense_weight()
    assert w.shape == m.weight.shape
    assert torch.unique(w).numel() <= 8
    x = torch.randn(2, m.in_channels, 7, 7)
    expected = F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
    assert torch.equal(q(x), expected)
    fresh = module_class("KMeansConv2d").from_spec(q.spec())  # type: ignore[union-attr]
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


def test_linear_spec_describe_and_params() -> None:
    m = nn.Linear(10, 4, bias=False)
    q = KMeansLinear.from_float(m, bits=4)
    assert q.spec() == {"in_features": 10, "out_features": 4, "bias": False, "bits": 4}
    fresh = module_class("KMeansLinear").from_spec(q.spec())  # type: ignore[union-attr]
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 10)
    assert torch.equal(fresh(x), q(x))
    assert q.n_params() == count_params(q) == 40
    assert q.simulated is False
    assert q.describe() == (
        "4-bit k-means codebook (16 shared values), indices packed, "
        "weights gathered for the fp32 kernel"
    )


def test_storage_bytes_counts_codebook_and_packed_indices() -> None:
    assert storage_bytes(1000, 4) == 16 * 4 + 500
    assert storage_bytes(9, 3) == 8 * 4 + 4
    with pytest.raises(ValueError, match="bits"):
        storage_bytes(10, 9)


# -- pipeline, config, artifacts --------------------------------------------------------------
def test_compress_swaps_every_linear_and_conv() -> None:
    model = Net().eval()
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        y = model(x)
    slimkit.compress(model, kmeans_recipe(bits=6))
    assert type(model.conv) is KMeansConv2d
    assert type(model.fc1) is KMeansLinear and type(model.fc2) is KMeansLinear
    with torch.no_grad():
        yq = model(x)
    assert float((yq - y).abs().max()) <= 0.05 * float(y.abs().max())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_save_load_bit_exact_and_small(bits: int, tmp_path: Path) -> None:
    model = Net(width=256).eval()
    layers = [model.conv.weight.numel(), model.fc1.weight.numel(), model.fc2.weight.numel()]
    float_bytes = 4 * sum(layers)  # 40,224 bytes of fp32 weights
    bias_bytes = 4 * (4 + 256 + 3)
    slimkit.compress(model, kmeans_recipe(bits=bits))
    x = torch.randn(3, 2, 6, 6)
    with torch.no_grad():
        y = model(x)
    slimkit.save(model, tmp_path / "k")
    torch.manual_seed(99)
    loaded = slimkit.load(tmp_path / "k", model=Net(width=256))
    assert type(loaded.fc1) is KMeansLinear and type(loaded.conv) is KMeansConv2d
    assert torch.equal(loaded.fc1.codebook, model.fc1.codebook)
    assert torch.equal(loaded.fc1.indices, model.fc1.indices)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    size = (tmp_path / "k" / "model.safetensors").stat().st_size
    codebooks = 3 * 4 * 2**bits
    header = 1024  # safetensors JSON header, generous
    assert size <= sum(storage_bytes(n, bits) for n in layers) + bias_bytes + header
    assert size <= bits / 32 * float_bytes + codebooks + bias_bytes + header  # ~bits/32


def test_shared_module_converted_once_and_stays_shared() -> None:
    model = Net().eval()
    model.alias = model.fc2  # the same layer under a second name
    x = torch.randn(2, 2, 6, 6)
    slimkit.compress(model, kmeans_recipe(bits=3))
    assert model.alias is model.fc2 and type(model.fc2) is KMeansLinear
    with torch.no_grad():
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"iters": 0}, "iters"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_config_rejects_out_of_range(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"quantize\.kmeans\.{field}: got"):
        KMeansConfig(**options)
    model = Net().eval()
    before = state(model)
    with pytest.raises(ConfigError, match=field):
        slimkit.compress(model, kmeans_recipe(**options))
    assert type(model.fc1) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_conv_padding_mode_refused_before_any_work() -> None:
    model = Net().eval()
    model.conv.padding_mode = "reflect"
    with pytest.raises(ConfigError, match=r"layer 'conv' cannot be quantized by kmeans"):
        slimkit.compress(model, kmeans_recipe())
    assert type(model.fc1) is nn.Linear and type(model.conv) is nn.Conv2d


def test_shipped_recipe_parses() -> None:
    r = Recipe.from_file(shipped_dir() / "kmeans-4bit.yaml")
    assert r.name == "kmeans-4bit"
    (stage,) = r.stages
    assert isinstance(stage, KMeansConfig)
    assert stage.bits == 4 and stage.targets == ("*",) and stage.finetune_epochs > 0


# -- codebook fine-tuning ---------------------------------------------------------------------
def test_finetune_lowers_loss_and_changes_only_codebooks() -> None:
    task = ToyTask()
    model = task.model()
    model.fc2 = nn.Linear(16, 3)  # an unselected float layer must stay as it is
    slimkit.compress(model, kmeans_recipe(bits=2, targets=["conv", "fc1"]))
    before, loss0 = state(model), train_loss(model, task.batches)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    layers = [model.conv, model.fc1]
    losses = finetune_codebooks(model, layers, task.batches, epochs=5, lr=1e-2)
    assert len(losses) == 5
    assert train_loss(model, task.batches) < 0.9 * loss0
    after = state(model)
    assert set(after) == set(before)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"conv.codebook", "fc1.codebook"}
    for layer in layers:
        assert "codebook" in layer._buffers and "codebook" not in layer._parameters
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_compress_with_finetuning_uses_the_task() -> None:
    task = ToyTask()
    model = task.model()
    plain = slimkit.compress(copy.deepcopy(model), kmeans_recipe(bits=2), task=task)
    tuned = slimkit.compress(model, kmeans_recipe(bits=2, finetune_epochs=5, lr=1e-2), task=task)
    for name in ("conv", "fc1", "fc2"):
        a, b = plain.get_submodule(name), tuned.get_submodule(name)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.bias, b.bias)
        assert not torch.equal(a.codebook, b.codebook)
        assert "codebook" in b._buffers
    assert train_loss(tuned, task.batches) < train_loss(plain, task.batches)
    assert not tuned.training
    assert all(p.grad is None for p in tuned.parameters())


def test_finetune_skips_a_layer_the_loss_does_not_use() -> None:
    task = ToyTask()
    model = task.model()
    model.spare = nn.Linear(4, 4)  # never called by forward
    slimkit.compress(model, kmeans_recipe(bits=2))
    spare, fc2 = model.spare.codebook.clone(), model.fc2.codebook.clone()
    layers = [model.conv, model.fc1, model.fc2, model.spare]
    finetune_codebooks(model, layers, task.batches, epochs=1, lr=1e-2)  # type: ignore[list-item]
    assert torch.equal(model.spare.codebook, spare)
    assert not torch.equal(model.fc2.codebook, fc2)


def test_adam_first_step_moves_by_lr_and_minimises_a_quadratic() -> None:
    x = torch.tensor([3.0, -2.0, 0.5])
    opt = Adam([x], lr=0.1)
    opt.step([torch.tensor([4.0, -0.001, 0.0])])
    # the first step is lr * sign(g) (bias-corrected moments); a zero gradient moves nothing
    assert torch.allclose(x, torch.tensor([2.9, -1.9, 0.5]), atol=1e-5)
    opt.step([None])
    assert torch.allclose(x, torch.tensor([2.9, -1.9, 0.5]), atol=1e-5)
    target = torch.tensor([1.0, 2.0, -1.0])
    for _ in range(400):
        opt.step([2 * (x - target)])
    assert float((x - target).abs().max()) <= 0.05


@pytest.mark.parametrize("task", [None, ToyTask(labelled=False)], ids=["no-task", "unlabelled"])
def test_finetuning_without_training_data_refused_before_any_work(task: Task | None) -> None:
    model = Net().eval()
    before = state(model)
    with pytest.raises(DataError, match=r"finetune_epochs=2\) needs labelled training data"):
        slimkit.compress(model, kmeans_recipe(finetune_epochs=2), task=task)
    assert type(model.fc1) is nn.Linear and type(model.conv) is nn.Conv2d
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_finetuning_labels_that_do_not_fit_refused_before_any_work() -> None:
    task = ToyTask()
    task.batches = [(x, y[:-1]) for x, y in task.batches]
    model = Net().eval()
    with pytest.raises(DataError, match=r"do not fit labels of shape \(31,\)"):
        slimkit.compress(model, kmeans_recipe(finetune_epochs=1), task=task)
    assert type(model.fc1) is nn.Linear


# -- the real task ----------------------------------------------------------------------------
@pytest.mark.slow
def test_digits_mlp_kmeans_4bit_drops_at_most_half_a_point() -> None:
    from slimkit.tasks import get

    task = get("digits-mlp")
    base = task.evaluate(task.model())["accuracy"]
    q = slimkit.compress(task.model(), shipped_dir() / "kmeans-4bit.yaml", task=task)
    assert all(not isinstance(m, nn.Linear) for m in q.modules())
    assert task.evaluate(q)["accuracy"] >= base - 0.005
