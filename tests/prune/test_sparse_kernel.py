"""SparseLinear's kernel: dense, csr, or auto (measured per row bucket), and its config."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimkit
from slimkit.errors import ConfigError
from slimkit.evaluate.memory import resident_bytes
from slimkit.formats.bitmask import pack_mask
from slimkit.layers import sparse
from slimkit.layers.sparse import SparseConv2d, SparseLinear, row_bucket, time_kernels, to_sparse
from slimkit.prune.schedule import GradualConfig
from slimkit.prune.unstructured import UnstructuredConfig
from tests.prune.toys import inputs, net, prune_recipe


def pruned_linear(
    n_in: int, n_out: int, density: float, bias: bool = True, seed: int = 0
) -> nn.Linear:
    """A Linear whose weights outside a random mask of about ``density`` are zero."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n_out, n_in, generator=g))
        m.weight.mul_(torch.rand(n_out, n_in, generator=g) < density)
        if bias:
            m.bias.copy_(torch.randn(n_out, generator=g))
    return m


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    """Same shape and elementwise within ``atol`` + 1e-5 relative."""
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol, rtol=1e-5), float((a - b).abs().max())


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sparse.KERNEL_ENV, raising=False)
    monkeypatch.setattr(sparse, "AUTO_MIN_MACS", 0)  # the tiny layers here are timed too


# -- csr computes what dense computes ---------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    density=st.sampled_from([0.0, 0.02, 0.1, 0.3, 0.7, 1.0]),
    lead=st.sampled_from([(), (1,), (5,), (2, 3), (3, 1, 2)]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_csr_equals_dense(
    n_in: int,
    n_out: int,
    density: float,
    lead: tuple[int, ...],
    bias: bool,
    seed: int,
) -> None:
    dense = pruned_linear(n_in, n_out, density, bias, seed)
    layer = SparseLinear.from_float(dense, kernel="csr")
    x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        y, want = layer(x), F.linear(x, dense.weight, dense.bias)
    assert layer.kernel_for(x) == "csr" and layer.dense is None  # the dense weight is not kept
    assert y.shape == want.shape == (*lead, n_out)
    assert_close(y, want, atol=1e-4 * n_in)


def test_csr_rebuilds_after_the_mask_or_values_change() -> None:
    a = SparseLinear.from_float(pruned_linear(16, 8, 0.2, seed=1), kernel="csr")
    b = pruned_linear(16, 8, 0.2, seed=2)
    x = torch.randn(4, 16)
    with torch.no_grad():
        a(x)  # builds the CSR index of the first mask
        a.set_weight(b.weight)
        a.bias.copy_(b.bias)
        assert_close(a(x), b(x))
        keep = a.dense_weight() != 0
        moved = keep.roll(1, dims=1)  # same count, other positions: a mask copied in place
        a.mask.copy_(pack_mask(moved.reshape(-1)))
        w = torch.zeros(8, 16)
        w[moved] = a.values
        assert_close(a(x), F.linear(x, w, a.bias))


def test_csr_holds_less_memory_and_copies() -> None:
    dense = pruned_linear(64, 64, 0.05)
    x = torch.randn(2, 64)
    by_kernel = {}
    for kernel in ("dense", "csr"):
        layer = SparseLinear.from_float(dense, kernel=kernel)
        with torch.no_grad():
            layer(x)
        by_kernel[kernel] = (layer, resident_bytes(layer))
    (d, dense_bytes), (c, csr_bytes) = by_kernel["dense"], by_kernel["csr"]
    assert d.dense is not None and d.csr_col is None
    assert c.dense is None and c.csr_col is not None
    assert csr_bytes < dense_bytes / 3
    twin = copy.deepcopy(c)
    with torch.no_grad():
        assert torch.equal(twin(x), c(x))


# -- settings, spec, artifacts ---------------------------------------------------------------
def test_invalid_kernel_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'sparse'.*auto, dense, csr"):
        SparseLinear(in_features=8, out_features=4, nnz=3, kernel="sparse")
    with pytest.raises(ValueError, match=r"'fast'"):
        to_sparse(pruned_linear(8, 4, 0.5), kernel="fast")
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match=r"'fast'"):
        to_sparse(conv, kernel="fast")
    assert type(to_sparse(conv, kernel="csr")) is SparseConv2d  # convolutions stay dense


def test_kernel_in_spec_and_old_specs_default_to_auto() -> None:
    layer = SparseLinear.from_float(pruned_linear(8, 3, 0.5), kernel="csr")
    assert layer.spec()["kernel"] == "csr"
    assert SparseLinear.from_spec(layer.spec()).kernel == "csr"
    old = {"in_features": 8, "out_features": 3, "nnz": 12, "bias": True}
    assert SparseLinear.from_spec(old).kernel == "auto"


def test_kernel_survives_save_and_load(tmp_path: Path) -> None:
    model = slimkit.compress(net(), prune_recipe("unstructured", sparsity=0.9, kernel="csr"))
    assert model.fc1.kernel == model.fc2.kernel == "csr"
    slimkit.save(model, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "slimkit.json").read_text())
    specs = {e["name"]: e["spec"] for e in manifest["modules"] if "spec" in e}
    assert specs["fc1"]["kernel"] == specs["fc2"]["kernel"] == "csr"
    assert "kernel" not in specs["conv"]
    back = slimkit.load(tmp_path / "a", model=net(seed=9))
    assert back.fc1.kernel == back.fc2.kernel == "csr"
    x = inputs()
    with torch.no_grad():
        assert_close(back(x), model(x))
    assert back.fc1.dense is None and back.fc1.csr_col is not None


def test_gradual_passes_its_kernel() -> None:
    recipe = prune_recipe("gradual", sparsity=0.8, steps=2, finetune_epochs=0, kernel="dense")
    model = slimkit.compress(net(), recipe)
    assert model.fc1.kernel == model.fc2.kernel == "dense"
    assert GradualConfig(kernel="csr").kernel.value == "csr"


def test_config_refuses_an_unknown_kernel() -> None:
    with pytest.raises(ConfigError, match=r"kernel: got 'bogus'.*auto, dense, csr"):
        UnstructuredConfig(kernel="bogus")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bogus"):
        slimkit.compress(net(), prune_recipe("magnitude", kernel="bogus"))
    assert UnstructuredConfig().to_dict()["kernel"] == "auto"


def test_env_overrides_the_layer_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = SparseLinear.from_float(pruned_linear(16, 8, 0.1), kernel="dense")
    x = torch.randn(3, 16)
    monkeypatch.setenv(sparse.KERNEL_ENV, "csr")
    with torch.no_grad():
        layer(x)
    assert layer.dense is None and layer.csr_col is not None  # csr ran
    assert layer.describe().endswith("run with a CSR sparse kernel")
    monkeypatch.setenv(sparse.KERNEL_ENV, "dense")
    with torch.no_grad():
        layer(x)
    assert layer.dense is not None and layer.csr_col is None  # dense ran
    assert layer.describe().endswith("run with the dense kernel")
    monkeypatch.setenv(sparse.KERNEL_ENV, "turbo")
    with pytest.raises(ValueError, match="'turbo'"):
        layer(x)


# -- auto ---------------------------------------------------------------------------------
def _no_timing(runs: object, repeats: int = 3) -> dict[str, float]:
    raise AssertionError("timed")


def test_auto_runs_dense_above_the_density_bar_without_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sparse, "time_kernels", _no_timing)
    layer = SparseLinear.from_float(pruned_linear(32, 8, 0.5))
    assert layer.density() > sparse.CSR_MAX_DENSITY and layer.kernel == "auto"
    with torch.no_grad():
        layer(torch.randn(4, 32))
    assert layer.kernels_used() == {} and layer.csr_col is None
    assert "run with the dense kernel" in layer.describe()


def test_auto_keeps_the_measured_choice_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    fake = {8: {"dense": 1.0, "csr": 0.5}, 128: {"dense": 0.5, "csr": 1.0}}

    def timer(runs: dict[str, object], repeats: int = 3) -> dict[str, float]:
        assert set(runs) == {"dense", "csr"}
        calls.append(len(calls))
        return fake[8] if len(calls) == 1 else fake[128]

    monkeypatch.setattr(sparse, "time_kernels", timer)
    dense = pruned_linear(32, 16, 0.1)
    layer = SparseLinear.from_float(dense)
    assert layer.describe().endswith("not yet measured")
    with torch.no_grad():
        for rows in (5, 7, 8, 100, 6, 128):
            x = torch.randn(rows, 32)
            assert_close(layer(x), dense(x))
    assert len(calls) == 2  # once per bucket
    assert layer.kernels_used() == {8: "csr", 128: "dense"}
    assert layer.kernel_for(torch.randn(3, 2, 32)) == "csr"  # 6 rows: bucket 8
    assert layer.describe().endswith(": csr for 8 rows, dense for 128 rows")
    assert "kernel chosen by measurement per batch size" in layer.describe()


def test_auto_runs_small_calls_dense_without_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse, "time_kernels", _no_timing)
    monkeypatch.setattr(sparse, "AUTO_MIN_MACS", 16 * 32 * 16)
    layer = SparseLinear.from_float(pruned_linear(32, 16, 0.1))
    with torch.no_grad():
        layer(torch.randn(7, 32))  # bucket 8: 4096 multiply-adds, below the bar
    assert layer.kernels_used() == {8: "dense"}
    with pytest.raises(AssertionError, match="timed"), torch.no_grad():
        layer(torch.randn(9, 32))  # bucket 16: at the bar, timed


def test_auto_keeps_only_the_chosen_form(monkeypatch: pytest.MonkeyPatch) -> None:
    def timer(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
        for fn in runs.values():
            fn()  # both forms of the weight are built
        return {"dense": 1.0, "csr": 0.1}

    monkeypatch.setattr(sparse, "time_kernels", timer)
    layer = SparseLinear.from_float(pruned_linear(32, 16, 0.1))
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert layer.kernels_used() == {2: "csr"}
    assert layer.dense is None and layer.csr_col is not None


def test_time_kernels_times_each_function() -> None:
    counts = {"a": 0, "b": 0}

    def bump(name: str) -> None:
        counts[name] += 1

    seconds = time_kernels({"a": lambda: bump("a"), "b": lambda: bump("b")}, repeats=3)
    assert counts == {"a": 4, "b": 4}  # one warm call and three timed
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_row_bucket() -> None:
    rows = (0, 1, 2, 3, 5, 8, 9, 256, 257)
    buckets = (1, 1, 2, 4, 8, 8, 16, 256, 512)
    assert tuple(row_bucket(n) for n in rows) == buckets


# -- autograd -------------------------------------------------------------------------------
def test_finetuning_a_csr_layer_gets_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse, "time_kernels", _no_timing)
    dense = pruned_linear(16, 8, 0.2)
    layer = SparseLinear.from_float(dense, kernel="csr")
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)  # the CSR index is built
    param = layer.values_to_parameter()
    assert layer.kernel_for(x) == "dense"
    layer(x).pow(2).sum().backward()
    w = dense.weight.detach().clone().requires_grad_(True)
    F.linear(x, w, dense.bias).pow(2).sum().backward()
    assert param.grad is not None
    assert_close(param.grad, w.grad[dense.weight != 0])
    with torch.no_grad():
        param.add_(1.0)
    layer.values_to_buffer()
    with torch.no_grad():
        y = layer(x)
    assert layer.kernel_for(x) == "csr"
    moved = dense.weight.detach() + (dense.weight != 0).float()
    assert_close(y, F.linear(x, moved, dense.bias))


def test_input_gradients_run_dense() -> None:
    dense = pruned_linear(16, 8, 0.1)
    layer = SparseLinear.from_float(dense, kernel="csr")
    x = torch.randn(3, 16, requires_grad=True)
    assert layer.kernel_for(x) == "dense"
    layer(x).sum().backward()
    assert x.grad is not None
    assert_close(x.grad, dense.weight.detach().sum(0).expand(3, 16))
