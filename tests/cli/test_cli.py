"""The command line: exit codes, one-line errors, the compress/eval flow end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimkit.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def hf_args(tiny_hf: tuple[Path, Path]) -> list[str]:
    model_dir, data = tiny_hf
    return ["--task", "hf", "--model-dir", str(model_dir), "--data", str(data)]


def compress(capsys, tiny_hf, out: Path, recipe: Path, *extra: str) -> tuple[int, str]:
    return run(capsys, "compress", *hf_args(tiny_hf), "--recipe", recipe, "--out", out, *extra)


def test_usage_error_exits_2(capsys):
    code, text = run(capsys, "compress", "--bogus")
    assert code == 2
    assert "--bogus" in text and "Traceback" not in text


def test_unknown_task_exits_2_with_suggestion(capsys, tmp_path):
    code, text = run(
        capsys, "compress", "-t", "digits-lenett", "-r", RECIPES / "w8-rtn.yaml", "-o", tmp_path
    )
    assert code == 2
    assert "digits-lenet" in one_error_line(text)


def test_missing_recipe_file(capsys, tmp_path):
    code, text = run(capsys, "compress", "-t", "digits-lenet", "-r", "nope.yaml", "-o", tmp_path)
    assert code == 2
    assert "nope.yaml" in one_error_line(text)


def test_malformed_yaml_names_line(capsys, tmp_path):
    bad = write(tmp_path / "bad.yaml", "name: x\nstages:\n  - quantize: {bits: 8\n")
    code, text = run(capsys, "compress", "-t", "digits-lenet", "-r", bad, "-o", tmp_path / "o")
    line = one_error_line(text)
    assert code == 2
    assert "bad.yaml" in line and "line" in line


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("{bitz: 8}", "did you mean 'bits'"),
        ("{bits: eight}", "bits"),
        ("{bits: 9}", "allowed: 2..8"),
        ("{granularity: per_chanel}", "did you mean 'per_channel'"),
    ],
)
def test_bad_recipe_values(capsys, tmp_path, options, expected):
    recipe = write(tmp_path / "r.yaml", f"name: r\nstages:\n  - quantize: {options}\n")
    code, text = run(capsys, "compress", "-t", "digits-lenet", "-r", recipe, "-o", tmp_path / "o")
    assert code == 2
    assert expected in one_error_line(text)


def test_sparsity_out_of_range(capsys, tmp_path):
    recipe = write(tmp_path / "r.yaml", "name: r\nstages:\n  - prune: {sparsity: 1.5}\n")
    code, text = run(capsys, "compress", "-t", "digits-lenet", "-r", recipe, "-o", tmp_path / "o")
    line = one_error_line(text)
    assert code == 2
    assert "sparsity" in line and "1.5" in line


def test_missing_model_dir(capsys, tmp_path, tiny_hf):
    _, data = tiny_hf
    args = ["--task", "hf", "--model-dir", tmp_path / "nope", "--data", data]
    code, text = run(capsys, "compress", *args, "-r", RECIPES / "w8-rtn.yaml", "-o", tmp_path / "o")
    assert code == 2
    assert "nope" in one_error_line(text)


def test_not_a_hf_dir(capsys, tmp_path, tiny_hf):
    _, data = tiny_hf
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--task", "hf", "--model-dir", empty, "--data", data]
    code, text = run(capsys, "compress", *args, "-r", RECIPES / "w8-rtn.yaml", "-o", tmp_path / "o")
    assert code == 2
    assert "empty" in one_error_line(text)


def test_empty_data_file(capsys, tmp_path, tiny_hf):
    model_dir, _ = tiny_hf
    data = write(tmp_path / "d.jsonl", "")
    args = ["--task", "hf", "--model-dir", model_dir, "--data", data]
    code, text = run(capsys, "compress", *args, "-r", RECIPES / "w8-rtn.yaml", "-o", tmp_path / "o")
    assert code == 2
    assert "d.jsonl" in one_error_line(text)


def test_bad_jsonl_line_number(capsys, tmp_path, tiny_hf):
    model_dir, _ = tiny_hf
    data = write(tmp_path / "d.jsonl", '{"text": "fine words here"}\n{"text": oops}\n')
    args = ["--task", "hf", "--model-dir", model_dir, "--data", data]
    code, text = run(capsys, "compress", *args, "-r", RECIPES / "w8-rtn.yaml", "-o", tmp_path / "o")
    line = one_error_line(text)
    assert code == 2
    assert "d.jsonl" in line and "line 2" in line


def test_target_matching_nothing(capsys, tmp_path, tiny_hf):
    recipe = write(
        tmp_path / "r.yaml", "name: r\nstages:\n  - quantize: {targets: ['decoder.*']}\n"
    )
    code, text = compress(capsys, tiny_hf, tmp_path / "o", recipe)
    assert code == 2
    assert "decoder.*" in one_error_line(text)
    assert not (tmp_path / "o" / "slimkit.json").exists()


def test_compress_hf_end_to_end_then_eval(capsys, tmp_path, tiny_hf):
    out = tmp_path / "out"
    code, text = compress(capsys, tiny_hf, out, RECIPES / "w8-rtn.yaml")
    assert code == 0, text
    for name in ("model.safetensors", "slimkit.json", "report.json", "report.md", "pareto.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "hf"
    base, quant = report["results"]
    assert base["name"] == "fp32" and quant["recipe"] == "w8-rtn"
    assert quant["size_bytes"] < 0.5 * base["size_bytes"]
    assert quant["metrics"]["cosine_mean"] > 0.99
    assert base["metrics"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert set(quant["latency_ms"]) >= {"median", "min", "max", "batch", "threads"}
    assert quant["simulated"] is False

    code, text = run(capsys, "eval", out, *hf_args(tiny_hf))
    assert code == 0, text
    assert "w8-rtn" in text


def test_existing_artifact_refused_then_survives_failed_overwrite(capsys, tmp_path, tiny_hf):
    out = tmp_path / "out"
    assert compress(capsys, tiny_hf, out, RECIPES / "w8-rtn.yaml")[0] == 0
    before = (out / "model.safetensors").read_bytes()

    code, text = compress(capsys, tiny_hf, out, RECIPES / "prune-magnitude-50.yaml")
    assert code == 2
    assert "--overwrite" in one_error_line(text)

    bad = write(tmp_path / "r.yaml", "name: r\nstages:\n  - quantize: {targets: ['nothing']}\n")
    code, _ = compress(capsys, tiny_hf, out, bad, "--overwrite")
    assert code == 2
    assert (out / "model.safetensors").read_bytes() == before
    assert run(capsys, "eval", out, *hf_args(tiny_hf))[0] == 0


def test_eval_flipped_byte_names_file(capsys, tmp_path, tiny_hf):
    out = tmp_path / "out"
    assert compress(capsys, tiny_hf, out, RECIPES / "w8-rtn.yaml")[0] == 0
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    code, text = run(capsys, "eval", out, *hf_args(tiny_hf))
    line = one_error_line(text)
    assert code == 2
    assert "model.safetensors" in line and "checksum" in line


def test_eval_pickle_refused(capsys, tmp_path):
    import pickle

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps(Evil()))
    code, text = run(capsys, "eval", bad)
    assert code == 2
    assert "pickle" in one_error_line(text)
    assert not marker.exists()


def test_tasks_lists_builtin_tasks(capsys):
    code, text = run(capsys, "tasks")
    assert code == 0
    for name in ("digits-lenet", "digits-mlp", "minilm-topics", "hf"):
        assert name in text


def test_export_text_model_with_dynamic_batch_and_length(capsys, tmp_path, tiny_hf):
    import numpy as np
    import onnxruntime as ort
    import torch

    import slimkit

    out = tmp_path / "out"
    assert compress(capsys, tiny_hf, out, RECIPES / "w8a8-static.yaml")[0] == 0
    code, text = run(capsys, "export", out, *hf_args(tiny_hf), "--out", tmp_path / "onnx")
    assert code == 0, text
    assert "model.onnx" in text
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    names = [i.name for i in session.get_inputs()]
    assert "input_ids" in names and "attention_mask" in names
    ids = torch.randint(5, 45, (3, 11))  # another batch and length than the example
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    feed.update({n: torch.zeros_like(ids) for n in names if n not in feed})
    got = session.run(None, {n: feed[n].numpy() for n in names})[0]
    model = slimkit.load(out)
    with torch.inference_mode():
        want = model(**{n: feed[n] for n in names}).last_hidden_state.numpy()
    assert got.shape == want.shape
    cos = (got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cos >= 0.9999


def test_export_unknown_format_exits_2_before_loading(capsys, tmp_path):
    code, text = run(capsys, "export", tmp_path / "nothing", "--format", "tflite", "-o", tmp_path)
    assert code == 2 and "--format 'tflite'; allowed: onnx, openvino, auto" in one_error_line(text)


def test_export_auto_times_the_runtimes_and_writes_the_fastest_faithful(capsys, tmp_path, tiny_hf):
    out = tmp_path / "out"
    assert compress(capsys, tiny_hf, out, RECIPES / "w8-rtn.yaml")[0] == 0
    args = ("export", out, *hf_args(tiny_hf), "-o", tmp_path / "x", "-f", "auto", "--runs", "2")
    code, text = run(capsys, *args)
    assert code == 0, text
    chosen = json.loads((tmp_path / "x" / "export.json").read_text())["chosen"]
    rows = {r["runtime"]: r for r in chosen["measured"]}
    assert "torch" in rows and "onnxruntime" in rows
    best = min(
        (r for r in rows.values() if r["format"] and r["faithful"]), key=lambda r: r["median_ms"]
    )
    assert chosen["runtime"] == best["runtime"]
    assert f"{best['runtime']}: " in text and "<- written" in text


def test_compress_evaluates_each_model_on_each_runtime(capsys, tmp_path, tiny_hf):
    out = tmp_path / "out"
    code, text = compress(
        capsys, tiny_hf, out, RECIPES / "w8-rtn.yaml", "--runtime", "torch,onnxruntime"
    )
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["fp32", "w8-rtn", "fp32@onnxruntime", "w8-rtn@onnxruntime"]
    assert [r["runtime"] for r in rows.values()] == ["torch", "torch", "onnxruntime", "onnxruntime"]
    ort = rows["w8-rtn@onnxruntime"]
    # its own outputs: as faithful as the torch artifact, not a copy of its figures
    assert ort["metrics"]["cosine_mean"] == pytest.approx(
        rows["w8-rtn"]["metrics"]["cosine_mean"], abs=1e-3
    )
    assert ort["size_bytes"] < rows["fp32@onnxruntime"]["size_bytes"]
    assert ort["params"] == rows["w8-rtn"]["params"] and ort["latency_ms"]["median"] > 0
    # robustness is the torch row's (the same weights), never copied onto the export's row
    assert rows["w8-rtn"]["robustness"] and ort["robustness"] == {}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "slimkit.json", "report.json", "report.md", "pareto.png"]
    )  # the exports were measured in a scratch directory


def test_unknown_runtime_exits_2_before_work(capsys, tmp_path, tiny_hf):
    out = tmp_path / "out"
    code, text = compress(capsys, tiny_hf, out, RECIPES / "w8-rtn.yaml", "--runtime", "tvm")
    assert code == 2 and "--runtime 'tvm'; allowed: torch, onnxruntime, openvino" in one_error_line(
        text
    )
    assert not out.exists()


def test_the_demo_names_the_fastest_faithful_row():
    from slimkit.cli import _fastest_faithful
    from slimkit.evaluate.result import Report, Result

    def row(name, runtime, cos, ms, simulated=False):
        latency = {"median": ms, "min": ms, "max": ms, "batch": 64, "threads": 2}
        return Result(name, None, {"cosine_mean": cos}, "cosine_mean", 100, 10, 10, latency,
                      0, {}, simulated, runtime=runtime)  # fmt: skip

    rows = [
        row("fp32", "torch", 1.0, 1000.0),
        row("w4@openvino", "openvino", 0.988, 200.0),  # fastest, but not faithful
        row("bf16@openvino", "openvino", 0.9999, 350.0),
        row("w8a8", "torch", 0.998, 900.0),
        row("fake", "torch", 1.0, 100.0, simulated=True),  # only simulates: never counted
    ]
    line = _fastest_faithful(Report("minilm-topics", rows))
    assert line.startswith("minilm-topics: fastest faithful row: bf16@openvino on openvino, 2.86x")
    line = _fastest_faithful(Report("t", [rows[0], rows[1]]))
    assert line == "t: no row keeps cosine_mean within 0.003 of fp32"


def test_eval_on_a_runtime_shows_its_rows(capsys, tmp_path, tiny_hf):
    out = tmp_path / "out"
    assert compress(capsys, tiny_hf, out, RECIPES / "w8-rtn.yaml")[0] == 0
    code, text = run(capsys, "eval", out, *hf_args(tiny_hf), "--runtime", "onnxruntime")
    assert code == 0, text
    top = next(line for line in text.splitlines() if line.startswith("┏"))
    assert top.count("┳") == 4  # the metric column and 4 models: fp32, w8-rtn and both @onnxruntime
