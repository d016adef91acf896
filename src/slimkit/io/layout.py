"""The layout of an artifact directory: its file names, format version, and what else may
live in it (the files slimkit itself writes beside an artifact)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 2
MANIFEST = "slimkit.json"
WEIGHTS = "model.safetensors"
ARTIFACT_FILES = (WEIGHTS, MANIFEST)
#: the files slimkit writes beside an artifact: ``compress``'s report (report/write.py) and
#: the report files stages return (the architecture search's plot and front)
SIDE_FILES = ("report.json", "report.md", "pareto.png", "search_pareto.png", "search_front.json")
#: everything an artifact directory may hold: saving replaces such a directory as a whole
OWN_FILES = ARTIFACT_FILES + SIDE_FILES
#: the temporary name ``io.atomic`` writes one of those files under before renaming it
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.slimkit-tmp\.[0-9a-f]{8}")


def is_artifact(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def foreign_entry(path: str | os.PathLike[str]) -> str | None:
    """The first entry (by name) of the directory ``path`` that slimkit did not write, or
    None when every entry is one of ``OWN_FILES`` (or an interrupted atomic write of one) as
    a regular file. Symlinks, subdirectories, FIFOs and other files are foreign."""
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if not _is_own(entry):
            return entry.name
    return None


def _is_own(entry: os.DirEntry[str]) -> bool:
    if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
        return False
    temp = _TEMP_FILE.fullmatch(entry.name)
    return entry.name in OWN_FILES or (temp is not None and temp["name"] in OWN_FILES)


def holds_manifest(path: str | os.PathLike[str]) -> bool:
    """True when ``path/slimkit.json`` is a regular file holding a slimkit manifest."""
    manifest = Path(path) / MANIFEST
    try:
        if not stat.S_ISREG(manifest.lstat().st_mode):
            return False
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT
