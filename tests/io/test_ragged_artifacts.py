"""Ragged quantization groups in artifacts: the short last group's parameters are stored
exactly, reload bit-exactly, and a stored scale must have ``ceil(K / group_size)`` columns."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

import slimkit
from slimkit.errors import ArtifactError
from slimkit.formats import primitives as P
from tests.ragged_toys import RaggedToy, ragged_toy

GROUPED = {"bits": 4, "granularity": "per_group", "group_size": 32, "symmetric": False}


def toy() -> RaggedToy:
    return ragged_toy()


def recipe(**options: Any) -> dict[str, Any]:
    return {"stages": [{"quantize": {"method": "rtn", **GROUPED, **options}}]}


X = torch.randn(4, 5, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", [{}, {"symmetric": True, "bits": 3}, {"format": "nf4"}])
def test_ragged_groups_save_and_load_bit_exactly(options: dict[str, Any], tmp_path: Path) -> None:
    if options.get("format") == "nf4":
        options = {**options, "symmetric": True}
    model = slimkit.compress(toy(), recipe(**options))
    assert model.fc.scale.shape == (16, 3) and model.conv.scale.shape == (8, 2)
    back = slimkit.load(slimkit.save(model, tmp_path / "a"), model=toy())
    state, loaded = model.state_dict(), back.state_dict()
    assert state.keys() == loaded.keys()
    for name, value in state.items():
        assert value.dtype == loaded[name].dtype and torch.equal(value, loaded[name]), name
    with torch.no_grad():
        assert torch.equal(back(X), model(X))
    if "format" not in options:  # the stored scales are exactly those of the groups
        w = toy().fc.weight.detach()
        scale, zero = P.qparams(w, model.fc.bits, model.fc.symmetric, group_size=32)
        assert torch.equal(back.fc.scale, scale)
        assert model.fc.symmetric or torch.equal(back.fc.zero_point, zero)


def test_a_stored_scale_without_the_short_group_is_refused(tmp_path: Path) -> None:
    art = slimkit.save(slimkit.compress(toy(), recipe()), tmp_path / "a")
    tensors = load((art / "model.safetensors").read_bytes())
    assert tensors["fc.scale"].shape == (16, 3)
    tensors["fc.scale"] = tensors["fc.scale"][:, :2].contiguous()  # floor(72 / 32) columns
    data = save(tensors, {"format": "slimkit-artifact"})
    (art / "model.safetensors").write_bytes(data)
    m = json.loads((art / "slimkit.json").read_text())
    m["files"]["model.safetensors"] = {"sha256": sha256(data).hexdigest(), "bytes": len(data)}
    (art / "slimkit.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"'fc\.scale' has shape \[16, 2\], the model holds"):
        slimkit.load(art, model=toy())
