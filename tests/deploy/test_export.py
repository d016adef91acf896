"""Export to ONNX / OpenVINO: every shipped recipe that applies to a CNN exports, the runtime's
outputs match the torch artifact's, weights stay integers, bad input fails before writing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

import slimkit
from slimkit.cpu import has_int8_dot
from slimkit.errors import ArtifactError, ConfigError
from slimkit.recipe import resolve, shipped_dir
from tests.deploy.toys import ToyImageTask

#: shipped recipes that do not apply to a CNN, and why
NOT_FOR_A_CNN = {
    "heads-ffn": "prunes attention heads of a transformer",
    "distill-minilm-3l": "a text encoder's shallower student",
    "nas-quarter": "searches the task's own search space",
    "svd-50": "targets a transformer's intermediate layers",
    "svd-50-distill": "targets a transformer's intermediate layers",
}
#: training lengths capped so that each recipe runs in about a second on the toy
SHORT = {"epochs": 1, "finetune_epochs": 1, "steps": 2}
RECIPES = sorted(p.stem for p in shipped_dir().glob("*.yaml") if p.stem not in NOT_FOR_A_CNN)


@pytest.fixture(scope="module")
def toy() -> ToyImageTask:
    return ToyImageTask()


def compressed(toy: ToyImageTask, recipe: str, tmp: Path) -> nn.Module:
    """The toy model compressed by the shipped ``recipe`` (its training shortened), saved
    and loaded back."""
    spec = yaml.safe_load(resolve(recipe).read_text())
    for stage in spec["stages"]:
        for options in stage.values():
            options.update({k: v for k, v in SHORT.items() if k in options})
    model = slimkit.compress(toy.model(), spec, task=toy)
    slimkit.save(model, tmp / recipe)
    return slimkit.load(tmp / recipe, model=toy.model())


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x.numpy()})[0])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_exports_and_matches_the_artifact(
    recipe: str, toy: ToyImageTask, tmp_path: Path
) -> None:
    model = compressed(toy, recipe, tmp_path)
    x = toy.x[:8]
    with torch.inference_mode():
        want = model(x).numpy()
    out = slimkit.export(model, tmp_path / "onnx", "onnx", toy.example_inputs())
    got = run_onnx(out, x)  # another batch size than the example: the batch axis is dynamic
    assert got.shape == want.shape
    assert cosine(got, want) >= 0.9999, recipe
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "onnx" and meta["inputs"] == ["input"]


def _weight_inputs(path: Path) -> dict[str, int]:
    """data type of each initializer that feeds a DequantizeLinear as its codes."""
    graph = onnx.load(str(path / "model.onnx")).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    dq = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    return {name: inits[name] for name in dq if name in inits}


def test_integer_weights_stay_integers_and_4_bits_take_half_a_byte(
    toy: ToyImageTask, tmp_path: Path
) -> None:
    fp32 = slimkit.export(toy.model(), tmp_path / "fp32", "onnx", toy.example_inputs())
    w8 = slimkit.export(compressed(toy, "w8-rtn", tmp_path), tmp_path / "w8", "onnx", toy.x[:2])
    w4 = slimkit.export(compressed(toy, "w4-rtn", tmp_path), tmp_path / "w4", "onnx", toy.x[:2])
    assert set(_weight_inputs(w8).values()) == {onnx.TensorProto.INT8}
    # w4's convolutions as int4 DequantizeLinear, its grouped Linears as MatMulNBits
    assert len(_weight_inputs(w8)) == 4 and len(_weight_inputs(w4)) == 2
    assert set(_weight_inputs(w4).values()) == {onnx.TensorProto.INT4}
    ops = [n.op_type for n in onnx.load(str(w4 / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2
    size = {p: (p / "model.onnx").stat().st_size for p in (fp32, w8, w4)}
    # measured: 0.36x and 0.31x (the toy's float biases, scales and the graph weigh in)
    assert size[w4] < size[w8] < 0.40 * size[fp32] and size[w4] < 0.34 * size[fp32]


def test_static_activations_become_quantize_dequantize_pairs(
    toy: ToyImageTask, tmp_path: Path
) -> None:
    out = slimkit.export(
        compressed(toy, "w8a8-static", tmp_path), tmp_path / "o", "onnx", toy.x[:2]
    )
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("QuantizeLinear") == 4  # one per layer input
    assert ops.count("DequantizeLinear") == 8  # the inputs and the weights


def test_an_export_runs_in_a_process_without_slimkit(toy: ToyImageTask, tmp_path: Path) -> None:
    model = compressed(toy, "w4-gptq", tmp_path)
    out = slimkit.export(model, tmp_path / "o", "onnx", toy.example_inputs())
    x = toy.x[:4]
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys; sys.modules['slimkit'] = None\n"  # any import of slimkit fails
        "import numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(out / 'model.onnx')!r})\n"
        f"y = s.run(None, {{'input': np.load({str(tmp_path / 'x.npy')!r})}})[0]\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with torch.inference_mode():
        want = model(x).numpy()
    assert cosine(np.load(tmp_path / "y.npy"), want) >= 0.9999


@pytest.mark.parametrize("recipe", ["w8a8-static", "w8a8", "w4-awq"])
def test_openvino_reads_the_export(recipe: str, toy: ToyImageTask, tmp_path: Path) -> None:
    """Regression (w8a8, w4-awq): an input scale folded into the weight after its
    DequantizeLinear crashed OpenVINO's CPU plugin on MiniLM; it now goes on the input."""
    ov = pytest.importorskip("openvino")
    model = compressed(toy, recipe, tmp_path)
    out = slimkit.export(model, tmp_path / "ov", "openvino", toy.example_inputs())
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.bin", "model.xml"]
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU")
    x = toy.x[:8]
    got = np.asarray(compiled(x.numpy())[0])
    with torch.inference_mode():
        want = model(x).numpy()
    # without VNNI, oneDNN's u8 x s8 kernels halve int8 weights to 7 bits (so that pairwise
    # sums cannot saturate): measured 0.99910 for w8a8-static on an AVX2-only CPU
    floor = 0.9999 if recipe != "w8a8-static" or has_int8_dot() else 0.998
    assert cosine(got, want) >= floor


def test_bad_input_fails_before_anything_is_written(toy: ToyImageTask, tmp_path: Path) -> None:
    model = toy.model()
    with pytest.raises(ConfigError, match="export format 'tflite'; allowed: onnx, openvino"):
        slimkit.export(model, tmp_path / "a", "tflite", toy.example_inputs())
    with pytest.raises(ConfigError, match="example input"):
        slimkit.export(model, tmp_path / "a", "onnx")
    qat = slimkit.compress(
        toy.model(),
        {"name": "q", "stages": [{"quantize": {"method": "qat", "epochs": 1}}]},
        task=toy,
    )
    for m in qat.modules():  # a layer that only simulates its compression
        if hasattr(m, "simulated"):
            type(m).simulated = True
            with pytest.raises(ConfigError, match=r"layer '\w+' \(\w+\) only simulates"):
                slimkit.export(qat, tmp_path / "a", "onnx", toy.example_inputs())
            type(m).simulated = False
            break
    assert not (tmp_path / "a").exists()


def test_an_export_is_replaced_only_when_asked(toy: ToyImageTask, tmp_path: Path) -> None:
    model = toy.model()
    target = slimkit.export(model, tmp_path / "o", "onnx", toy.example_inputs())
    first = (target / "model.onnx").read_bytes()
    with pytest.raises(ArtifactError, match="already holds an export"):
        slimkit.export(model, target, "onnx", toy.example_inputs())
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"holds no export\.json"):
        slimkit.export(model, other, "onnx", toy.example_inputs())
    assert (other / "notes.txt").read_text() == "mine"
    slimkit.export(model, target, "onnx", toy.x[:3], overwrite=True)
    assert (target / "model.onnx").read_bytes() != b"" and first != b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "other"]  # no leftovers
