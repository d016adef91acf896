"""The search space: genomes of small CNNs and MLPs, and the standard-layer models they build.

A ``Genome`` is a point of a ``SearchSpace``: for a CNN, the conv blocks (channels, kernel
size, standard or depthwise-separable) and the hidden widths of the classifier; for an MLP,
the hidden widths. ``build(genome)`` makes a ``SearchedCNN`` or ``SearchedMLP`` of plain
``nn.Conv2d`` / ``nn.Linear`` layers whose constructor takes the genome as JSON-able
keyword arguments (``rebuild_kwargs()``), so an artifact records them and rebuilds it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.constructible import register_constructible

CNN, MLP = "cnn", "mlp"


@dataclasses.dataclass(frozen=True)
class Genome:
    """One architecture. ``convs``: (channels, kernel, separable) per conv block (CNN only);
    ``hidden``: widths of the hidden Linear layers before the output layer."""

    kind: str  # "cnn" or "mlp"
    in_shape: tuple[int, ...]  # (C, H, W) or (features,)
    num_classes: int
    convs: tuple[tuple[int, int, bool], ...] = ()
    hidden: tuple[int, ...] = ()

    def kwargs(self) -> dict[str, Any]:
        """The model constructor's keyword arguments (JSON scalars and lists only)."""
        if self.kind == CNN:
            return {
                "in_shape": list(self.in_shape),
                "num_classes": self.num_classes,
                "convs": [[c, k, bool(s)] for c, k, s in self.convs],
                "hidden": list(self.hidden),
            }
        return {
            "in_features": self.in_shape[0],
            "num_classes": self.num_classes,
            "hidden": list(self.hidden),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.kwargs()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Genome:
        kind = data["kind"]
        shape = tuple(data["in_shape"]) if kind == CNN else (int(data["in_features"]),)
        convs = tuple((int(c), int(k), bool(s)) for c, k, s in data.get("convs", ()))
        return cls(kind, shape, int(data["num_classes"]), convs, tuple(data["hidden"]))

    def key(self) -> str:
        """Canonical JSON text: equal genomes, equal keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        convs = " ".join(f"{'sep' if s else 'conv'}{k}x{k}:{c}" for c, k, s in self.convs)
        fc = "-".join(str(h) for h in self.hidden) or "none"
        return f"{convs + ', ' if convs else ''}fc {fc}"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The choices per gene. ``conv_depth`` and ``fc_depth`` are inclusive (min, max) numbers
    of conv blocks and hidden Linear layers; every conv block halves the image (max pool 2)."""

    kind: str
    in_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...]
    fc_depth: tuple[int, int] = (1, 2)
    channels: tuple[int, ...] = ()
    kernels: tuple[int, ...] = (3,)
    separable: tuple[bool, ...] = (False,)
    conv_depth: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.kind not in (CNN, MLP):
            raise ValueError(f"kind must be {CNN!r} or {MLP!r}, got {self.kind!r}")
        lo, hi = self.fc_depth
        if not self.hidden or not 0 <= lo <= hi:
            raise ValueError("hidden widths must be non-empty and fc_depth a (min, max) range")
        if self.kind == CNN:
            c_lo, c_hi = self.conv_depth
            if len(self.in_shape) != 3 or not self.channels or not 1 <= c_lo <= c_hi:
                raise ValueError("a CNN space needs in_shape (C, H, W), channels, conv_depth >= 1")
            if min(self.in_shape[1:]) >> c_hi < 1:
                raise ValueError(f"{c_hi} conv blocks pool a {self.in_shape} image below 1x1")
        elif len(self.in_shape) != 1:
            raise ValueError("an MLP space needs in_shape (features,)")

    # -- membership and sampling ------------------------------------------------------------
    def contains(self, g: Genome) -> bool:
        if (g.kind, g.in_shape, g.num_classes) != (self.kind, self.in_shape, self.num_classes):
            return False
        fc_ok = self.fc_depth[0] <= len(g.hidden) <= self.fc_depth[1]
        fc_ok = fc_ok and all(h in self.hidden for h in g.hidden)
        if self.kind == MLP:
            return fc_ok and not g.convs
        depth_ok = self.conv_depth[0] <= len(g.convs) <= self.conv_depth[1]
        blocks_ok = all(
            c in self.channels and k in self.kernels and s in self.separable for c, k, s in g.convs
        )
        return fc_ok and depth_ok and blocks_ok

    def _block(self, rng: random.Random) -> tuple[int, int, bool]:
        return (rng.choice(self.channels), rng.choice(self.kernels), rng.choice(self.separable))

    def _genome(self, convs: Sequence[tuple[int, int, bool]], hidden: Sequence[int]) -> Genome:
        return Genome(self.kind, self.in_shape, self.num_classes, tuple(convs), tuple(hidden))

    def sample(self, rng: random.Random) -> Genome:
        """A uniformly random genome (depths first, then every gene)."""
        convs = []
        if self.kind == CNN:
            convs = [self._block(rng) for _ in range(rng.randint(*self.conv_depth))]
        hidden = [rng.choice(self.hidden) for _ in range(rng.randint(*self.fc_depth))]
        return self._genome(convs, hidden)

    def genes(self, g: Genome) -> list[tuple[str, int]]:
        """The genes of ``g`` that have another value to take: (name, index)."""
        genes: list[tuple[str, int]] = []
        if self.kind == CNN:
            if self.conv_depth[0] < self.conv_depth[1]:
                genes.append(("conv_depth", 0))
            for i in range(len(g.convs)):
                genes += [("channels", i)] if len(self.channels) > 1 else []
                genes += [("kernel", i)] if len(self.kernels) > 1 else []
                genes += [("separable", i)] if len(self.separable) > 1 else []
        if self.fc_depth[0] < self.fc_depth[1]:
            genes.append(("fc_depth", 0))
        if len(self.hidden) > 1:
            genes += [("hidden", j) for j in range(len(g.hidden))]
        return genes

    def mutate(self, g: Genome, rng: random.Random) -> Genome:
        """``g`` with one gene changed to another of its values (a depth gene adds random
        blocks or layers at the end, or drops the last ones); ``g`` itself when no gene can
        change."""
        genes = self.genes(g)
        if not genes:
            return g
        name, i = rng.choice(genes)
        convs, hidden = [list(b) for b in g.convs], list(g.hidden)

        def other(values: Sequence[Any], current: Any) -> Any:
            return rng.choice([v for v in values if v != current])

        if name == "conv_depth":
            depth = other(range(self.conv_depth[0], self.conv_depth[1] + 1), len(convs))
            convs = convs[:depth] + [list(self._block(rng)) for _ in range(depth - len(convs))]
        elif name == "fc_depth":
            depth = other(range(self.fc_depth[0], self.fc_depth[1] + 1), len(hidden))
            hidden = hidden[:depth] + [rng.choice(self.hidden) for _ in range(depth - len(hidden))]
        elif name == "hidden":
            hidden[i] = other(self.hidden, hidden[i])
        else:
            field, values = {
                "channels": (0, self.channels),
                "kernel": (1, self.kernels),
                "separable": (2, self.separable),
            }[name]
            convs[i][field] = other(values, convs[i][field])
        return self._genome([(int(c), int(k), bool(s)) for c, k, s in convs], hidden)

    def smallest_candidates(self) -> list[Genome]:
        """Genomes at the narrowest widths and smallest kernel, at every depth and conv form:
        the cheapest genome of the space (by parameters, MACs or latency) is among them."""
        c, k, h = min(self.channels or (0,)), min(self.kernels), min(self.hidden)
        out = []
        conv_depths = range(self.conv_depth[0], self.conv_depth[1] + 1)
        for depth in range(self.fc_depth[0], self.fc_depth[1] + 1):
            if self.kind == MLP:
                out.append(self._genome([], [h] * depth))
                continue
            for n in conv_depths:
                for forms in itertools.product(self.separable, repeat=n):
                    out.append(self._genome([(c, k, s) for s in forms], [h] * depth))
        return out


# -- models -----------------------------------------------------------------------------
def _positive(name: str, values: Sequence[int], length: int | None = None) -> None:
    """ValueError unless every size is positive (and there are ``length`` of them)."""
    if (length is not None and len(values) != length) or any(v < 1 for v in values):
        raise ValueError(f"{name}: sizes must be positive, got {list(values)}")


@register_constructible(kwargs=True, former=("slimkit.nas.space:SearchedCNN",))
class SearchedCNN(nn.Module):
    """Conv blocks (a standard k x k conv, or a depthwise k x k conv + pointwise 1x1 conv;
    then ReLU and 2x2 max pool), flatten, hidden Linear + ReLU layers, an output Linear."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        convs: Sequence[Sequence[Any]],
        hidden: Sequence[int],
    ) -> None:
        super().__init__()
        shape = [int(v) for v in in_shape]
        blocks_spec = [[int(c), int(k), bool(s)] for c, k, s in convs]
        widths = [int(h) for h in hidden]
        _positive("in_shape", shape, length=3)
        _positive("convs", [v for c, k, _ in blocks_spec for v in (c, k)])
        _positive("hidden", [*widths, int(num_classes)])
        self._kwargs: dict[str, Any] = {
            "in_shape": shape,
            "num_classes": int(num_classes),
            "convs": blocks_spec,
            "hidden": widths,
        }
        channels, height, width = shape
        blocks = []
        for out, k, sep in blocks_spec:
            layers: list[nn.Module]
            if sep:
                depthwise = nn.Conv2d(
                    channels, channels, k, padding=k // 2, groups=channels, bias=False
                )
                layers = [depthwise, nn.Conv2d(channels, out, 1)]
            else:
                layers = [nn.Conv2d(channels, out, k, padding=k // 2)]
            blocks.append(nn.Sequential(*layers, nn.ReLU(), nn.MaxPool2d(2)))
            channels, height, width = out, height // 2, width // 2
        self.blocks = nn.ModuleList(blocks)
        self.classifier = _classifier(channels * height * width, widths, int(num_classes))

    def rebuild_kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON-able): an artifact rebuilds from them."""
        return json.loads(json.dumps(self._kwargs))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        for block in self.blocks:
            x = block(x)  # (B, c, H/2, W/2)
        return self.classifier(x.flatten(1))  # (B, classes)


@register_constructible(kwargs=True, former=("slimkit.nas.space:SearchedMLP",))
class SearchedMLP(nn.Module):
    """Hidden Linear + ReLU layers and an output Linear on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int]) -> None:
        super().__init__()
        widths = [int(h) for h in hidden]
        _positive("sizes", [int(in_features), int(num_classes), *widths])
        self._kwargs: dict[str, Any] = {
            "in_features": int(in_features),
            "num_classes": int(num_classes),
            "hidden": widths,
        }
        self.classifier = _classifier(int(in_features), widths, int(num_classes))

    def rebuild_kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON-able): an artifact rebuilds from them."""
        return json.loads(json.dumps(self._kwargs))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F)
        return self.classifier(x.flatten(1))  # (B, classes)


def _classifier(features: int, hidden: Sequence[int], classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, classes))


def build(genome: Genome) -> nn.Module:
    """The model of ``genome`` (freshly initialised from the global RNG), in train mode."""
    if genome.kind == CNN:
        return SearchedCNN(**genome.kwargs())
    return SearchedMLP(**genome.kwargs())


def genome_of(model: nn.Module) -> Genome | None:
    """The genome a searched model was built from; None for any other model."""
    if isinstance(model, SearchedCNN | SearchedMLP):
        kind = CNN if isinstance(model, SearchedCNN) else MLP
        return Genome.from_dict({"kind": kind, **model.rebuild_kwargs()})
    return None
