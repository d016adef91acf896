"""Evolution: space, mutation, limits, determinism, workers, log + resume, the Pareto front."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimkit.errors import ConfigError
from slimkit.nas import search as search_mod
from slimkit.nas.search import Limits, Settings, dominates, pareto_front, read_log, search
from slimkit.tasks.searched import build

from .conftest import CNN_SPACE, MLP_SPACE, toy_data

TINY = Settings(population=3, generations=2, epochs=1, final_epochs=1, batch_size=32)


def run(limits: Limits, settings: Settings = TINY, **kw):  # the toy MLP search
    x, y = toy_data()
    return search(MLP_SPACE, x, y, x[:1], limits, settings, **kw)


def cost_params(genome) -> int:
    return sum(p.numel() for p in build(genome).parameters())


def test_genome_builds_output_shape() -> None:
    rng = random.Random(0)
    for _ in range(10):
        g = CNN_SPACE.sample(rng)
        assert build(g)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        m = MLP_SPACE.sample(rng)
        assert build(m)(torch.zeros(2, 16)).shape == (2, 3)


def test_separable_block_is_depthwise_then_pointwise() -> None:
    g = CNN_SPACE.sample(random.Random(1))
    g = type(g)(g.kind, g.in_shape, g.num_classes, ((4, 5, False), (2, 3, True)), (8,))
    dw, pw = build(g).blocks[1][:2]
    assert (dw.groups, dw.kernel_size, dw.bias) == (4, (3, 3), None)
    assert (pw.kernel_size, pw.in_channels, pw.out_channels) == ((1, 1), 4, 2)


def test_mutation_changes_one_gene_and_stays_in_space() -> None:
    rng = random.Random(0)
    for space in (CNN_SPACE, MLP_SPACE):
        g = space.sample(rng)
        for _ in range(200):
            child = space.mutate(g, rng)
            assert space.contains(child) and child != g
            if len(child.convs) == len(g.convs) and len(child.hidden) == len(g.hidden):
                flat = lambda x: [v for b in x.convs for v in b] + list(x.hidden)  # noqa: E731
                assert sum(a != b for a, b in zip(flat(g), flat(child), strict=True)) == 1
            g = child


def test_candidates_over_the_limit_are_never_trained(counting_trainer) -> None:
    limit = 300
    result = run(Limits(max_params=limit))
    assert counting_trainer and result.rejected > 0
    for genome in counting_trainer:
        g = type(result.winner.genome).from_dict({"kind": "mlp", **genome})
        assert cost_params(g) <= limit
    assert result.winner.params <= limit


def test_impossible_limit_names_smallest_cost_before_training(counting_trainer) -> None:
    smallest = min(cost_params(g) for g in MLP_SPACE.smallest_candidates())
    with pytest.raises(ConfigError) as e:
        run(Limits(max_params=50))
    assert f"{smallest:,} parameters" in str(e.value) and "50" in str(e.value)
    assert counting_trainer == []


def test_deterministic_under_seed() -> None:
    a, b = run(Limits(max_params=400)), run(Limits(max_params=400))
    assert [(t.genome, t.accuracy) for t in a.trials] == [(t.genome, t.accuracy) for t in b.trials]
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_two_workers_equal_one() -> None:
    one = run(Limits(max_params=400))
    two = run(Limits(max_params=400), Settings(**{**TINY.__dict__, "workers": 2}))
    assert [(t.genome, t.accuracy) for t in one.trials] == [
        (t.genome, t.accuracy) for t in two.trials
    ]
    assert one.winner.genome == two.winner.genome
    for p, q in zip(one.model.parameters(), two.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_skips_logged_trials(counting_trainer, tmp_path) -> None:
    log = tmp_path / "search.jsonl"
    first = run(Limits(max_params=400), log=log)
    trained = len(counting_trainer)
    assert trained == first.trained == len(read_log(log))
    counting_trainer.clear()
    again = run(Limits(max_params=400), log=log, resume=True)
    assert counting_trainer == [] and again.trained == 0
    assert [t.accuracy for t in again.trials] == [t.accuracy for t in first.trials]
    lines = log.read_text().splitlines()  # keep two trials: only the others are retrained
    log.write_text("\n".join(lines[:2]) + "\n")
    run(Limits(max_params=400), log=log, resume=True)
    assert len(counting_trainer) == trained - 2


def test_resume_ignores_trials_of_other_settings(counting_trainer, tmp_path) -> None:
    log = tmp_path / "search.jsonl"
    run(Limits(max_params=400), log=log)
    counting_trainer.clear()
    other = Settings(**{**TINY.__dict__, "epochs": 2})
    result = run(Limits(max_params=400), other, log=log, resume=True)
    assert len(counting_trainer) == result.trained > 0


def test_interrupted_log_keeps_whole_lines(monkeypatch, tmp_path) -> None:
    log, calls = tmp_path / "search.jsonl", []

    def interrupted(genome, seed, settings, data):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(genome)
        return 0.5

    monkeypatch.setattr(search_mod, "train_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(Limits(max_params=400), log=log)
    text = log.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3
    assert all(json.loads(line)["val_accuracy"] == 0.5 for line in text.splitlines())
    with open(log, "a") as f:  # a torn line, as a crash mid-write would leave
        f.write('{"key": "tor')
    calls.clear()
    monkeypatch.setattr(search_mod, "train_trial", lambda g, s, st, d: 0.25)
    result = run(Limits(max_params=400), log=log, resume=True)
    records = read_log(log)
    assert len(records) == 3 + result.trained
    assert all(line.startswith("{") for line in log.read_text().splitlines())


points = st.lists(st.tuples(st.integers(0, 5).map(lambda v: v / 5), st.integers(1, 6)), max_size=25)


@given(points)
def test_pareto_front(pts: list[tuple[float, int]]) -> None:
    pts_f = [(a, float(c)) for a, c in pts]
    front = set(pareto_front(pts_f))
    for i in front:
        assert not any(dominates(p, pts_f[i]) for p in pts_f)
    for i in set(range(len(pts_f))) - front:
        assert any(dominates(p, pts_f[i]) for p in pts_f)


def test_latency_limit_is_measured(counting_trainer) -> None:
    x, _ = toy_data()
    result = run(
        Limits(max_latency_ms=1000.0, latency_batch=8, latency_threads=1), latency_inputs=x[:8]
    )
    assert result.winner and counting_trainer


def test_layer_macs_match_count_macs() -> None:
    from slimkit.evaluate.macs import count_macs  # its first call is slow (torch's decomps)

    g = CNN_SPACE.sample(random.Random(3))
    g = type(g)(g.kind, g.in_shape, g.num_classes, ((4, 5, False), (2, 3, True)), (8, 16))
    model, x = build(g).eval(), torch.zeros(1, 1, 8, 8)
    assert search_mod.layer_macs(model, x) == count_macs(model, x)
