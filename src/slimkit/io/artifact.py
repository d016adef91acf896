"""Artifacts: a directory with ``model.safetensors`` and ``slimkit.json``.

Saving writes both files into a fresh staging directory beside the target (fsync each),
then swaps it into place atomically: a crash leaves either the old artifact or the new one,
never a mix. Loading verifies the format version and every file's sha256, rebuilds the
model from its recorded source, replays the recorded module swaps and fills the tensors
from safetensors. Nothing is ever unpickled.
"""

from __future__ import annotations

import ctypes
import datetime
import importlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from slimkit import registry
from slimkit._version import __version__ as slimkit_version
from slimkit.compressed import (
    CompressedModule,
    is_simulated,
    is_standard,
    module_class,
    run_after_replay,
    standard_from_spec,
    standard_spec,
)
from slimkit.errors import ArtifactError
from slimkit.io.atomic import fsync_dir, sha256_file
from slimkit.pipeline import check_finite, info, set_info
from slimkit.select import set_module

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1
MANIFEST = "slimkit.json"
WEIGHTS = "model.safetensors"
ARTIFACT_FILES = (WEIGHTS, MANIFEST)
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


# -- saving ----------------------------------------------------------------------------
def is_artifact(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


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
