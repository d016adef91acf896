"""Shared fixtures of the distillation tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slimkit import tasks


@pytest.fixture(scope="session")
def tiny6(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from tests.cli.conftest import WORDS, make_jsonl

    root = tmp_path_factory.mktemp("tiny6")
    model_dir = root / "bert6"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(model_dir)
    BertTokenizerFast(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    return tasks.get("hf", model_dir=model_dir, data=make_jsonl(root / "data.jsonl"))
