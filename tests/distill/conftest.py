"""Shared fixtures of the distillation tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slimkit import tasks


@pytest.fixture(scope="session")
def tiny6(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The hf task on a random 6-layer, 16-wide BERT (2 heads) and a small JSONL file."""
    pytest.importorskip("transformers")
    from tests.cli.conftest import make_jsonl, make_tiny_bert

    root = tmp_path_factory.mktemp("tiny6")
    with torch.random.fork_rng(devices=[]):
        model_dir = make_tiny_bert(root, layers=6, hidden=16, intermediate=32, name="bert6")
    return tasks.get("hf", model_dir=model_dir, data=make_jsonl(root / "data.jsonl"))
