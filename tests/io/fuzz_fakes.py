"""Fake artifact loaders for the fuzz harness's own tests (``test_fuzz.py``).

``by_name`` behaves as the artifact directory's name says, so that one fork server runs every
case; it never looks inside the artifact, which keeps the harness tests independent of
slimkit's loader.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import ArtifactError


class Failing(nn.Module):
    """Loads fine; its forward raises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("the forward failed")


class Shifted(nn.Module):
    """Outputs the input plus one: different from ``nn.Identity``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def by_name(path: str) -> Any:
    """Do what the artifact directory's name says."""
    name = Path(path).name
    if name == "identity":
        return nn.Identity()
    if name == "shifted":
        return Shifted()
    if name == "nan":
        return lambda x: x * float("nan")
    if name == "abort":
        os.abort()
    if name == "segfault":
        ctypes.string_at(0)
    if name == "silent-exit":
        os._exit(0)
    if name == "sleep":
        time.sleep(120)
    if name == "bytearray":
        return bytearray(64 << 30)
    if name == "torch-alloc":
        return torch.empty(1 << 40)
    if name == "reads-outside":
        with open("/etc/passwd", "rb") as f:
            f.read(1)
        return nn.Identity()
    if name == "reads-inside":
        (Path(path) / "slimkit.json").read_bytes()
        return nn.Identity()
    if name == "system":
        os.system("true")
        return nn.Identity()
    if name == "imports-pdb":
        import pdb  # noqa: F401

        return nn.Identity()
    if name == "refuses":
        raise ArtifactError("refused: not a slimkit artifact")
    if name == "key-error":
        raise KeyError("format_version")
    if name == "exits":
        raise SystemExit(3)
    if name == "bad-forward":
        return Failing()
    raise AssertionError(f"no fake behaviour named {name!r}")
