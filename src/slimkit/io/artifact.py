"""Artifacts: a directory with ``model.safetensors`` and ``slimkit.json``.

``save`` (io/save.py) writes one atomically; ``load`` (io/load.py) verifies and rebuilds one.
"""

from __future__ import annotations

from slimkit.io.layout import (
    ARTIFACT_FILES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    is_artifact,
)
from slimkit.io.load import load, read_manifest
from slimkit.io.save import check_target, save

__all__ = [
    "ARTIFACT_FILES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "check_target",
    "is_artifact",
    "load",
    "read_manifest",
    "save",
]
