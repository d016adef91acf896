"""Saving an artifact: both files are written into a fresh staging directory beside the
target (fsync each), then the directory is swapped into place atomically: a crash leaves
either the old artifact or the new one, never a mix."""

from __future__ import annotations

import ctypes
import datetime
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from slimkit._version import __version__ as slimkit_version
from slimkit.compressed import CompressedModule, is_simulated, standard_spec
from slimkit.errors import ArtifactError
from slimkit.io.atomic import fsync_dir, sha256_file
from slimkit.io.layout import ARTIFACT_FILES, FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, is_artifact
from slimkit.pipeline import check_finite, info


# -- saving ----------------------------------------------------------------------------
def check_target(
    path: str | os.PathLike[str], overwrite: bool, how: str = "pass overwrite=True"
) -> Path:
    """Refuse a target that is a file, or that holds an artifact unless ``overwrite``.

    ``how`` tells the user how to allow overwriting (the CLI says ``--overwrite``).
    """
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ArtifactError(f"output path {p} exists and is not a directory")
    if overwrite:
        return p
    if is_artifact(p):
        raise ArtifactError(f"{p} already holds an artifact; {how} to replace it")
    if (p / WEIGHTS).exists():
        raise ArtifactError(f"{p / WEIGHTS} exists and is not part of a slimkit artifact; refused")
    return p


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    task: Any = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an artifact directory at ``path``; return the path.

    ``task`` (a Task) and ``recipe`` (a dict) default to what ``compress`` recorded.
    """
    target = check_target(path, overwrite)
    check_finite(model)
    manifest = _manifest(model, task, recipe)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    cwd = Path.cwd()
    try:
        _write_stage(model, stage, manifest)
        _swap_in(stage, target)
        if cwd == target or target in cwd.parents:  # the old directory was swapped away
            os.chdir(cwd if cwd.is_dir() else target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _write_stage(model: nn.Module, stage: Path, manifest: dict[str, Any]) -> None:
    weights = stage / WEIGHTS
    save_model(model, str(weights), metadata={"format": FORMAT}, force_contiguous=True)
    _fsync_file(weights)
    manifest["files"] = {WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    _fsync_file(stage / MANIFEST)
    fsync_dir(stage)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _swap_in(stage: Path, target: Path) -> None:
    """Move the finished ``stage`` directory to ``target`` atomically."""
    if not target.exists():
        os.rename(stage, target)
        fsync_dir(target.parent)
        return
    for entry in target.iterdir():  # keep the old directory's other files (reports, ...)
        if entry.name not in ARTIFACT_FILES and entry.is_file() and not entry.is_symlink():
            os.link(entry, stage / entry.name)
    if not _exchange(stage, target):  # fallback: two renames, the old kept until the end
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)
    for entry in stage.iterdir():  # stage now holds the old artifact: move its subfolders
        if entry.is_dir() and not (target / entry.name).exists():
            os.rename(entry, target / entry.name)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False when unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(rc == 0)


def _manifest(model: nn.Module, task: Any, recipe: dict[str, Any] | None) -> dict[str, Any]:
    recorded = info(model)
    source = _kwargs_source(model)  # a model built from arguments (architecture search)
    if source is None:
        source = task.source() if task is not None else recorded.get("source") or _source_of(model)
    student = recorded.get("student")  # a task's student architecture (distillation)
    if isinstance(student, dict) and "task" in source:
        source = {**source, "student": student}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "slimkit_version": slimkit_version,
        "torch_version": torch.__version__.split("+")[0],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "recipe": recipe if recipe is not None else recorded.get("recipe"),
        "modules": _module_specs(model),
        "simulated": is_simulated(model),
    }


def _module_specs(model: nn.Module) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    first: dict[int, str] = {}
    owners: list[str] = []  # compressed modules: they rebuild their own children
    for name, m in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(f"{owner}.") for owner in owners):
            continue
        if id(m) in first:  # a module shared under several names stays shared
            specs.append({"name": name, "same_as": first[id(m)]})
            continue
        first[id(m)] = name
        if isinstance(m, CompressedModule):
            specs.append({"name": name, "type": type(m).__name__, "spec": m.spec()})
            owners.append(name)
        elif (spec := standard_spec(m)) is not None:
            specs.append({"name": name, "type": type(m).__name__, "spec": spec})
    return specs


def _source_of(model: nn.Module) -> dict[str, Any]:
    """How to rebuild the original architecture: a HF directory, a class, or the caller."""
    cls = type(model)
    hf_dir = getattr(getattr(model, "config", None), "_name_or_path", None)
    if hf_dir and (Path(hf_dir) / "config.json").is_file():
        return {"hf": str(Path(hf_dir).resolve()), "class": f"{cls.__module__}:{cls.__qualname__}"}
    importable = cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__
    # torch's own containers construct without arguments but empty: not a rebuild
    if importable and not cls.__module__.startswith("torch.") and _no_arg_init(cls):
        return {"class": f"{cls.__module__}:{cls.__qualname__}"}
    return {"caller": cls.__qualname__}


def _kwargs_source(model: nn.Module) -> dict[str, Any] | None:
    """``{"class": "slimkit.mod:Cls", "kwargs": {...}}`` for a slimkit model class that
    records its constructor arguments (``rebuild_kwargs()``), such as a searched network."""
    cls = type(model)
    rebuild = getattr(model, "rebuild_kwargs", None)
    if not callable(rebuild) or not _is_slimkit_module(cls.__module__):
        return None
    kwargs = rebuild()
    _check_kwargs(kwargs, f"{cls.__qualname__}.rebuild_kwargs()")
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": kwargs}


def _is_slimkit_module(module: str) -> bool:
    return module == "slimkit" or module.startswith("slimkit.")


def _check_kwargs(kwargs: Any, where: str) -> None:
    """ArtifactError unless ``kwargs`` maps names to JSON scalars and (nested) lists of them."""

    def plain(v: Any) -> bool:
        if v is None or isinstance(v, bool | int | float | str):
            return True
        return isinstance(v, list) and all(plain(x) for x in v)

    ok = isinstance(kwargs, dict) and all(
        isinstance(k, str) and k.isidentifier() and plain(v) for k, v in kwargs.items()
    )
    if not ok:
        raise ArtifactError(
            f"{where}: constructor arguments must map names to JSON scalars or lists, "
            f"got {kwargs!r}"
        )


def _no_arg_init(cls: type) -> bool:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )
