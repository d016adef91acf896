"""Attention-map transfer in the distill stage: the maps, the loss term, the checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimkit
from slimkit.distill.losses import attention_loss, attention_probs
from slimkit.distill.stage import DistillConfig, capturing, maps, query_key
from slimkit.errors import ConfigError

FAST: dict[str, Any] = {"lr": 3e-3, "val_fraction": 0.0, "batch_limit": 2}
PAIRS = [
    ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"],
    ["encoder.layer.2.attention.self", "encoder.layer.5.attention.self"],
]


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 6),
    heads=st.integers(1, 3),
    d=st.integers(1, 4),
    pad=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_attention_probs_rows_are_distributions_over_real_tokens(b, t, heads, d, pad, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, heads * d, generator=g)
    k = torch.randn(b, t, heads * d, generator=g)
    mask = torch.ones(b, t)
    mask[:, t - min(pad, t - 1) :] = 0 if pad else 1  # at least the first token is real
    p = attention_probs(q, k, heads, mask)
    assert p.shape == (b, heads, t, t)
    assert torch.allclose(p.sum(-1), torch.ones(b, heads, t), atol=1e-5)
    assert torch.all(p[..., mask[0] == 0] == 0)
    # head h only sees its own slice of the projections
    h = heads - 1
    qh, kh = q[..., h * d : (h + 1) * d], k[..., h * d : (h + 1) * d]
    scores = (qh @ kh.transpose(-1, -2)) / d**0.5
    scores = scores.masked_fill(mask[:, None, :] == 0, float("-inf"))
    assert torch.allclose(p[:, h], scores.softmax(-1), atol=1e-5)


def test_attention_probs_refuses_widths_that_do_not_split():
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        attention_probs(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), 3)


def test_maps_match_the_models_own_attention(tiny6: Any):
    model = tiny6.model()
    model.set_attn_implementation("eager")
    x = tiny6.calibration_data()[0]
    name = PAIRS[0][0]
    with torch.no_grad(), capturing(model, list(query_key(name))) as found:
        out = model(**x, output_attentions=True)
    ours = maps(found, name, 2, x["attention_mask"])
    theirs = out.attentions[0]
    real = x["attention_mask"][:, None, None, :].bool().expand_as(theirs)
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


def _attention_gap(student: Any, teacher: Any, x: dict[str, torch.Tensor]) -> float:
    s_names = [n for s, _ in PAIRS for n in query_key(s)]
    t_names = [n for _, t in PAIRS for n in query_key(t)]
    mask = x["attention_mask"]
    with torch.no_grad(), capturing(student, s_names) as s, capturing(teacher, t_names) as t:
        student(**x)
        teacher(**x)
    s_maps = [maps(s, name, 2, mask) for name, _ in PAIRS]
    t_maps = [maps(t, name, 2, mask) for _, name in PAIRS]
    return float(attention_loss(s_maps, t_maps, layer_map=range(len(PAIRS))))


def test_attention_transfer_pulls_the_maps_together(tiny6: Any):
    x = tiny6.calibration_data()[0]
    teacher = tiny6.model()
    base = {"method": "kd", "teacher": "task", "loss": "embedding", "epochs": 6, **FAST}
    gaps = {}
    for weight in (0.0, 50.0):
        stage = {**base, "attention": PAIRS, "attention_weight": weight, "student_depth": 0.5}
        student = slimkit.compress(
            tiny6.model(), {"name": "a", "stages": [{"distill": stage}]}, task=tiny6
        )
        gaps[weight] = _attention_gap(student, teacher, x)
    assert gaps[50.0] < 0.7 * gaps[0.0]


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        (["encoder.layer.9.attention.self", "encoder.layer.1.attention.self"],
         "the student has no module 'encoder.layer.9.attention.self'"),
        (["encoder.layer.0.attention", "encoder.layer.1.attention.self"],
         "the student has no attention module 'encoder.layer.0.attention'"),
        (["encoder.layer.0.attention.self", "encoder.layer.7.attention.self"],
         "the teacher has no module 'encoder.layer.7.attention.self'"),
    ],
)  # fmt: skip
def test_bad_attention_modules_are_named_before_training(tiny6: Any, pair, expected):
    stage = {"method": "kd", "teacher": "task", "loss": "embedding", "epochs": 1, **FAST}
    stage = {**stage, "attention": [pair], "student_depth": 0.5, "checkpoint": None}
    with pytest.raises(ConfigError, match=expected) as e:
        slimkit.compress(tiny6.model(), {"name": "a", "stages": [{"distill": stage}]}, task=tiny6)
    assert "distill.kd.attention[0]" in str(e.value)


def test_head_counts_must_agree(tiny6: Any):
    from slimkit.distill.stage import check_attention_heads

    student, teacher = tiny6.model(), tiny6.model()
    student.encoder.layer[0].attention.self.num_attention_heads = 4
    config = DistillConfig(attention=(tuple(PAIRS[0]),))
    with pytest.raises(ConfigError, match="has 4 heads and the teacher module"):
        check_attention_heads(student, teacher, config)
    check_attention_heads(teacher, tiny6.model(), config)  # equal counts pass


@pytest.mark.parametrize(
    ("options", "field"),
    [({"attention": [["a"]]}, "attention"), ({"attention_weight": -1.0}, "attention_weight")],
)
def test_config_checks(options, field):
    with pytest.raises(ConfigError, match=f"distill.kd.{field}"):
        DistillConfig(**options)
