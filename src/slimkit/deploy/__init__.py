"""Export a compressed model to a runtime's own format, keeping its compressed form.

``export(model, path, format=..., example=...)`` writes a directory:

- ``onnx``: ``model.onnx`` (:mod:`slimkit.deploy.onnx`: integer weights as
  ``DequantizeLinear`` of int8 / int4 constants, grouped 4-bit Linears as onnxruntime's
  ``MatMulNBits``, static activation ranges as ``QuantizeLinear`` / ``DequantizeLinear``,
  codebooks as ``Gather``);
- ``openvino``: ``model.xml`` + ``model.bin``, OpenVINO's reading of that ONNX graph (its
  weight constants stay integers);

and ``export.json`` (the format, opset, input names, the layers and how each was written).
``auto`` measures first (:mod:`slimkit.deploy.choose`): the model exported to every installed
runtime and timed alternately with torch on this machine, the fastest faithful one written,
every measurement recorded under ``chosen`` in ``export.json``.
Text models get dynamic batch and sequence axes, image models a dynamic batch. Every layer is
checked before anything is built; the directory is written beside the target and renamed into
place, so an existing export is never half-overwritten (it is replaced only with
``overwrite``). The runtimes are imported only here, never by ``import slimkit``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.atomic import fsync_file
from slimkit.compressed import CompressedModule
from slimkit.data import Batch
from slimkit.errors import ArtifactError, ConfigError

FORMATS = ("onnx", "openvino")
#: the formats ``export`` takes: a runtime's, or ``auto`` (the fastest faithful one, measured)
CHOICES = (*FORMATS, "auto")
#: the file that marks a directory as an export (and describes it)
META = "export.json"


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str = "onnx",
    example: Batch | None = None,
    *,
    overwrite: bool = False,
    inputs: Batch | None = None,
    runs: int = 5,
) -> Path:
    """Write ``model`` (run on ``example``, one batch of its inputs) as ``format`` into the
    directory ``path``; return it. With ``auto``, each installed runtime is timed on
    ``inputs`` (default ``example``) over ``runs`` warm calls first. ConfigError for an
    unknown format, a missing example, a layer the format cannot express (naming it) or no
    faithful runtime, ArtifactError for a target that is not an earlier export (or is one,
    without ``overwrite``)."""
    from slimkit.deploy import onnx as to_onnx

    if format not in CHOICES:
        raise ConfigError(f"export format {format!r}; allowed: {', '.join(CHOICES)}")
    if example is None:
        raise ConfigError("export needs an example input (one batch the model takes)")
    try:
        to_onnx.check_exportable(model)
    except ValueError as e:
        raise ConfigError(f"export to {format}: {e}") from None
    target = _check_target(Path(path), overwrite)
    if format == "auto":
        return _export_fastest(model, example, example if inputs is None else inputs, target, runs)
    # MatMulNBits and MatMulInteger for onnxruntime; OpenVINO gets DequantizeLinear weights
    data = to_onnx.onnx_bytes(model, example, ort_kernels=format == "onnx")
    meta: dict[str, Any] = {
        "format": format,
        "opset": to_onnx.OPSET,
        "inputs": to_onnx.input_names(example),
        "layers": layer_forms(model),
    }
    with _staged(target) as stage:
        (stage / "model.onnx").write_bytes(data)
        if format == "openvino":
            _to_openvino(stage / "model.onnx", stage / "model.xml")
            (stage / "model.onnx").unlink()
        (stage / META).write_text(json.dumps(meta, indent=2) + "\n")
    return target


def _export_fastest(
    model: nn.Module, example: Batch, inputs: Batch, target: Path, runs: int
) -> Path:
    """Every installed runtime's export timed here; the fastest faithful one moved into
    ``target`` (not exported again), what was measured recorded in its ``export.json``."""
    from slimkit.cpu import device
    from slimkit.deploy.choose import FAITHFUL_COSINE, fastest, installed_runtimes, measure_runtimes

    if not installed_runtimes():
        raise ConfigError(
            "export format 'auto': no runtime is installed (pip install slimkit[deploy])"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.measure-", dir=target.parent))
    try:
        rows = measure_runtimes(model, example, inputs, work, export, runs=runs)
        best = fastest(rows)
        if best is None or best.format is None:
            found = ", ".join(f"{r.runtime} {r.cosine:.5f}" for r in rows if r.format)
            raise ConfigError(
                f"export format 'auto': no runtime keeps the outputs' cosine >= "
                f"{FAITHFUL_COSINE} ({found})"
            )
        made = work / best.runtime
        meta = json.loads((made / META).read_text())
        meta["chosen"] = {
            "runtime": best.runtime,
            "device": device(),
            "rule": f"the fastest export whose outputs keep cosine >= {FAITHFUL_COSINE} to torch's",
            "measured": [r.as_dict() for r in rows],
        }
        with _staged(target) as stage:
            for f in made.iterdir():
                if f.name != META:
                    os.replace(f, stage / f.name)
            (stage / META).write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def layer_forms(model: nn.Module) -> dict[str, str]:
    """How each compressed layer was written: ``{name: describe()}``."""
    return {
        name: m.deployed().describe()  # type: ignore[operator]
        for name, m in model.named_modules()
        if isinstance(m, CompressedModule)
    }


def exported_files(path: str | os.PathLike[str]) -> dict[str, int]:
    """The model files of an export directory and their bytes (``export.json`` left out)."""
    p = Path(path)
    return {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.name != META}


def _to_openvino(onnx_path: Path, xml: Path) -> None:
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)


def _check_target(target: Path, overwrite: bool) -> Path:
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"export target {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not (target / META).is_file():
            raise ArtifactError(f"{target} is not empty and holds no {META}: refused")
        if not overwrite:
            raise ArtifactError(f"{target} already holds an export; pass overwrite to replace it")
    return target


@contextlib.contextmanager
def _staged(target: Path) -> Any:
    """A new directory beside ``target`` to write into; on success its files are fsynced and
    it is renamed to ``target`` (the old one renamed away first and then removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    old: Path | None = None
    try:
        yield stage
        for f in stage.iterdir():
            fsync_file(f)
        fsync_file(stage)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "export")
        os.replace(stage, target)
        fsync_file(target.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
