"""The distill stage: teacher -> student training, its checks, early stopping, checkpoints."""

from __future__ import annotations

import copy
import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
import slimkit.distill.stage as distill_mod
from slimkit.context import Context
from slimkit.data import Batch
from slimkit.distill.stage import (
    DistillConfig,
    DistillLoss,
    apply_distill,
    check_shapes,
    distill,
    split,
    training_items,
)
from slimkit.errors import ConfigError, DataError, ModelError
from slimkit.layers.sparse import SparseConv2d, SparseLinear
from slimkit.pipeline import needs_original
from slimkit.recipe import Recipe, shipped_dir
from tests.prune.toys import Net, ToyTask, inputs, net, prune_recipe

FAST: dict[str, Any] = {"epochs": 4, "lr": 0.01, "val_fraction": 0.0}


def stage(**options: Any) -> dict[str, Any]:
    return {"distill": {"method": "kd", "teacher": "task", **FAST, **options}}


def distilled(model: nn.Module, task: ToyTask | None = None, **options: Any) -> nn.Module:
    recipe = {"name": "d", "stages": [stage(**options)]}
    return slimkit.compress(model, recipe, task=task or ToyTask())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kl_to(model: nn.Module, teacher: nn.Module, task: ToyTask, T: float = 4.0) -> float:
    with torch.no_grad():
        return sum(
            float(
                F.kl_div(
                    F.log_softmax(model(x) / T, dim=1),
                    F.log_softmax(teacher(x) / T, dim=1),
                    reduction="batchmean",
                    log_target=True,
                )
            )
            for x, _ in task.batches
        )


def agreement(model: nn.Module, teacher: nn.Module, task: ToyTask) -> float:
    """The fraction of the task's inputs on which the two models' argmax agree."""
    x = torch.cat([b[0] for b in task.batches])
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == teacher(x).argmax(dim=1)).float().mean())


class WideNet(nn.Module):
    """A teacher wider than ``Net``: conv 8 -> 12 channels, fc1 12 -> 24, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


class WideTask(ToyTask):
    def model(self) -> nn.Module:
        torch.manual_seed(7)
        return WideNet().eval()


# -- distillation works ------------------------------------------------------------------
def test_distillation_reduces_student_teacher_kl() -> None:
    task = ToyTask()
    student, teacher = net(seed=1), task.model()
    before = kl_to(student, teacher, task)
    distilled(student, task, alpha=1.0, epochs=8)
    assert kl_to(student, teacher, task) < 0.5 * before
    assert not student.training
    assert all(p.grad is None and p.requires_grad for p in student.parameters())


def test_teacher_original_is_the_model_before_the_earlier_stages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[nn.Module] = []
    resolve = distill_mod.resolve_teacher

    def spy(config: DistillConfig, ctx: Context) -> nn.Module:
        seen.append(resolve(config, ctx))
        return seen[-1]

    monkeypatch.setattr(distill_mod, "resolve_teacher", spy)
    recipe = prune_recipe("magnitude", sparsity=0.9)
    recipe["stages"].append(stage(teacher="original", epochs=1))
    assert needs_original(Recipe.from_dict(recipe))
    assert not needs_original(Recipe.from_dict(prune_recipe("magnitude", sparsity=0.9)))
    model = slimkit.compress(net(), recipe, task=ToyTask())
    (teacher,) = seen
    assert teacher is not model and isinstance(model.fc1, SparseLinear)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    pruned = slimkit.compress(net(), prune_recipe("magnitude", sparsity=0.9))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(teacher(x), net()(x))  # the unpruned model, untouched
        assert not torch.allclose(teacher(x), pruned(x), atol=1e-3)
    assert type(teacher.fc1) is nn.Linear


def test_distill_after_pruning_keeps_the_sparse_form() -> None:
    model = slimkit.compress(net(), prune_recipe("magnitude", sparsity=0.7))
    ref = copy.deepcopy(model)
    distilled(model)
    for name in ("conv", "fc1", "fc2"):
        layer, old = model.get_submodule(name), ref.get_submodule(name)
        assert type(layer) in (SparseLinear, SparseConv2d) and "values" in layer._buffers
        assert torch.equal(layer.mask, old.mask)
        assert not torch.equal(layer.values, old.values)


def test_deterministic_under_seed() -> None:
    runs = [snapshot(distilled(net(seed=1), seed=s, val_fraction=0.3)) for s in (3, 3, 4)]
    assert same(runs[0], runs[1])
    assert not same(runs[0], runs[2])


def test_pseudo_labels_train_without_labels() -> None:
    task = ToyTask(labelled=False)
    with pytest.raises(DataError, match="labelled training data"):
        distilled(net(seed=1), task)
    model = net(seed=1)
    teacher = task.model()
    before = agreement(model, teacher, task)
    distilled(model, task, pseudo_labels=True, alpha=0.5, epochs=6)
    assert agreement(model, teacher, task) > before
    items = training_items(
        net(seed=1), teacher, DistillConfig(pseudo_labels=True), Context(names=[], task=task)
    )
    for (x, y), xb in zip(items, task.calibration_data(), strict=True):
        assert torch.equal(x, xb) and torch.equal(y, teacher(xb).argmax(dim=1))


# -- checks before any work --------------------------------------------------------------
def test_output_shape_mismatch_raises_before_training() -> None:
    model = net(seed=1)
    model.fc2 = nn.Linear(16, 5)
    before = snapshot(model)
    with pytest.raises(ModelError, match=r"student's output shape \(16, 5\).*teacher's \(16, 4\)"):
        distilled(model)
    assert same(snapshot(model), before)


def test_missing_hint_layer_is_named() -> None:
    model = net(seed=1)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"hints\[1\]: the student has no layer 'fc9'"):
        distilled(model, hints=[["fc1", "fc1"], ["fc9", "fc2"]])
    with pytest.raises(ConfigError, match="the teacher has no layer 'nope'"):
        distilled(model, hints=[["fc1", "nope"]])
    with pytest.raises(ConfigError, match=r"hints\[0\].*'fc1' gives \(16, 16\).*'conv'"):
        distilled(model, WideTask(), hints=[["fc1", "conv"]])
    assert same(snapshot(model), before)


def test_teacher_sources_and_their_errors(tmp_path: Path) -> None:
    model = net(seed=1)
    with pytest.raises(ConfigError, match="needs a task"):
        apply_distill(model, DistillConfig(teacher="task"), Context(names=[]))
    with pytest.raises(ConfigError, match="original"):
        apply_distill(model, DistillConfig(), Context(names=[], task=ToyTask()))
    with pytest.raises(ConfigError, match=r"teacher: got '.*missing'.*not an existing path"):
        DistillConfig(teacher=str(tmp_path / "missing"))
    teacher = net(seed=5)
    slimkit.register_constructible(type(teacher))  # so that the artifact rebuilds alone
    slimkit.save(teacher, tmp_path / "t")
    task = ToyTask()
    student = net(seed=1)
    distilled(student, task, teacher=str(tmp_path / "t"), alpha=1.0, epochs=8)
    assert kl_to(student, net(seed=5), task) < kl_to(net(seed=1), net(seed=5), task)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0),
        ("alpha", 1.5),
        ("loss", "logit"),
        ("embedding_kind", "l1"),
        ("hints", [["fc1"]]),
        ("hint_weight", -1.0),
        ("epochs", 0),
        ("lr", 0),
        ("lr_schedule", "step"),
        ("val_fraction", 1.0),
        ("patience", 0),
        ("batch_limit", 0),
        ("seed", -1),
        ("pseudo_labels", "yes"),
    ],
)
def test_bad_options_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"distill\.kd\.{field}"):
        DistillConfig.from_dict({field: value})
    with pytest.raises(ConfigError, match=field):
        Recipe.from_dict({"name": "r", "stages": [{"distill": {"method": "kd", field: value}}]})


def test_checkpoint_must_be_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint"):
        DistillConfig(checkpoint=str(tmp_path))


# -- hints -------------------------------------------------------------------------------
def test_hints_with_projections_train_and_leave_no_extra_modules() -> None:
    task = WideTask()
    model = net(seed=1)
    names = [n for n, _ in model.named_modules()]
    before = snapshot(model)
    plans = check_shapes(
        model,
        task.model(),
        task.batches[0],
        DistillConfig(teacher="task", hints=(("conv", "conv"), ("fc1", "fc1"))),
    )
    assert [(p.projection, p.width_in, p.width_out) for p in plans] == [
        ("conv", 8, 12),
        ("linear", 16, 24),
    ]
    hinted = snapshot(distilled(model, task, hints=[["conv", "conv"], ["fc1", "fc1"]]))
    plain = snapshot(distilled(net(seed=1), task))
    assert not same(hinted, before) and not same(hinted, plain)
    assert [n for n, _ in model.named_modules()] == names
    assert hinted.keys() == before.keys()
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# -- early stopping and checkpoints -------------------------------------------------------
def run_direct(model: nn.Module, task: ToyTask, **options: Any) -> distill_mod.History:
    config = DistillConfig(teacher="task", **options)
    ctx = Context(names=[], task=task)
    teacher = task.model()
    items = training_items(model, teacher, config, ctx)
    return distill(model, teacher, items, config)


def val_loss(model: nn.Module, task: ToyTask, config: DistillConfig) -> float:
    _, val = split(len(task.batches), config.val_fraction, config.seed)
    teacher = task.model()
    with torch.no_grad():
        return sum(
            float(
                distill_mod.objective(
                    model(task.batches[i][0]),
                    teacher(task.batches[i][0]),
                    task.batches[i][1],
                    config,
                )
            )
            for i in val
        ) / len(val)


def test_early_stopping_stops_before_the_epochs_and_keeps_the_best() -> None:
    task = ToyTask()
    options = {"epochs": 40, "lr": 0.05, "val_fraction": 0.3, "patience": 2, "alpha": 0.5}
    model = net(seed=1)
    history = run_direct(model, task, **options)
    assert history.stopped_early and history.epochs_run < 40
    assert history.epochs_run == history.best_epoch + 2
    best = min(history.val)
    assert history.val[history.best_epoch - 1] == best
    assert val_loss(model, task, DistillConfig(teacher="task", **options)) == pytest.approx(
        best, rel=1e-5
    )
    assert not model.training


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck" / "distill.safetensors"
    options = {"lr": 0.005, "val_fraction": 0.3, "patience": 10, "checkpoint": str(ckpt)}

    def pruned_then_distilled(epochs: int, **extra: Any) -> nn.Module:
        recipe = prune_recipe("magnitude", sparsity=0.5)
        recipe["stages"].append(stage(**{**options, "epochs": epochs, **extra}))
        return slimkit.compress(net(seed=1), recipe, task=ToyTask())

    straight = snapshot(pruned_then_distilled(4, checkpoint=None))
    first = snapshot(pruned_then_distilled(2))
    assert ckpt.is_file() and not same(first, straight)
    raw = ckpt.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])  # a safetensors file, not a pickle
    state = json.loads(header["__metadata__"]["state"])
    assert state["epoch"] == 2 and len(state["losses"]) == 2
    messages: list[str] = []
    recipe = prune_recipe("magnitude", sparsity=0.5)
    recipe["stages"].append(stage(**{**options, "epochs": 4}))
    resumed = snapshot(
        slimkit.compress(net(seed=1), recipe, task=ToyTask(), progress=messages.append)
    )
    assert any("resuming" in m and "after epoch 2" in m for m in messages)
    assert sum("distill epoch" in m for m in messages) == 2
    assert same(resumed, straight)


def test_checkpoint_of_another_run_or_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.safetensors"
    distilled(net(seed=1), epochs=1, checkpoint=str(ckpt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = distilled(net(seed=1), epochs=1, lr=0.05, checkpoint=str(ckpt))
    assert any("another run" in str(w.message) for w in caught)
    assert same(snapshot(model), snapshot(distilled(net(seed=1), epochs=1, lr=0.05)))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x80\x04not a checkpoint")
    model = net(seed=1)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="not a distill checkpoint"):
        distilled(model, checkpoint=str(junk))
    assert same(snapshot(model), before) and junk.read_bytes().startswith(b"\x80\x04")


# -- encoders: embedding loss on unlabelled data ------------------------------------------
class Encoder(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, width)
        self.mix = nn.Linear(width, width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return (self.mix(torch.tanh(self.embed(input_ids))),)  # (B, T, H), like a HF tuple


class EncoderTask(ToyTask):
    def __init__(self) -> None:
        super().__init__(labelled=False)
        g = torch.Generator().manual_seed(0)
        self.texts = [
            {
                "input_ids": torch.randint(0, 20, (8, 6), generator=g),
                "attention_mask": (torch.rand(8, 6, generator=g) > 0.2).long(),
            }
            for _ in range(4)
        ]

    def model(self) -> nn.Module:
        torch.manual_seed(11)
        return Encoder().eval()

    def calibration_data(self) -> list[Batch]:
        return list(self.texts)


def test_embedding_distillation_on_unlabelled_inputs() -> None:
    task = EncoderTask()
    torch.manual_seed(12)
    student = Encoder().eval()
    teacher = task.model()
    loss = DistillLoss.EMBEDDING

    def distance() -> float:
        with torch.no_grad():
            return sum(
                float(
                    1
                    - F.cosine_similarity(
                        distill_mod.outputs(student(**b), b, loss),
                        distill_mod.outputs(teacher(**b), b, loss),
                    ).mean()
                )
                for b in task.texts
            )

    before = distance()
    distilled(student, task, loss="embedding", epochs=10, lr=0.02)
    assert distance() < 0.5 * before
    pooled = distill_mod.outputs(teacher(**task.texts[0]), task.texts[0], loss)
    assert pooled.shape == (8, 8)


def test_shipped_recipe() -> None:
    recipe = Recipe.from_file(shipped_dir() / "distill-kd.yaml")
    (config,) = recipe.stages
    assert isinstance(config, DistillConfig)
    assert (config.teacher, config.loss, config.temperature, config.alpha) == (
        "original",
        DistillLoss.LOGITS,
        4.0,
        0.9,
    )
    assert (config.epochs, config.lr, config.lr_schedule.value) == (10, 1e-3, "cosine")
    steps = [*prune_recipe("magnitude", sparsity=0.8)["stages"], *recipe.to_dict()["stages"]]
    model = slimkit.compress(Net().eval(), {"name": "pd", "stages": steps}, task=ToyTask())
    assert isinstance(model.fc1, SparseLinear) and not model.training
