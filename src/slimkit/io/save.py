"""Saving an artifact: both files are written into a fresh, locked staging directory beside
the target (``io/scratch.py`` names it and tells a stale one from one in use), fsynced, and
the directory is swapped into place with ``renameat2(RENAME_EXCHANGE)``: a crash leaves either
the old artifact or the new one, never a mix. Where the file system cannot exchange, two
renames (old away to a scratch ``old`` name, new in) do it, with a warning; a crash between
them leaves the old artifact whole under its scratch name, and the next save of the same
target moves it back first.

Saving replaces the target directory as a whole, so it only ever replaces an empty directory
or an artifact directory (``layout.OWN_FILES``: the two artifact files and the reports slimkit
writes beside them); anything else in it is refused and left alone. Old reports are not
carried over: a new model does not inherit the old model's report.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import inspect
import json
import os
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import _remove_duplicate_names, save_file
from torch import nn

from slimkit import constructible
from slimkit._version import __version__ as slimkit_version
from slimkit.atomic import default_mode, fsync_dir, fsync_file, sha256_file
from slimkit.compressed import CompressedModule, is_simulated, standard_spec
from slimkit.errors import ArtifactError, SlimkitError
from slimkit.io import scratch
from slimkit.io.layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    foreign_entry,
    holds_manifest,
)
from slimkit.io.manifest import check_kwargs
from slimkit.model_info import check_finite, info

#: renameat2 errors that mean "this file system (or kernel) cannot exchange": fall back
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_warned_devices: set[int] = set()


# -- the target ----------------------------------------------------------------------------
def check_target(
    path: str | os.PathLike[str], overwrite: bool, how: str = "pass overwrite=True"
) -> Path:
    """The absolute target path, once it is safe to save there; ArtifactError otherwise.

    Stale scratch directories of the target are tidied first (``scratch.tidy``). Refused: a
    path that is not a directory, a directory holding anything slimkit did not write (named
    in the error), and an artifact unless ``overwrite``. A symlink to a directory stands for
    that directory (the link stays). ``how`` tells the user how to allow overwriting.
    """
    p = _absolute(path)
    with io_errors(p):
        done = scratch.tidy(p)
    for line in done:
        if line.startswith("restored"):
            warnings.warn(f"{line}: an earlier save was interrupted", RuntimeWarning, stacklevel=2)
    if os.path.lexists(p) and not p.is_dir():
        raise ArtifactError(f"output path {p} exists and is not a directory")
    if not p.is_dir():
        return p
    with io_errors(p, "read"):
        foreign = foreign_entry(p)
        first = min(os.listdir(p), default=None)
    if foreign is not None:
        raise ArtifactError(
            f"{p} holds {foreign!r}, which is not part of a slimkit artifact; refused "
            "(saving replaces the whole directory: choose a new or empty one)"
        )
    if first is not None and not holds_manifest(p):
        raise ArtifactError(
            f"{p} holds {first!r} but no slimkit manifest ({MANIFEST}): not a slimkit "
            "artifact; refused"
        )
    if first is not None and not overwrite:
        raise ArtifactError(f"{p} already holds an artifact; {how} to replace it")
    return p


def _absolute(path: str | os.PathLike[str]) -> Path:
    p = Path(os.path.abspath(path))
    if p.is_symlink() and p.is_dir():
        p = p.resolve()
    if p.parent == p:
        raise ArtifactError(f"cannot save to {p}: an artifact needs a directory of its own")
    return p


# -- saving ----------------------------------------------------------------------------
def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    task: Any = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an artifact directory at ``path``; return the path.

    ``task`` (a Task) and ``recipe`` (a dict) default to what ``compress`` recorded. The
    directory is replaced as a whole: files of an earlier artifact there (reports) are gone.
    """
    target = check_target(path, overwrite)
    check_finite(model)
    manifest = _manifest(model, task, recipe)
    with Staging(target, overwrite) as stage:
        stage.write(model, manifest)
        stage.commit()
    return target


def write_artifact(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    task: Any = None,
    recipe: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s two artifact files into the existing, empty ``directory`` (usually a
    ``Staging.path``: nothing is swapped in here). Errors name the target that a staging
    directory stands for."""
    check_finite(model)
    manifest = _manifest(model, task, recipe)
    with io_errors(Path(directory)):
        _write_stage(model, Path(directory), manifest)


class Staging:
    """A locked scratch directory beside ``target`` to build its new contents in (the
    artifact, and reports beside it); ``commit`` swaps it in as ``target``. Leaving the
    ``with`` block removes the staging directory, committed or not. Entering it is the
    early check that the target's parent is writable (ArtifactError naming the target)."""

    def __init__(
        self, target: str | os.PathLike[str], overwrite: bool, how: str = "pass overwrite=True"
    ) -> None:
        self.target = _absolute(target)
        self.overwrite = overwrite
        self.how = how
        self._scratch: scratch.Scratch | None = None

    @property
    def path(self) -> Path:
        """The staging directory (valid inside the ``with`` block, before ``commit``)."""
        if self._scratch is None:
            raise RuntimeError("Staging.path is only valid inside its with block")
        return self._scratch.path

    def __enter__(self) -> Staging:
        with io_errors(self.target):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._scratch = scratch.create(self.target, "stage")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._scratch is not None:
            self._scratch.release()
            self._scratch = None

    def write(self, model: nn.Module, manifest: dict[str, Any] | None = None, **kw: Any) -> None:
        """Write ``model``'s artifact files into the staging directory; ``kw``: ``task``,
        ``recipe`` for its manifest when ``manifest`` is not given."""
        if manifest is None:
            check_finite(model)
            manifest = _manifest(model, kw.get("task"), kw.get("recipe"))
        with io_errors(self.target):
            _write_stage(model, self.path, manifest)

    def commit(self) -> Path:
        """Swap the staging directory in as the target (checked again first); the target."""
        target = check_target(self.target, self.overwrite, self.how)
        stage = self.path
        cwd = _cwd()
        with io_errors(target):
            _match_directory(stage, target)
            fsync_dir(stage)
            _swap_in(stage, target)
        if cwd is not None and (cwd == target or target in cwd.parents):
            with contextlib.suppress(OSError):  # the old directory was swapped away
                os.chdir(cwd if cwd.is_dir() else target)
        return target


def _cwd() -> Path | None:
    try:
        return Path.cwd()
    except OSError:
        return None


def _write_stage(model: nn.Module, stage: Path, manifest: dict[str, Any]) -> None:
    weights = stage / WEIGHTS
    save_model(model, str(weights))
    os.chmod(weights, default_mode())  # safetensors writes 0600; a plain file is 0666 & ~umask
    fsync_file(weights)
    manifest["files"] = {WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}}
    with open(stage / MANIFEST, "x", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(stage)


def save_model(model: nn.Module, filename: str) -> None:
    """``safetensors.torch.save_model`` (tensors shared under several names stored once,
    all contiguous) with the header's metadata exactly ``{"format": ...}``: save_model also
    records every dropped alias there, in hash order, which made the bytes differ from run
    to run."""
    state = model.state_dict()
    for aliases in _remove_duplicate_names(state).values():
        for name in aliases:
            del state[name]
    save_file({k: v.contiguous() for k, v in state.items()}, filename, {"format": FORMAT})


def _match_directory(stage: Path, target: Path) -> None:
    """Give ``stage`` the owner (where allowed) and mode of the directory it replaces."""
    try:
        old = target.stat()
    except FileNotFoundError:
        return  # a new directory: mkdir gave it 0777 & ~umask
    new = stage.stat()
    if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
        with contextlib.suppress(PermissionError):
            os.chown(stage, old.st_uid, old.st_gid)
    os.chmod(stage, stat.S_IMODE(old.st_mode))


def _swap_in(stage: Path, target: Path) -> None:
    """Move the finished ``stage`` directory to ``target`` atomically (``stage`` then holds
    the old directory, removed by the caller)."""
    if not os.path.lexists(target):
        os.rename(stage, target)
    elif not _exchange(stage, target):
        _two_renames(stage, target)
    fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths with renameat2(RENAME_EXCHANGE); False (with a warning) where the
    file system or kernel cannot, ArtifactError on any other failure."""
    err = _renameat2(a, b, _RENAME_EXCHANGE)
    if err == 0:
        return True
    if err in _UNSUPPORTED:
        _warn_fallback(b, err)
        return False
    raise ArtifactError(f"cannot replace {b}: {os.strerror(err)}")


def _renameat2(a: Path, b: Path, flags: int) -> int:
    """0, or the errno of ``renameat2(a, b, flags)`` (ENOSYS when libc lacks it)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return errno.ENOSYS
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def _warn_fallback(target: Path, err: int) -> None:
    device = target.parent.stat().st_dev
    if device in _warned_devices:
        return
    _warned_devices.add(device)
    warnings.warn(
        f"{target.parent}: the file system cannot exchange directories atomically "
        f"({os.strerror(err)}); replacing {target.name} by two renames (a crash between "
        "them leaves the old artifact beside it, restored by the next save)",
        RuntimeWarning,
        stacklevel=5,
    )


def _two_renames(stage: Path, target: Path) -> None:
    """The fallback: ``target`` to a locked scratch ``old`` name, ``stage`` to ``target``,
    then the old one removed."""
    try:
        held = scratch.lock(target)
    except BlockingIOError:
        raise ArtifactError(f"cannot replace {target}: another process is replacing it") from None
    old = target.parent / scratch.scratch_name(target, "old")
    kept, swapped = scratch.Scratch(old, held), False
    try:
        os.rename(target, old)
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(old, target)
            raise
        swapped = True
        fsync_dir(target.parent)
    finally:  # the old one is removed only once the new one is in place
        kept.release(remove=swapped)


@contextlib.contextmanager
def io_errors(target: Path, verb: str = "write") -> Iterator[None]:
    """OSError and safetensors' errors as one-line ArtifactErrors naming ``target`` (the
    target a staging directory stands for, when ``target`` is one)."""
    target = scratch.target_of(target) or target
    try:
        yield
    except OSError as e:
        raise ArtifactError(f"cannot {verb} {target}: {_reason(e)}") from e
    except SafetensorError as e:
        raise ArtifactError(f"cannot {verb} {target}: {_safetensors_reason(e)}") from e


def _reason(e: OSError) -> str:
    text = e.strerror or str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__


def _safetensors_reason(e: SafetensorError) -> str:
    """The operating system's words inside a safetensors I/O error, else its first line."""
    text = str(e)
    found = re.search(r'message: "([^"]+)"', text)
    if found:
        return found[1]
    return text.splitlines()[0] if text else "safetensors failed"


def _created() -> str:
    """The manifest's time: ``SOURCE_DATE_EPOCH`` when set (reproducible builds), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        now = datetime.datetime.now(datetime.timezone.utc)
        return now.isoformat(timespec="seconds")
    try:
        seconds = int(epoch)
        when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise ArtifactError(
            f"SOURCE_DATE_EPOCH={epoch!r} is not a time in whole seconds since 1970"
        ) from None
    return when.isoformat(timespec="seconds")


def _manifest(model: nn.Module, task: Any, recipe: dict[str, Any] | None) -> dict[str, Any]:
    recorded = info(model)
    source = _kwargs_source(model)  # a model built from arguments (architecture search)
    if source is None:
        source = task.source() if task is not None else recorded.get("source") or _source_of(model)
    extra = recorded.get("source_extra")  # what stages added (a distilled student's options)
    if isinstance(extra, dict) and "task" in source:
        source = {**source, **extra}
    recipe = _canonical_recipe(recipe if recipe is not None else recorded.get("recipe"))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "slimkit_version": slimkit_version,
        "torch_version": torch.__version__.split("+")[0],
        "created": _created(),
        "source": source,
        "recipe": recipe,
        "modules": module_specs(model),
        "simulated": is_simulated(model),
        "stages": _stage_records(recipe, recorded.get("stages")),
    }


def _stage_records(recipe: dict[str, Any] | None, recorded: Any) -> list[dict[str, Any]]:
    """The stages' records for ``recipe``: those recorded when they match its stages, else
    empty ones (a model loaded from a format-1 artifact, which kept none)."""
    if recipe is None:
        return []
    names = [
        (kind, options["method"]) for stage in recipe["stages"] for kind, options in stage.items()
    ]
    if isinstance(recorded, list) and [(r.get("kind"), r.get("method")) for r in recorded] == names:
        return recorded
    return [{"kind": kind, "method": method, "record": {}} for kind, method in names]


def _canonical_recipe(recipe: Any) -> dict[str, Any] | None:
    """The recipe in the one form loading accepts (every option written out)."""
    if recipe is None:
        return None
    from slimkit.recipe import Recipe

    try:
        return Recipe.from_dict(recipe).to_dict()
    except SlimkitError as e:
        raise ArtifactError(f"cannot record the recipe: {e}") from None


def module_specs(model: nn.Module) -> list[dict[str, Any]]:
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
    """How to rebuild the original architecture: a local HF directory, a class registered
    as constructible, or the caller (who then passes ``model=`` to ``load``)."""
    cls = type(model)
    hf_dir = getattr(getattr(model, "config", None), "_name_or_path", None)
    if hf_dir and (Path(hf_dir) / "config.json").is_file() and _is_transformers(cls):
        source = {"hf": str(Path(hf_dir).resolve()), "class": constructible.key_of(cls)}
        changed = _config_changes(model.config, Path(hf_dir) / "config.json")
        return {**source, "config": changed} if changed else source
    entry = constructible.registered(cls)
    if entry is not None and not entry.kwargs and _no_arg_init(cls):
        return {"class": constructible.key_of(cls)}
    return {"caller": cls.__qualname__}


def _config_changes(config: Any, file: Path) -> dict[str, Any]:
    """The entries of the directory's config.json that ``config`` (the model's, in memory)
    holds another JSON value for, such as a student's ``num_hidden_layers``."""
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    current = config.to_dict()
    return {
        k: current[k]
        for k, v in saved.items()
        if k in current and current[k] != v and isinstance(current[k], bool | int | float | str)
    }


def _is_transformers(cls: type) -> bool:
    module = cls.__module__
    return module.startswith("transformers.") and "." not in cls.__qualname__


def _kwargs_source(model: nn.Module) -> dict[str, Any] | None:
    """``{"class": key, "kwargs": {...}}`` for a class registered as constructible from its
    recorded arguments (``rebuild_kwargs()``), such as a searched network."""
    cls = type(model)
    entry = constructible.registered(cls)
    if entry is None or not entry.kwargs:
        return None
    kwargs = model.rebuild_kwargs()  # type: ignore[operator]
    check_kwargs(kwargs, f"{cls.__qualname__}.rebuild_kwargs()")
    return {"class": constructible.key_of(cls), "kwargs": kwargs}


def _no_arg_init(cls: type) -> bool:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )
