"""Loading an artifact: the format version and every file's sha256 are verified, the model
is rebuilt from its recorded source, the recorded module swaps are replayed and the tensors
filled from safetensors. Nothing is ever unpickled."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn

from slimkit import registry
from slimkit.compressed import (
    is_standard,
    module_class,
    run_after_replay,
    standard_from_spec,
    standard_spec,
)
from slimkit.errors import ArtifactError
from slimkit.io.atomic import sha256_file
from slimkit.io.layout import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS
from slimkit.io.save import _check_kwargs, _is_slimkit_module
from slimkit.pipeline import set_info
from slimkit.select import set_module

_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


# -- loading ---------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified manifest of the artifact at ``path`` (format, version, checksums)."""
    p = _artifact_dir(Path(path))
    try:
        manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p / MANIFEST}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{p / MANIFEST}: not a slimkit manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{p / MANIFEST}: format version {version!r} is newer than this slimkit reads "
            f"({FORMAT_VERSION}); upgrade slimkit"
        )
    _check_structure(p / MANIFEST, manifest)
    _verify_files(p, manifest)
    return manifest


def _check_structure(where: Path, manifest: dict[str, Any]) -> None:
    """ArtifactError naming the manifest when a field has the wrong shape."""
    source, files, modules = manifest.get("source"), manifest.get("files"), manifest.get("modules")
    if not isinstance(source, dict):
        raise ArtifactError(f"{where}: 'source' is missing or not a mapping")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise ArtifactError(f"{where}: 'files' must map file names to {{sha256, bytes}}")
    if not isinstance(modules, list):
        raise ArtifactError(f"{where}: 'modules' is missing or not a list")
    for i, entry in enumerate(modules):
        ok = isinstance(entry, dict) and isinstance(entry.get("name"), str)
        ok = ok and (
            "same_as" in entry or ("type" in entry and isinstance(entry.get("spec"), dict))
        )
        if not ok:
            raise ArtifactError(f"{where}: modules[{i}] needs 'name' and 'type' + 'spec'")


def _artifact_dir(p: Path) -> Path:
    if p.is_file():
        if _looks_pickled(p):
            raise ArtifactError(
                f"refused to load {p}: it is a pickle/torch.save file, and slimkit never "
                f"unpickles; an artifact is a directory with {MANIFEST} and {WEIGHTS}"
            )
        raise ArtifactError(f"{p} is a file; an artifact is a directory with {MANIFEST}")
    if not p.is_dir():
        raise ArtifactError(f"artifact not found: {p}")
    if not (p / MANIFEST).is_file():
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
        hint = f" (pickle files such as {pickles[0]} are never loaded)" if pickles else ""
        raise ArtifactError(f"{p} is not a slimkit artifact: {MANIFEST} is missing{hint}")
    return p


def _looks_pickled(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head[:2] == b"PK" or p.suffix in _PICKLE_SUFFIXES


def _verify_files(p: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    if WEIGHTS not in files:
        raise ArtifactError(f"{p / MANIFEST}: lists no {WEIGHTS}")
    for name, meta in files.items():
        f = p / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing from the artifact")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise ArtifactError(
                f"{f}: {size} bytes, the manifest says {meta.get('bytes')} (truncated or replaced)"
            )
        if sha256_file(f) != meta.get("sha256"):
            raise ArtifactError(f"{f}: checksum mismatch (the file is corrupt or was modified)")
    try:
        with safe_open(str(p / WEIGHTS), framework="pt") as st:
            st.keys()
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{p / WEIGHTS}: not a readable safetensors file: {e}") from None


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved at ``path``: every saved tensor reloads bit for bit, and so do
    the outputs, except that a sparse Linear on kernel ``auto`` may pick another kernel on
    this machine (its outputs then agree to float rounding; ``kernel: dense`` keeps them
    bit for bit).

    ``model``: a fresh instance of the original architecture, needed only when the artifact
    does not record a rebuildable source (a built-in task, a HF directory, or a class that
    constructs without arguments).
    """
    p = Path(path)
    manifest = read_manifest(p)
    base = model if model is not None else _rebuild_base(manifest["source"], p)
    _replay(base, manifest.get("modules", []), p)
    try:
        missing, unexpected = load_model(base, str(p / WEIGHTS), strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ArtifactError(f"{p / WEIGHTS}: does not fit the model: {_first_line(e)}") from None
    if missing or unexpected:
        raise ArtifactError(
            f"{p / WEIGHTS}: does not fit the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    source = manifest["source"]
    student = source.get("student") if "task" in source else None
    set_info(base, source=source, recipe=manifest.get("recipe"), artifact=str(p), student=student)
    return base.eval()


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])


def _rebuild_base(source: dict[str, Any], p: Path) -> nn.Module:
    if "task" in source:
        from slimkit import tasks

        return tasks.model_from_source(source)  # the task's model, or its recorded student
    if "hf" in source:
        cls = _import(source["class"], p)
        return cls.from_pretrained(source["hf"])  # type: ignore[no-any-return]
    if "class" in source and "kwargs" in source:
        return _rebuild_with_kwargs(source, p)
    if "class" in source:
        return _import(source["class"], p)()  # type: ignore[no-any-return]
    raise ArtifactError(
        f"{p}: was saved from a {source.get('caller', 'model')} that slimkit cannot rebuild "
        f"alone; pass model= a fresh instance of that architecture"
    )


def _rebuild_with_kwargs(source: dict[str, Any], p: Path) -> nn.Module:
    """Construct ``source["class"]`` with ``source["kwargs"]``: only a ``torch.nn.Module``
    class of the ``slimkit`` package, only with JSON scalars and lists (no other code runs
    than slimkit's own; nothing from another package is imported)."""
    path, kwargs = source["class"], source["kwargs"]
    module = path.partition(":")[0] if isinstance(path, str) else ""
    if not _is_slimkit_module(module):
        raise ArtifactError(
            f"{p}: refused to rebuild {path!r}: a class with constructor arguments is rebuilt "
            f"only from the slimkit package"
        )
    _check_kwargs(kwargs, f"{p / MANIFEST}: source kwargs")
    cls = _import(path, p)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArtifactError(f"{p}: {path} is not a torch.nn.Module class")
    try:
        with torch.random.fork_rng(devices=[]):
            return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{p}: cannot rebuild {path} from its arguments: {e}") from None


def _import(path: str, p: Path) -> Any:
    module, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ArtifactError(f"{p}: cannot import the model class {path}: {e}") from None
    return obj


def _replay(model: nn.Module, specs: list[dict[str, Any]], p: Path) -> None:
    """Swap in the recorded compressed modules and the standard layers whose shape changed,
    then run the ``after_replay`` fixups."""
    registry.load_builtin()
    for entry in specs:
        name = entry["name"]
        if "same_as" in entry:
            set_module(model, name, model.get_submodule(entry["same_as"]))
            continue
        type_name, spec = entry["type"], entry["spec"]
        cls = module_class(type_name)
        if cls is not None:
            set_module(model, name, cls.from_spec(spec))
        elif is_standard(type_name):
            current = _get(model, name)
            if current is None or standard_spec(current) != spec:
                set_module(model, name, standard_from_spec(type_name, spec))
        else:
            raise ArtifactError(f"{p / MANIFEST}: unknown module type {type_name!r} at {name!r}")
    run_after_replay(model)


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
