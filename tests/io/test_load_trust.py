"""Loading refuses what a hostile or corrupt artifact holds: each finding of the trust
review, one test (checksums recomputed, so the check behind the checksum is what is tested).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit
from slimkit.cli import main
from slimkit.encode.stage import HuffmanCoded, pack_payload, payload_bytes, unpack_payload
from slimkit.errors import ArtifactError

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "artifacts" / "v1"


# -- editing a copy of a fixture -------------------------------------------------------------
def _copy(kind: str, tmp_path: Path) -> Path:
    art = tmp_path / kind
    shutil.copytree(FIXTURES / kind, art, ignore=shutil.ignore_patterns("expected.*"))
    return art


def _manifest(art: Path) -> dict[str, Any]:
    return json.loads((art / "slimkit.json").read_text())  # type: ignore[no-any-return]


def _edit(art: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    m = _manifest(art)
    change(m)
    (art / "slimkit.json").write_text(json.dumps(m))
    return art


def _split(art: Path) -> tuple[dict[str, Any], bytearray]:
    data = (art / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), bytearray(data[8 + n :])


def _write_weights(art: Path, header: dict[str, Any], payload: bytes) -> Path:
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + bytes(payload)
    (art / "model.safetensors").write_bytes(data)
    return _edit(
        art,
        lambda m: m["files"].update(
            {"model.safetensors": {"sha256": sha256(data).hexdigest(), "bytes": len(data)}}
        ),
    )


def _refused(art: Path, *words: str) -> str:
    with pytest.raises(ArtifactError) as e:
        slimkit.load(art)
    text = str(e.value)
    assert "\n" not in text
    for word in words:
        assert word in text, text
    return text


def test_an_unedited_fixture_loads(tmp_path: Path) -> None:
    model = slimkit.load(_copy("fp32", tmp_path))
    assert isinstance(model, nn.Module) and not model.training


# -- 1. code execution -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "pdb:set_trace",
        "os:abort",
        "sys:exit",
        "slimkit.io.artifact:nn.Sequential",
        "torch.nn:Identity",
        "slimkit.tasks.digits:LeNet5.__init__",
    ],
)
def test_a_manifest_never_names_code_to_run(tmp_path: Path, name: str) -> None:
    art = _copy("fp32", tmp_path)
    (art / ".pdbrc").write_text("import os; os._exit(42)\n")
    _edit(art, lambda m: m.update(source={"class": name}))
    _refused(art, "not registered as constructible", name)


def test_eval_of_a_sys_exit_source_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = _edit(_copy("fp32", tmp_path), lambda m: m.update(source={"class": "sys:exit"}))
    assert main(["eval", str(art), "--task", "digits-lenet"]) == 2
    err = capsys.readouterr().err
    assert "not registered as constructible" in err and "Traceback" not in err


def test_only_registered_classes_are_rebuilt_with_kwargs(tmp_path: Path) -> None:
    art = _copy("nas", tmp_path)
    assert isinstance(slimkit.load(art), nn.Module)  # SearchedCNN is registered by slimkit
    _edit(art, lambda m: m["source"].update({"class": "slimkit.tasks.searched:Other"}))
    _refused(art, "not registered")


class _UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # type: ignore[no-any-return]


def test_a_user_class_loads_once_registered(tmp_path: Path) -> None:
    art = tmp_path / "user"
    net = _UserNet()
    slimkit.save(net, art)
    assert _manifest(art)["source"] == {"caller": "_UserNet"}  # not registered when saved
    with pytest.raises(ArtifactError, match="pass model="):
        slimkit.load(art)
    assert torch.equal(slimkit.load(art, model=_UserNet()).fc.weight, net.fc.weight)
    slimkit.register_constructible(_UserNet)
    slimkit.save(net, art, overwrite=True)
    assert _manifest(art)["source"] == {"class": f"{__name__}:_UserNet"}
    assert torch.equal(slimkit.load(art).fc.weight, net.fc.weight)


# -- 2. reads outside the artifact ----------------------------------------------------------
def test_a_file_name_leaving_the_directory_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    meta = {"sha256": sha256(b"secret").hexdigest(), "bytes": 6}
    for name in ("../secret.txt", str(secret), "/etc/passwd"):
        art = _copy("fp32", tmp_path / name.replace("/", "_"))
        _edit(art, lambda m, name=name: m["files"].update({name: meta}))
        text = _refused(art, "refused")
        assert "6 bytes" not in text  # nothing learnt about the outside file


@pytest.mark.parametrize("name", ["model.safetensors", "slimkit.json"])
def test_a_symlinked_artifact_file_is_refused(tmp_path: Path, name: str) -> None:
    art = _copy("fp32", tmp_path)
    outside = tmp_path / f"outside-{name}"
    (art / name).rename(outside)
    os.symlink(outside, art / name)
    _refused(art, "symbolic link")


def test_an_hf_hub_id_is_never_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loading tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    art = _copy("fp32", tmp_path)
    for hub in ("bert-base-uncased", "../x", "org/model"):
        _edit(art, lambda m, hub=hub: m.update(source={"hf": hub, "class": "transformers:Bert"}))
        _refused(art, "not a local Hugging Face directory")


# -- 3. silent wrong models -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["I32", "F16", "F64", "I64", "BF16"])
def test_a_changed_dtype_is_never_cast(tmp_path: Path, dtype: str) -> None:
    """A well-formed file whose tensor has another dtype (as a forger would write it)."""
    from safetensors.torch import load, save

    from slimkit.io.tensors import DTYPES

    art = _copy("fp32", tmp_path)
    tensors = load((art / "model.safetensors").read_bytes())
    tensors["fc1.bias"] = tensors["fc1.bias"].to(DTYPES[dtype])
    data = save(tensors, {"format": "slimkit-artifact"})
    (art / "model.safetensors").write_bytes(data)
    meta = {"sha256": sha256(data).hexdigest(), "bytes": len(data)}
    _edit(art, lambda m: m["files"].update({"model.safetensors": meta}))
    _refused(art, "fc1.bias", dtype, "no silent cast")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, value: float) -> None:
    art = _copy("fp32", tmp_path)
    header, payload = _split(art)
    begin = header["fc2.weight"]["data_offsets"][0]
    payload[begin : begin + 4] = struct.pack("<f", value)
    _write_weights(art, header, payload)
    _refused(art, "fc2.weight", "NaN" if value != value else "Inf")


def _coded_layer(art: Path) -> tuple[str, HuffmanCoded]:
    model = slimkit.load(art)
    for name, m in model.named_modules():
        if isinstance(m, HuffmanCoded) and any(s["n_chunks"] > 1 for s in m.layouts):
            return name, m
    raise AssertionError("no layer with several chunks")


@pytest.mark.parametrize("shift", [-8, 1, 8])
def test_huffman_chunk_offsets_are_checked_at_load(tmp_path: Path, shift: int) -> None:
    art = _copy("huffman-quant", tmp_path)
    name, layer = _coded_layer(art)
    at = sum(payload_bytes(s) for s in layer.layouts)
    coded = unpack_payload(layer.payload[:at], layer.layouts)
    i = next(i for i, s in enumerate(layer.layouts) if s["n_chunks"] > 1)
    coded[i].starts[1] += shift
    header, payload = _split(art)
    begin = header[f"{name}.payload"]["data_offsets"][0]
    payload[begin : begin + at] = pack_payload(coded).numpy().tobytes()
    _write_weights(art, header, payload)
    _refused(art, name)


def test_a_mask_popcount_must_match_the_stored_values(tmp_path: Path) -> None:
    art = _copy("sparse", tmp_path)
    header, payload = _split(art)
    begin, end = header["fc1.mask"]["data_offsets"]
    zero = next(i for i in range(begin, end) if payload[i] != 0xFF)
    bit = next(b for b in range(8) if not payload[zero] >> b & 1)
    payload[zero] |= 1 << bit
    _write_weights(art, header, payload)
    _refused(art, "fc1")


@pytest.mark.parametrize(
    ("key", "value"), [("eps", 1e30), ("eps", 0), ("momentum", 7.0), ("affine", 1)]
)
def test_batchnorm_arguments_are_checked(tmp_path: Path, key: str, value: Any) -> None:
    art = _copy("structured-resnet", tmp_path)

    def change(m: dict[str, Any]) -> None:
        entry = next(e for e in m["modules"] if e.get("type") == "BatchNorm2d")
        entry["spec"][key] = value

    _refused(_edit(art, change), key)


def test_a_changed_stride_is_refused(tmp_path: Path) -> None:
    art = _copy("fp32", tmp_path)
    _refused(_edit(art, lambda m: m["modules"][0]["spec"].update(stride=[2, 2])), "stride")


# -- 4. unclean errors ------------------------------------------------------------------------
def _raw_manifest(art: Path, text: str) -> Path:
    (art / "slimkit.json").write_text(text)
    return art


def test_deeply_nested_json_is_refused(tmp_path: Path) -> None:
    art = _copy("fp32", tmp_path)
    text = json.dumps(_manifest(art))[:-1] + ', "recipe": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _refused(_raw_manifest(art, text.replace('"recipe": null, ', "")), "nested")


def test_a_5000_digit_integer_is_refused(tmp_path: Path) -> None:
    art = _copy("fp32", tmp_path)
    text = json.dumps(_manifest(art)).replace(
        '"format_version": 1', '"format_version": 1' + "0" * 5000
    )
    _refused(_raw_manifest(art, text), "digits")


@pytest.mark.parametrize("version", [True, -1, 0, 1.0, "1", 3])
def test_format_version_must_be_a_known_positive_integer(tmp_path: Path, version: Any) -> None:
    art = _edit(_copy("fp32", tmp_path), lambda m: m.update(format_version=version))
    _refused(art, "format")


def test_each_format_version_has_exactly_its_keys(tmp_path: Path) -> None:
    # format 1 wrote no stage records; format 2 always writes them
    _refused(_edit(_copy("fp32", tmp_path), lambda m: m.update(stages=[])), "unknown key 'stages'")
    art = _edit(_copy("fp32", tmp_path / "b"), lambda m: m.update(format_version=2))
    _refused(art, "key 'stages' is missing")


def _resaved(kind: str, tmp_path: Path) -> Path:
    """A format-2 copy of the format-1 fixture ``kind`` (loaded and saved again)."""
    return slimkit.save(slimkit.load(_copy(kind, tmp_path)), tmp_path / "v2")


def test_a_resaved_format_1_artifact_is_format_2_and_loads(tmp_path: Path) -> None:
    art = _resaved("w8-rtn", tmp_path)
    manifest = _manifest(art)
    assert manifest["format_version"] == 2
    assert manifest["stages"] == [{"kind": "quantize", "method": "rtn", "record": {}}]
    slimkit.load(art)


@pytest.mark.parametrize(
    "stages",
    [
        [],
        [{"kind": "prune", "method": "rtn", "record": {}}],
        [{"kind": "quantize", "method": "gptq", "record": {}}],
        [{"kind": "quantize", "method": "rtn", "record": []}],
        [{"kind": "quantize", "method": "rtn"}],
        [{"kind": "quantize", "method": "rtn", "record": {}}] * 2,
        {"quantize": "rtn"},
    ],
)
def test_stage_records_must_follow_the_recipe(tmp_path: Path, stages: Any) -> None:
    art = _edit(_resaved("w8-rtn", tmp_path), lambda m: m.update(stages=stages))
    _refused(art, "stages")


@pytest.mark.parametrize("target", ["conv1", "nowhere", "fc3", "", "fc1.weight", 7])
def test_same_as_must_name_an_earlier_module(tmp_path: Path, target: Any) -> None:
    art = _copy("fp32", tmp_path)
    _edit(art, lambda m: m["modules"].insert(1, {"name": "fc1", "same_as": target}))
    _refused(art, "modules[")


@pytest.mark.parametrize("how", ["duplicate", "reorder", "delete", "unknown-key", "recipe"])
def test_module_entries_must_be_those_saving_writes(tmp_path: Path, how: str) -> None:
    art = _copy("w8-rtn", tmp_path)

    def change(m: dict[str, Any]) -> None:
        mods = m["modules"]
        if how == "duplicate":
            mods.insert(2, dict(mods[1]))
        elif how == "reorder":
            mods[0], mods[1] = mods[1], mods[0]
        elif how == "delete":
            del mods[0]
        elif how == "unknown-key":
            mods[0]["spec"]["extra"] = 1
        else:
            m["recipe"]["stages"][0]["quantize"]["bits"] = "eight"

    _refused(_edit(art, change), str(art))


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(tmp_path: Path) -> None:
    art = _copy("fp32", tmp_path)
    blob = b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR."
    (art / "model.safetensors").write_bytes(blob)
    meta = {"sha256": sha256(blob).hexdigest(), "bytes": len(blob)}
    _edit(art, lambda m: m["files"].update({"model.safetensors": meta}))
    _refused(art, "model.safetensors")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_local_hf_directory_rebuilds_from_its_config_alone(tmp_path: Path) -> None:
    from transformers import BertModel

    from tests.cli.conftest import make_tiny_bert

    model_dir = make_tiny_bert(tmp_path)
    model = BertModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        model.pooler.dense.weight.mul_(2)  # differs from the directory's weights
    art = slimkit.save(model, tmp_path / "art")
    source = _manifest(art)["source"]
    key = "transformers.models.bert.modeling_bert:BertModel"
    assert source == {"hf": str(model_dir.resolve()), "class": key}
    (model_dir / "model.safetensors").unlink()  # only the config is read
    loaded = slimkit.load(art)
    ids = torch.tensor([[2, 7, 8, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).pooler_output, model(ids).pooler_output)
    _edit(art, lambda m: m["source"].update({"class": "transformers:AutoModel"}))
    _refused(art, "not a transformers model")


def test_swapped_tensor_names_are_refused(tmp_path: Path) -> None:
    """Same dtype and shape, names exchanged: the layout safetensors writes no longer holds."""
    art = _copy("kmeans", tmp_path)
    header, payload = _split(art)
    a, b = "conv2.codebook", "fc1.codebook"
    assert header[a]["shape"] == header[b]["shape"]
    header[a]["data_offsets"], header[b]["data_offsets"] = (
        header[b]["data_offsets"],
        header[a]["data_offsets"],
    )
    _refused(_write_weights(art, header, payload), "does not start where it should")


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "weights.PKL"])
def test_a_pickle_beside_the_artifact_is_refused(tmp_path: Path, name: str) -> None:
    art = _copy("fp32", tmp_path)
    (art / name).write_bytes(b"\x80\x04N.")
    _refused(art, name, "never unpickles")
    (art / name).unlink()
    (art / "notes.txt").write_text("other files are left alone")
    slimkit.load(art)


@pytest.mark.parametrize(
    "meta", [None, {}, {"format": "pt"}, {"format": "slimkit-artifact", "x": "y"}]
)
def test_header_metadata_must_be_slimkits(tmp_path: Path, meta: Any) -> None:
    art = _copy("fp32", tmp_path)
    header, payload = _split(art)
    header.pop("__metadata__")
    if meta is not None:
        header["__metadata__"] = meta
    _refused(_write_weights(art, header, payload), "metadata")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("aliases", [{"b.weight": "a.weight"}, {"b.weight": "a.bias"}])
def test_aliases_recorded_by_earlier_versions(tmp_path: Path, aliases: dict[str, str]) -> None:
    """Earlier versions wrote each dropped alias of a tied tensor into the header's
    metadata; those load when they are the model's ties, and only then."""
    model = _Tied()
    art = slimkit.save(model, tmp_path / "t")
    header, payload = _split(art)
    header["__metadata__"].update(aliases)
    _write_weights(art, header, payload)
    if aliases == {"b.weight": "a.weight"}:
        loaded = slimkit.load(art, model=_Tied())
        assert loaded.a.weight is loaded.b.weight
        assert torch.equal(loaded.b.weight, model.a.weight)
    else:
        with pytest.raises(ArtifactError, match="aliases"):
            slimkit.load(art, model=_Tied())


def test_a_deleted_recipe_option_is_refused(tmp_path: Path) -> None:
    art = _copy("structured", tmp_path)
    _edit(art, lambda m: m["recipe"]["stages"][0]["prune"].pop("ignore"))
    _refused(art, "recipe is not in the form slimkit writes")


def test_a_shallower_hugging_face_model_reloads(tmp_path: Path) -> None:
    """Regression: a model whose config differs from its directory's (a student with fewer
    layers) used to save a source that rebuilt the directory's depth, so loading failed on
    the missing layers."""
    from transformers import AutoModel

    from tests.cli.conftest import make_tiny_bert

    model_dir = make_tiny_bert(tmp_path, layers=4, hidden=16, intermediate=32, name="bert4")
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    slimkit.save(model, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "slimkit.json").read_text())
    assert manifest["source"]["config"] == {"num_hidden_layers": 2}
    back = slimkit.load(tmp_path / "a")
    assert len(back.encoder.layer) == 2
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.inference_mode():
        assert torch.equal(back(input_ids=ids)[0], model(input_ids=ids)[0])
    manifest["source"]["config"] = {"num_hidden_layerz": 2}
    (tmp_path / "a" / "slimkit.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="source config 'num_hidden_layerz' is not a int"):
        slimkit.load(tmp_path / "a")
