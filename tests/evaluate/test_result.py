from __future__ import annotations

import json

import pytest

from slimkit.evaluate.result import Report, Result

KEYS = [
    "name",
    "recipe",
    "metrics",
    "primary_metric",
    "size_bytes",
    "params",
    "macs",
    "latency_ms",
    "peak_mem_bytes",
    "robustness",
    "simulated",
    "notes",
    "runtime",
    "device",
]


def make_result(name: str = "fp32", recipe: str | None = None, acc: float = 0.9) -> Result:
    return Result(
        name=name,
        recipe=recipe,
        metrics={"accuracy": acc, "loss": 0.25},
        primary_metric="accuracy",
        size_bytes=12345,
        params=1000,
        macs=64000,
        latency_ms={"median": 1.5, "min": 1.25, "max": 2.0, "batch": 8, "threads": 2, "runs": 10},
        peak_mem_bytes=99999,
        robustness={"gauss_0.1": 0.8},
        simulated=recipe is not None,
        notes=["3 x QuantLinear: int8"] if recipe else [],
    )


def test_json_round_trip_is_equal() -> None:
    report = Report("digits", [make_result(), make_result("w8", "w8-rtn", 0.85)])
    back = Report.from_dict(json.loads(report.to_json()))
    assert back == report
    assert Report.from_json(report.to_json()) == report


def test_json_layout_has_the_report_keys_in_order() -> None:
    data = json.loads(Report("digits", [make_result()]).to_json())
    assert list(data) == ["task", "results"]
    assert list(data["results"][0]) == KEYS
    assert data["results"][0]["latency_ms"]["median"] == 1.5


def test_every_row_says_its_runtime_and_the_cpu() -> None:
    row = make_result().to_dict()
    assert row["runtime"] == "torch"
    assert "(" in row["device"] and row["device"].endswith(")")  # model (instruction sets)
    older = {k: v for k, v in row.items() if k not in ("runtime", "device")}
    assert Result.from_dict(older).runtime == "torch"  # reports written before these keys


def test_from_dict_coerces_types_and_accepts_missing_runs() -> None:
    data = make_result().to_dict()
    data["latency_ms"] = {"median": 1, "min": 1, "max": 2, "batch": 4, "threads": 1}
    data["size_bytes"] = 10.0
    result = Result.from_dict(data)
    assert isinstance(result.latency_ms["median"], float)
    assert "runs" not in result.latency_ms
    assert isinstance(result.size_bytes, int)


def test_primary_and_baseline() -> None:
    report = Report("t", [make_result(acc=0.5), make_result("b", "r", acc=0.7)])
    assert report.baseline.name == "fp32"
    assert report.results[1].primary() == pytest.approx(0.7)


def test_empty_report_has_no_baseline() -> None:
    with pytest.raises(ValueError, match="no results"):
        _ = Report("t", []).baseline
