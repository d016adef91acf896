"""Artifacts: bit-exact round trips, manifest contents, refusal of corrupt or unsafe inputs."""

import copy
import hashlib
import importlib
import json
import os
import pathlib
import pickle
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit import compressed, model_info
from slimkit.errors import ArtifactError, ModelError
from slimkit.io import artifact
from slimkit.io import save as artifact_save
from slimkit.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.layers.sparse import SparseConv2d, SparseLinear

W8 = {"name": "w8-rtn", "stages": [{"quantize": {"bits": 8, "granularity": "per_channel"}}]}
P50 = {"name": "p50", "stages": [{"prune": {"sparsity": 0.5}}]}


class Net(nn.Module):
    """Every layer kind the built-in techniques touch, plus a norm they leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8, padding_idx=0)
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.emb(idx).mean(1))))
        return self.norm(h + self.conv(x).mean((2, 3)))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 2, 6, 6, generator=g), torch.randint(0, 10, (3, 5), generator=g)


def out(model: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*(args or inputs()))


def fresh_net() -> Net:
    torch.manual_seed(1234)  # different weights: everything must come from the artifact
    return Net()


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "slimkit.json").read_text())


def rewrite_manifest(d: Path, **changes: Any) -> None:
    m = manifest(d)
    m.update(changes)
    (d / "slimkit.json").write_text(json.dumps(m))


# -- round trips -------------------------------------------------------------------------
def test_fp32_round_trip_bit_exact(net: Net, tmp_path: Path) -> None:
    y = out(net)
    path = slimkit.save(net, tmp_path / "fp32")
    assert path == tmp_path / "fp32"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "slimkit.json"]
    loaded = slimkit.load(path, model=fresh_net())
    assert not loaded.training
    assert torch.equal(out(loaded), y)
    assert not torch.equal(out(fresh_net().eval()), y)  # the weights did come from disk


def test_w8_round_trip_bit_exact(net: Net, tmp_path: Path) -> None:
    slimkit.compress(net, W8)
    y = out(net)
    slimkit.save(net, tmp_path / "w8")
    loaded = slimkit.load(tmp_path / "w8", model=fresh_net())
    assert type(loaded.fc1) is QuantLinear
    assert type(loaded.conv) is QuantConv2d
    assert type(loaded.emb) is QuantEmbedding
    assert torch.equal(loaded.fc1.codes, net.fc1.codes)
    assert torch.equal(out(loaded), y)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_w8_asymmetric_round_trip_bit_exact(net: Net, tmp_path: Path, granularity: str) -> None:
    rec = {"stages": [{"quantize": {"symmetric": False, "granularity": granularity}}]}
    slimkit.compress(net, rec)
    y = out(net)
    slimkit.save(net, tmp_path / "a")
    loaded = slimkit.load(tmp_path / "a", model=fresh_net())
    assert loaded.fc1.zero_point is not None
    assert torch.equal(out(loaded), y)


def test_pruned_round_trip_bit_exact(net: Net, tmp_path: Path) -> None:
    slimkit.compress(net, P50)
    y = out(net)
    slimkit.save(net, tmp_path / "p")
    loaded = slimkit.load(tmp_path / "p", model=fresh_net())
    assert type(loaded.fc1) is SparseLinear and type(loaded.conv) is SparseConv2d
    assert loaded.fc1.n_params() == net.fc1.n_params()
    assert torch.equal(out(loaded), y)


def test_after_replay_fixups_run_on_load(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compressed, "_AFTER_REPLAY", [])
    seen: list[int] = []

    @compressed.after_replay
    def fixup(model: nn.Module) -> None:
        seen.append(model.fc1.out_features)  # the rebuilt layer is already in place

    compressed.after_replay(fixup)  # registered once
    net.fc1, net.fc2 = nn.Linear(8, 12), nn.Linear(12, 4)  # fresh_net's fc1 has 16 outputs
    slimkit.save(net, tmp_path / "f")
    slimkit.load(tmp_path / "f", model=fresh_net())
    assert seen == [12]


def test_pruned_then_quantized_stages_round_trip(net: Net, tmp_path: Path) -> None:
    rec = {
        "name": "p-then-q",
        "stages": [
            {"prune": {"sparsity": 0.5, "targets": ["fc*"]}},
            {"quantize": {"targets": ["*"]}},  # what pruning left: conv and emb
        ],
    }
    slimkit.compress(net, rec)
    assert type(net.fc1) is SparseLinear and type(net.conv) is QuantConv2d
    y = out(net)
    slimkit.save(net, tmp_path / "pq")
    loaded = slimkit.load(tmp_path / "pq", model=fresh_net())
    assert [type(m) for m in loaded.modules()] == [type(m) for m in net.modules()]
    assert torch.equal(out(loaded), y)
    assert manifest(tmp_path / "pq")["recipe"]["name"] == "p-then-q"


def test_pruned_weights_then_quantized_round_trip(net: Net, tmp_path: Path) -> None:
    from slimkit.config import Scope
    from slimkit.prune.magnitude import magnitude_masks

    with torch.no_grad():
        for m in (net.fc1, net.fc2, net.conv):
            (keep,) = magnitude_masks([m.weight], 0.5, Scope.LAYER)
            m.weight.mul_(keep)
    slimkit.compress(net, W8)
    # zeros stay exact zeros after quantization
    assert int((net.fc1.dense_weight() == 0).sum()) >= 64
    y = out(net)
    slimkit.save(net, tmp_path / "pq")
    assert torch.equal(out(slimkit.load(tmp_path / "pq", model=fresh_net())), y)


def test_loaded_model_records_info(net: Net, tmp_path: Path) -> None:
    slimkit.compress(net, W8)
    slimkit.save(net, tmp_path / "w8")
    loaded = slimkit.load(tmp_path / "w8", model=fresh_net())
    info = model_info.info(loaded)
    assert info["recipe"] == slimkit.Recipe.from_dict(W8).to_dict()
    assert info["artifact"] == str(tmp_path / "w8")
    assert info["source"] == manifest(tmp_path / "w8")["source"]


def test_saved_artifact_can_be_saved_again(net: Net, tmp_path: Path) -> None:
    slimkit.compress(net, W8)
    y = out(net)
    slimkit.save(net, tmp_path / "one")
    once = slimkit.load(tmp_path / "one", model=fresh_net())
    slimkit.save(once, tmp_path / "two")
    twice = slimkit.load(tmp_path / "two", model=fresh_net())
    assert torch.equal(out(twice), y)
    assert manifest(tmp_path / "two")["recipe"] == manifest(tmp_path / "one")["recipe"]


def test_save_creates_missing_parents(net: Net, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "art"
    slimkit.save(net, str(target))
    assert artifact.is_artifact(target)


# -- tied weights --------------------------------------------------------------------------
def test_tied_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(4, 6)
    y = out(model, x)
    slimkit.save(model, tmp_path / "t")
    loaded = slimkit.load(tmp_path / "t", model=Tied())
    assert loaded.a.weight is loaded.b.weight
    assert torch.equal(out(loaded, x), y)


@pytest.mark.parametrize("recipe", [W8, P50], ids=["w8", "p50"])
def test_tied_weights_compressed_round_trip(tmp_path: Path, recipe: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    with pytest.warns(UserWarning, match="shares its weight"):
        slimkit.compress(model, recipe)
    assert model.a.weight is model.b.weight  # tied layers are left float, still tied
    x = torch.randn(4, 6)
    y = out(model, x)
    slimkit.save(model, tmp_path / "t")
    loaded = slimkit.load(tmp_path / "t", model=Tied())
    assert torch.equal(out(loaded, x), y)
    assert loaded.a.weight is loaded.b.weight


# -- how the architecture is recorded and rebuilt ------------------------------------------
def test_an_unregistered_class_is_recorded_as_the_caller(net: Net, tmp_path: Path) -> None:
    slimkit.save(net, tmp_path / "n")
    assert manifest(tmp_path / "n")["source"] == {"caller": "Net"}
    with pytest.raises(ArtifactError, match="pass model="):
        slimkit.load(tmp_path / "n")


MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Small(nn.Module):
        def __init__(self, width: int = 6) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, width)
            self.fc2 = nn.Linear(width, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))
    """
)


@pytest.mark.parametrize("recipe", [None, W8, P50], ids=["fp32", "w8", "p50"])
@pytest.mark.parametrize("width", [6, 9], ids=["default-width", "other-width"])
def test_rebuild_a_registered_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: dict[str, Any] | None, width: int
) -> None:
    """A registered class is built without arguments; recorded layer shapes fix the rest.
    Loading imports nothing: an unregistered name is refused even when importable."""
    name = f"slimkit_models_{uuid.uuid4().hex[:12]}"
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{name}.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(src))
    module = importlib.import_module(name)
    slimkit.register_constructible(module.Small)
    torch.manual_seed(0)
    model = module.Small(width=width).eval()
    if recipe is not None:
        slimkit.compress(model, recipe)
    x = torch.randn(5, 4)
    y = out(model, x)
    slimkit.save(model, tmp_path / "art")
    assert manifest(tmp_path / "art")["source"] == {"class": f"{name}:Small"}
    loaded = slimkit.load(tmp_path / "art")
    assert type(loaded) is module.Small
    assert torch.equal(out(loaded, x), y)
    rewrite_manifest(tmp_path / "art", source={"class": f"{name}:Other"})
    with pytest.raises(ArtifactError, match="not registered as constructible"):
        slimkit.load(tmp_path / "art")


def test_an_importable_but_unregistered_class_is_never_imported(tmp_path: Path, net: Net) -> None:
    slimkit.save(net, tmp_path / "n")
    rewrite_manifest(tmp_path / "n", source={"class": "no_such_module_xyz:Net"})
    with pytest.raises(ArtifactError, match="no_such_module_xyz:Net"):
        slimkit.load(tmp_path / "n")
    assert "no_such_module_xyz" not in sys.modules


def test_local_class_needs_model_argument(tmp_path: Path) -> None:
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = Local()
    slimkit.save(model, tmp_path / "l")
    source = manifest(tmp_path / "l")["source"]
    assert list(source) == ["caller"]
    assert "<locals>" in source["caller"] and source["caller"].endswith("Local")
    with pytest.raises(ArtifactError) as info:
        slimkit.load(tmp_path / "l")
    assert "model=" in str(info.value)
    assert str(tmp_path / "l") in str(info.value)
    x = torch.randn(2, 3)
    assert torch.equal(out(slimkit.load(tmp_path / "l", model=Local()), x), out(model, x))


def test_class_needing_arguments_recorded_as_caller(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)  # torch's own layers are not rebuilt from their class
    slimkit.save(model, tmp_path / "lin")
    assert "caller" in manifest(tmp_path / "lin")["source"]
    with pytest.raises(ArtifactError, match="model="):
        slimkit.load(tmp_path / "lin")


def test_wrong_architecture_does_not_fit(net: Net, tmp_path: Path) -> None:
    slimkit.save(net, tmp_path / "n")
    with pytest.raises(ArtifactError, match="the model has no such module") as info:
        slimkit.load(tmp_path / "n", model=Tied())
    assert "slimkit.json" in str(info.value)


# -- the manifest ------------------------------------------------------------------------
def test_manifest_contents(net: Net, tmp_path: Path) -> None:
    slimkit.compress(net, W8)
    d = slimkit.save(net, tmp_path / "w8")
    m = manifest(d)
    assert m["format"] == "slimkit-artifact"
    assert m["format_version"] == 2
    assert m["slimkit_version"] == slimkit.__version__
    assert m["stages"] == [{"kind": "quantize", "method": "rtn", "record": {}}]
    assert m["simulated"] is False
    weights = (d / "model.safetensors").read_bytes()
    assert m["files"] == {
        "model.safetensors": {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)}
    }
    assert m["recipe"] == slimkit.Recipe.from_dict(W8).to_dict()
    specs = {e["name"]: e for e in m["modules"]}
    assert specs["fc1"]["type"] == "QuantLinear"
    assert specs["fc1"]["spec"] == net.fc1.spec()
    assert specs["conv"]["type"] == "QuantConv2d" and specs["conv"]["spec"]["groups"] == 2
    assert specs["emb"]["type"] == "QuantEmbedding" and specs["emb"]["spec"]["padding_idx"] == 0
    assert specs["norm"]["type"] == "LayerNorm"
    assert artifact.read_manifest(d) == m


def test_manifest_of_plain_model_has_no_recipe(net: Net, tmp_path: Path) -> None:
    m = manifest(slimkit.save(net, tmp_path / "n"))
    assert m["recipe"] is None
    assert {e["type"] for e in m["modules"]} == {"Embedding", "Conv2d", "Linear", "LayerNorm"}


# -- refusing bad inputs -------------------------------------------------------------------
@pytest.fixture
def saved(net: Net, tmp_path: Path) -> Path:
    slimkit.compress(net, W8)
    return slimkit.save(net, tmp_path / "art")


def test_flipped_byte_is_checksum_mismatch(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as info:
        slimkit.load(saved, model=fresh_net())
    assert "checksum mismatch" in str(info.value)
    assert str(weights) in str(info.value)


def test_truncated_weights(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as info:
        slimkit.load(saved, model=fresh_net())
    assert str(weights) in str(info.value)
    assert "truncated" in str(info.value)


def test_missing_weights(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"model\.safetensors: missing"):
        slimkit.load(saved, model=fresh_net())


def test_garbage_weights_with_matching_checksum(saved: Path) -> None:
    weights = saved / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    data = weights.read_bytes()
    rewrite_manifest(
        saved,
        files={
            "model.safetensors": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        },
    )
    with pytest.raises(ArtifactError, match=r"model\.safetensors: not valid JSON") as info:
        slimkit.load(saved, model=fresh_net())
    assert str(weights) in str(info.value)


def test_missing_manifest(saved: Path) -> None:
    (saved / "slimkit.json").unlink()
    with pytest.raises(ArtifactError) as info:
        slimkit.load(saved, model=fresh_net())
    assert str(saved) in str(info.value)
    assert "slimkit.json is missing" in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="artifact not found") as info:
        slimkit.load(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


@pytest.mark.parametrize("version", [3, 99])
def test_newer_format_version(saved: Path, version: int) -> None:
    rewrite_manifest(saved, format_version=version)
    with pytest.raises(ArtifactError) as info:
        slimkit.load(saved, model=fresh_net())
    msg = str(info.value)
    assert str(saved / "slimkit.json") in msg
    assert "newer" in msg and "upgrade" in msg
    assert str(version) in msg


def test_invalid_json_manifest(saved: Path) -> None:
    (saved / "slimkit.json").write_text('{"format": "slimkit-artifact", ')
    with pytest.raises(ArtifactError) as info:
        slimkit.load(saved, model=fresh_net())
    assert str(saved / "slimkit.json") in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_foreign_manifest(saved: Path) -> None:
    (saved / "slimkit.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="not a slimkit manifest"):
        slimkit.load(saved, model=fresh_net())
    (saved / "slimkit.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a slimkit manifest"):
        slimkit.load(saved, model=fresh_net())


def test_unknown_module_type(saved: Path) -> None:
    m = manifest(saved)
    m["modules"][0]["type"] = "FancyLinear"
    (saved / "slimkit.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="unknown layer type 'FancyLinear'"):
        slimkit.load(saved, model=fresh_net())


def _drop_source(m: dict[str, Any]) -> None:
    del m["source"]


def _bad_file_entry(m: dict[str, Any]) -> None:
    m["files"]["model.safetensors"] = "deadbeef"


def _bad_module_entry(m: dict[str, Any]) -> None:
    m["modules"] = [{"name": "fc1"}]


@pytest.mark.parametrize(
    "corrupt",
    [_drop_source, _bad_file_entry, _bad_module_entry],
    ids=["no-source", "file-entry-not-mapping", "module-entry-without-type"],
)
def test_structurally_bad_manifest_is_artifact_error(saved: Path, corrupt: Any) -> None:
    m = manifest(saved)
    corrupt(m)
    (saved / "slimkit.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"slimkit\.json"):
        slimkit.load(saved, model=fresh_net())


class _Marker:
    """Unpickling this touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("filename", ["model.pt", "weights", "model.safetensors"])
def test_pickle_file_refused_and_never_unpickled(tmp_path: Path, filename: str) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker))
    assert payload[:1] == b"\x80"
    f = tmp_path / filename
    f.write_bytes(payload)
    with pytest.raises(ArtifactError) as info:
        slimkit.load(f)
    assert str(f) in str(info.value)
    assert "pickle" in str(info.value)
    assert not marker.exists()


def test_directory_with_only_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.pt").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(ArtifactError) as info:
        slimkit.load(d)
    msg = str(info.value)
    assert str(d) in msg
    assert "slimkit.json is missing" in msg
    assert "model.pt" in msg and "never loaded" in msg
    assert not marker.exists()


@pytest.mark.parametrize("filename", ["model.pt", "checkpoint"])
def test_torch_save_zip_refused(tmp_path: Path, filename: str) -> None:
    marker = tmp_path / "unpickled"
    f = tmp_path / filename
    torch.save({"w": torch.ones(2), "evil": _Marker(marker)}, f)
    assert f.read_bytes()[:2] == b"PK"
    with pytest.raises(ArtifactError, match="never unpickles") as info:
        slimkit.load(f)
    assert str(f) in str(info.value)
    assert not marker.exists()


def test_plain_file_refused(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ArtifactError, match="is a file"):
        slimkit.load(f)


# -- saving safely -------------------------------------------------------------------------
def test_save_over_artifact_needs_overwrite(saved: Path, net: Net) -> None:
    before = snapshot(saved)
    other = fresh_net()
    with pytest.raises(ArtifactError) as info:
        slimkit.save(other, saved)
    assert str(saved) in str(info.value)
    assert "overwrite" in str(info.value)
    assert snapshot(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["art"]


def test_save_to_existing_file_refused(net: Net, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(ArtifactError, match="not a directory"):
        slimkit.save(net, f)
    assert f.read_text() == "keep"


def test_overwrite_replaces_the_whole_directory(saved: Path) -> None:
    (saved / "report.md").write_text("# the old model's report\n")
    old = snapshot(saved)
    replacement = fresh_net().eval()
    y = out(replacement)
    slimkit.save(replacement, saved, overwrite=True)
    assert sorted(p.name for p in saved.iterdir()) == ["model.safetensors", "slimkit.json"]
    assert snapshot(saved)["model.safetensors"] != old["model.safetensors"]
    assert manifest(saved)["recipe"] is None  # the new model was not compressed
    assert torch.equal(out(slimkit.load(saved, model=fresh_net())), y)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["art"]  # no leftovers


def test_save_into_plain_directory_refused(net: Net, tmp_path: Path) -> None:
    d = tmp_path / "out"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match=r"'notes\.txt'"):
            slimkit.save(net, d, overwrite=overwrite)
    assert [p.name for p in d.iterdir()] == ["notes.txt"]
    assert (d / "notes.txt").read_text() == "mine"


def test_save_does_not_clobber_foreign_weights(net: Net, tmp_path: Path) -> None:
    d = tmp_path / "hf-model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"the user's original weights")
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        slimkit.save(net, d)
    assert (d / "model.safetensors").read_bytes() == b"the user's original weights"


def _fail_midway(model: nn.Module, stage: Path, manifest: dict[str, Any]) -> None:
    (stage / "model.safetensors").write_bytes(b"partial")
    raise OSError("disk full")


def test_failed_overwrite_keeps_old_artifact(
    saved: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    y = out(net)
    before = snapshot(saved)
    parent_before = sorted(os.listdir(saved.parent))
    monkeypatch.setattr(artifact_save, "_write_stage", _fail_midway)
    with pytest.raises(ArtifactError, match=f"cannot write {saved}: disk full"):
        slimkit.save(fresh_net(), saved, overwrite=True)
    assert snapshot(saved) == before
    assert sorted(os.listdir(saved.parent)) == parent_before  # no temp dirs left
    monkeypatch.undo()
    assert torch.equal(out(slimkit.load(saved, model=fresh_net())), y)


def test_failed_weights_write_keeps_old_artifact(
    saved: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    y = out(net)
    before = snapshot(saved)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(artifact_save, "save_model", broken)
    with pytest.raises(RuntimeError, match="serialization failed"):
        slimkit.save(fresh_net(), saved, overwrite=True)
    assert snapshot(saved) == before
    assert sorted(os.listdir(saved.parent)) == ["art"]
    monkeypatch.undo()
    assert torch.equal(out(slimkit.load(saved, model=fresh_net())), y)


def test_failed_first_save_leaves_nothing(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifact_save, "_write_stage", _fail_midway)
    with pytest.raises(ArtifactError, match="disk full"):
        slimkit.save(net, tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_save_to_current_directory(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "here"
    d.mkdir()
    monkeypatch.chdir(d)
    slimkit.save(net, ".")
    assert torch.equal(out(slimkit.load(d, model=fresh_net())), out(net))


# -- non-finite weights --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layer", "tensor", "value", "word"),
    [
        ("fc1", "weight", float("nan"), "NaN"),
        ("fc2", "bias", float("inf"), "Inf"),
        ("conv", "weight", float("-inf"), "Inf"),
        ("norm", "weight", float("nan"), "NaN"),
    ],
)
def test_non_finite_weights_refused_on_save(
    net: Net, tmp_path: Path, layer: str, tensor: str, value: float, word: str
) -> None:
    with torch.no_grad():
        getattr(getattr(net, layer), tensor).view(-1)[0] = value
    with pytest.raises(ModelError) as info:
        slimkit.save(net, tmp_path / "bad")
    msg = str(info.value)
    assert f"'{layer}'" in msg and word in msg and tensor in msg
    assert not (tmp_path / "bad").exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused_on_compress(net: Net, value: float) -> None:
    with torch.no_grad():
        net.fc2.weight[1, 2] = value
    before = copy.deepcopy(net)
    with pytest.raises(ModelError, match=r"layer 'fc2' has (NaN|Inf) in its weight"):
        slimkit.compress(net, W8)
    assert [type(m) for m in net.modules()] == [type(m) for m in before.modules()]


def test_non_finite_buffer_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    model[1].running_var[0] = float("nan")
    with pytest.raises(ModelError, match="layer '1' has NaN in its running_var"):
        slimkit.save(model, tmp_path / "bn")
