"""Distillation into a smaller student the task defines: ``Task.student``, the distill
stage's ``student_*`` options, and artifacts that rebuild the student."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit import tasks
from slimkit.compressed import count_params
from slimkit.distill.stage import DistillConfig
from slimkit.errors import ConfigError
from slimkit.recipe import Recipe, resolve
from slimkit.tasks.digits import MLP300100, LeNet5, hidden_widths
from slimkit.tasks.text import even_layers
from tests.prune.toys import ToyTask

FAST: dict[str, Any] = {"epochs": 1, "lr": 3e-3, "val_fraction": 0.0, "batch_limit": 2}


def linear_params(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def lenet_params(c1: int, c2: int, f1: int, f2: int) -> int:
    return (1 * 9 * c1 + c1) + (c1 * 9 * c2 + c2) + linear_params([c2 * 4, f1, f2, 10])


def student_recipe(**options: Any) -> dict[str, Any]:
    stage = {"method": "kd", "teacher": "task", "student_width": 0.5, **FAST, **options}
    return {"name": "half", "stages": [{"distill": stage}]}


# -- Task.student -----------------------------------------------------------------------------
def test_half_width_students_halve_every_hidden_width():
    assert hidden_widths(LeNet5, 0.5) == {"conv1": 8, "conv2": 16, "fc1": 60, "fc2": 42}
    assert hidden_widths(MLP300100, 0.5) == {"fc1": 150, "fc2": 50}
    assert hidden_widths(MLP300100, 0.001) == {"fc1": 1, "fc2": 1}  # at least one unit
    lenet, mlp = tasks.get("digits-lenet"), tasks.get("digits-mlp")
    assert count_params(lenet.model()) == lenet_params(16, 32, 120, 84)
    assert count_params(lenet.student(0.5, init="random")) == lenet_params(8, 16, 60, 42)
    assert count_params(mlp.student(0.5, init="random")) == linear_params([64, 150, 50, 10])
    for task in (lenet, mlp):
        x = task.example_inputs()
        with torch.no_grad():
            assert task.student(0.5).eval()(x).shape == task.model()(x).shape == (1, 10)


def test_default_widths_keep_the_cached_state_dict_shapes():
    state = tasks.get("digits-lenet").model().state_dict()
    fresh = LeNet5().state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in fresh.items()}


def test_random_students_follow_the_seed_and_teacher_init_copies_leading_units():
    task = tasks.get("digits-mlp")
    a, b = task.student(0.5, init="random", seed=1), task.student(0.5, init="random", seed=1)
    c = task.student(0.5, init="random", seed=2)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    teacher, student = task.model(), task.student(0.5, init="teacher")
    assert torch.equal(student.fc2.weight, teacher.fc2.weight[:50, :150])
    assert torch.equal(student.fc3.bias, teacher.fc3.bias)


def test_digits_refuse_depth_and_out_of_range_width_naming_them():
    task = tasks.get("digits-lenet")
    with pytest.raises(ConfigError, match=r"depth 0\.5"):
        task.student(depth=0.5)
    with pytest.raises(ConfigError, match=r"width 1\.5 is out of range"):
        task.student(width=1.5)
    with pytest.raises(ConfigError, match="init 'zeros'"):
        task.student(init="zeros")


def test_a_task_without_students_refuses():
    with pytest.raises(ConfigError, match="task 'toy' defines no student architecture"):
        ToyTask().student(0.5)


# -- the config -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("student_width", 0.0), ("student_width", 1.5), ("student_depth", -0.5)],
)
def test_student_ranges_are_checked_naming_the_field(field: str, value: float):
    with pytest.raises(ConfigError, match=rf"distill\.kd\.{field}: got {value}"):
        DistillConfig(**{field: value})


def test_student_options_default_the_unset_multiplier_to_one():
    config = DistillConfig(student_depth=0.5, seed=3)
    assert config.has_student and not DistillConfig().has_student
    assert config.student_options() == {"width": 1.0, "depth": 0.5, "init": "teacher", "seed": 3}


def test_a_student_needs_a_task():
    model = tasks.get("digits-lenet").model()
    with pytest.raises(ConfigError, match="student_width: a student is built by the task"):
        slimkit.compress(model, student_recipe(teacher="original"), data=[torch.zeros(2, 1, 8, 8)])


# -- the stage and the artifact -------------------------------------------------------------
def test_half_width_recipe_trains_and_round_trips(tmp_path: Path):
    task = tasks.get("digits-lenet")
    before = task.student(0.5, init="random")
    out = slimkit.compress(task.model(), student_recipe(student_init="random"), task=task)
    assert isinstance(out, LeNet5) and out.fc1.out_features == 60
    assert not torch.equal(out.fc1.weight, before.fc1.weight)  # it trained
    assert not any(p.grad is not None for p in out.parameters())
    path = slimkit.save(out, tmp_path / "half")
    source = json.loads((path / "slimkit.json").read_text())["source"]
    assert source == {
        "task": "digits-lenet",
        "student": {"width": 0.5, "depth": 1.0, "init": "random", "seed": 0},
    }
    loaded = slimkit.load(path)
    x = task.latency_inputs(32)
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))
    again = slimkit.save(loaded, tmp_path / "again")  # a loaded student saves as one
    assert json.loads((again / "slimkit.json").read_text())["source"] == source
    assert tasks.from_source(source).name == "digits-lenet"


def test_hard_labels_only_is_alpha_zero_of_the_same_stage():
    task = tasks.get("digits-mlp")
    soft = slimkit.compress(task.model(), student_recipe(student_init="random"), task=task)
    hard = slimkit.compress(
        task.model(), student_recipe(student_init="random", alpha=0.0), task=task
    )
    assert soft.fc1.weight.shape == hard.fc1.weight.shape == (150, 64)
    assert not torch.equal(soft.fc1.weight, hard.fc1.weight)


def test_shipped_half_width_recipe_has_a_student():
    (stage,) = Recipe.from_file(resolve("distill-half")).stages
    assert isinstance(stage, DistillConfig)
    assert stage.student_options()["width"] == 0.5 and stage.temperature == 4.0
    (text_stage,) = Recipe.from_file(resolve("distill-minilm-3l")).stages
    assert isinstance(text_stage, DistillConfig)
    assert text_stage.student_options()["depth"] == 0.5 and text_stage.loss.value == "embedding"


# -- text students (a tiny 6-layer BERT) ----------------------------------------------------
def test_even_layers():
    assert even_layers(6, 0.5) == [0, 2, 4]
    assert even_layers(6, 1.0) == list(range(6))
    assert even_layers(6, 0.34) == [0, 3]
    assert even_layers(6, 0.01) == [0]
    assert even_layers(12, 0.25) == [0, 4, 8]


def _same_block(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_text_student_keeps_every_other_teacher_layer(tiny6: Any):
    teacher = tiny6.model()
    student = tiny6.student(depth=0.5)
    assert len(student.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    for j, i in enumerate([0, 2, 4]):
        assert _same_block(student.encoder.layer[j], teacher.encoder.layer[i])
    assert torch.equal(
        student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight
    )
    random = tiny6.student(depth=0.5, init="random")
    assert random.state_dict().keys() == student.state_dict().keys()
    with pytest.raises(ConfigError, match=r"width 0\.5 is not supported"):
        tiny6.student(width=0.5)


def test_text_student_distils_and_round_trips(tiny6: Any, tmp_path: Path):
    stage = {
        "method": "kd",
        "teacher": "task",
        "loss": "embedding",
        "student_depth": 0.5,
        **FAST,
    }
    out = slimkit.compress(
        tiny6.model(), {"name": "3l", "stages": [{"distill": stage}]}, task=tiny6
    )
    assert len(out.encoder.layer) == 3
    path = slimkit.save(out, tmp_path / "bert3")
    loaded = slimkit.load(path)
    x = tiny6.latency_inputs(4)
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, out(**x).last_hidden_state)
