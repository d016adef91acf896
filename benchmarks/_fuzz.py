"""A seeded mutation fuzzer for artifact loading: mutants, fork-server runner, outcomes.

Seeds are artifacts (by default the format-version-1 fixtures of ``tests/data/artifacts/v1``).
Each mutation is drawn from ``random.Random(f"{seed}:{index}")``, so a run is reproducible
mutation by mutation. Mutations change the manifest (random leaves, keys, module entries,
sources, nesting, size, file names), the safetensors header (dtypes, shapes, offsets, names,
tensors, header length), the tensor data (bit flips: the ``payload`` class; everything else is
``structural``) or the files (truncation, garbage, symlinks out of the artifact, pickles).
After every mutation but those of the ``files`` entry itself the manifest's sha256 and size of
``model.safetensors`` are recomputed, so what is tested is the decoder behind the checksum.

Each mutant is written to its own directory (``artifact/`` beside an ``outside`` file that the
artifact must never read) and loaded in a child process forked from a server process that has
imported torch and slimkit once. The child runs under an address-space limit, with an audit
hook that reports any file opened outside the artifact and the Python and slimkit
installation, sockets, subprocesses, ``os.system`` and a few imports no load needs; the
server kills it after the time limit. Outcomes:

- ``slimkit-error``: a ``SlimkitError`` at load (the good outcome);
- ``other-exception``: any other exception at load;
- ``forward-error``: loaded, but the first forward raised;
- ``loads-same`` / ``loads-different``: loaded, outputs bit-identical to the unmutated
  artifact's, or not (or not finite);
- ``crash``: the child died by a signal it did not get from the runner, or exited without
  reporting;
- ``hang``: the time limit ran out;
- ``memory``: ``MemoryError``, an allocation failure, or killed (SIGKILL) by someone else;
- ``escaped``: the child touched something outside the artifact (whatever happened next).

``benchmarks/fuzz.py`` is the command line; ``tests/io/test_fuzz.py`` runs a few hundred
mutations and tests the harness with fake loaders.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import queue
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "tests" / "data" / "artifacts" / "v1"
MANIFEST = "slimkit.json"
WEIGHTS = "model.safetensors"
EXPECTED = "expected.safetensors"
DEFAULT_LOADER = "slimkit:load"

PAYLOAD, STRUCTURAL = "payload", "structural"
OUTCOMES = (
    "slimkit-error",
    "other-exception",
    "forward-error",
    "loads-same",
    "loads-different",
    "crash",
    "hang",
    "memory",
    "escaped",
)
#: outcomes that are wrong for any mutation
BAD = ("other-exception", "forward-error", "crash", "hang", "memory", "escaped")
LOADS = ("loads-same", "loads-different")

#: what the artifact's ``outside`` neighbour holds: a file the loader must never read
OUTSIDE_BYTES = b"a file outside the artifact\n"
OUTSIDE_NAME = "outside.txt"
OUTSIDE_PLACEHOLDER = "@OUTSIDE@"

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
MODULE_TYPES = (
    "Linear", "Conv2d", "BatchNorm2d", "Embedding", "LayerNorm", "Identity", "Sequential",
    "QuantLinear", "QuantConv2d", "QuantEmbedding", "DynamicQuantLinear", "StaticQuantLinear",
    "StaticQuantConv2d", "KMeansLinear", "KMeansConv2d", "SparseKMeansLinear",
    "SparseKMeansConv2d", "SparseLinear", "SparseConv2d", "HuffmanCoded", "SeparableConv2d",
    "LowRankLinear", "TuckerConv2d", "SpatialConv2d", "QATLinear", "NoSuchModule",
)  # fmt: skip
HOSTILE_STRINGS = (
    "", "../x", "/etc/passwd", "../../../../etc/passwd", "pdb:set_trace", "os:abort",
    "sys:exit", "torch.nn:Identity", "slimkit.io.artifact:nn.Sequential", "\x00", "é" * 3,
    "model.safetensors", "fc1", "x" * 10_000, "1", "true", "null", "NaN",
)  # fmt: skip
SOURCES: tuple[dict[str, Any], ...] = (
    {"task": "digits-mlp"},
    {"task": "digits-resnet"},
    {"task": "digits-lenet"},
    {"task": "minilm-topics"},
    {"task": "no-such-task"},
    {"task": "../x"},
    {"task": None},
    {"task": "digits-lenet", "model_dir": "/etc"},
    {"task": "digits-lenet", "student": {"width": 1e30, "depth": 1.0}},
    {"task": "digits-lenet", "student": {"width": 0, "depth": 1.0}},
    {"task": "digits-lenet", "student": {"width": -1}},
    {"task": "digits-lenet", "student": "half"},
    {"hf": "bert-base-uncased", "class": "transformers:AutoModel"},
    {"hf": "/etc", "class": "transformers:AutoModel"},
    {"hf": "../x", "class": "transformers:BertModel"},
    {"class": "pdb:set_trace"},
    {"class": "os:abort"},
    {"class": "sys:exit"},
    {"class": "builtins:print"},
    {"class": "torch.nn:Identity"},
    {"class": "slimkit.io.artifact:nn.Sequential"},
    {"class": "slimkit.tasks.digits:LeNet5"},
    {"class": "slimkit.tasks.digits:MLP300100"},
    {"class": "code:interact"},
    {"class": "slimkit.tasks.searched:SearchedCNN", "kwargs": {"in_shape": [1, 8, 8]}},
    {"class": "slimkit.tasks.digits:LeNet5", "kwargs": {"conv1": 1_000_000_000}},
    {"class": "subprocess:Popen", "kwargs": {"args": ["true"]}},
    {"caller": "Model"},
    {},
)
#: imports no artifact load needs: importing one means the manifest chose code to run
SUSPICIOUS_IMPORTS = frozenset((
    "pdb", "bdb", "code", "codeop", "cmd", "pty", "webbrowser", "antigravity", "this",
    "telnetlib", "ftplib", "smtplib", "turtle", "tkinter", "idlelib",
))  # fmt: skip
#: audit events that are always an escape
ESCAPE_EVENTS = frozenset((
    "socket.connect", "socket.bind", "socket.sendto", "os.system", "subprocess.Popen",
    "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "os.remove", "os.rename", "os.rmdir", "os.unlink", "os.truncate", "os.chmod", "os.chown",
    "shutil.rmtree", "shutil.move", "webbrowser.open",
))  # fmt: skip


# -- the seed artifacts ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Seed:
    """An artifact to mutate: its directory and the file holding its fixed ``input`` batch."""

    name: str
    path: Path
    inputs: Path | None

    @property
    def manifest_text(self) -> str:
        return (self.path / MANIFEST).read_text("utf-8")

    @property
    def weights(self) -> bytes:
        return (self.path / WEIGHTS).read_bytes()


def fixture_seeds(root: Path = FIXTURES) -> list[Seed]:
    """Every artifact under ``root`` (sorted by name), with its ``expected.safetensors``."""
    seeds = []
    for d in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
        inputs = d / EXPECTED
        seeds.append(Seed(d.name, d, inputs if inputs.is_file() else None))
    return seeds


# -- safetensors (pure) ----------------------------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header dict, data region) of a well-formed safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header, data[8 + n :]


def join_safetensors(header: dict[str, Any], payload: bytes) -> bytes:
    """A safetensors file: the header as compact JSON padded with spaces to 8 bytes."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload


def tensor_names(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- mutants ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Mutant:
    """One mutated artifact, as the files to write.

    ``manifest``: the manifest object (serialized at write time, checksums recomputed when
    ``checksum``); ``raw``: sentinel string -> JSON text put in its place after serializing
    (values JSON cannot express from Python: 5000-digit integers, deep nesting);
    ``manifest_bytes``: written as is instead, when set. ``extra``: other files inside the
    artifact; ``links``: names inside the artifact made symlinks to the outside file (or to a
    copy of the seed's weights, ``"weights"``, or manifest, ``"manifest"``, placed outside).
    """

    seed: str
    operator: str
    klass: str
    key: str
    detail: str
    manifest: Any
    weights: bytes
    raw: dict[str, str] = dataclasses.field(default_factory=dict)
    manifest_bytes: bytes | None = None
    extra: dict[str, bytes] = dataclasses.field(default_factory=dict)
    dirs: tuple[str, ...] = ()
    links: dict[str, str] = dataclasses.field(default_factory=dict)
    checksum: bool = True

    def manifest_data(self, outside: str = OUTSIDE_PLACEHOLDER) -> bytes:
        """The manifest file's bytes (``outside``: the absolute outside file's path)."""
        if self.manifest_bytes is not None:
            return self.manifest_bytes
        manifest = self.manifest
        if self.checksum and isinstance(manifest, dict):
            files = manifest.get("files")
            if isinstance(files, dict) and isinstance(files.get(WEIGHTS), dict):
                manifest = copy.copy(manifest)
                entry = {**files[WEIGHTS], "sha256": sha256(self.weights)}
                entry["bytes"] = len(self.weights)
                manifest["files"] = {**files, WEIGHTS: entry}
        text = json.dumps(manifest, indent=2)
        for sentinel, raw in self.raw.items():
            text = text.replace(json.dumps(sentinel), raw)
        text = text.replace(OUTSIDE_PLACEHOLDER, json.dumps(outside)[1:-1])
        return text.encode("utf-8", "surrogatepass")

    def write(self, directory: Path, seed: Seed) -> Path:
        """Write the mutant as ``directory/artifact`` (and its outside files); return it."""
        art = directory / "artifact"
        art.mkdir(parents=True)
        outside = directory / OUTSIDE_NAME
        outside.write_bytes(OUTSIDE_BYTES)
        (art / WEIGHTS).write_bytes(self.weights)
        (art / MANIFEST).write_bytes(self.manifest_data(str(outside)))
        for name, data in self.extra.items():
            (art / name).write_bytes(data)
        for name in self.dirs:
            target = art / name
            if target.is_file():
                target.unlink()
            target.mkdir()
        for name, what in self.links.items():
            if what == "weights":
                target = directory / "outside.safetensors"
                target.write_bytes(seed.weights)
            elif what == "manifest":
                target = directory / "outside.json"
                target.write_bytes(self.manifest_data(str(outside)))
            else:
                target = outside
            (art / name).unlink(missing_ok=True)
            (art / name).symlink_to(target)
        return art

    def same_as(self, seed: Seed) -> bool:
        """Whether writing this mutant gives the seed's files back (a no-op mutation)."""
        if self.raw or self.manifest_bytes is not None or self.extra or self.links or self.dirs:
            return False
        if self.weights != seed.weights:
            return False
        ours = json.loads(self.manifest_data())
        return _canonical(ours) == _canonical(json.loads(seed.manifest_text))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


@dataclasses.dataclass
class Draft:
    """What an operator changes: a deep copy of the seed's manifest and its weights."""

    seed: Seed
    manifest: Any
    weights: bytes

    def mutant(self, operator: str, key: str, detail: str, **kw: Any) -> Mutant:
        klass = kw.pop("klass", STRUCTURAL)
        return Mutant(
            self.seed.name, operator, klass, key, detail, self.manifest, self.weights, **kw
        )


Operator = Callable[[Draft, random.Random], "Mutant | None"]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into ``obj`` (dict keys and list indexes), containers included."""
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _get(obj: Any, path: Sequence[Any]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: Sequence[Any], value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _show(path: Sequence[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def random_value(rng: random.Random, raw: dict[str, str]) -> Any:
    """A random JSON value of a random type; values Python's json cannot write are
    sentinels whose text goes into ``raw``."""
    kind = rng.choice(("int", "float", "str", "bool", "null", "list", "dict", "raw"))
    if kind == "int":
        return rng.choice((0, -1, 1, 2, 7, 255, 2**31, 2**63, -(2**63), 10**30))
    if kind == "float":
        return rng.choice((0.0, -0.0, 0.5, -1.5, 1e30, -1e30, 1e-30, float("nan"), float("inf")))
    if kind == "str":
        return rng.choice(HOSTILE_STRINGS)
    if kind == "bool":
        return rng.choice((True, False))
    if kind == "null":
        return None
    if kind == "list":
        return rng.choice(([], [0], [None], [[]], [1, 2, 3], ["a"], [-1] * 3))
    if kind == "dict":
        return rng.choice(({}, {"a": 1}, {"name": "fc1"}, {"__class__": "os:system"}))
    sentinel = f"@RAW{len(raw)}@"
    raw[sentinel] = rng.choice(("9" * 5000, "-" + "9" * 5000, "1e999", "-1e999", "NaN"))
    return sentinel


def _top(path: Sequence[Any]) -> str:
    return str(path[0]) if path else "(root)"


# manifest operators
def op_json_leaf(d: Draft, rng: random.Random) -> Mutant | None:
    paths = list(_paths(d.manifest))
    if not paths:
        return None
    path = rng.choice(paths)
    raw: dict[str, str] = {}
    value = random_value(rng, raw)
    _set(d.manifest, path, value)
    shown = raw.get(value, value) if isinstance(value, str) else value
    files = path[0] == "files"
    detail = f"{_show(path)} = {_short(shown)}"
    return d.mutant("json-leaf", _top(path), detail, raw=raw, checksum=not files)


def op_json_delete(d: Draft, rng: random.Random) -> Mutant | None:
    paths = [p for p in _paths(d.manifest) if isinstance(_get(d.manifest, p[:-1]), dict)]
    if not paths:
        return None
    path = rng.choice(paths)
    del _get(d.manifest, path[:-1])[path[-1]]
    return d.mutant(
        "json-delete-key", _top(path), f"del {_show(path)}", checksum=path[0] != "files"
    )


def op_json_add(d: Draft, rng: random.Random) -> Mutant | None:
    dicts = [()] + [p for p in _paths(d.manifest) if isinstance(_get(d.manifest, p), dict)]
    path = rng.choice(dicts)
    name = rng.choice(("unknown", "__proto__", "same_as", "type", "spec", "kwargs", "x" * 64))
    target = _get(d.manifest, path)
    if name in target:
        return None
    raw: dict[str, str] = {}
    target[name] = random_value(rng, raw)
    key = _top(path) if path else name
    detail = f"{_show((*path, name))} added"
    return d.mutant("json-add-key", key, detail, raw=raw, checksum=key != "files")


def _modules(d: Draft) -> list[Any] | None:
    modules = d.manifest.get("modules") if isinstance(d.manifest, dict) else None
    return modules if isinstance(modules, list) and modules else None


def op_modules(d: Draft, rng: random.Random) -> Mutant | None:
    modules = _modules(d)
    if modules is None:
        return None
    how = rng.choice(("duplicate", "reorder", "delete", "reverse"))
    i = rng.randrange(len(modules))
    if how == "duplicate":
        modules.insert(rng.randrange(len(modules) + 1), copy.deepcopy(modules[i]))
    elif how == "delete":
        del modules[i]
    elif how == "reverse":
        modules.reverse()
    else:
        j = rng.randrange(len(modules))
        modules[i], modules[j] = modules[j], modules[i]
    return d.mutant(f"modules-{how}", "modules", f"modules[{i}] {how}")


def op_module_type(d: Draft, rng: random.Random) -> Mutant | None:
    modules = _modules(d)
    if modules is None:
        return None
    i = rng.randrange(len(modules))
    if not isinstance(modules[i], dict):
        return None
    new = rng.choice(MODULE_TYPES)
    old = modules[i].get("type")
    modules[i]["type"] = new
    return d.mutant("module-type", "modules", f"modules[{i}].type {old} -> {new}")


def op_module_swap_specs(d: Draft, rng: random.Random) -> Mutant | None:
    modules = _modules(d)
    if modules is None:
        return None
    with_spec = [i for i, m in enumerate(modules) if isinstance(m, dict) and "spec" in m]
    if len(with_spec) < 2:
        return None
    i, j = rng.sample(with_spec, 2)
    modules[i]["spec"], modules[j]["spec"] = modules[j]["spec"], modules[i]["spec"]
    if rng.random() < 0.5:
        modules[i]["type"], modules[j]["type"] = modules[j]["type"], modules[i]["type"]
        return d.mutant("module-swap-entries", "modules", f"modules[{i}] <-> modules[{j}]")
    return d.mutant("module-swap-specs", "modules", f"modules[{i}].spec <-> modules[{j}].spec")


def op_same_as(d: Draft, rng: random.Random) -> Mutant | None:
    modules = _modules(d)
    if modules is None:
        return None
    i = rng.randrange(len(modules))
    names = [m.get("name") for m in modules if isinstance(m, dict)]
    target = rng.choice([*names, "", ".", "..", "fc1.weight", "no.such", "conv1.bias", "0"])
    name = modules[i].get("name") if isinstance(modules[i], dict) else None
    entry = {"name": name, "same_as": target}
    if rng.random() < 0.3:
        entry = {"name": rng.choice(["", "fc9", "conv1.weight", "a.b.c"]), "same_as": target}
    modules.insert(i, entry) if rng.random() < 0.3 else modules.__setitem__(i, entry)
    return d.mutant("module-same-as", "modules", f"{entry['name']!r} same_as {target!r}")


def op_deep(d: Draft, rng: random.Random) -> Mutant | None:
    paths = list(_paths(d.manifest))
    path = rng.choice(paths)
    depth = rng.choice((1000, 100_000))
    sentinel = "@DEEP@"
    _set(d.manifest, path, sentinel)
    raw = {sentinel: "[" * depth + "]" * depth}
    detail = f"{_show(path)} = [[[...]]] x {depth}"
    return d.mutant("json-deep", _top(path), detail, raw=raw, checksum=path[0] != "files")


def op_huge(d: Draft, rng: random.Random) -> Mutant | None:
    sentinel = "@HUGE@"
    n = rng.choice((1_000_000, 4_000_000))
    place = rng.choice(("unknown", "recipe", "modules"))
    if place == "modules" and _modules(d) is not None:
        d.manifest["modules"].append({"name": "x", "type": "Linear", "spec": sentinel})
    else:
        place = "unknown" if place == "modules" else place
        d.manifest[place] = sentinel
    raw = {sentinel: "[" + ",".join(["0"] * n) + "]"}
    return d.mutant("json-huge", place, f"{place}: a list of {n} zeros", raw=raw)


def op_format_version(d: Draft, rng: random.Random) -> Mutant | None:
    if not isinstance(d.manifest, dict):
        return None
    raw: dict[str, str] = {}
    value = rng.choice((True, False, -1, 0, 2, "1", 1.0, None, [1], "@RAW@"))
    if value == "@RAW@":
        raw["@RAW@"] = "1" + "0" * 5000
    d.manifest["format_version"] = value
    return d.mutant("format-version", "format_version", f"= {_short(value)}", raw=raw)


def op_format(d: Draft, rng: random.Random) -> Mutant | None:
    if not isinstance(d.manifest, dict):
        return None
    value = rng.choice(("slimkit-artifact ", "SLIMKIT-ARTIFACT", "", None, 1, "pytorch"))
    d.manifest["format"] = value
    return d.mutant("format-name", "format", f"= {_short(value)}")


def op_files_names(d: Draft, rng: random.Random) -> Mutant | None:
    if not isinstance(d.manifest, dict) or not isinstance(d.manifest.get("files"), dict):
        return None
    files = d.manifest["files"]
    how = rng.choice(("add-relative", "add-absolute", "add-etc", "rename", "rename-absolute"))
    outside = {"sha256": sha256(OUTSIDE_BYTES), "bytes": len(OUTSIDE_BYTES)}
    if how == "add-relative":
        files[f"../{OUTSIDE_NAME}"] = outside
    elif how == "add-absolute":
        files[OUTSIDE_PLACEHOLDER] = outside
    elif how == "add-etc":
        files["/etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    else:
        entry = files.pop(WEIGHTS, None)
        if entry is None:
            return None
        name = f"../{OUTSIDE_NAME}" if how == "rename" else OUTSIDE_PLACEHOLDER
        files[name] = {**entry, **outside}
    return d.mutant("files-names", "files", how, checksum=how.startswith("add"))


def op_source(d: Draft, rng: random.Random) -> Mutant | None:
    if not isinstance(d.manifest, dict):
        return None
    old = d.manifest.get("source")
    how = rng.choice(("replace", "replace", "merge", "kwargs"))
    if how == "kwargs" and isinstance(old, dict) and isinstance(old.get("kwargs"), dict):
        kwargs = old["kwargs"]
        paths = list(_paths(kwargs))
        path = rng.choice(paths)
        value = rng.choice((10**9, 2**40, -1, 0, "x", None, 1e30, [], [10**6] * 3))
        _set(kwargs, path, value)
        return d.mutant("source-kwargs", "source", f"kwargs{_show(path)} = {_short(value)}")
    new = copy.deepcopy(rng.choice(SOURCES))
    if how == "merge" and isinstance(old, dict):
        new = {**old, **new}
    d.manifest["source"] = new
    return d.mutant("source", "source", _short(new))


# safetensors header operators
def _header_draft(d: Draft) -> tuple[dict[str, Any], bytes, list[str]]:
    header, payload = split_safetensors(d.weights)
    return header, payload, tensor_names(header)


def _with_header(d: Draft, header: dict[str, Any], payload: bytes) -> None:
    d.weights = join_safetensors(header, payload)


def op_st_dtype(d: Draft, rng: random.Random) -> Mutant | None:
    header, payload, names = _header_draft(d)
    name = rng.choice(names)
    old = header[name]["dtype"]
    new = rng.choice([t for t in ("F32", "I32", "F64", "F16", "I64", "BF16", "U8", "I8", "BOOL")
                      if t != old])  # fmt: skip
    header[name]["dtype"] = new
    _with_header(d, header, payload)
    return d.mutant("st-dtype", "header", f"{name}: {old} -> {new}")


def op_st_recast(d: Draft, rng: random.Random) -> Mutant | None:
    """A valid file where one tensor is stored in another dtype (values cast)."""
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = st_load(d.weights)
    name = rng.choice(sorted(tensors))
    old = tensors[name].dtype
    options = [torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8,
               torch.float32]  # fmt: skip
    new = rng.choice([t for t in options if t != old])
    tensors[name] = tensors[name].to(new)
    header, _ = split_safetensors(d.weights)
    d.weights = st_save(tensors, metadata=header.get("__metadata__"))
    return d.mutant("st-recast", "header", f"{name}: {old} -> {new} (values cast)")


def op_st_shape(d: Draft, rng: random.Random) -> Mutant | None:
    header, payload, names = _header_draft(d)
    name = rng.choice(names)
    shape = list(header[name]["shape"])
    old = list(shape)
    how = rng.choice(("plus", "minus", "zero", "huge", "reverse", "unsqueeze", "squeeze", "flat"))
    if how in ("plus", "minus", "zero", "huge") and shape:
        i = rng.randrange(len(shape))
        shape[i] = {"plus": shape[i] + 1, "minus": shape[i] - 1, "zero": 0, "huge": 2**40}[how]
    elif how == "reverse":
        shape.reverse()
    elif how == "unsqueeze":
        shape.insert(rng.randrange(len(shape) + 1), 1)
    elif how == "squeeze" and shape:
        shape = shape[1:] if shape[0] == 1 else [shape[0] * (shape[1] if len(shape) > 1 else 1)]
        shape += old[2:]
    else:
        n = 1
        for s in shape:
            n *= s
        shape = [n]
    if shape == old:
        return None
    header[name]["shape"] = shape
    _with_header(d, header, payload)
    return d.mutant("st-shape", "header", f"{name}: {old} -> {shape} ({how})")


def op_st_offsets(d: Draft, rng: random.Random) -> Mutant | None:
    header, payload, names = _header_draft(d)
    name = rng.choice(names)
    begin, end = header[name]["data_offsets"]
    how = rng.choice(("begin+1", "end-1", "end+1", "begin-8", "swap", "overlap", "beyond", "neg"))
    other = header[rng.choice(names)]["data_offsets"]
    new = {
        "begin+1": [begin + 1, end],
        "end-1": [begin, end - 1],
        "end+1": [begin, end + 1],
        "begin-8": [begin - 8, end],
        "swap": [end, begin],
        "overlap": list(other),
        "beyond": [begin, len(payload) + 4096],
        "neg": [-1, end],
    }[how]
    if new == [begin, end]:
        return None
    header[name]["data_offsets"] = new
    _with_header(d, header, payload)
    return d.mutant("st-offsets", "header", f"{name}: [{begin}, {end}] -> {new} ({how})")


def op_st_rename(d: Draft, rng: random.Random) -> Mutant | None:
    header, payload, names = _header_draft(d)
    name = rng.choice(names)
    new = rng.choice([*names, "../x", "", name + ".x", name.upper(), "fc1.weight", "__metadata"])
    if new == name:
        return None
    entry = header.pop(name)
    if new in header:  # the two swap names
        header[name] = header[new]
    header[new] = entry
    _with_header(d, header, payload)
    return d.mutant("st-rename", "header", f"{name} -> {new}")


def op_st_drop(d: Draft, rng: random.Random) -> Mutant | None:
    """A valid file with one tensor left out (the data region rebuilt without it)."""
    header, payload, names = _header_draft(d)
    if len(names) < 2:
        return None
    name = rng.choice(names)
    begin, end = header.pop(name)["data_offsets"]
    for n in names:
        if n != name and header[n]["data_offsets"][0] >= end:
            b, e = header[n]["data_offsets"]
            header[n]["data_offsets"] = [b - (end - begin), e - (end - begin)]
    _with_header(d, header, payload[:begin] + payload[end:])
    return d.mutant("st-drop", "header", f"{name} dropped")


def op_st_add(d: Draft, rng: random.Random) -> Mutant | None:
    header, payload, names = _header_draft(d)
    name = rng.choice(("extra.weight", names[0] + "_copy", "fc1.extra", "conv1.weight2"))
    if name in header:
        return None
    n = rng.choice((1, 4, 1024))
    header[name] = {
        "dtype": "F32",
        "shape": [n],
        "data_offsets": [len(payload), len(payload) + 4 * n],
    }
    _with_header(d, header, payload + bytes(4 * n))
    return d.mutant("st-add", "header", f"{name} F32 [{n}] added")


def op_st_metadata(d: Draft, rng: random.Random) -> Mutant | None:
    header, payload, _ = _header_draft(d)
    value = rng.choice((None, {}, {"format": "np"}, {"format": "pt", "x": "y"}, {"format": 1}))
    if value is None:
        header.pop("__metadata__", None)
    else:
        header["__metadata__"] = value
    _with_header(d, header, payload)
    return d.mutant("st-metadata", "header", f"__metadata__ = {_short(value)}")


def op_st_header_length(d: Draft, rng: random.Random) -> Mutant | None:
    (n,) = struct.unpack("<Q", d.weights[:8])
    new = rng.choice((n + 1, n - 1, n + 8, n - 8, 0, 2**63, 2**64 - 1, len(d.weights), 7))
    d.weights = struct.pack("<Q", new) + d.weights[8:]
    return d.mutant("st-header-length", "header", f"{n} -> {new}")


def op_st_header_text(d: Draft, rng: random.Random) -> Mutant | None:
    """Bytes of the header JSON text itself replaced (not re-serialized)."""
    (n,) = struct.unpack("<Q", d.weights[:8])
    data = bytearray(d.weights)
    i = 8 + rng.randrange(n)
    data[i] = rng.choice(b'{}[]",:0\x00\xff ')
    d.weights = bytes(data)
    return d.mutant("st-header-byte", "header", f"header byte {i - 8} -> {data[i]:#04x}")


# payload operator
def op_payload_flip(d: Draft, rng: random.Random) -> Mutant | None:
    header, payload, names = _header_draft(d)
    names = [n for n in names if header[n]["data_offsets"][1] > header[n]["data_offsets"][0]]
    name = rng.choice(names)
    begin, end = header[name]["data_offsets"]
    start = len(d.weights) - len(payload)
    data = bytearray(d.weights)
    bits = rng.sample(range(8 * (end - begin)), min(rng.randint(1, 8), 8 * (end - begin)))
    for bit in bits:
        data[start + begin + bit // 8] ^= 1 << (bit % 8)
    d.weights = bytes(data)
    return d.mutant("payload-flip", "data", f"{name}: {len(bits)} bit(s)", klass=PAYLOAD)


# file operators
def op_truncate(d: Draft, rng: random.Random) -> Mutant | None:
    n = rng.choice((0, 4, 8, 9, rng.randrange(len(d.weights)), len(d.weights) - 1))
    d.weights = d.weights[:n]
    return d.mutant("file-truncate", "file", f"{WEIGHTS} cut to {n} bytes")


def op_append(d: Draft, rng: random.Random) -> Mutant | None:
    n = rng.choice((1, 8, 4096))
    d.weights += bytes(rng.randrange(256) for _ in range(n))
    return d.mutant("file-append", "file", f"{n} garbage bytes appended to {WEIGHTS}")


def op_symlink(d: Draft, rng: random.Random) -> Mutant | None:
    how = rng.choice(("weights", "manifest", "outside"))
    name = {"weights": WEIGHTS, "manifest": MANIFEST, "outside": WEIGHTS}[how]
    detail = (
        f"{name} is a symlink to "
        + {
            "weights": "a copy of the weights outside the artifact",
            "manifest": "a copy of the manifest outside the artifact",
            "outside": "a file outside the artifact",
        }[how]
    )
    return d.mutant("file-symlink", "file", detail, links={name: how})


class _Reduce:
    """A pickle that runs ``os.system`` when loaded (the child's audit hook sees it)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("true",))


def op_pickle(d: Draft, rng: random.Random) -> Mutant | None:
    blob = b"\x80\x04" + pickle.dumps(_Reduce(), protocol=4)[2:]
    how = rng.choice(("listed", "unlisted", "replace"))
    if how == "replace":
        d.weights = blob
        return d.mutant("file-pickle", "file", f"{WEIGHTS} is a pickle (checksum updated)")
    name = rng.choice(("model.pt", "pytorch_model.bin", "model.pkl"))
    if (
        how == "listed"
        and isinstance(d.manifest, dict)
        and isinstance(d.manifest.get("files"), dict)
    ):
        d.manifest["files"][name] = {"sha256": sha256(blob), "bytes": len(blob)}
        return d.mutant(
            "file-pickle", "files", f"{name} (a pickle) listed in files", extra={name: blob}
        )
    return d.mutant("file-pickle", "file", f"{name} (a pickle) beside the artifact files",
                    extra={name: blob})  # fmt: skip


def op_manifest_bytes(d: Draft, rng: random.Random) -> Mutant | None:
    text = json.dumps(d.manifest, indent=2).encode()
    how = rng.choice(("empty", "bom", "latin1", "garbage", "truncated", "nul", "dup-key"))
    data = {
        "empty": b"",
        "bom": b"\xef\xbb\xbf" + text,
        "latin1": text.replace(b'"', b'"\xe9', 1),
        "garbage": bytes(rng.randrange(256) for _ in range(64)),
        "truncated": text[: len(text) // 2],
        "nul": text + b"\x00",
        "dup-key": text.replace(b'"format": "slimkit-artifact"',
                                b'"format": "slimkit-artifact", "format": "other"', 1),
    }[how]  # fmt: skip
    return d.mutant("manifest-bytes", "(manifest)", how, manifest_bytes=data)


def op_file_dir(d: Draft, rng: random.Random) -> Mutant | None:
    name = rng.choice((WEIGHTS, MANIFEST))
    return d.mutant("file-is-dir", "file", f"{name} is a directory", dirs=(name,))


#: name -> (operator, weight)
OPERATORS: dict[str, tuple[Operator, float]] = {
    "json-leaf": (op_json_leaf, 10),
    "json-delete-key": (op_json_delete, 4),
    "json-add-key": (op_json_add, 3),
    "modules": (op_modules, 3),
    "module-type": (op_module_type, 3),
    "module-swap": (op_module_swap_specs, 3),
    "module-same-as": (op_same_as, 2),
    "json-deep": (op_deep, 1),
    "json-huge": (op_huge, 0.5),
    "format-version": (op_format_version, 1),
    "format-name": (op_format, 0.5),
    "files-names": (op_files_names, 1.5),
    "source": (op_source, 4),
    "st-dtype": (op_st_dtype, 3),
    "st-recast": (op_st_recast, 2),
    "st-shape": (op_st_shape, 3),
    "st-offsets": (op_st_offsets, 2),
    "st-rename": (op_st_rename, 2),
    "st-drop": (op_st_drop, 1.5),
    "st-add": (op_st_add, 1),
    "st-metadata": (op_st_metadata, 1),
    "st-header-length": (op_st_header_length, 1),
    "st-header-byte": (op_st_header_text, 1),
    "payload-flip": (op_payload_flip, 10),
    "file-truncate": (op_truncate, 1),
    "file-append": (op_append, 1),
    "file-symlink": (op_symlink, 1),
    "file-pickle": (op_pickle, 1),
    "manifest-bytes": (op_manifest_bytes, 1),
    "file-is-dir": (op_file_dir, 0.5),
}


def apply(seed: Seed, rng: random.Random, operator: str | None = None) -> Mutant | None:
    """One mutant of ``seed`` from ``operator`` (drawn by weight when None); None when the
    operator did not apply or gave the seed's files back."""
    if operator is None:
        names = list(OPERATORS)
        operator = rng.choices(names, weights=[OPERATORS[n][1] for n in names])[0]
    draft = Draft(seed, json.loads(seed.manifest_text), seed.weights)
    mutant = OPERATORS[operator][0](draft, rng)
    if mutant is None or mutant.same_as(seed):
        return None
    return mutant


def mutants(
    seeds: Sequence[Seed], n: int, seed: int, skipped: Counter[str] | None = None
) -> Iterator[tuple[int, Mutant]]:
    """``n`` mutants, seed artifacts taken in turn; mutation ``i`` is drawn from
    ``Random(f"{seed}:{i}")``. No-ops are redrawn (counted in ``skipped``)."""
    for i in range(n):
        yield i, mutant_at(seeds, i, seed, skipped)


def mutant_at(
    seeds: Sequence[Seed], i: int, seed: int, skipped: Counter[str] | None = None
) -> Mutant:
    rng = random.Random(f"{seed}:{i}")
    base = seeds[i % len(seeds)]
    while True:
        names = list(OPERATORS)
        operator = rng.choices(names, weights=[OPERATORS[k][1] for k in names])[0]
        m = apply(base, rng, operator)
        if m is not None:
            return m
        if skipped is not None:
            skipped[operator] += 1


# -- the fork server (runs in its own process) ------------------------------------------------
def _resolve(spec: str) -> Callable[..., Any]:
    """``module:function`` or ``/path/file.py:function``."""
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        mod_name = "fuzz_loader_" + hashlib.sha1(where.encode()).hexdigest()[:8]
        spec_ = importlib.util.spec_from_file_location(mod_name, where)
        assert spec_ is not None and spec_.loader is not None
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn: Callable[..., Any] = getattr(module, name)
    return fn


def _allowed_roots() -> list[str]:
    """Directories a load may read: the Python installation, site-packages, slimkit's own
    code and its task cache, the Hugging Face cache, /proc, /sys and /dev."""
    import site
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/proc", "/sys", "/dev"}
    roots.update(site.getsitepackages())
    roots.update(p for p in sysconfig.get_paths().values())
    try:
        import slimkit
        from slimkit.tasks.digits import cache_dir

        roots.add(str(Path(slimkit.__file__).resolve().parent))
        roots.add(str(cache_dir()))
    except ImportError:
        pass
    hf = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    roots.add(hf)
    roots.add("/etc/ld.so.cache")
    return sorted(os.path.realpath(r) for r in roots if r)


def _within(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _is_memory_error(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    alloc = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory")
    return isinstance(e, RuntimeError | OSError) and any(a in text for a in alloc)


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        for x in out:
            if isinstance(x, torch.Tensor):
                return x
    raise TypeError(f"the forward returned {type(out).__name__}, not a tensor")


def _child(job: dict[str, Any], write: int, load: Callable[..., Any], inputs: Any,
           roots: list[str], limit: int) -> None:  # fmt: skip
    """The forked child: limits, audit hook, load, one forward; reports JSON lines."""
    import torch

    def send(msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(write, data) :]

    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    torch.set_num_threads(1)
    art = os.path.realpath(job["artifact"])
    # relative names resolve inside the artifact, as a loader opening its files relative to
    # the directory's descriptor (openat) sees them: "../x" still resolves outside it
    os.chdir(art if os.path.isdir(art) else os.path.dirname(art))
    allowed = [art, *roots]
    preloaded = set(sys.modules)
    busy = [False]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if busy[0]:
            return
        busy[0] = True
        try:
            if event == "open":
                path = args[0]
                if isinstance(path, int):
                    return
                name = os.fsdecode(path)
                flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
                if flags & os.O_NOFOLLOW:  # the kernel never follows the last component
                    parent, base = os.path.split(os.path.abspath(name))
                    full = os.path.join(os.path.realpath(parent), base)
                else:
                    full = os.path.realpath(name)
                if not _within(full, allowed):
                    send({"escape": f"open {full}"})
            elif event == "import":
                name = str(args[0])
                top = name.partition(".")[0]
                if name not in preloaded and top in SUSPICIOUS_IMPORTS:
                    send({"escape": f"import {name}"})
            elif event in ESCAPE_EVENTS or event.startswith(("os.exec", "os.spawn")):
                send({"escape": f"{event} {_short(args)}"})
        except Exception:  # a hook must never make the audited call fail
            pass
        finally:
            busy[0] = False

    sys.addaudithook(hook)
    try:
        model = load(art)
    except BaseException as e:
        from slimkit.errors import SlimkitError

        if isinstance(e, SlimkitError):
            send({"result": "slimkit-error", "message": f"{type(e).__name__}: {e}"})
        elif _is_memory_error(e):
            send({"result": "memory", "message": f"{type(e).__name__}: {e}"})
        else:
            send({"result": "other-exception", "message": f"{type(e).__name__}: {e}"})
        return
    send({"loaded": True})
    try:
        with torch.inference_mode():
            out = _first_tensor(model(inputs) if inputs is not None else model())
            digest = hashlib.sha256(
                f"{out.dtype}{tuple(out.shape)}".encode() + out.contiguous().numpy().tobytes()
            ).hexdigest()
            finite = bool(torch.isfinite(out).all()) if out.is_floating_point() else True
    except BaseException as e:
        kind = "memory" if _is_memory_error(e) else "forward-error"
        send({"result": kind, "message": f"{type(e).__name__}: {e}"})
        return
    send({"result": "loaded", "digest": digest, "finite": finite})


def _run_one(job: dict[str, Any], load: Callable[..., Any], inputs: Any, roots: list[str],
             limit: int) -> dict[str, Any]:  # fmt: skip
    """Fork a child for ``job``; wait for it with the time limit; what it reported."""
    read, write = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read)
            _child(job, write, load, inputs, roots, limit)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write)
    deadline = started + float(job["timeout"])
    chunks: list[bytes] = []
    status: int | None = None
    killed = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            _kill(pid)
            killed = True
            break
        ready, _, _ = select.select([read], [], [], min(left, 0.2))
        if ready:
            data = os.read(read, 65536)
            if not data:
                break
            chunks.append(data)
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
    if status is None:
        _, status = os.waitpid(pid, 0)
    _drain(read, chunks)
    os.close(read)
    _kill(pid)  # whatever the child started
    seconds = time.monotonic() - started
    return _verdict(b"".join(chunks), status, killed, seconds)


def _kill(pid: int) -> None:
    """SIGKILL the child's process group (the child itself if it has none yet)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _drain(fd: int, chunks: list[bytes]) -> None:
    os.set_blocking(fd, False)
    try:
        while data := os.read(fd, 65536):
            chunks.append(data)
    except BlockingIOError:
        pass


def _verdict(data: bytes, status: int, killed: bool, seconds: float) -> dict[str, Any]:
    """The outcome of one child from its messages and exit status."""
    messages = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            messages.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    escapes = [m["escape"] for m in messages if "escape" in m]
    results = [m for m in messages if "result" in m]
    out: dict[str, Any] = {"seconds": round(seconds, 4), "escapes": escapes[:5]}
    if results:
        out.update(results[0])
        out["outcome"] = out.pop("result")
    elif killed:
        out["outcome"], out["message"] = "hang", "time limit"
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name
        out["outcome"] = "memory" if sig == signal.SIGKILL else "crash"
        out["message"] = f"killed by {name}"
    else:
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        out["outcome"], out["message"] = "crash", f"exited with status {code} without a result"
    if escapes:
        out["outcome"] = "escaped"
    return out


def serve(config: dict[str, Any]) -> None:
    """The fork-server loop: a job (JSON line) on stdin, its result (JSON line) on stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    for path in config.get("sys_path", []):
        sys.path.insert(0, path)
    load = _resolve(config["loader"])
    inputs: dict[str, Any] = {}
    for warm in config.get("warm", []):  # lazy imports and caches, once
        try:
            model = load(warm["artifact"])
            if warm.get("inputs"):
                with torch.inference_mode():
                    model(load_file(warm["inputs"])["input"])
        except Exception:
            pass
    tempfile.gettempdir()  # its first call probes the temp dir by writing a file there
    roots = _allowed_roots()
    vm = _vm_bytes()
    limit = vm + int(config.get("memory_extra", 2 << 30))
    proto.write(json.dumps({"ready": True, "vm": vm, "limit": limit}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        path = job.get("inputs")
        if path and path not in inputs:
            inputs[path] = load_file(path)["input"]
        result = _run_one(job, load, inputs.get(path) if path else None, roots, limit)
        proto.write(json.dumps(result) + "\n")


def _vm_bytes() -> int:
    """This process's virtual memory size (VmSize) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the runner (in the calling process) -----------------------------------------------------
class Server:
    """One fork server: a Python process with torch and slimkit imported once."""

    def __init__(self, loader: str, warm: Sequence[Seed] = (), memory_extra: int = 2 << 30,
                 sys_path: Sequence[str] = ()) -> None:  # fmt: skip
        config = {
            "loader": loader,
            "memory_extra": memory_extra,
            "sys_path": list(sys_path),
            "warm": [
                {"artifact": str(s.path), "inputs": str(s.inputs) if s.inputs else None}
                for s in warm
            ],
        }
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server stopped (status {self.proc.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, artifact: Path, inputs: Path | None, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        job = {"artifact": str(artifact), "inputs": str(inputs) if inputs else None,
               "timeout": timeout}  # fmt: skip
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclasses.dataclass
class Record:
    """One mutation and what loading it did."""

    index: int
    seed: str
    operator: str
    klass: str
    key: str
    detail: str
    outcome: str
    message: str = ""
    escapes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


class Runner:
    """A pool of fork servers that load artifacts in isolated children."""

    def __init__(self, loader: str = DEFAULT_LOADER, workers: int = 2, timeout: float = 10.0,
                 memory_extra: int = 2 << 30, warm: Sequence[Seed] = (),
                 sys_path: Sequence[str] = ()) -> None:  # fmt: skip
        self.timeout = timeout
        self.servers: list[Server] = []
        config = (loader, warm, memory_extra, sys_path)
        starters = [
            threading.Thread(target=lambda: self.servers.append(Server(*config)))
            for _ in range(max(1, workers))
        ]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        if len(self.servers) != max(1, workers):
            self.close()
            raise RuntimeError("a fork server did not start")
        self.references: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self.servers:
            s.close()

    def load(self, artifact: Path, inputs: Path | None, server: int = 0) -> dict[str, Any]:
        """The raw result of loading ``artifact`` in a child of server ``server``."""
        return self.servers[server].run(artifact, inputs, self.timeout)

    def reference(self, seeds: Sequence[Seed]) -> dict[str, dict[str, Any]]:
        """Load every unmutated seed; the result of each (its output digest when it loads)."""
        for s in seeds:
            self.references[s.name] = self.load(s.path, s.inputs)
        return self.references

    def classify(self, result: dict[str, Any], seed: str) -> str:
        """The outcome: ``loaded`` becomes ``loads-same`` or ``loads-different``."""
        outcome = str(result["outcome"])
        if outcome != "loaded":
            return outcome
        ref = self.references.get(seed, {})
        same = result.get("finite") and result.get("digest") == ref.get("digest")
        return "loads-same" if same else "loads-different"

    def run(self, seeds: Sequence[Seed], jobs: Sequence[int], make: Callable[[int], Mutant],
            workdir: Path) -> list[Record]:  # fmt: skip
        """Write and load the mutant ``make(i)`` for every ``i`` in ``jobs``, the servers in
        parallel; the records in ``jobs`` order."""
        by_name = {s.name: s for s in seeds}
        todo: queue.Queue[int] = queue.Queue()
        for i in jobs:
            todo.put(i)
        records: dict[int, Record] = {}
        errors: list[BaseException] = []

        def work(server: int) -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    m = make(i)
                    seed = by_name[m.seed]
                    where = workdir / f"m{i}"
                    art = m.write(where, seed)
                    result = self.load(art, seed.inputs, server)
                    shutil.rmtree(where, ignore_errors=True)
                    records[i] = Record(
                        i, m.seed, m.operator, m.klass, m.key, m.detail,
                        self.classify(result, m.seed), str(result.get("message", ""))[:300],
                        list(result.get("escapes", [])), float(result.get("seconds", 0.0)),
                    )  # fmt: skip
                except BaseException as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(self.servers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [records[i] for i in jobs]


# -- a whole run -----------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    """The records of a run, what happened to the unmutated seeds, and timings."""

    records: list[Record]
    seeds: dict[str, dict[str, Any]]
    skipped: dict[str, int]
    seconds: float
    startup_seconds: float
    workers: int


def fuzz(n: int, seed: int = 0, seeds: Sequence[Seed] | None = None, workers: int = 2,
         timeout: float = 10.0, loader: str = DEFAULT_LOADER, memory_extra: int = 2 << 30,
         warm: bool = True) -> Report:  # fmt: skip
    """Run ``n`` seeded mutations of ``seeds`` (default: the fixtures) through ``loader``."""
    seeds = list(seeds if seeds is not None else fixture_seeds())
    started = time.perf_counter()
    with Runner(loader, workers, timeout, memory_extra, seeds if warm else ()) as runner:
        refs = runner.reference(seeds)
        startup = time.perf_counter() - started
        usable = [s for s in seeds if refs[s.name]["outcome"] == "loaded"]
        skipped: Counter[str] = Counter()
        records: list[Record] = []
        if usable:
            with tempfile.TemporaryDirectory(prefix="slimkit-fuzz-") as tmp:
                records = runner.run(
                    usable, list(range(n)), lambda i: mutant_at(usable, i, seed, skipped),
                    Path(tmp),
                )  # fmt: skip
    return Report(records, refs, dict(skipped), time.perf_counter() - started, startup, workers)


# -- summaries (pure) ------------------------------------------------------------------------
def is_bad(r: Record) -> bool:
    """An outcome that is wrong: any of ``BAD``, or a structural mutation that loaded."""
    return r.outcome in BAD or (r.klass == STRUCTURAL and r.outcome in LOADS)


def counts(records: Sequence[Record], by: Callable[[Record], str]) -> dict[str, Counter[str]]:
    """``by(record)`` -> Counter of outcomes."""
    table: dict[str, Counter[str]] = {}
    for r in records:
        table.setdefault(by(r), Counter())[r.outcome] += 1
    return dict(sorted(table.items()))


def examples(records: Sequence[Record], per_kind: int = 3) -> dict[str, list[Record]]:
    """The first few records of every bad outcome (structural loads split by outcome)."""
    out: dict[str, list[Record]] = {}
    for r in records:
        if not is_bad(r):
            continue
        kind = f"structural {r.outcome}" if r.outcome in LOADS else r.outcome
        bucket = out.setdefault(kind, [])
        if len(bucket) < per_kind:
            bucket.append(r)
    return out


def payload_summary(records: Sequence[Record]) -> dict[str, int]:
    """Bit flips in tensor data: how many, how many loaded, how many changed the outputs."""
    flips = [r for r in records if r.klass == PAYLOAD]
    return {
        "mutations": len(flips),
        "refused": sum(r.outcome == "slimkit-error" for r in flips),
        "loaded": sum(r.outcome in LOADS for r in flips),
        "changed_outputs": sum(r.outcome == "loads-different" for r in flips),
        "bad": sum(r.outcome in BAD for r in flips),
    }


def bad_counts(records: Sequence[Record]) -> dict[str, int]:
    """The count behind each target."""
    outcomes = Counter(r.outcome for r in records)
    structural = [r for r in records if r.klass == STRUCTURAL]
    return {
        "other-exception": outcomes["other-exception"],
        "crash": outcomes["crash"],
        "hang": outcomes["hang"],
        "memory": outcomes["memory"],
        "forward-error": outcomes["forward-error"],
        "escaped": outcomes["escaped"],
        "structural-loads": sum(r.outcome in LOADS for r in structural),
        "structural-loads-different": sum(r.outcome == "loads-different" for r in structural),
    }


def main_serve(argv: Sequence[str]) -> None:
    serve(json.loads(argv[0]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        main_serve(sys.argv[2:])
