"""Peer toolkits' quantization of a Hugging Face encoder, one small function per setting.

Each function takes a fresh fp32 model and a list of calibration batches (dicts of keyword
arguments) and returns the quantized model, called like the original and returning an object
with ``.last_hidden_state``. Each imports its toolkit inside, so a missing package fails only
that setting. ``PEERS`` maps a short name to ``(description, function)``; ``size_on_disk``
gives the bytes of what the peer itself saves. Used by ``quant_minilm.py``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

THREADS = 2
QUANTO_CALIB_EXAMPLES = 16  # activation ranges: int8 matmuls run while calibrating
ONNX_OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")

Calibration = list[dict[str, torch.Tensor]]
PeerFn = Callable[[nn.Module, Calibration], nn.Module]


# -- torch.ao ----------------------------------------------------------------------------
def torch_ao_per_tensor(model: nn.Module, calib: Calibration) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def torch_ao_per_channel(model: nn.Module, calib: Calibration) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


# -- onnxruntime -------------------------------------------------------------------------
@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor


class _LastHidden(nn.Module):
    """The HF encoder returning only ``last_hidden_state`` (one ONNX output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


class OrtEncoder(nn.Module):
    """An onnxruntime session behind the HF call signature; ``path`` is the .onnx file."""

    def __init__(self, path: Path, workdir: tempfile.TemporaryDirectory[str]) -> None:
        import onnxruntime as ort

        super().__init__()
        self.path = path
        self._workdir = workdir  # the file lives as long as this module
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def forward(self, **inputs: torch.Tensor) -> EncoderOutput:
        feed = {k: inputs[k].numpy() for k in self.inputs}
        (hidden,) = self.session.run(["last_hidden_state"], feed)
        return EncoderOutput(torch.from_numpy(hidden))


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    """TorchScript-based export, opset 17, dynamic batch and sequence axes."""
    axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, "last_hidden_state")}
    with torch.no_grad():
        torch.onnx.export(
            _LastHidden(model),
            tuple(example[k] for k in INPUT_NAMES),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


def onnxruntime_qint8(model: nn.Module, calib: Calibration) -> nn.Module:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    workdir = tempfile.TemporaryDirectory(prefix="ort-")
    fp32, int8 = Path(workdir.name) / "model.onnx", Path(workdir.name) / "model.int8.onnx"
    export_onnx(model, calib[0], fp32)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    fp32.unlink()
    return OrtEncoder(int8, workdir)


# -- torchao -----------------------------------------------------------------------------
def torchao_int8_dynamic(model: nn.Module, calib: Calibration) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def torchao_int8_weight_only(model: nn.Module, calib: Calibration) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


# -- hqq ---------------------------------------------------------------------------------
def _hqq(model: nn.Module, nbits: int, group_size: int = 64) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = HQQLinear(
            linear, quant_config=config, compute_dtype=torch.float32, device="cpu"
        )
        setattr(parent, child, quantized)
    return model


def hqq_4bit(model: nn.Module, calib: Calibration) -> nn.Module:
    return _hqq(model, 4)


def hqq_3bit(model: nn.Module, calib: Calibration) -> nn.Module:
    return _hqq(model, 3)


# -- optimum-quanto ----------------------------------------------------------------------
def quanto_w8(model: nn.Module, calib: Calibration) -> nn.Module:
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8)
    freeze(model)
    return model


def quanto_w8a8(model: nn.Module, calib: Calibration) -> nn.Module:
    from optimum.quanto import Calibration as QuantoCalibration
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8, activations=qint8)
    batch = {k: v[:QUANTO_CALIB_EXAMPLES] for k, v in calib[0].items()}
    with torch.inference_mode(), QuantoCalibration():
        model(**batch)
    freeze(model)
    return model


PEERS: dict[str, tuple[str, PeerFn]] = {
    "torch-ao-per-tensor": ("torch.ao quantize_dynamic int8 per-tensor", torch_ao_per_tensor),
    "torch-ao-per-channel": ("torch.ao quantize_dynamic int8 per-channel", torch_ao_per_channel),
    "onnxruntime": ("onnxruntime quantize_dynamic QInt8", onnxruntime_qint8),
    "torchao-int8-dynamic": ("torchao Int8DynamicActivationInt8WeightConfig", torchao_int8_dynamic),
    "torchao-int8-weight-only": ("torchao Int8WeightOnlyConfig", torchao_int8_weight_only),
    "hqq-4bit": ("hqq 4-bit g64 (HQQLinear)", hqq_4bit),
    "hqq-3bit": ("hqq 3-bit g64 (HQQLinear)", hqq_3bit),
    "quanto-w8": ("optimum-quanto qint8 weights", quanto_w8),
    "quanto-w8a8": ("optimum-quanto qint8 weights + activations", quanto_w8a8),
}

LINEAR_ONLY = "Linear layers only, embeddings stay fp32"
DEQUANT = "dequantizes on the fly for the fp32 matmul"
NOTES = {
    "torch-ao-per-tensor": f"fbgemm int8 dynamic linear; {LINEAR_ONLY}",
    "torch-ao-per-channel": f"fbgemm int8 dynamic linear; {LINEAR_ONLY}",
    "onnxruntime": "int8 MatMulInteger; quantization time includes the ONNX export",
    "torchao-int8-dynamic": f"int8 GEMM through torch._int_mm; {LINEAR_ONLY}",
    "torchao-int8-weight-only": f"{DEQUANT}; {LINEAR_ONLY}",
    "hqq-4bit": f"unpacks and {DEQUANT}; {LINEAR_ONLY}",
    "hqq-3bit": f"unpacks and {DEQUANT}; {LINEAR_ONLY}",
    "quanto-w8": f"{DEQUANT}; {LINEAR_ONLY}",
    "quanto-w8a8": (
        f"int8 GEMM through torch._int_mm; activation ranges from {QUANTO_CALIB_EXAMPLES} "
        f"calibration paragraphs; {LINEAR_ONLY}"
    ),
}


def size_on_disk(model: nn.Module) -> int:
    """Bytes of what the peer saves: the .onnx file, else torch.save of the state dict."""
    path = getattr(model, "path", None)
    if isinstance(path, Path):
        return path.stat().st_size
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        file = Path(tmp) / "state_dict.pt"
        torch.save(model.state_dict(), file)
        return file.stat().st_size


def describe(name: str) -> dict[str, Any]:
    """Description and note of a peer setting by name."""
    return {"method": PEERS[name][0], "note": NOTES.get(name, "")}
