"""Size on disk of a saved artifact."""

from __future__ import annotations

import os
from pathlib import Path

from slimkit.errors import ArtifactError
from slimkit.io.layout import MANIFEST, WEIGHTS


def artifact_size(directory: str | os.PathLike[str]) -> int:
    """Bytes on disk of the artifact files in ``directory`` (weights + manifest)."""
    path = Path(directory)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path} holds no {WEIGHTS}: not a saved artifact")
    manifest = path / MANIFEST
    extra = os.path.getsize(manifest) if manifest.is_file() else 0
    return os.path.getsize(weights) + extra
