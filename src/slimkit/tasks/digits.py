"""Image tasks on scikit-learn's 8x8 handwritten digits: a small CNN and an MLP.

The models are trained on first use (a few seconds on a CPU, deterministically) and cached as
safetensors in the user cache directory, ``$SLIMKIT_CACHE_DIR/tasks`` when that is set.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimkit import atomic
from slimkit.constructible import register_constructible
from slimkit.data import Batch, call, first_tensor
from slimkit.errors import ConfigError
from slimkit.tasks.base import Task, check_student
from slimkit.train.fit import fit, minibatches
from slimkit.train.optim import torch_optimizer

# Bump whenever the data, the architectures or the training change: it is part of the cache key.
RECIPE_VERSION = 1
SEED = 0
BATCH = 64  # calibration / train_data batches
TRAIN_BATCH = 128  # optimisation minibatches
NOISE_LEVELS = (0.1, 0.2, 0.4)
NOISE_SEED = 1234


@register_constructible
class LeNet5(nn.Module):
    """A LeNet-5-style CNN for (B, 1, 8, 8) images: two conv layers, three linear layers.

    The hidden widths are arguments (a student is the same network narrower); the defaults
    are the task's model."""

    def __init__(
        self, conv1: int = 16, conv2: int = 32, fc1: int = 120, fc2: int = 84, classes: int = 10
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(conv1, conv2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(conv2 * 2 * 2, fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(fc2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, C1, 4, 4)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, C2, 2, 2)
        x = x.flatten(1)  # (B, C2 * 4)
        x = F.relu(self.fc1(x))  # (B, F1)
        x = F.relu(self.fc2(x))  # (B, F2)
        return self.fc3(x)  # (B, classes)


@register_constructible
class MLP300100(nn.Module):
    """The LeNet-300-100 MLP on flattened (B, 64) digit images (hidden widths are arguments;
    the defaults are the task's model)."""

    def __init__(self, fc1: int = 300, fc2: int = 100, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(fc2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64)
        x = F.relu(self.fc1(x))  # (B, F1)
        x = F.relu(self.fc2(x))  # (B, F2)
        return self.fc3(x)  # (B, classes)


def hidden_widths(arch: type[nn.Module], width: float) -> dict[str, int]:
    """The constructor's hidden widths (every integer argument but ``classes``) times
    ``width``, rounded, at least 1."""
    params = inspect.signature(arch).parameters.values()
    return {
        p.name: max(1, round(p.default * width))
        for p in params
        if p.name != "classes" and isinstance(p.default, int)
    }


def copy_leading(student: nn.Module, teacher: nn.Module) -> None:
    """Fill every tensor of ``student`` with the leading block of the teacher's tensor of
    the same name (the first output channels / neurons and inputs): the teacher's sub-network
    of the kept units. A flattened (C, 2, 2) map is channel-major, so its first C' * 4
    columns are the kept channels."""
    source = teacher.state_dict()
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            block = source[name][tuple(slice(0, n) for n in tensor.shape)]
            tensor.copy_(block)


def cache_dir() -> Path:
    """Where trained task weights live: ``$SLIMKIT_CACHE_DIR/tasks`` or the user cache dir."""
    root = os.environ.get("SLIMKIT_CACHE_DIR")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("slimkit")
    return Path(root).expanduser() / "tasks"


@functools.lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed stratified split: x_train (N, 1, 8, 8) in [0, 1], y_train (N,), x_test, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype("float32") / 16.0  # (1797, 8, 8)
    y = digits.target.astype("int64")  # (1797,)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    with torch.inference_mode(False):  # usable for training even if first built in inference mode
        return (
            torch.from_numpy(x_tr).unsqueeze(1),  # (1347, 1, 8, 8)
            torch.from_numpy(y_tr),
            torch.from_numpy(x_te).unsqueeze(1),  # (450, 1, 8, 8)
            torch.from_numpy(y_te),
        )


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = first_tensor(call(model, x))  # (N, 10)
    return float((logits.argmax(dim=1) == y).float().mean())


def _metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy (nats) of the logits on ``(x, y)``."""
    logits = first_tensor(call(model, x)).float()  # (N, 10)
    return {
        "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
        "cross_entropy": float(F.cross_entropy(logits, y)),
    }


class DigitsTask(Task):
    """Shared data, training, caching and metrics for the digits tasks."""

    primary_metric = "accuracy"
    higher_is_better = True
    modality = "image"
    default_batch = 256
    arch: ClassVar[type[nn.Module]]
    #: whether the model takes the 64 pixels flat rather than as a 1x8x8 image
    flatten: ClassVar[bool] = False
    #: training of the task model on first use (one-cycle schedule up to ``lr``)
    epochs: ClassVar[int] = 25
    lr: ClassVar[float] = 2e-2
    #: the architecture search space's choices (``SearchSpace`` arguments but the classes)
    space: ClassVar[dict[str, Any] | None] = None

    def search_space(self) -> Any:
        """The architecture search space of the nas stage (see ``space``), or None."""
        from slimkit.tasks.searched import SearchSpace

        return None if self.space is None else SearchSpace(num_classes=10, **self.space)

    # -- data ------------------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.flatten else x  # (B, 64) or (B, 1, 8, 8)

    def calibration_data(self) -> list[Batch]:
        x_train = self._inputs(_split()[0])
        return [x_train[i : i + BATCH] for i in range(0, 4 * BATCH, BATCH)]

    def train_data(self) -> list[tuple[Batch, torch.Tensor]]:
        x_train, y_train = self._inputs(_split()[0]), _split()[1]
        n = len(x_train)
        return [(x_train[i : i + BATCH], y_train[i : i + BATCH]) for i in range(0, n, BATCH)]

    def example_inputs(self) -> Batch:
        return self._inputs(_split()[2][:1]).clone()

    def latency_inputs(self, batch: int | None = None) -> Batch:
        x_test = _split()[2]
        index = torch.arange(batch or self.default_batch) % len(x_test)  # tile the test set
        return self._inputs(x_test[index])

    def latency_description(self, batch: int | None = None) -> str:
        shape = "64 pixels" if self.flatten else "1x8x8 images"
        return f"batch {batch or self.default_batch} x {shape}"

    # -- metrics ---------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        _, _, x_test, y_test = _split()
        model.eval()
        with torch.inference_mode():
            return _metrics(model, self._inputs(x_test), y_test)

    def robustness(self, model: nn.Module) -> dict[str, float]:
        x_train, _, x_test, y_test = _split()
        std = float(x_train.std())
        noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
        model.eval()
        out = {}
        with torch.inference_mode():
            for level in NOISE_LEVELS:
                noisy = x_test + noise * (level * std)  # (N, 1, 8, 8)
                out[f"gauss_{level}"] = _accuracy(model, self._inputs(noisy), y_test)
        return out

    # -- model -----------------------------------------------------------------------------
    def model(self) -> nn.Module:
        return self._build(self._weights())

    def student(
        self, width: float = 1.0, depth: float = 1.0, init: str = "teacher", seed: int = 0
    ) -> nn.Module:
        """The same architecture with every hidden width (conv channels, FC neurons) times
        ``width``, rounded, at least 1; the output layer keeps the classes. ``init``:
        ``random`` (seeded by ``seed``; the global RNG is left as is) or ``teacher`` (the
        leading channels / neurons of the task's trained model). Only ``depth`` 1."""
        check_student(self.name, width, depth, init)
        if depth != 1.0:
            raise ConfigError(
                f"task {self.name!r}: student depth {depth!r} is not supported; its layers "
                "cannot be dropped (allowed: 1.0)"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.arch(**hidden_widths(self.arch, width))
        if init == "teacher":
            copy_leading(model, self.model())
        return model.eval()

    def _build(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The architecture in eval mode with ``state`` loaded; the global RNG is left as is."""
        with torch.random.fork_rng(devices=[]):
            model = self.arch()
        model.load_state_dict(state)
        return model.eval()

    def cache_paths(self) -> tuple[Path, Path]:
        """The weights file and its JSON sidecar; the recipe version is part of the name."""
        stem = cache_dir() / f"{self.name}-v{RECIPE_VERSION}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def _weights(self) -> dict[str, torch.Tensor]:
        cached = self._load_cached()
        if cached is not None:
            return cached
        started = time.perf_counter()
        state = self._fit()
        seconds = time.perf_counter() - started
        self._store(state, {"train_seconds": round(seconds, 3)})
        return state

    def _load_cached(self) -> dict[str, torch.Tensor] | None:
        """The cached weights when present, of this recipe version and matching their sha256."""
        from safetensors.torch import load_file

        weights, sidecar = self.cache_paths()
        try:
            meta = json.loads(sidecar.read_text("utf-8"))
            ok = meta.get("recipe_version") == RECIPE_VERSION
            if not ok or meta.get("sha256") != atomic.sha256_file(weights):
                return None
            return load_file(str(weights))
        except (OSError, ValueError, AttributeError, RuntimeError):
            return None  # missing, unreadable or corrupt: retrain

    def _store(self, state: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        weights, sidecar = self.cache_paths()
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        try:
            atomic.write_with(weights, lambda tmp: save_file(tensors, str(tmp)))
            meta = {
                "task": self.name,
                "recipe_version": RECIPE_VERSION,
                "sha256": atomic.sha256_file(weights),
                "test_accuracy": self._test_accuracy(state),
                **extra,
            }
            atomic.write_text(sidecar, json.dumps(meta, indent=2) + "\n")
        except OSError as e:
            warnings.warn(
                f"cannot cache {self.name} weights in {weights.parent}: {e}", stacklevel=3
            )

    def _test_accuracy(self, state: dict[str, torch.Tensor]) -> float:
        return round(self.evaluate(self._build(state))["accuracy"], 6)

    def _fit(self) -> dict[str, torch.Tensor]:
        """Train from a fixed seed in a fixed order; the global RNG state is left untouched."""
        x_train, y_train, _, _ = _split()
        x_train = self._inputs(x_train)
        steps_per_epoch = -(-len(x_train) // TRAIN_BATCH)
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(SEED)
            model = self.arch().train()

            def loss(idx: torch.Tensor) -> torch.Tensor:
                logits = model(x_train[idx])  # (B, 10)
                return F.cross_entropy(logits, y_train[idx], label_smoothing=0.1)

            fit(
                list(model.parameters()),
                minibatches(len(x_train), TRAIN_BATCH, torch.Generator().manual_seed(SEED)),
                loss,
                epochs=self.epochs,
                optimizer=torch_optimizer(
                    lambda ps: torch.optim.AdamW(ps, lr=self.lr, weight_decay=1e-4),
                    lambda opt: torch.optim.lr_scheduler.OneCycleLR(
                        opt, max_lr=self.lr, total_steps=self.epochs * steps_per_epoch
                    ),
                ),
                model=model,
                check_finite=False,
            )
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


class DigitsLeNet(DigitsTask):
    name = "digits-lenet"
    description = "LeNet-5-style CNN on sklearn 8x8 digits (trained on first use); top-1 accuracy"
    arch = LeNet5

    #: architecture search (nas stage): 1..3 conv blocks (width, 3x3 or 5x5, standard or
    #: depthwise-separable), 1..2 hidden Linear layers
    space: ClassVar[dict[str, Any]] = {
        "kind": "cnn", "in_shape": (1, 8, 8), "hidden": (16, 24, 32, 48, 64, 96, 128),
        "fc_depth": (1, 2), "channels": (4, 8, 12, 16, 24, 32), "kernels": (3, 5),
        "separable": (False, True), "conv_depth": (1, 3),
    }  # fmt: skip


class DigitsMLP(DigitsTask):
    name = "digits-mlp"
    description = "LeNet-300-100 MLP on flattened sklearn 8x8 digits (trained on first use); top-1"
    arch = MLP300100
    flatten = True

    #: architecture search (nas stage): 1..3 hidden Linear layers of the listed widths
    space: ClassVar[dict[str, Any]] = {
        "kind": "mlp", "in_shape": (64,), "hidden": (16, 32, 48, 64, 100, 128, 200, 300),
        "fc_depth": (1, 3),
    }  # fmt: skip
