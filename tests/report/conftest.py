from __future__ import annotations

import pytest

from slimkit.evaluate.result import Report, Result


def make_result(
    name: str,
    acc: float,
    size: int,
    median: float,
    simulated: bool = False,
    notes: list[str] | None = None,
) -> Result:
    return Result(
        name=name,
        recipe=None if name == "fp32" else name,
        metrics={"accuracy": acc, "f1": acc - 0.01},
        primary_metric="accuracy",
        size_bytes=size,
        params=1_234_567,
        macs=45_600,
        latency_ms={
            "median": median,
            "min": median * 0.9,
            "max": median * 1.2,
            "batch": 32,
            "threads": 2,
            "runs": 10,
        },
        peak_mem_bytes=2_500_000,
        robustness={"gauss_0.1": acc - 0.1},
        simulated=simulated,
        notes=notes or [],
    )


def make_report(task: str = "digits-lenet") -> Report:
    return Report(
        task,
        [
            make_result("fp32", 0.98, 4_000_000, 2.0),
            make_result("w8-rtn", 0.975, 1_080_000, 1.6, notes=["4 x QuantLinear: int8"]),
            make_result("prune|50", 0.96, 2_000_000, 2.5, simulated=True),
        ],
    )


@pytest.fixture
def report() -> Report:
    return make_report()
