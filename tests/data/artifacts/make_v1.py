"""Generate the format-version-1 artifact fixtures of ``tests/data/artifacts/v1``.

This script was run once, with the slimkit code of that time on ``PYTHONPATH``, to write
artifacts exactly as that code saved them; the tests never run it. Running it again with a
later slimkit would write that later format, which is not what the fixtures are for.

Each fixture directory ``v1/<kind>/`` holds the artifact (``model.safetensors`` and
``slimkit.json``) and ``expected.safetensors``: ``input``, a fixed batch of 8 test digits in
the task's input form, and ``output``, the logits the model loaded back from the artifact
gave on it (computed right after saving, with the same code).

    PYTHONPATH=<checkout of that time>/src python tests/data/artifacts/make_v1.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import slimkit
from slimkit import tasks
from slimkit.tasks.digits import _split

HERE = Path(__file__).resolve().parent
OUT = HERE / "v1"
BATCH = 8

LENET = "digits-lenet"
MLP = "digits-mlp"
RESNET = "digits-resnet"


def _stage(kind: str, **options: Any) -> dict[str, Any]:
    return {kind: options}


def _rtn(bits: int, targets: list[str], **kw: Any) -> dict[str, Any]:
    return _stage("quantize", method="rtn", bits=bits, targets=targets, ignore=[], **kw)


_PRUNE50 = _stage(
    "prune", method="magnitude", sparsity=0.5, scope="layer", kernel="dense", targets=["*"]
)
_KMEANS = _stage("quantize", method="kmeans", bits=4, iters=10, finetune_epochs=0, targets=["*"])
_GROUP8 = {"granularity": "per_group", "group_size": 8, "symmetric": False}
_GROUPED = ["conv2", "fc1", "fc2"]  # input sizes 144, 128, 120: multiples of 8
_PER_CHANNEL = ["conv1", "fc3"]  # input sizes 9 and 84


def _grouped(method: str, **kw: Any) -> list[dict[str, Any]]:
    """Two ``method`` stages: groups of 8 inputs where they divide, per channel elsewhere."""
    return [
        _stage("quantize", method=method, bits=4, **_GROUP8, targets=_GROUPED, **kw),
        _stage("quantize", method=method, bits=4, granularity="per_channel", symmetric=True,
               targets=_PER_CHANNEL, **kw),
    ]  # fmt: skip


#: kind -> (task, recipe stages); an empty list saves the task's fp32 model as it is
FIXTURES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "fp32": (LENET, []),
    "w8-rtn": (LENET, [_rtn(8, ["*"], granularity="per_channel", symmetric=True)]),
    "w4-rtn": (LENET, _grouped("rtn")),
    "rtn-2to7-bits": (
        LENET,
        [
            _rtn(2, ["conv1"], granularity="per_channel", symmetric=True),
            _rtn(3, ["conv2"], **_GROUP8),
            _rtn(5, ["fc1"], granularity="per_channel", symmetric=False),
            _rtn(6, ["fc2"], **_GROUP8),
            _rtn(7, ["fc3"], granularity="per_tensor", symmetric=True),
        ],
    ),
    "gptq": (LENET, _grouped("gptq", damp=0.01, act_order=True)),
    "awq": (LENET, _grouped("awq", n_grid=5, clip=True)),
    "kmeans": (LENET, [_KMEANS]),
    "sparse": (LENET, [_PRUNE50]),
    "sparse-csr": (
        MLP,
        [
            _stage(
                "prune", method="magnitude", sparsity=0.9, scope="layer", kernel="csr",
                targets=["*"],
            )
        ],
    ),
    "nm-2to4": (
        LENET,
        [_stage("prune", method="nm", n=2, m=4, criterion="magnitude", targets=["*"],
                ignore=["conv1"])],
    ),
    "sparse-kmeans": (LENET, [_PRUNE50, _KMEANS]),
    "huffman-kmeans": (
        LENET, [_KMEANS, _stage("encode", method="huffman", targets=["*"])],
    ),
    "huffman-quant": (
        LENET,
        [*_grouped("rtn"), _stage("encode", method="huffman", targets=["*"])],
    ),
    "huffman-sparse": (
        LENET, [_PRUNE50, _stage("encode", method="huffman", positions="gaps", targets=["*"])],
    ),
    "huffman-sparse-kmeans": (
        LENET,
        [
            _PRUNE50,
            _KMEANS,
            _stage("encode", method="huffman", positions="bytes", floats="float16",
                   targets=["*"]),
        ],
    ),
    "w8a8": (
        LENET,
        [_stage("quantize", method="w8a8-dynamic", smoothquant=True, alpha=0.3,
                kernel="reference", targets=["*"])],
    ),
    "w8a8-static": (
        LENET,
        [
            _stage(
                "quantize", method="w8a8-static", bits=8, granularity="per_channel",
                symmetric=True, act_bits=8, act_symmetric=False, observer="minmax",
                targets=["*"],
            )
        ],
    ),
    "qat": (
        LENET,
        [_stage("quantize", method="qat", weight_bits=4, act_bits=4, weights="affine",
                epochs=1, lr=3e-4, batch_limit=3, targets=["*"])],
    ),
    "svd": (LENET, [_stage("factorize", method="svd", ratio=0.5, targets=["fc1", "fc2"])]),
    "tucker": (
        LENET, [_stage("factorize", method="tucker", ratio=0.5, iters=2, targets=["conv2"])],
    ),
    "spatial-svd": (
        LENET, [_stage("factorize", method="spatial-svd", ratio=0.5, targets=["conv2"])],
    ),
    "separable": (
        LENET,
        [_stage("separable", method="depthwise", depth_multiplier=1, min_kernel=3,
                targets=["conv2"])],
    ),
    "structured": (
        LENET,
        [_stage("prune", method="structured", ratio=0.5, criterion="l1", targets=["*"])],
    ),
    "structured-resnet": (
        RESNET,
        [_stage("prune", method="structured", ratio=0.5, criterion="l1", targets=["*"])],
    ),
    "student": (
        LENET,
        [
            _stage(
                "distill", method="kd", teacher="original", student_width=0.5,
                student_init="random", epochs=1, lr=5e-3, val_fraction=0.0, seed=0,
            )
        ],
    ),
    "nas": (
        LENET,
        [
            _stage(
                "nas", method="evolution", max_params_ratio=0.25, population=2, generations=1,
                tournament=2, epochs=1, final_epochs=1, seed=0, workers=1,
            )
        ],
    ),
}  # fmt: skip


def fixed_input(task_name: str) -> torch.Tensor:
    """The first ``BATCH`` test digits in the task's input form (float32)."""
    task = tasks.get(task_name)
    x = _split()[2][:BATCH].clone()  # (8, 1, 8, 8)
    return x.flatten(1).contiguous() if getattr(task, "flatten", False) else x.contiguous()


def make(kind: str, task_name: str, stages: list[dict[str, Any]]) -> int:
    """Write ``v1/<kind>/``; return its size in bytes."""
    task = tasks.get(task_name)
    out = OUT / kind
    if out.exists():
        shutil.rmtree(out)
    model = task.model()
    if stages:
        recipe = {"name": f"fixture-{kind}", "stages": stages}
        model = slimkit.compress(model, recipe, task=task)
    else:
        slimkit.pipeline.set_info(model, source=task.source(), recipe=None)
    slimkit.save(model, out)
    loaded = slimkit.load(out)
    x = fixed_input(task_name)
    with torch.inference_mode():
        y = loaded(x)
    assert torch.isfinite(y).all(), kind
    save_file({"input": x, "output": y.contiguous()}, str(out / "expected.safetensors"))
    return sum(f.stat().st_size for f in out.iterdir())


def main(argv: list[str]) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    kinds = argv or list(FIXTURES)
    total = 0
    for kind in kinds:
        task_name, stages = FIXTURES[kind]
        size = make(kind, task_name, stages)
        total += size
        print(f"{kind:24s} {task_name:14s} {size / 1024:8.1f} KiB", flush=True)
    print(f"total {total / 1024:.1f} KiB  (slimkit {slimkit.__version__} from {slimkit.__file__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
