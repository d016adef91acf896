"""Knowledge distillation: train the (compressed) model towards a teacher's outputs.

The ``distill`` stage (method ``kd``) trains what ``finetune`` trains (see
:mod:`slimkit.train.finetune`: plain float parameters, the kept values of sparse layers,
k-means codebooks; integer-code layers frozen; the stored form unchanged) to match a teacher:

- ``teacher``: ``original`` (the model as it entered the recipe, before the earlier stages:
  ``Context.original``, a frozen copy the pipeline takes when a stage asks for it), ``task``
  (a fresh ``task.model()``) or the path of a saved slimkit artifact (``slimkit.load``);
- ``loss: logits`` (classifiers): :func:`~slimkit.distill.losses.kd_loss` of the first output
  tensors over the task's labelled batches, or, with ``pseudo_labels``, over the unlabelled
  calibration batches labelled by the teacher's argmax;
- ``loss: embedding`` (encoders): :func:`~slimkit.distill.losses.embedding_loss` of the first
  output tensors (a (B, T, H) hidden state of a dict batch with an ``attention_mask`` is
  mean-pooled over the mask and L2-normalised first, as the text tasks embed) over the
  unlabelled calibration batches;
- ``hints``: ``[student_layer, teacher_layer]`` pairs whose outputs (forward hooks) are
  pulled together by :func:`~slimkit.distill.losses.hint_loss`, times ``hint_weight``; where
  the widths differ a projection (Linear on the last dim, 1x1 Conv2d on (B, C, H, W) maps)
  trains with the student and is discarded afterwards;
- ``attention``: ``[student_module, teacher_module]`` pairs of attention modules (BERT-like:
  ``query`` / ``key`` / ``value`` Linear layers and a ``num_attention_heads`` attribute, e.g.
  ``encoder.layer.0.attention.self``) whose attention probabilities, recomputed from the
  captured query and key projections with the batch's ``attention_mask``
  (:func:`~slimkit.distill.losses.attention_probs`), are pulled together by
  :func:`~slimkit.distill.losses.attention_loss` (MSE, TinyBERT / MiniLM style), times
  ``attention_weight``; both modules must have the same number of heads.

With ``student_width`` and/or ``student_depth`` the model entering the stage is set aside
and a new, smaller model of the task is trained instead and returned: ``task.student(width,
depth, student_init, seed)`` (narrower digits networks; a BERT encoder keeping every other
layer, ...). The student's options are added to the source (``StageResult.source``), so a saved
artifact's source names them and loading rebuilds the student's architecture. The teacher is
as configured (``original``: the model as it entered the recipe). ``alpha: 0`` trains the
same student on the hard labels alone, the baseline distillation is measured against.

Before any training: the hint layers and attention modules must exist (attention pairs with
equal head counts), and the student's output must have the teacher's shape on the first
batch (and every hint pair fit a projection). A ``val_fraction`` of the batches (chosen by
``seed``) is held out; after each epoch the distillation loss on it (without hints and
attention terms) is measured, the best state is kept and restored at the end, and training
stops after ``patience`` epochs without improvement. With ``checkpoint``, the student's
state, the projections, Adam's state, the epoch and the early-stopping state are written
after every epoch atomically to one safetensors file (its JSON metadata holds the counters;
nothing is pickled), and a later run with the same options (``epochs`` aside) on the same
model and data resumes from it: the shuffle and random state of every epoch are seeded from
``seed`` and the epoch, so a resumed run ends where an uninterrupted one does.

Deterministic for a given seed; no ``.grad`` is left; the model is returned in eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.calib.capture import labelled_batches
from slimkit.compressed import count_params
from slimkit.config import Config
from slimkit.context import Context, StageResult
from slimkit.data import Batch, call, first_tensor, writable
from slimkit.distill.losses import (
    attention_loss,
    attention_probs,
    embedding_loss,
    hint_loss,
    kd_loss,
)
from slimkit.errors import ConfigError, DataError, ModelError, did_you_mean
from slimkit.registry import register
from slimkit.train.checkpoint import SafetensorsCheckpoint
from slimkit.train.finetune import LRSchedule, lr_at, training
from slimkit.train.fit import Callback, EarlyStopping, FitResult, fit
from slimkit.train.optim import adam

ORIGINAL = "original"
TASK = "task"
CHECKPOINT_FORMAT = "slimkit-distill-checkpoint"
CHECKPOINT_VERSION = 1

#: (inputs, class labels or None) — labels are None for unlabelled (embedding) batches
Item = tuple[Batch, torch.Tensor | None]


class DistillLoss(str, enum.Enum):
    LOGITS, EMBEDDING = "logits", "embedding"


class EmbeddingKind(str, enum.Enum):
    COSINE, MSE = "cosine", "mse"


class StudentInit(str, enum.Enum):
    TEACHER, RANDOM = "teacher", "random"


@dataclasses.dataclass(frozen=True)
class DistillConfig(Config):
    """Distil ``teacher`` (``original``, ``task`` or an artifact path) into the model for
    ``epochs`` with Adam at ``lr`` (``lr_schedule`` constant or cosine over all updates):
    ``loss: logits`` with temperature ``temperature`` and soft weight ``alpha`` (the rest on
    the labels' cross-entropy), or ``loss: embedding`` (``embedding_kind`` cosine or mse);
    ``hints`` pairs of [student_layer, teacher_layer] weighted by ``hint_weight``;
    ``pseudo_labels`` trains on the unlabelled calibration data; ``val_fraction`` of the
    batches held out for early stopping after ``patience`` epochs without improvement (0:
    no validation); ``checkpoint`` a file to save after each epoch and resume from;
    ``batch_limit`` the first batches only (null: all); shuffled by ``seed``.
    ``student_width`` / ``student_depth`` (each in (0, 1]; null: 1 when the other is set,
    no student when both are null): train a new, smaller model of the task,
    ``task.student(width, depth, student_init, seed)``, instead of the model entering the
    stage, and return it."""

    kind = "distill"
    method = "kd"

    teacher: str = ORIGINAL
    loss: DistillLoss = DistillLoss.LOGITS
    temperature: float = 4.0
    alpha: float = 0.9
    embedding_kind: EmbeddingKind = EmbeddingKind.COSINE
    hints: tuple[tuple[str, ...], ...] = ()
    hint_weight: float = 1.0
    attention: tuple[tuple[str, ...], ...] = ()
    attention_weight: float = 1.0
    epochs: int = 3
    lr: float = 1e-4
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    pseudo_labels: bool = False
    val_fraction: float = 0.1
    patience: int = 3
    checkpoint: str | None = None
    batch_limit: int | None = None
    seed: int = 0
    student_width: float | None = None
    student_depth: float | None = None
    student_init: StudentInit = StudentInit.TEACHER

    @property
    def has_student(self) -> bool:
        """Whether the stage trains a new student of the task instead of the model."""
        return self.student_width is not None or self.student_depth is not None

    def student_options(self) -> dict[str, Any]:
        """The arguments of ``task.student`` (and what an artifact records to rebuild it)."""
        return {
            "width": 1.0 if self.student_width is None else self.student_width,
            "depth": 1.0 if self.student_depth is None else self.student_depth,
            "init": self.student_init.value,
            "seed": self.seed,
        }

    @property
    def needs_original(self) -> bool:
        """Whether the pipeline must keep a copy of the model from before the recipe."""
        return self.teacher == ORIGINAL

    def validate(self) -> None:
        allowed_teacher = "original, task, or the path of an existing slimkit artifact"
        if not self.teacher:
            self.fail("teacher", allowed_teacher)
        if self.teacher not in (ORIGINAL, TASK) and not Path(self.teacher).exists():
            raise ConfigError(
                f"{self._where('teacher')}: got {self.teacher!r}, which is not an existing "
                f"path{did_you_mean(self.teacher, [ORIGINAL, TASK])}; allowed: {allowed_teacher}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            self.fail("temperature", "a positive finite number")
        if not 0.0 <= self.alpha <= 1.0:
            self.fail("alpha", "a number from 0 to 1")
        for pair in self.hints:
            if len(pair) != 2 or not all(pair):
                self.fail("hints", "a list of [student_layer, teacher_layer] name pairs")
        if not (math.isfinite(self.hint_weight) and self.hint_weight >= 0):
            self.fail("hint_weight", "a finite number >= 0")
        for pair in self.attention:
            if len(pair) != 2 or not all(pair):
                self.fail("attention", "a list of [student_module, teacher_module] name pairs")
        if not (math.isfinite(self.attention_weight) and self.attention_weight >= 0):
            self.fail("attention_weight", "a finite number >= 0")
        if self.epochs < 1:
            self.fail("epochs", "an integer >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            self.fail("lr", "a positive finite number")
        if not 0.0 <= self.val_fraction < 1.0:
            self.fail("val_fraction", "a number >= 0 and < 1 (0: no validation)")
        if self.patience < 1:
            self.fail("patience", "an integer >= 1")
        if self.checkpoint is not None and (not self.checkpoint or Path(self.checkpoint).is_dir()):
            self.fail("checkpoint", "the path of a file (not a directory), or null")
        if self.batch_limit is not None and self.batch_limit < 1:
            self.fail("batch_limit", "an integer >= 1, or null for every batch")
        if self.seed < 0:
            self.fail("seed", "an integer >= 0")
        for name in ("student_width", "student_depth"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0.0 < value <= 1.0):
                self.fail(name, "a number in (0, 1], or null")


#: what a distillation run did: per epoch (including those of a resumed run) the mean
#: training loss and the validation loss (empty without validation)
History = FitResult


# -- checks before any work --------------------------------------------------------------
def check_hint_layers(model: nn.Module, config: DistillConfig, role: str) -> None:
    """ConfigError naming the first hint layer missing from ``model`` (``role``: student or
    teacher)."""
    names = [name for name, _ in model.named_modules() if name]
    column = 0 if role == "student" else 1
    for i, pair in enumerate(config.hints):
        name = pair[column]
        if name not in names:
            raise ConfigError(
                f"{config._where('hints')}[{i}]: the {role} has no layer {name!r}"
                f"{did_you_mean(name, names)}"
            )


def check_attention_modules(model: nn.Module, config: DistillConfig, role: str) -> None:
    """ConfigError naming the first ``attention`` module of ``role`` (student or teacher)
    missing from ``model`` or not an attention module (query / key / value Linear layers
    and head-count attributes)."""
    from slimkit.model_info import is_attention

    modules = dict(model.named_modules())
    names = [name for name, m in modules.items() if name and is_attention(m)]
    column = 0 if role == "student" else 1
    for i, pair in enumerate(config.attention):
        name = pair[column]
        if name not in modules or not is_attention(modules[name]):
            what = "no module" if name not in modules else "no attention module"
            example = f" (attention modules: {', '.join(names[:3])}, ...)" if names else ""
            raise ConfigError(
                f"{config._where('attention')}[{i}]: the {role} has {what} {name!r}"
                f"{did_you_mean(name, names)}{example}"
            )


def attention_heads(model: nn.Module, name: str) -> int:
    heads: Any = model.get_submodule(name).num_attention_heads
    return int(heads)


def check_attention_heads(model: nn.Module, teacher: nn.Module, config: DistillConfig) -> None:
    """ConfigError naming both modules when an ``attention`` pair's head counts differ."""
    for i, (s_name, t_name) in enumerate(config.attention):
        s, t = attention_heads(model, s_name), attention_heads(teacher, t_name)
        if s != t:
            raise ConfigError(
                f"{config._where('attention')}[{i}]: the student module {s_name!r} has {s} "
                f"heads and the teacher module {t_name!r} {t}; attention maps are compared "
                "head by head"
            )


def resolve_teacher(config: DistillConfig, ctx: Context) -> nn.Module:
    """The teacher model, in eval mode without gradients."""
    where = config._where("teacher")
    if config.teacher == ORIGINAL:
        if ctx.original is None:
            raise ConfigError(
                f"{where}: 'original' needs the model from before the recipe, which the "
                "pipeline keeps only when run through slimkit.compress / pipeline.run"
            )
        teacher = ctx.original
    elif config.teacher == TASK:
        if ctx.task is None:
            raise ConfigError(f"{where}: 'task' needs a task; none was given")
        teacher = ctx.task.model()
    else:
        path = Path(config.teacher)
        if not path.exists():
            raise ConfigError(f"{where}: the teacher artifact {str(path)!r} does not exist")
        from slimkit.io.artifact import load

        teacher = load(path)
        for p in teacher.parameters():
            p.requires_grad_(False)
    return teacher.eval()


def training_items(
    model: nn.Module, teacher: nn.Module, config: DistillConfig, ctx: Context
) -> list[Item]:
    """The batches to train on: the task's labelled batches for ``loss: logits``; the
    calibration batches (labelled by the teacher's argmax with ``pseudo_labels``) otherwise."""
    items: list[Item]
    if config.loss is DistillLoss.LOGITS and not config.pseudo_labels:
        items = list(labelled_batches(model, ctx, "distill"))
    else:
        batches = ctx.need_data("distill")
        items = [(b, None) for b in batches]
    items = items[: config.batch_limit]
    if config.loss is DistillLoss.LOGITS and config.pseudo_labels:
        with torch.no_grad():
            items = [(x, first_tensor(call(teacher, x)).argmax(dim=-1)) for x, _ in items]
    return items


@dataclasses.dataclass(frozen=True)
class HintPlan:
    """A hint pair's layers and the projection it needs: None (same shape), ``linear`` or
    ``conv`` from ``width_in`` to ``width_out``."""

    student: str
    teacher: str
    projection: str | None
    width_in: int
    width_out: int

    def build(self) -> nn.Module:
        if self.projection == "conv":
            return nn.Conv2d(self.width_in, self.width_out, kernel_size=1)
        if self.projection == "linear":
            return nn.Linear(self.width_in, self.width_out)
        return nn.Identity()


def check_shapes(
    model: nn.Module, teacher: nn.Module, item: Item, config: DistillConfig
) -> list[HintPlan]:
    """One forward of both models on ``item``: ModelError naming both shapes when the
    outputs differ, ConfigError when a hint pair's features cannot be projected; returns the
    hint plan."""
    inputs = item[0]
    pairs = [(str(s), str(t)) for s, t in config.hints]
    with (
        torch.no_grad(),
        capturing(model, [s for s, _ in pairs]) as s_feats,
        capturing(teacher, [t for _, t in pairs]) as t_feats,
    ):
        was_training = model.training
        model.eval()
        try:
            s_out = outputs(call(model, inputs), inputs, config.loss)
        finally:
            model.train(was_training)
        t_out = outputs(call(teacher, inputs), inputs, config.loss)
    if s_out.shape != t_out.shape:
        raise ModelError(
            f"distill: the student's output shape {tuple(s_out.shape)} does not match the "
            f"teacher's {tuple(t_out.shape)} (first training batch)"
        )
    plans = []
    for i, (s_name, t_name) in enumerate(pairs):
        s, t = s_feats[s_name], t_feats[t_name]
        plans.append(_plan(config, i, s_name, t_name, s.shape, t.shape))
    return plans


def _plan(
    config: DistillConfig, i: int, s_name: str, t_name: str, s: torch.Size, t: torch.Size
) -> HintPlan:
    if s == t:
        return HintPlan(s_name, t_name, None, 0, 0)
    if len(s) == 4 and len(t) == 4 and s[:1] + s[2:] == t[:1] + t[2:]:
        return HintPlan(s_name, t_name, "conv", s[1], t[1])
    if len(s) == len(t) and s[:-1] == t[:-1]:
        return HintPlan(s_name, t_name, "linear", s[-1], t[-1])
    raise ConfigError(
        f"{config._where('hints')}[{i}]: the student layer {s_name!r} gives {tuple(s)} and "
        f"the teacher layer {t_name!r} {tuple(t)}; only the channel (4-D maps) or last "
        "dimension may differ"
    )


# -- forward helpers -----------------------------------------------------------------------
@contextlib.contextmanager
def capturing(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the named modules' (first) outputs of the latest forward, by name."""
    found: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            found[name] = first_tensor(output)

        return hook

    handles = [
        model.get_submodule(name).register_forward_hook(hook_for(name)) for name in set(names)
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def query_key(name: str) -> tuple[str, str]:
    """The names of an attention module's query and key projections."""
    return f"{name}.query", f"{name}.key"


def maps(
    found: dict[str, torch.Tensor], name: str, heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """(B, heads, T, T) attention probabilities of the module ``name`` from its captured
    query and key projections of the latest forward."""
    q, k = query_key(name)
    return attention_probs(found[q], found[k], heads, mask)


def outputs(output: Any, inputs: Batch, loss: DistillLoss) -> torch.Tensor:
    """What the loss compares: the first output tensor; for ``embedding`` a (B, T, H) hidden
    state of a dict batch with an ``attention_mask`` is mask-mean-pooled and L2-normalised
    to (B, H), as the text tasks embed."""
    out = first_tensor(output)
    if loss is DistillLoss.EMBEDDING and out.dim() == 3 and isinstance(inputs, dict):
        mask = inputs.get("attention_mask")
        if mask is not None and mask.shape == out.shape[:2]:
            weights = mask.to(out.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (out * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, H)
            return F.normalize(pooled, dim=-1)
    return out


def objective(
    s_out: torch.Tensor, t_out: torch.Tensor, labels: torch.Tensor | None, config: DistillConfig
) -> torch.Tensor:
    """The distillation loss of one batch, hints aside."""
    if config.loss is DistillLoss.LOGITS:
        return kd_loss(s_out, t_out, labels, config.temperature, config.alpha)
    return embedding_loss(s_out, t_out, config.embedding_kind.value)


# -- the loop ----------------------------------------------------------------------------
def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) batch indices: ``round(fraction * n)`` (at least 1) batches chosen
    by ``seed`` are held out when ``fraction > 0`` and at least two batches exist."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_val = min(n - 1, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` (0-based): shuffle order and random state (dropout)."""
    return (seed * 1_000_003 + epoch + 1) % (2**63)


class Reseed(Callback):
    """At the start of every epoch the random state (dropout) is seeded by
    :func:`epoch_seed`."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def epoch_start(self, epoch: int) -> None:
        torch.manual_seed(epoch_seed(self.seed, epoch))


def distill(
    model: nn.Module,
    teacher: nn.Module,
    items: Sequence[Item],
    config: DistillConfig,
    hints: Sequence[HintPlan] = (),
    report: Callable[[str], None] | None = None,
) -> History:
    """Train ``model`` towards ``teacher`` over ``items`` (see the module doc) and return
    the history. The teacher is only run (under no_grad); ``hints`` come from
    :func:`check_shapes`. ModelError when the loss becomes NaN or Inf."""
    if not items:
        raise DataError("distill: no training batches")
    data = [(writable(x), None if y is None else y.clone()) for x, y in items]
    train_idx, val_idx = split(len(data), config.val_fraction, config.seed)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.random.fork_rng(devices=[]))
        params = stack.enter_context(training(model))
        torch.manual_seed(config.seed)
        projections = nn.ModuleList([plan.build() for plan in hints])
        s_att = [qk for s_name, _ in config.attention for qk in query_key(s_name)]
        t_att = [qk for _, t_name in config.attention for qk in query_key(t_name)]
        s_feats = stack.enter_context(capturing(model, [h.student for h in hints] + s_att))
        t_feats = stack.enter_context(capturing(teacher, [h.teacher for h in hints] + t_att))
        features = bool(hints or config.attention)  # the teacher's hooks must run each step
        t_cache: dict[int, torch.Tensor] = {}

        def teacher_out(i: int) -> torch.Tensor:
            """The teacher's output on batch ``i``: computed once when there are no hints or
            attention pairs (the teacher is frozen and in eval mode), every time otherwise
            (the hooks need its features)."""
            inputs = data[i][0]
            if features or i not in t_cache:
                with torch.no_grad():
                    out = outputs(call(teacher, inputs), inputs, config.loss)
                if features:
                    return out
                t_cache[i] = out
            return t_cache[i]

        def batch_loss(i: int, with_hints: bool) -> torch.Tensor:
            inputs, labels = data[i]
            t_out = teacher_out(i)
            s_out = outputs(call(model, inputs), inputs, config.loss)
            loss = objective(s_out, t_out, labels, config)
            if with_hints and hints and config.hint_weight > 0:
                terms = [
                    hint_loss(s_feats[h.student], t_feats[h.teacher], proj)
                    for h, proj in zip(hints, projections, strict=True)
                ]
                loss = loss + config.hint_weight * torch.stack(terms).mean()
            if with_hints and config.attention and config.attention_weight > 0:
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                s_maps = [
                    maps(s_feats, name, attention_heads(model, name), mask)
                    for name, _ in config.attention
                ]
                t_maps = [
                    maps(t_feats, name, attention_heads(teacher, name), mask)
                    for _, name in config.attention
                ]
                att = attention_loss(s_maps, t_maps, layer_map=range(len(s_maps)))
                loss = loss + config.attention_weight * att
            return loss

        def val_loss() -> float:
            model.eval()
            with torch.no_grad():
                val = sum(float(batch_loss(i, with_hints=False)) for i in val_idx)
            return val / len(val_idx)

        def order(epoch: int) -> list[int]:
            gen = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
            return [train_idx[k] for k in torch.randperm(len(train_idx), generator=gen).tolist()]

        updates = config.epochs * len(train_idx)
        history = fit(
            [*params, *projections.parameters()],
            order,
            lambda i: batch_loss(i, with_hints=True),
            epochs=config.epochs,
            optimizer=adam(config.lr),
            schedule=lambda step: lr_at(config.lr, step, updates, config.lr_schedule),
            model=model,
            early_stopping=EarlyStopping(val_loss, config.patience) if val_idx else None,
            checkpoint=_checkpoint(config, model, projections, train_idx, val_idx),
            callbacks=[Reseed(config.seed)],
            report=report,
            name="distill",
        )
    model.eval()
    return history


def _checkpoint(
    config: DistillConfig,
    model: nn.Module,
    projections: nn.Module,
    train_idx: list[int],
    val_idx: list[int],
) -> SafetensorsCheckpoint | None:
    """The checkpoint file of ``config`` holding the student and the projections."""
    if config.checkpoint is None:
        return None
    return SafetensorsCheckpoint(
        Path(config.checkpoint),
        {"student.": model, "proj.": projections},
        _fingerprint(model, projections, config, train_idx, val_idx),
        format=CHECKPOINT_FORMAT,
        version=CHECKPOINT_VERSION,
        name="distill",
        key="distill.kd.checkpoint",
    )


# -- checkpoint ----------------------------------------------------------------------------
def _fingerprint(
    model: nn.Module,
    projections: nn.Module,
    config: DistillConfig,
    train_idx: list[int],
    val_idx: list[int],
) -> str:
    """What a checkpoint must share with this run to be resumed: the options (``epochs`` and
    ``checkpoint`` aside), the tensors' names, shapes and dtypes, and the batch split."""
    options = {k: v for k, v in config.to_dict().items() if k not in ("epochs", "checkpoint")}
    tensors = {
        f"{prefix}{k}": [list(v.shape), str(v.dtype)]
        for prefix, module in (("student.", model), ("proj.", projections))
        for k, v in module.state_dict().items()
    }
    blob = json.dumps([options, tensors, train_idx, val_idx], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- the stage ---------------------------------------------------------------------------
def build_student(config: DistillConfig, ctx: Context) -> nn.Module:
    """``ctx.task.student(...)`` of the configured options; ConfigError without a task."""
    if ctx.task is None:
        raise ConfigError(
            f"{config._where('student_width')}: a student is built by the task; none was given"
        )
    return ctx.task.student(**config.student_options())


@register(DistillConfig)
def apply_distill(model: nn.Module, config: DistillConfig, ctx: Context) -> StageResult:
    """The trained model (the new student, with its options added to the source so that
    loading rebuilds its architecture); its record holds the losses."""
    if config.has_student:
        model = build_student(config, ctx)
    check_hint_layers(model, config, "student")
    check_attention_modules(model, config, "student")
    teacher = resolve_teacher(config, ctx)
    if teacher is model:
        raise ModelError("distill: the teacher is the student itself")
    check_hint_layers(teacher, config, "teacher")
    check_attention_modules(teacher, config, "teacher")
    check_attention_heads(model, teacher, config)
    items = training_items(model, teacher, config, ctx)
    plans = check_shapes(model, teacher, items[0], config)
    history = distill(model, teacher, items, config, plans, report=ctx.report)
    summary = f"distill: {history.epochs_run} epochs on {len(items)} batches"
    summary += f", loss {history.losses[-1]:.4f}" if history.losses else ""
    if history.best_epoch:
        summary += f", best val {min(history.val):.4f} (epoch {history.best_epoch}) kept"
    if config.has_student:
        summary += f"; student {config.student_options()} of {count_params(model):,} params"
    ctx.report(summary)
    source = {"student": config.student_options()} if config.has_student else {}
    record = {"epochs": history.epochs_run, "best_epoch": history.best_epoch}
    return StageResult(model.eval(), record=record, source=source)
