"""The pipeline: checks before work, contexts, data handling, recorded info."""

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit import model_info, pipeline, registry
from slimkit.config import StageConfig
from slimkit.context import Context
from slimkit.data import as_batches, call, check_batch, first_tensor
from slimkit.errors import ConfigError, DataError, SelectionError
from slimkit.layers.quantized import QuantLinear
from slimkit.layers.sparse import SparseLinear
from slimkit.tasks.base import Task


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def state(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[list[type], dict[str, torch.Tensor]]) -> None:
    types, tensors = state(model)
    assert types == before[0]
    assert tensors.keys() == before[1].keys()
    assert all(torch.equal(tensors[k], before[1][k]) for k in tensors)


def two_stages(first: list[str], second: list[str]) -> dict[str, Any]:
    return {
        "name": "two",
        "stages": [
            {"quantize": {"targets": first}},
            {"prune": {"targets": second}},
        ],
    }


# -- checks before work --------------------------------------------------------------------
def test_unmatched_target_raises_before_any_change(net: Net) -> None:
    before = state(net)
    rec = {"name": "r", "stages": [{"quantize": {"targets": ["fc1", "decoder.*"]}}]}
    with pytest.raises(SelectionError) as info:
        slimkit.compress(net, rec)
    msg = str(info.value)
    assert "'decoder.*'" in msg
    assert "stages[0]" in msg and "'r'" in msg
    assert_unchanged(net, before)


def test_unmatched_second_stage_target_raises_before_first_stage(net: Net) -> None:
    before = state(net)
    with pytest.raises(SelectionError) as info:
        slimkit.compress(net, two_stages(["fc1"], ["fc3"]))
    assert "'fc3'" in str(info.value)
    assert "stages[1]" in str(info.value)
    assert_unchanged(net, before)


def test_target_of_wrong_type_raises_before_change(net: Net) -> None:
    before = state(net)
    rec = {"name": "r", "stages": [{"quantize": {"targets": ["norm"]}}]}
    with pytest.raises(SelectionError, match=r"stages\[0\]\.quantize: target 'norm' matches no"):
        slimkit.compress(net, rec)
    assert_unchanged(net, before)


@pytest.mark.parametrize(
    "second",
    [["norm"], ["*"]],
    ids=["later-target-wrong-type", "later-target-swapped-by-earlier-stage"],
)
def test_later_stage_type_mismatch_raises_before_first_stage(net: Net, second: list[str]) -> None:
    before = state(net)
    rec = {
        "name": "r",
        "stages": [{"prune": {"targets": ["*"]}}, {"quantize": {"targets": second}}],
    }
    with pytest.raises(SelectionError):
        slimkit.compress(net, rec)
    assert_unchanged(net, before)


def test_bad_data_raises_before_any_change(net: Net) -> None:
    before = state(net)
    with pytest.raises(DataError, match="empty"):
        slimkit.compress(net, {"stages": [{"quantize": {}}]}, data=[])
    with pytest.raises(DataError, match=r"data\[1\]"):
        slimkit.compress(net, {"stages": [{"quantize": {}}]}, data=[torch.ones(1, 4), "x"])
    assert_unchanged(net, before)


def test_bad_recipe_raises_before_any_change(net: Net) -> None:
    before = state(net)
    with pytest.raises(ConfigError, match="did you mean 'quantize'"):
        slimkit.compress(net, {"stages": [{"quantise": {}}]})
    assert_unchanged(net, before)


def test_two_stages_with_disjoint_targets(net: Net) -> None:
    out = slimkit.compress(net, two_stages(["fc1"], ["fc2"]))
    assert out is net
    assert type(net.fc1) is QuantLinear and type(net.fc2) is SparseLinear
    assert type(net.norm) is nn.LayerNorm


# -- Context -------------------------------------------------------------------------------
class FakeTask(Task):
    name = "fake"
    description = "a task for tests"
    primary_metric = "score"
    modality = "image"
    default_batch = 2

    def __init__(self) -> None:
        self.calls = 0

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return Net().eval()

    def calibration_data(self) -> list[Any]:
        self.calls += 1
        return [torch.ones(2, 4)]

    def example_inputs(self) -> torch.Tensor:
        return torch.ones(1, 4)

    def latency_inputs(self, batch: int | None = None) -> torch.Tensor:
        return torch.ones(batch or self.default_batch, 4)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"score": 1.0}

    def robustness(self, model: nn.Module) -> dict[str, float]:
        return {}


def test_need_data_without_data_or_task() -> None:
    with pytest.raises(DataError, match="gptq needs calibration data: pass data= or a task"):
        Context(names=[]).need_data("gptq")


def test_need_data_empty_list() -> None:
    with pytest.raises(DataError, match="calibration data"):
        Context(names=[], data=[]).need_data("x")


def test_need_data_from_data_and_from_task() -> None:
    batch = torch.zeros(1, 4)
    assert Context(names=[], data=[batch]).need_data("x") == [batch]
    task = FakeTask()
    ctx = Context(names=[], task=task)
    got = ctx.need_data("x")
    assert torch.equal(got[0], torch.ones(2, 4))
    ctx.need_data("x")
    assert task.calls == 1  # fetched once, then kept
    assert ctx.data is got


def test_report_calls_progress() -> None:
    seen: list[str] = []
    Context(names=[], progress=seen.append).report("hello")
    Context(names=[]).report("nobody listens")
    assert seen == ["hello"]


# -- data ----------------------------------------------------------------------------------
def test_as_batches_empty() -> None:
    with pytest.raises(DataError, match="empty"):
        as_batches([])
    with pytest.raises(DataError, match=r"^calib: is empty"):
        as_batches(iter([]), where="calib")


def test_as_batches_bad_type_names_index() -> None:
    with pytest.raises(DataError) as info:
        as_batches([torch.ones(2), (torch.ones(2), torch.ones(2)), [torch.ones(2)]])
    assert "data[2]" in str(info.value)
    assert "got list" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [(), (torch.ones(1), 3), {"x": 1}, None, 3.0, "text"],
    ids=["empty-tuple", "tuple-with-int", "dict-with-int", "none", "float", "str"],
)
def test_check_batch_refuses(bad: Any) -> None:
    with pytest.raises(DataError, match=r"^here: expected a Tensor"):
        check_batch(bad, "here")


def test_as_batches_accepts_the_three_forms() -> None:
    t = torch.ones(2, 4)
    assert as_batches(None) is None
    (single,) = as_batches(t)  # type: ignore[misc]
    assert single is t
    (d,) = as_batches({"x": t})  # type: ignore[misc]
    assert d == {"x": t}
    batches = as_batches([t, (t, t), {"x": t}])
    assert batches is not None and len(batches) == 3
    assert as_batches(b for b in [t, t]) == [t, t]


def test_call_and_first_tensor() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> Any:
            return (a if b is None else a + b, "extra")

    m, t = Two(), torch.ones(2)
    assert torch.equal(first_tensor(call(m, t)), t)
    assert torch.equal(first_tensor(call(m, (t, t))), 2 * t)
    assert torch.equal(first_tensor(call(m, {"a": t, "b": t})), 2 * t)
    assert torch.equal(first_tensor({"last_hidden_state": t, "pooled": 2 * t}), t)
    assert torch.equal(first_tensor([t, 2 * t]), t)
    with pytest.raises(TypeError, match="str"):
        first_tensor("nothing")


def test_first_tensor_of_logits_only_mapping() -> None:
    t = torch.ones(2)
    assert torch.equal(first_tensor({"logits": t}), t)


# -- running stages ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScaleConfig(StageConfig):
    kind = "finetune"
    method = "scale-for-tests"

    factor: float = 2.0


@pytest.fixture
def scale_stage(monkeypatch: pytest.MonkeyPatch) -> list[Context]:
    """Registers ScaleConfig (in registry copies that the test restores)."""
    for attr in ("_HANDLERS", "_CONFIGS", "_TYPES"):
        monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
    seen: list[Context] = []

    @slimkit.register(ScaleConfig, types=(nn.Linear,))
    def apply_scale(model: nn.Module, config: ScaleConfig, ctx: Context) -> nn.Module:
        seen.append(ctx)
        data = ctx.need_data("scale")
        assert data
        assert not torch.is_grad_enabled()
        for name in ctx.names:
            model.get_submodule(name).weight.mul_(config.factor)
        return model

    return seen


def test_custom_stage_runs_with_context(net: Net, scale_stage: list[Context]) -> None:
    ref = copy.deepcopy(net)
    rec = {"name": "s", "stages": [{"finetune": {"method": "scale-for-tests", "factor": 3}}]}
    msgs: list[str] = []
    batch = torch.ones(1, 4)
    slimkit.compress(net, rec, data=[batch], progress=msgs.append)
    (ctx,) = scale_stage
    assert ctx.names == ["fc1", "fc2"]
    assert ctx.data == [batch]
    assert torch.equal(net.fc1.weight, ref.fc1.weight * 3)
    assert torch.equal(net.norm.weight, ref.norm.weight)
    assert msgs == ["stage 1/1: finetune scale-for-tests"]
    assert "finetune" in registry.available_kinds()
    assert "scale-for-tests" in registry.methods("finetune")


def test_custom_stage_registration_is_undone() -> None:
    assert "scale-for-tests" not in registry.methods("finetune")
    assert "supervised" in registry.methods("finetune")
    assert "rtn" in registry.methods("quantize")


def test_custom_stage_gets_task_data(net: Net, scale_stage: list[Context]) -> None:
    task = FakeTask()
    rec = {"stages": [{"finetune": {"method": "scale-for-tests", "targets": ["fc2"]}}]}
    slimkit.compress(net, rec, task=task)
    assert task.calls == 1
    assert scale_stage[0].names == ["fc2"]
    assert model_info.info(net)["source"] == {"task": "fake"}


def test_custom_stage_without_data_is_data_error(net: Net, scale_stage: list[Context]) -> None:
    rec = {"stages": [{"finetune": {"method": "scale-for-tests"}}]}
    with pytest.raises(DataError, match="scale needs calibration data"):
        slimkit.compress(net, rec)


def test_run_returns_timings(net: Net) -> None:
    rec = slimkit.Recipe.from_dict(two_stages(["fc1"], ["fc2"]))
    run = pipeline.run(net, rec)
    model, timings = run.model, run.timings
    assert model is net
    assert [(t.kind, t.method) for t in timings] == [("quantize", "rtn"), ("prune", "magnitude")]
    assert all(t.seconds >= 0 for t in timings)


def test_handler_for_unregistered_config() -> None:
    @dataclasses.dataclass(frozen=True)
    class Orphan(StageConfig):
        kind = "encode"
        method = "orphan"

    with pytest.raises(KeyError, match="no handler registered for Orphan"):
        registry.handler_for(Orphan())


def test_register_refuses_unknown_kind() -> None:
    @dataclasses.dataclass(frozen=True)
    class Weird(StageConfig):
        kind = "weird"
        method = "x"

    with pytest.raises(ValueError, match="'weird' is not one of"):
        slimkit.register(Weird)


# -- recorded info -------------------------------------------------------------------------
def test_compress_records_recipe_and_save_writes_it(net: Net, tmp_path: Path) -> None:
    assert model_info.info(net) == {}
    rec = two_stages(["fc1"], ["fc2"])
    slimkit.compress(net, rec)
    expected = slimkit.Recipe.from_dict(rec).to_dict()
    assert model_info.info(net)["recipe"] == expected
    assert "source" not in model_info.info(net)  # no task: nothing recorded
    slimkit.save(net, tmp_path / "a")
    m = json.loads((tmp_path / "a" / "slimkit.json").read_text())
    assert m["recipe"] == expected
    assert m["source"] == {"caller": "Net"}  # not registered as constructible


def test_compress_with_task_records_source(net: Net, tmp_path: Path) -> None:
    slimkit.compress(net, {"stages": [{"quantize": {}}]}, task=FakeTask())
    slimkit.save(net, tmp_path / "a")
    m = json.loads((tmp_path / "a" / "slimkit.json").read_text())
    assert m["source"] == {"task": "fake"}


def test_set_info_merges_and_skips_none(net: Net) -> None:
    model_info.set_info(net, recipe={"name": "a"}, source=None)
    model_info.set_info(net, source={"task": "t"})
    assert model_info.info(net) == {"recipe": {"name": "a"}, "source": {"task": "t"}}
    assert "_slimkit_info" not in dict(net.named_children())
