"""The layout of an artifact directory: its file names and format version."""

from __future__ import annotations

import os
from pathlib import Path

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1
MANIFEST = "slimkit.json"
WEIGHTS = "model.safetensors"
ARTIFACT_FILES = (WEIGHTS, MANIFEST)


def is_artifact(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()
