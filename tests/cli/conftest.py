from __future__ import annotations

import json
from pathlib import Path

import pytest

WORDS = (  # noqa: SIM905
    "the a of to and in is for on with as by be this that it from are or an at which "
    "python class function module return value list dict string number loop import "
    "object method attribute error exception file data type name call argument"
).split()


def make_tiny_bert(
    root: Path, layers: int = 2, hidden: int = 32, intermediate: int = 64, name: str = "tiny-bert"
) -> Path:
    """A random BERT (``layers`` x ``hidden`` wide, 2 heads, seed 0) with its tokenizer,
    saved as a HF directory ``root/name``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    model_dir = root / name
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(model_dir)
    BertTokenizerFast(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    return model_dir


def make_jsonl(path: Path, n: int = 24) -> Path:
    lines = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 5)]
        lines.append(json.dumps({"text": " ".join(words), "label": f"topic{i % 3}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hf")
    return make_tiny_bert(root), make_jsonl(root / "data.jsonl")
