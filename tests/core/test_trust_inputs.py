"""Bad inputs are refused before any work, or warned about; calibration never changes the
model it measures."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import slimkit
from slimkit import cli, pipeline
from slimkit.errors import ConfigError, DataError, ModelError
from slimkit.recipe import Recipe
from slimkit.tasks.base import Task


# -- models --------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Two conv + BatchNorm stages, pooled, then a Linear head (like digits-resnet)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


def conv_bn() -> ConvBN:
    torch.manual_seed(0)
    model = ConvBN()
    for bn in (model.bn1, model.bn2):  # running statistics a training run left behind
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(7)
    return model


def images(n: int = 4, batch: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 1, 8, 8, generator=gen) for _ in range(n)]


def one_stage(kind: str, **options: Any) -> dict[str, Any]:
    return {"name": "r", "stages": [{kind: options}]}


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: t.clone() for name, t in model.named_buffers() if name.startswith(("bn1.", "bn2."))
    }


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


class LabelledTask(Task):
    """Labelled batches of ``images`` for the training stages."""

    name = "labelled"
    description = "test task"
    primary_metric = "accuracy"
    modality = "image"
    default_batch = 4

    def model(self) -> nn.Module:
        return conv_bn()

    def calibration_data(self) -> list[Any]:
        return images()

    def train_data(self) -> list[Any]:
        return [(x, torch.arange(4) % 4) for x in images(2)]

    def example_inputs(self) -> torch.Tensor:
        return images(1)[0]

    def latency_inputs(self, batch: int | None = None) -> torch.Tensor:
        return images(1)[0]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"accuracy": 0.0}

    def robustness(self, model: nn.Module) -> dict[str, float]:
        return {}


# -- 1. calibration never changes the model it measures -------------------------------------
CALIBRATING = [
    ("quantize", {"method": "rtn", "bits": 8}),
    ("quantize", {"method": "gptq", "bits": 4}),
    ("quantize", {"method": "awq", "bits": 4}),
    ("quantize", {"method": "w8a8-dynamic"}),
    ("quantize", {"method": "w8a8-static"}),
    ("prune", {"method": "sparsegpt", "sparsity": 0.5}),
    ("prune", {"method": "unstructured", "criterion": "wanda", "sparsity": 0.5}),
    ("prune", {"method": "nm", "criterion": "wanda", "targets": ["conv2"]}),
]


@pytest.mark.parametrize(("kind", "options"), CALIBRATING, ids=lambda v: str(v))
def test_calibration_keeps_batchnorm_and_modes(kind: str, options: dict[str, Any]) -> None:
    model = conv_bn().train()
    model.drop.eval()  # a mixed state: every flag must come back as it was
    before, flags = bn_buffers(model), modes(model)
    out = slimkit.compress(model, one_stage(kind, **options), data=images())
    after = bn_buffers(out)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), kind
    assert {n: t for n, t in modes(out).items() if n in flags} == flags
    assert out.training and not out.drop.training


@pytest.mark.parametrize(
    "stage",
    [
        {"quantize": {"method": "qat", "weight_bits": 8, "act_bits": None, "epochs": 1}},
        {"finetune": {"epochs": 1}},
    ],
    ids=["qat", "finetune"],
)
def test_training_stages_leave_the_callers_mode(stage: dict[str, Any]) -> None:
    model = conv_bn().train()
    flags = modes(model)
    weight = model.fc.weight.detach().clone()
    out = slimkit.compress(model, {"name": "t", "stages": [stage]}, task=LabelledTask())
    assert {n: t for n, t in modes(out).items() if n in flags} == flags
    assert all(m.training for m in out.modules())  # layers swapped in follow their parent
    fc = out.get_submodule("fc")
    assert not torch.equal(fc.dense_weight() if hasattr(fc, "dense_weight") else fc.weight, weight)


def test_eval_mode_model_comes_back_in_eval_mode() -> None:
    model = conv_bn().eval()
    out = slimkit.compress(model, one_stage("quantize", method="gptq", bits=4), data=images())
    assert not any(m.training for m in out.modules())


# -- 2. too little calibration data for a Hessian method -------------------------------------
class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def wide() -> Wide:
    torch.manual_seed(0)
    return Wide().eval()


@pytest.mark.parametrize(
    ("kind", "options", "method"),
    [
        ("quantize", {"method": "gptq", "bits": 4}, "GPTQ"),
        ("prune", {"method": "sparsegpt"}, "SparseGPT"),
        ("quantize", {"method": "mixed", "quantizer": "gptq", "candidates": [4, 8]}, "GPTQ"),
    ],
    ids=["gptq", "sparsegpt", "mixed"],
)
def test_too_few_calibration_rows_warns(kind: str, options: dict[str, Any], method: str) -> None:
    with pytest.warns(UserWarning) as record:
        slimkit.compress(wide(), one_stage(kind, **options), data=[torch.randn(1, 64)])
    messages = [str(w.message) for w in record]
    assert messages == [
        f"layer 'fc1': 1 calibration rows for 64 input columns; {method} needs at least 64, "
        "give more calibration data",
        f"layer 'fc2': 1 calibration rows for 16 input columns; {method} needs at least 16, "
        "give more calibration data",
    ]


def test_enough_rows_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimkit.compress(wide(), one_stage("quantize", method="gptq"), data=[torch.randn(64, 64)])


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("quantize", {"method": "gptq", "bits": 4, "strict": True}),
        ("prune", {"method": "sparsegpt", "strict": True}),
        ("quantize", {"method": "mixed", "candidates": [4, 8], "strict": True}),
    ],
    ids=["gptq", "sparsegpt", "mixed"],
)
def test_too_few_rows_strict_is_an_error_before_work(kind: str, options: dict[str, Any]) -> None:
    model = wide()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match="layer 'fc1': 1 calibration rows for 64 input columns"):
        slimkit.compress(model, one_stage(kind, **options), data=[torch.randn(1, 64)])
    assert all(type(m) in (Wide, nn.Linear) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_conv_rows_are_unfolded_patches() -> None:
    def warned(model: nn.Module, x: torch.Tensor) -> list[str]:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            slimkit.compress(model, one_stage("quantize", method="gptq"), data=[x])
        return [str(w.message) for w in record if "layer '0'" in str(w.message)]

    torch.manual_seed(0)
    # a 3x3 input gives one 3x3 patch per image: 2 rows for 36 columns
    small = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)).eval()
    assert warned(small, torch.randn(2, 4, 3, 3)) == [
        "layer '0': 2 calibration rows for 36 input columns; GPTQ needs at least 36, "
        "give more calibration data"
    ]
    # an 8x8 input gives 36 patches per image: enough rows for the conv
    large = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(144, 2)).eval()
    assert warned(large, torch.randn(1, 4, 8, 8)) == []


# -- 3. tied weights stay tied ----------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.mid(self.embed(ids))))


def tied() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM().eval()


def token_batches() -> list[torch.Tensor]:
    return [
        torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(i)) for i in (0, 1)
    ]


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("quantize", {"method": "rtn", "bits": 8}),
        ("quantize", {"method": "gptq", "bits": 8}),
        ("prune", {"method": "magnitude", "sparsity": 0.5}),
    ],
    ids=["rtn", "gptq", "magnitude"],
)
def test_tied_layers_stay_float_and_tied(kind: str, options: dict[str, Any]) -> None:
    model = tied()
    with pytest.warns(UserWarning) as record:
        out = slimkit.compress(model, one_stage(kind, **options), data=token_batches())
    method = f"{kind}.{options['method']}"
    expected = [
        f"layer 'lm_head' shares its weight with 'embed'; {method} leaves it uncompressed "
        "(float, tied)"
    ]
    if kind == "quantize":  # the Embedding is selected too
        expected.insert(
            0,
            f"layer 'embed' shares its weight with 'lm_head'; {method} leaves it uncompressed "
            "(float, tied)",
        )
    assert [str(w.message) for w in record] == expected
    assert type(out.lm_head) is nn.Linear and type(out.embed) is nn.Embedding
    assert out.lm_head.weight is out.embed.weight
    assert type(out.mid) is not nn.Linear  # the untied layer was compressed


def test_tie_survives_save_and_load(tmp_path: Path) -> None:
    model = tied()
    with pytest.warns(UserWarning, match="shares its weight"):
        out = slimkit.compress(model, "w8-rtn", data=token_batches())
    expected = out(token_batches()[0])
    slimkit.save(out, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys & {"embed.weight", "lm_head.weight"}) == 1  # stored once
    loaded = slimkit.load(tmp_path / "a", model=tied())
    assert loaded.lm_head.weight is loaded.embed.weight
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    assert torch.equal(loaded(token_batches()[0]), expected)


def test_shared_module_is_not_a_tie() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.ReLU(), layer).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = slimkit.compress(model, "w8-rtn")
    assert out[0] is out[2] and type(out[0]) is not nn.Linear


# -- 4. half-precision models are refused before any work ------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("recipe", ["w4-gptq", "w8-rtn"])
def test_half_precision_model_refused(dtype: torch.dtype, recipe: str) -> None:
    model = wide().to(dtype)
    before = model.fc1.weight.clone()
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ModelError) as info:
        slimkit.compress(model, recipe, data=[torch.randn(64, 64).to(dtype)])
    assert str(info.value) == (
        f"model parameter 'fc1.weight' is {name}; slimkit compresses float32 models: "
        "call model.float() first"
    )
    assert type(model.fc1) is nn.Linear and torch.equal(model.fc1.weight, before)


# -- 5. data that does not fit the model ----------------------------------------------------
class Image(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_unbatched_tensors_are_a_data_error_before_work() -> None:
    torch.manual_seed(0)
    model = Image().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(1, 8, 8) for _ in range(4)]
    with pytest.raises(DataError) as info:
        slimkit.compress(model, "w4-gptq", data=data)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data[0] of shape (1, 8, 8): the model fails on it: RuntimeError: ")
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.training and all(m.training for m in model.modules())


def test_batches_of_mixed_forms_are_a_data_error() -> None:
    torch.manual_seed(0)
    data = [torch.randn(2, 1, 8, 8), torch.randn(1, 8, 8)]
    with pytest.raises(DataError, match=r"data\[1\] of shape \(1, 8, 8\)"):
        slimkit.compress(Image().eval(), "w8-rtn", data=data)


def test_fitting_data_passes_the_check() -> None:
    torch.manual_seed(0)
    out = slimkit.compress(Image().eval(), "w8-rtn", data=[torch.randn(2, 1, 8, 8)])
    assert type(out.fc) is not nn.Linear


# -- 6. every checkable option is checked before any work ------------------------------------
def test_precheck_accepts_a_group_size_that_does_not_divide() -> None:
    # fc2's 16 inputs are one short group of 64: ragged groups are stored, not refused
    recipe = Recipe.from_dict(
        one_stage("quantize", method="gptq", bits=4, granularity="per_group", group_size=64)
    )
    pipeline.precheck(wide(), recipe)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ({"prune": {"method": "nm", "n": 2, "m": 3}}, "m=3 does not divide"),
        ({"prune": {"method": "sparsegpt", "n": 2, "m": 3}}, "m=3 does not divide"),
    ],
    ids=["nm", "sparsegpt"],
)
def test_precheck_checks_each_stage(stage: dict[str, Any], expected: str) -> None:
    first = {"quantize": {"bits": 8, "targets": ["fc1"]}}
    recipe = Recipe.from_dict({"name": "r", "stages": [first, stage]})
    with pytest.raises(ConfigError, match=expected) as info:
        pipeline.precheck(wide(), recipe)
    assert str(info.value).startswith("recipe 'r' stages[1].")
    assert "fc2 (16)" in str(info.value) and "fc1" not in str(info.value)


def test_precheck_checks_an_explicit_svd_rank() -> None:
    recipe = Recipe.from_dict(one_stage("factorize", method="svd", rank=4, targets=["fc*"]))
    pipeline.precheck(wide(), recipe)  # rank 4 fits fc1 (64 -> 16) and fc2 (16 -> 4)
    recipe = Recipe.from_dict(one_stage("factorize", method="svd", rank=8, targets=["fc*"]))
    with pytest.raises(ConfigError, match=r"got 8; layer 'fc2' \(16 -> 4\) allows at most rank 4"):
        pipeline.precheck(wide(), recipe)


def test_precheck_checks_heads_ffn_without_attention() -> None:
    recipe = Recipe.from_dict(one_stage("prune", method="heads-ffn", criterion="magnitude"))
    with pytest.raises(ModelError, match="no BERT-like attention layer"):
        pipeline.precheck(wide(), recipe)


def test_precheck_skips_layers_an_earlier_stage_replaces() -> None:
    # prune replaces fc2 first; the m check of the later stage does not see it as float
    later = {"prune": {"method": "nm", "n": 2, "m": 32, "targets": ["*"]}}
    with pytest.raises(ConfigError, match=r"m=32 does not divide .*fc2 \(16\)"):
        pipeline.precheck(wide(), Recipe.from_dict({"name": "r", "stages": [later]}))
    recipe = Recipe.from_dict({"name": "r", "stages": [{"prune": {"targets": ["fc2"]}}, later]})
    pipeline.precheck(wide(), recipe)


def test_cli_refuses_a_recipe_before_the_baseline(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def baseline(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the baseline was evaluated before the recipe was checked")

    monkeypatch.setattr(cli, "_baseline", baseline)
    out = str(tmp_path / "o")
    code = cli.main(["compress", "--task", "digits-lenet", "--recipe", "2to4-wanda", "--out", out])
    text = capsys.readouterr().err
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, text
    assert "m=4 does not divide" in lines[0] and "conv1 (9)" in lines[0]
    assert not (tmp_path / "o").exists()
