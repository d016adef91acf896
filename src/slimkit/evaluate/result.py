"""The measured results of one or more models on a task, as written to ``report.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from slimkit.cpu import device


@dataclass
class Result:
    """Everything measured about one model; field names are the report's JSON keys."""

    name: str
    recipe: str | None
    metrics: dict[str, float]
    primary_metric: str
    size_bytes: int
    params: int
    macs: int
    #: median/min/max in ms (float); batch, threads and runs (int, runs may be absent)
    latency_ms: dict[str, Any]
    peak_mem_bytes: int
    robustness: dict[str, float]
    simulated: bool
    notes: list[str] = field(default_factory=list)
    #: what ran the model: torch, onnxruntime or openvino
    runtime: str = "torch"
    #: the CPU model and the int8 / bf16 instruction sets found (``slimkit.cpu.device``)
    device: str = field(default_factory=device)

    def primary(self) -> float:
        """The value of the task's primary metric."""
        return float(self.metrics[self.primary_metric])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        latency = data["latency_ms"]
        return cls(
            name=str(data["name"]),
            recipe=None if data.get("recipe") is None else str(data["recipe"]),
            metrics={str(k): float(v) for k, v in data["metrics"].items()},
            primary_metric=str(data["primary_metric"]),
            size_bytes=int(data["size_bytes"]),
            params=int(data["params"]),
            macs=int(data["macs"]),
            latency_ms={
                "median": float(latency["median"]),
                "min": float(latency["min"]),
                "max": float(latency["max"]),
                "batch": int(latency["batch"]),
                "threads": int(latency["threads"]),
                **({"runs": int(latency["runs"])} if "runs" in latency else {}),
            },
            peak_mem_bytes=int(data["peak_mem_bytes"]),
            robustness={str(k): float(v) for k, v in data.get("robustness", {}).items()},
            simulated=bool(data["simulated"]),
            notes=[str(n) for n in data.get("notes", [])],
            runtime=str(data.get("runtime", "torch")),
            device=str(data.get("device", "")),
        )


@dataclass
class Report:
    """Results of several models on one task; the first result is the baseline."""

    task: str
    results: list[Result]

    @property
    def baseline(self) -> Result:
        if not self.results:
            raise ValueError(f"report for task {self.task!r} has no results")
        return self.results[0]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "results": [r.to_dict() for r in self.results]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            task=str(data["task"]),
            results=[Result.from_dict(r) for r in data["results"]],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))
