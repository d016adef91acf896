"""Reading an artifact's files safely, and the schema of its manifest.

Every file is opened inside the artifact directory by its plain name, never following a
link (``O_NOFOLLOW``), and must be a regular file. JSON (the manifest, the safetensors
header) is read with limits on size, nesting depth and number length, and rejects NaN,
Infinity and duplicate keys. The manifest is checked against its schema before anything is
built from it: top-level keys, types, the source's form, the module entries' form, file
names and checksums.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from slimkit.errors import ArtifactError
from slimkit.io.layout import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS

MAX_MANIFEST_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20
MAX_DEPTH = 32
MAX_INT_DIGITS = 24
MAX_MODULES = 1_000_000

TOP_KEYS = {
    "format",
    "format_version",
    "slimkit_version",
    "torch_version",
    "created",
    "source",
    "recipe",
    "modules",
    "simulated",
    "files",
    "stages",
}
#: the keys each format version wrote, all of them every time
KEYS_OF_VERSION = {1: TOP_KEYS - {"stages"}, 2: TOP_KEYS}
#: recipe options added after format 1 was first written: older artifacts lack them
LATER_OPTIONS = frozenset({"strict", "format"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+([.+\-][a-zA-Z0-9.+\-]{1,40}|[a-z]+[0-9]*)?")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- files inside the artifact directory ------------------------------------------------
def open_dir(p: Path) -> int:
    """A descriptor of the artifact directory ``p``."""
    try:
        return os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ArtifactError(f"{p}: cannot open the artifact directory: {e.strerror}") from None


def open_member(p: Path, dir_fd: int, name: str) -> int:
    """A read descriptor of the regular file ``name`` directly inside the artifact ``p``:
    never a link, a device, a FIFO or a path leaving the directory."""
    check_file_name(p / MANIFEST, name)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ArtifactError(f"{p / name}: missing from the artifact") from None
    except OSError as e:
        why = "is a symbolic link (refused)" if e.errno == 40 else f"cannot be read: {e.strerror}"
        raise ArtifactError(f"{p / name}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{p / name}: not a regular file (refused)")
    return fd


def check_file_name(where: Path, name: Any) -> None:
    """ArtifactError unless ``name`` is one of the artifact's own plain file names."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
    plain = plain and "\\" not in name and "\x00" not in name
    if not plain or name not in (WEIGHTS, MANIFEST):
        shown = name if isinstance(name, str) else repr(name)
        raise ArtifactError(
            f"{where}: file name {shown[:80]!r} refused: an artifact names only its own "
            f"{WEIGHTS} (plain names inside the artifact directory)"
        )


def read_at(fd: int, offset: int, size: int) -> bytearray:
    """``size`` bytes of ``fd`` from ``offset`` (short reads resumed; EOF is an error)."""
    out = bytearray(size)
    view, done = memoryview(out), 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 1 << 24), offset + done)
        if not chunk:
            raise ValueError(f"the file ends {size - done} bytes early")
        view[done : done + len(chunk)] = chunk
        done += len(chunk)
    return out


def sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


# -- bounded JSON -----------------------------------------------------------------------
def parse_json(data: bytes, where: Path) -> Any:
    """JSON of at most ``MAX_DEPTH`` nesting levels, integers of at most ``MAX_INT_DIGITS``
    digits, no NaN / Infinity, no duplicate keys; ArtifactError naming ``where`` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{where}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise ArtifactError(f"{where}: JSON nested {depth} levels deep (at most {MAX_DEPTH})")
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_constant=_no_constant,
            object_pairs_hook=_no_duplicates,
        )
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{where}: not valid JSON: {str(e)[:200]}") from None


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects, ignoring brackets inside strings."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    b = np.frombuffer(stripped.encode("utf-8"), dtype=np.uint8)
    if b.size == 0:
        return 0
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int64)
    step -= np.isin(b, (ord("]"), ord("}"))).astype(np.int64)
    return int(np.cumsum(step).max(initial=0))


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


# -- the manifest -----------------------------------------------------------------------
def read_manifest_fd(p: Path, dir_fd: int) -> dict[str, Any]:
    """The manifest of the artifact ``p``, schema-checked (its files not yet verified)."""
    where = p / MANIFEST
    fd = open_member(p, dir_fd, MANIFEST)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{where}: {size} bytes, more than a manifest may hold")
        manifest = parse_json(bytes(read_at(fd, 0, size)), where)
    finally:
        os.close(fd)
    check_manifest(where, manifest)
    return manifest  # type: ignore[no-any-return]


def check_manifest(where: Path, manifest: Any) -> None:
    """ArtifactError naming ``where`` and the key when ``manifest`` breaks the schema."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not a slimkit manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{where}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: format version {version} is newer than this slimkit reads "
            f"({FORMAT_VERSION}); upgrade slimkit"
        )
    keys = KEYS_OF_VERSION[version]
    unknown = sorted(set(manifest) - keys)
    if unknown:
        raise ArtifactError(f"{where}: unknown key {unknown[0][:40]!r}")
    missing = sorted(keys - set(manifest))
    if missing:
        raise ArtifactError(f"{where}: key {missing[0]!r} is missing")
    _check_record(where, manifest)
    if "stages" in manifest:
        _check_stages(where, manifest["stages"], manifest["recipe"])
    check_source(where, manifest["source"])
    check_modules(where, manifest["modules"])
    _check_files(where, manifest["files"])


def _check_stages(where: Path, stages: Any, recipe: Any) -> None:
    """One ``{kind, method, record}`` entry per recipe stage, in order (none without a
    recipe); a record is a mapping of what the stage reported."""
    expected = [] if recipe is None else recipe["stages"]
    if not isinstance(stages, list) or len(stages) != len(expected):
        raise ArtifactError(f"{where}: stages must list one entry per recipe stage")
    for i, (entry, stage) in enumerate(zip(stages, expected, strict=True)):
        kind, options = next(iter(stage.items()))
        ok = isinstance(entry, dict) and set(entry) == {"kind", "method", "record"}
        ok = ok and entry["kind"] == kind and entry["method"] == options.get("method")
        if not (ok and isinstance(entry["record"], dict)):
            raise ArtifactError(
                f"{where}: stages[{i}] must be {{kind, method, record}} of recipe stage {i}"
            )


def _check_record(where: Path, manifest: dict[str, Any]) -> None:
    """The fields that only record what happened: versions, time, recipe, simulated."""
    for key in ("slimkit_version", "torch_version"):
        value = manifest[key]
        if not (isinstance(value, str) and _VERSION.fullmatch(value)):
            raise ArtifactError(f"{where}: {key} {str(value)[:40]!r} is not a version")
    created = manifest["created"]
    if not _is_time(created):
        raise ArtifactError(f"{where}: created {str(created)[:40]!r} is not an ISO-8601 time")
    if not isinstance(manifest["simulated"], bool):
        raise ArtifactError(f"{where}: simulated must be true or false")
    recipe = manifest.get("recipe")
    if recipe is not None:
        from slimkit.errors import SlimkitError
        from slimkit.recipe import Recipe

        try:
            canonical = Recipe.from_dict(recipe, where=f"{where}: recipe").to_dict()
        except (SlimkitError, TypeError, ValueError) as e:
            raise ArtifactError(str(e)[:300]) from None
        if not _written_form(recipe, canonical):
            raise ArtifactError(f"{where}: recipe is not in the form slimkit writes")


def _written_form(recipe: Any, canonical: dict[str, Any]) -> bool:
    """Whether ``recipe`` holds every option as slimkit writes it (only an option added
    after format 1 was first written, ``LATER_OPTIONS``, may be absent)."""
    if set(recipe) != set(canonical) or recipe["name"] != canonical["name"]:
        return False
    for stage, want in zip(recipe["stages"], canonical["stages"], strict=True):
        if not isinstance(stage, dict) or set(stage) != set(want):
            return False
        for kind, options in stage.items():
            if not isinstance(options, dict):
                return False
            if any(want[kind].get(k, object()) != v for k, v in options.items()):
                return False
            if set(want[kind]) - set(options) - LATER_OPTIONS:
                return False
    return True


def _is_time(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 40:
        return False
    try:
        stamp = datetime.datetime.fromisoformat(value)
    except ValueError:
        return False
    return stamp.tzinfo is not None


SOURCE_FORMS = (
    ("task",),
    ("hf", "class"),
    ("hf", "class", "config"),
    ("class", "kwargs"),
    ("class",),
    ("caller",),
)
STUDENT_KEYS = {"width", "depth", "init", "seed"}


def check_source(where: Path, source: Any) -> None:
    """The source's form: a task (with its arguments and an optional student), a local
    Hugging Face directory with its class, a registered class (with JSON arguments), or the
    caller's model."""
    if not isinstance(source, dict):
        raise ArtifactError(f"{where}: 'source' must be a mapping")
    if "task" in source:
        _check_task_source(where, source)
        return
    keys = tuple(sorted(source))
    if keys not in {tuple(sorted(f)) for f in SOURCE_FORMS}:
        raise ArtifactError(f"{where}: source keys {list(keys)[:6]} are not a known form")
    for key in ("hf", "class", "caller"):
        if key in source and not (isinstance(source[key], str) and 0 < len(source[key]) < 4096):
            raise ArtifactError(f"{where}: source {key} must be a non-empty string")
    if "kwargs" in source:
        check_kwargs(source["kwargs"], f"{where}: source kwargs")
    if "config" in source:
        check_kwargs(source["config"], f"{where}: source config")


def _check_task_source(where: Path, source: dict[str, Any]) -> None:
    name = source["task"]
    if not isinstance(name, str) or not 0 < len(name) <= 100:
        raise ArtifactError(f"{where}: source task must be a task name")
    for key, value in source.items():
        if key in ("task", "student"):
            continue
        if not (isinstance(value, str) and 0 < len(value) < 4096):
            raise ArtifactError(f"{where}: source {str(key)[:40]!r} must be a string")
    student = source.get("student")
    if student is None:
        return
    if not isinstance(student, dict) or not set(student) <= STUDENT_KEYS:
        raise ArtifactError(f"{where}: source student must map {sorted(STUDENT_KEYS)}")
    for key in ("width", "depth"):
        v = student.get(key, 1.0)
        ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)
        if not (ok and 0 < v <= 1):
            raise ArtifactError(f"{where}: source student {key} {v!r} is not in (0, 1]")
    if student.get("init", "random") not in ("random", "teacher"):
        raise ArtifactError(f"{where}: source student init must be random or teacher")
    seed = student.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ArtifactError(f"{where}: source student seed {seed!r} is not a seed")


def check_kwargs(kwargs: Any, where: str) -> None:
    """ArtifactError unless ``kwargs`` maps names to JSON scalars and (nested) lists of them."""

    def plain(v: Any, depth: int = 0) -> bool:
        if v is None or isinstance(v, bool | int | str):
            return True
        if isinstance(v, float):
            return math.isfinite(v)
        return depth < 4 and isinstance(v, list) and all(plain(x, depth + 1) for x in v)

    ok = isinstance(kwargs, dict) and all(
        isinstance(k, str) and k.isidentifier() and plain(v) for k, v in kwargs.items()
    )
    if not ok:
        raise ArtifactError(
            f"{where}: constructor arguments must map names to JSON scalars or lists"
        )


def check_modules(where: Path, modules: Any) -> None:
    """Each entry ``{name, type, spec}`` or ``{name, same_as}``: dotted module names, each
    named once, none inside another entry's layer, ``same_as`` naming another module."""
    if not isinstance(modules, list) or len(modules) > MAX_MODULES:
        raise ArtifactError(f"{where}: 'modules' must be a list")
    seen: set[str] = set()
    for i, entry in enumerate(modules):
        at = f"{where}: modules[{i}]"
        if not isinstance(entry, dict):
            raise ArtifactError(f"{at} must be a mapping")
        keys = set(entry)
        if keys not in ({"name", "type", "spec"}, {"name", "same_as"}):
            raise ArtifactError(f"{at} needs 'name' and 'type' + 'spec', or 'same_as'")
        name = entry["name"]
        if not is_module_name(name):
            raise ArtifactError(f"{at}: name {str(name)[:80]!r} is not a module name")
        if name in seen:
            raise ArtifactError(f"{at}: {name!r} appears twice")
        if "same_as" in entry:
            other = entry["same_as"]
            if not is_module_name(other) or _related(name, other):
                raise ArtifactError(f"{at}: same_as {str(other)[:80]!r} is not another module")
        elif not isinstance(entry["type"], str) or not isinstance(entry["spec"], dict):
            raise ArtifactError(f"{at}: 'type' must be a string and 'spec' a mapping")
        seen.add(name)


def is_module_name(name: Any) -> bool:
    if not isinstance(name, str) or not 0 < len(name) <= 1000:
        return False
    return all(_NAME.fullmatch(part) for part in name.split("."))


def _related(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are the same module or one lies inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _check_files(where: Path, files: Any) -> None:
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise ArtifactError(f"{where}: 'files' must list {WEIGHTS}")
    if len(files) != 1:
        other = next(name for name in files if name != WEIGHTS)
        check_file_name(where, other)
        raise ArtifactError(f"{where}: files lists {str(other)[:80]!r}; only {WEIGHTS} is allowed")
    for name, meta in files.items():
        check_file_name(where, name)
        ok = isinstance(meta, dict) and set(meta) == {"sha256", "bytes"}
        ok = ok and isinstance(meta["sha256"], str) and bool(_HEX64.fullmatch(meta["sha256"]))
        size = meta.get("bytes") if isinstance(meta, dict) else None
        ok = ok and not isinstance(size, bool) and isinstance(size, int) and size >= 8
        if not ok:
            raise ArtifactError(f"{where}: files[{name!r}] must be {{sha256, bytes}}")


def verify_file(p: Path, fd: int, name: str, meta: dict[str, Any]) -> None:
    """The open file ``name`` of ``p`` has the size and sha256 the manifest records."""
    size = os.fstat(fd).st_size
    if size != meta["bytes"]:
        raise ArtifactError(
            f"{p / name}: {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)"
        )
    if sha256_fd(fd) != meta["sha256"]:
        raise ArtifactError(f"{p / name}: checksum mismatch (the file is corrupt or was modified)")
