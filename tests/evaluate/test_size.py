from __future__ import annotations

from pathlib import Path

import pytest

from slimkit.errors import ArtifactError
from slimkit.evaluate.size import artifact_size


def test_size_is_weights_plus_manifest(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "slimkit.json").write_text("{}")
    (tmp_path / "report.md").write_text("not part of the artifact" * 100)
    assert artifact_size(tmp_path) == 1002


def test_missing_manifest_counts_the_weights(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert artifact_size(tmp_path) == 10


def test_no_weights_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "slimkit.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        artifact_size(tmp_path)
