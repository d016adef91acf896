"""Export a compressed model to a runtime's own format, keeping its compressed form.

``export(model, path, format=..., example=...)`` writes a directory:

- ``onnx``: ``model.onnx`` (:mod:`slimkit.deploy.onnx`: integer weights as
  ``DequantizeLinear`` of int8 / int4 constants, static activation ranges as
  ``QuantizeLinear`` / ``DequantizeLinear``, codebooks as ``Gather``);
- ``openvino``: ``model.xml`` + ``model.bin``, OpenVINO's reading of that ONNX graph (its
  weight constants stay integers);

and ``export.json`` (the format, opset, input names, the layers and how each was written).
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
#: the file that marks a directory as an export (and describes it)
META = "export.json"


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str = "onnx",
    example: Batch | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (run on ``example``, one batch of its inputs) as ``format`` into the
    directory ``path``; return it. ConfigError for an unknown format, a missing example or a
    layer the format cannot express (naming it), ArtifactError for a target that is not an
    earlier export (or is one, without ``overwrite``)."""
    from slimkit.deploy import onnx as to_onnx

    if format not in FORMATS:
        raise ConfigError(f"export format {format!r}; allowed: {', '.join(FORMATS)}")
    if example is None:
        raise ConfigError("export needs an example input (one batch the model takes)")
    try:
        to_onnx.check_exportable(model)
    except ValueError as e:
        raise ConfigError(f"export to {format}: {e}") from None
    target = _check_target(Path(path), overwrite)
    data = to_onnx.onnx_bytes(model, example)
    meta = {
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
