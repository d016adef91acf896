"""The checkpoint of :func:`~slimkit.train.fit.fit` as one safetensors file.

Written atomically after every epoch: each module's state under its prefix, the optimizer's
state tensors, the best state under ``best.``, and in the JSON metadata the format, a
fingerprint of the run and the loop's counters; nothing is pickled. A later run with the same
fingerprint resumes from it; the file of another run is overwritten (with a warning); a file
that is not such a checkpoint is refused (ConfigError).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.atomic import atomic_path
from slimkit.errors import ConfigError
from slimkit.train.fit import FitResult, LoopState, Progress
from slimkit.train.optim import Optimizer, Stateful


@dataclasses.dataclass(frozen=True)
class SafetensorsCheckpoint:
    """A :class:`~slimkit.train.fit.Checkpoint` in the file ``path`` holding ``modules``
    (prefix, e.g. ``"student."``, to module). ``name`` heads messages; ``key`` is the option
    that named the file, in errors."""

    path: Path
    modules: Mapping[str, nn.Module]
    fingerprint: str
    format: str = "slimkit-fit-checkpoint"
    version: int = 1
    name: str = "fit"
    key: str = "checkpoint"

    def save(self, state: LoopState, optimizer: Optimizer) -> None:
        from safetensors.torch import save_file

        opt = _stateful(optimizer, self.name)
        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in self.modules.items():
            for k, v in module.state_dict().items():
                tensors[prefix + k] = v.detach().clone().contiguous()
        tensors.update(opt.state_tensors())
        for k, v in (state.best_state or {}).items():
            tensors["best." + k] = v.contiguous()
        metadata = {
            "format": self.format,
            "format_version": str(self.version),
            "fingerprint": self.fingerprint,
            "state": json.dumps(_counters(state, opt.steps)),
        }
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load(self, optimizer: Optimizer, report: Progress) -> LoopState | None:
        """The saved state loaded into the modules and ``optimizer``; None when there is no
        file or it belongs to another run (with a warning)."""
        opt = _stateful(optimizer, self.name)
        if not self.path.exists():
            return None
        metadata, tensors = self._read()
        if metadata.get("fingerprint") != self.fingerprint:
            message = (
                f"{self.name}: checkpoint {str(self.path)!r} is from another run (options, "
                "model or data differ); starting afresh and overwriting it"
            )
            warnings.warn(message, stacklevel=3)
            report(message)
            return None
        counters = json.loads(metadata["state"])

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        for prefix, module in self.modules.items():
            module.load_state_dict(part(prefix))
        opt.load_state(tensors, int(counters["steps"]))
        state = _state(counters, part("best.") if counters["has_best"] else None)
        report(f"{self.name}: resuming from {str(self.path)!r} after epoch {state.epoch}")
        return state

    def _read(self) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """Metadata and tensors of the file; ConfigError when it is not such a checkpoint."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                if metadata.get("format") != self.format:
                    raise ValueError(f"no {self.name} checkpoint metadata")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # any unreadable file is reported the same way
            raise ConfigError(
                f"{self.key}: {str(self.path)!r} exists but is not a {self.name} checkpoint "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); remove it or "
                "choose another path"
            ) from None
        return metadata, tensors


def _stateful(optimizer: Optimizer, name: str) -> Stateful:
    if not isinstance(optimizer, Stateful):
        raise ValueError(f"{name}: a checkpoint needs an optimizer with state tensors")
    return optimizer


def _counters(state: LoopState, steps: int) -> dict[str, Any]:
    r = state.result
    return {
        "epoch": state.epoch,
        "steps": steps,
        "best": state.best if math.isfinite(state.best) else None,
        "bad": state.bad,
        "stopped": state.stopped,
        "has_best": state.best_state is not None,
        "losses": r.losses,
        "val": r.val,
        "best_epoch": r.best_epoch,
        "stopped_early": r.stopped_early,
    }


def _state(counters: dict[str, Any], best_state: dict[str, torch.Tensor] | None) -> LoopState:
    """The loop state of saved ``counters`` (see :func:`_counters`)."""
    best = counters["best"]
    result = FitResult(
        losses=list(counters["losses"]),
        val=list(counters["val"]),
        best_epoch=int(counters["best_epoch"]),
        stopped_early=bool(counters["stopped_early"]),
        resumed_from=int(counters["epoch"]),
    )
    return LoopState(
        epoch=int(counters["epoch"]),
        best=math.inf if best is None else float(best),
        bad=int(counters["bad"]),
        stopped=bool(counters["stopped"]),
        best_state=best_state,
        result=result,
    )
