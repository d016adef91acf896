"""Loading an artifact without trusting it.

The steps, each refusing with an ``ArtifactError`` that names the file and the key:

1. the directory and its files are opened by plain names, never following a link
   (``io/manifest.py``); the manifest is read as bounded JSON and checked against its
   schema; the weights file's size and sha256 are verified on the descriptor it is then
   read from, and its header checked (``io/tensors.py``);
2. the base architecture is rebuilt only from what slimkit knows: a built-in task, a local
   Hugging Face directory by its config alone, or a class registered as constructible
   (``slimkit.constructible``); otherwise the caller passes ``model=``. No name from the
   manifest is ever imported or called;
3. each recorded layer is checked (its spec's keys, types, ranges and arithmetic), must
   replace a module of the base in the base's order, keeps the base's geometry, and is built
   on the meta device first so that its size is bounded before any memory is allocated;
4. the header must name exactly the tensors the rebuilt model holds, with their dtypes and
   shapes (no cast, no alias stored twice); floats must be finite;
5. each compressed layer verifies its own tensors (masks against values, coded streams
   against their sizes) and the manifest's module list must be exactly what saving the
   loaded model would record.

Any other exception raised on the way becomes an ``ArtifactError``: loading never fails
with another type. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import _remove_duplicate_names
from torch import nn

from slimkit import constructible
from slimkit.compressed import (
    CompressedModule,
    check_standard_spec,
    is_simulated,
    is_standard,
    module_class,
    run_after_replay,
    standard_from_spec,
    standard_spec,
)
from slimkit.errors import ArtifactError, SlimkitError
from slimkit.io import manifest as mf
from slimkit.io import scratch
from slimkit.io.layout import MANIFEST, WEIGHTS
from slimkit.io.tensors import NAMES, Header, read_header, read_tensor
from slimkit.select import set_module

_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
#: the bytes the rebuilt layers may take beyond 16x the weights file (a float layer rebuilt
#: from int4 codes is 8x larger; buffers and caches add some)
_SLACK_BYTES = 256 << 20
#: attributes of a layer that no stored tensor shape reveals: a recorded layer must keep
#: the base module's values (a changed stride or eps would load into a different model)
_GEOMETRY = (
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "eps",
    "momentum",
    "padding_idx",
    "affine",
    "elementwise_affine",
)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest of the artifact at ``path``, its weights file verified."""
    p = _artifact_dir(Path(os.path.abspath(path)))
    with _guard(p, "reading the manifest"), _opened(p) as (manifest, _, _):
        return manifest


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved at ``path``: every saved tensor reloads bit for bit, and so do
    the outputs, except that a sparse Linear on kernel ``auto`` may pick another kernel on
    this machine (its outputs then agree to float rounding; ``kernel: dense`` keeps them
    bit for bit).

    ``model``: a fresh instance of the original architecture, needed when the artifact does
    not record a source slimkit may rebuild alone (a built-in task, a local Hugging Face
    directory, or a class registered with ``slimkit.register_constructible``).
    """
    p = _artifact_dir(Path(os.path.abspath(path)))
    with _guard(p, "loading"):
        with _opened(p) as (manifest, fd, header):
            budget = 16 * os.fstat(fd).st_size + _SLACK_BYTES
            base = model if model is not None else _rebuild_base(p, manifest["source"], budget)
            _replay(p, base, manifest["modules"], budget)
            _fill(p, base, header, fd)
        _verify(p, base, manifest)
    from slimkit.model_info import set_info

    source = manifest["source"]
    extra = {"student": source["student"]} if "task" in source and "student" in source else None
    set_info(
        base,
        source=source,
        recipe=manifest.get("recipe"),
        artifact=str(p),
        source_extra=extra,
        stages=manifest.get("stages", []),
    )
    return base.eval()


# -- the directory -------------------------------------------------------------------------
def _artifact_dir(p: Path) -> Path:
    """``p`` when it looks like an artifact directory; a clear refusal for a pickle file, a
    plain file, a missing path or a directory without a manifest."""
    if p.is_file():
        if _looks_pickled(p):
            raise ArtifactError(
                f"refused to load {p}: it is a pickle/torch.save file, and slimkit never "
                f"unpickles; an artifact is a directory with {MANIFEST} and {WEIGHTS}"
            )
        raise ArtifactError(f"{p} is a file; an artifact is a directory with {MANIFEST}")
    if not p.is_dir():
        olds = [q.name for q, kind in scratch.candidates(p) if kind == "old"]
        hint = (
            f" (an interrupted save left the previous artifact at {p.parent / olds[0]}; "
            "saving to the same path again restores it first)"
            if olds
            else ""
        )
        raise ArtifactError(f"artifact not found: {p}{hint}")
    if not os.path.lexists(p / MANIFEST):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
        hint = f" (pickle files such as {pickles[0]} are never loaded)" if pickles else ""
        raise ArtifactError(f"{p} is not a slimkit artifact: {MANIFEST} is missing{hint}")
    return p


def _looks_pickled(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return p.suffix in _PICKLE_SUFFIXES
    return head[:1] == b"\x80" or head[:2] == b"PK" or p.suffix in _PICKLE_SUFFIXES


def _check_entries(p: Path) -> None:
    """Refuse an artifact whose own files are links or not regular files, or beside which
    lies a pickle (``.pt``, ``.bin``, ...): which weights were meant is then unclear, and
    slimkit never loads pickles. Other files beside an artifact are left alone, unread."""
    for entry in sorted(os.scandir(p), key=lambda e: e.name):
        if entry.name in (MANIFEST, WEIGHTS) and entry.is_symlink():
            raise ArtifactError(f"{p / entry.name}: is a symbolic link (refused)")
        if entry.name in (MANIFEST, WEIGHTS) and not entry.is_file(follow_symlinks=False):
            raise ArtifactError(f"{p / entry.name}: not a regular file (refused)")
        if Path(entry.name).suffix.lower() in _PICKLE_SUFFIXES:
            raise ArtifactError(
                f"{p} holds {entry.name[:80]!r}, a pickle-style checkpoint beside the artifact; "
                "refused (slimkit never unpickles: remove it or move the artifact)"
            )


@contextlib.contextmanager
def _opened(p: Path) -> Iterator[tuple[dict[str, Any], int, Header]]:
    """The artifact ``p``'s checked manifest, its weights file open (size and sha256
    verified on this descriptor, which the tensors are then read from) and checked header."""
    _check_entries(p)
    dir_fd = mf.open_dir(p)
    try:
        manifest = mf.read_manifest_fd(p, dir_fd)
        fd = mf.open_member(p, dir_fd, WEIGHTS)
    finally:
        os.close(dir_fd)
    try:
        mf.verify_file(p, fd, WEIGHTS, manifest["files"][WEIGHTS])
        yield manifest, fd, read_header(p / WEIGHTS, fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _guard(p: Path, step: str) -> Iterator[None]:
    """Any exception but a SlimkitError (a TypeError from a constructor, a RecursionError,
    a MemoryError) as an ArtifactError naming the artifact."""
    try:
        yield
    except SlimkitError:
        raise
    except (Exception, RecursionError, MemoryError) as e:
        raise ArtifactError(f"{p}: {step} failed: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300]


# -- the base architecture -----------------------------------------------------------------
def _rebuild_base(p: Path, source: dict[str, Any], budget: int) -> nn.Module:
    where = p / MANIFEST
    if "task" in source:
        from slimkit import tasks

        try:
            return tasks.model_from_source(source)  # the task's model, or its student
        except SlimkitError as e:
            raise ArtifactError(f"{where}: source task: {_first_line(e)}") from None
    if "hf" in source:
        return _rebuild_hf(where, source["hf"], source["class"], budget, source.get("config"))
    if "class" in source:
        return _rebuild_class(where, source["class"], source.get("kwargs"), budget)
    raise ArtifactError(
        f"{p}: was saved from a {str(source['caller'])[:80]} that slimkit cannot rebuild "
        "alone; pass model= a fresh instance of that architecture"
    )


def _rebuild_class(where: Path, key: str, kwargs: dict[str, Any] | None, budget: int) -> nn.Module:
    """A registered class, with its recorded JSON arguments when it takes them."""
    entry = constructible.lookup(key)
    if entry is None:
        raise ArtifactError(
            f"{where}: source class {key[:120]!r} is not registered as constructible; "
            "register it with slimkit.register_constructible before loading, or pass model="
        )
    if entry.kwargs != (kwargs is not None):
        how = "with" if entry.kwargs else "without"
        raise ArtifactError(f"{where}: source class {key!r} is built {how} recorded kwargs")
    args = kwargs or {}
    try:
        inspect.signature(entry.cls).bind(**args)
    except TypeError as e:
        raise ArtifactError(f"{where}: source kwargs do not fit {key}: {e}") from None
    return _build(where, f"source class {key}", lambda: entry.cls(**args), budget)


def _rebuild_hf(
    where: Path, directory: str, key: str, budget: int, changes: dict[str, Any] | None = None
) -> nn.Module:
    """A Hugging Face model built from the config of a local directory alone: never the
    network, never remote code, never the directory's weights (the artifact holds them).
    ``changes``: config entries the saved model held other values for (a student's depth),
    each one an entry the directory's config has."""
    d = Path(directory)
    if not d.is_absolute() or not (d / "config.json").is_file():
        raise ArtifactError(
            f"{where}: source hf {directory[:120]!r} is not a local Hugging Face directory "
            "(an absolute path holding config.json); pass model="
        )
    module, _, name = key.partition(":")
    if not (module == "transformers" or module.startswith("transformers.")) or "." in name:
        raise ArtifactError(f"{where}: source class {key[:120]!r} is not a transformers model")
    try:
        import transformers
    except ImportError:
        raise ArtifactError(f"{where}: loading a Hugging Face model needs transformers") from None
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ArtifactError(f"{where}: source class {key[:120]!r} is not a transformers model")
    config = transformers.AutoConfig.from_pretrained(
        str(d), local_files_only=True, trust_remote_code=False
    )
    for name, value in (changes or {}).items():
        if not hasattr(config, name) or type(getattr(config, name)) is not type(value):
            raise ArtifactError(
                f"{where}: source config {name[:40]!r} is not a "
                f"{type(value).__name__} entry of {directory[:80]!r}'s config"
            )
        setattr(config, name, value)
    return _build(where, f"source class {key}", lambda: cls(config), budget)


def _build(where: Path, what: str, make: Any, budget: int) -> nn.Module:
    """``make()`` on the meta device first: refused when it would take more than ``budget``
    bytes; then for real, without disturbing the caller's random state."""
    with torch.device("meta"):
        probe = make()
    if not isinstance(probe, nn.Module):
        raise ArtifactError(f"{where}: {what} does not build a torch module")
    size = _bytes(probe)
    if size > budget:
        raise ArtifactError(
            f"{where}: {what} would take {size} bytes, more than its weights file can fill"
        )
    with torch.random.fork_rng(devices=[]):
        module = make()
    return module  # type: ignore[no-any-return]


def _bytes(module: nn.Module) -> int:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# -- the recorded layers -------------------------------------------------------------------
def _replay(p: Path, model: nn.Module, entries: list[dict[str, Any]], budget: int) -> None:
    """Swap in the recorded layers, in the base model's order, each replacing a module of
    the base, then run the ``after_replay`` fixups."""
    where = p / MANIFEST
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    last, used = -1, _bytes(model)
    owners: list[str] = []
    for i, entry in enumerate(entries):
        name, at = entry["name"], f"{where}: modules[{i}] {entry['name']!r}"
        if name not in order:
            raise ArtifactError(f"{at}: the model has no such module")
        if order[name] <= last:
            raise ArtifactError(f"{at}: out of the model's order")
        if any(name.startswith(f"{owner}.") for owner in owners):
            raise ArtifactError(f"{at}: lies inside the recorded layer {owners[-1]!r}")
        last = order[name]
        if "same_as" in entry:
            target = entry["same_as"]
            if target not in order or order[target] >= order[name]:
                raise ArtifactError(f"{at}: same_as {target[:80]!r} is no earlier module")
            set_module(model, name, model.get_submodule(target))
            continue
        old = model.get_submodule(name)
        module = _layer(at, old, entry["type"], entry["spec"])
        if module is old:
            continue
        used += _bytes(module) - _bytes(old)
        if used > budget:
            raise ArtifactError(f"{at}: the layers take more than the weights file can fill")
        if isinstance(module, CompressedModule):
            owners.append(name)
        set_module(model, name, module)
    run_after_replay(model)


def _layer(at: str, old: nn.Module, type_name: str, spec: dict[str, Any]) -> nn.Module:
    """The layer an entry records, checked against its rules and the module it replaces,
    built on the meta device first (its size is then bounded by the caller)."""
    cls = module_class(type_name)
    if cls is not None:
        problem = cls.check_spec(spec)
        build: Any = lambda: cls.from_spec(spec)  # noqa: E731
    elif is_standard(type_name):
        if type(old).__name__ != type_name:
            raise ArtifactError(f"{at}: the model has a {type(old).__name__} there")
        problem = check_standard_spec(type_name, spec)
        build = lambda: standard_from_spec(type_name, spec)  # noqa: E731
    else:
        raise ArtifactError(f"{at}: unknown layer type {type_name[:80]!r}")
    if problem is not None:
        raise ArtifactError(f"{at}: {type_name} spec: {problem}")
    _check_geometry(at, old, spec)
    if standard_spec(old) == spec:
        return old  # unchanged: kept (with any weight it shares)
    with torch.device("meta"):
        probe = build()
    if _bytes(probe) > 16 * (_bytes(old) + (1 << 20)) + _SLACK_BYTES:
        raise ArtifactError(f"{at}: the spec claims a layer far larger than the one it replaces")
    with torch.random.fork_rng(devices=[]):
        return build()  # type: ignore[no-any-return]


def _check_geometry(at: str, old: nn.Module, spec: dict[str, Any]) -> None:
    """The spec (and a wrapped layer's ``inner_spec``) keeps ``old``'s geometry."""
    for key in _GEOMETRY:
        if key in spec and hasattr(old, key) and _plain(getattr(old, key)) != spec[key]:
            raise ArtifactError(
                f"{at}: {key}={spec[key]!r} differs from the model's {_plain(getattr(old, key))!r}"
            )
    if isinstance(spec.get("inner_spec"), dict):
        _check_geometry(at, old, spec["inner_spec"])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# -- the tensors ---------------------------------------------------------------------------
def _fill(p: Path, model: nn.Module, header: Header, fd: int) -> None:
    """Check the header against the rebuilt model, then copy each tensor in."""
    where, entries = p / WEIGHTS, header.entries
    state = model.state_dict()
    kept_of = {a: kept for kept, group in _remove_duplicate_names(state).items() for a in group}
    aliases = set(kept_of)
    if header.aliases and header.aliases != kept_of:
        raise ArtifactError(f"{where}: the header's aliases are not the model's tied tensors")
    expected = {k: v for k, v in state.items() if k not in aliases}
    for name in sorted(set(expected) | set(entries)):
        if name not in entries:
            raise ArtifactError(f"{where}: tensor {name!r} is missing")
        if name not in expected:
            what = "an alias stored twice" if name in aliases else "not a tensor of the model"
            raise ArtifactError(f"{where}: tensor {name[:80]!r} is {what}")
        e, want = entries[name], expected[name]
        if e.dtype != want.dtype:
            raise ArtifactError(
                f"{where}: tensor {name!r} is {NAMES[e.dtype]}, the model holds "
                f"{NAMES.get(want.dtype, str(want.dtype))} (no silent cast)"
            )
        if e.shape != tuple(want.shape):
            raise ArtifactError(
                f"{where}: tensor {name!r} has shape {list(e.shape)}, the model holds "
                f"{list(want.shape)}"
            )
    tensors = {}
    for name, e in entries.items():
        t = read_tensor(fd, e)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ArtifactError(f"{where}: tensor {name!r} holds {bad}")
        tensors[name] = t
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) - aliases or unexpected:
        raise ArtifactError(f"{where}: does not fit the model ({sorted(missing)[:3]})")


def _verify(p: Path, model: nn.Module, manifest: dict[str, Any]) -> None:
    """Each compressed layer's own consistency, and the manifest as saving would write it."""
    from slimkit.io.save import module_specs

    for name, m in model.named_modules():
        if isinstance(m, CompressedModule):
            try:
                m.verify()
            except ValueError as e:
                raise ArtifactError(f"{p / WEIGHTS}: layer {name!r}: {_first_line(e)}") from None
    recorded, written = module_specs(model), manifest["modules"]
    if recorded != written:
        pairs = enumerate(zip(recorded, written, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(recorded), len(written)))
        raise ArtifactError(
            f"{p / MANIFEST}: modules[{first}] is not what the loaded model records "
            "(an entry is missing, extra or altered)"
        )
    simulated = manifest.get("simulated")
    if simulated is not None and simulated != is_simulated(model):
        raise ArtifactError(f"{p / MANIFEST}: simulated is {simulated}, the layers say otherwise")
