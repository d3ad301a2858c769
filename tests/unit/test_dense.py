"""Dense projections on the kernel's row paths (engine.dense): the op against fp64, RowStreamLinear against
nn.Linear, the layer swap, and the loaders that apply it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.dense import (
    CALIBRATION_ROWS,
    MAX_ROWS,
    RowStreamLinear,
    RowStreamWeight,
    calibrate_row_paths,
    kernel_max_rows,
    replace_linears,
    stream_router_weights,
)
from engine.model_runner import ModelRunner, load_model
from engine.offload.experts import TOKEN_BUCKETS, moe_routers
from engine.offload.kernels import RUNS, using_runs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REL_TOL = 1e-5  # weights widened to fp32, fp32 accumulation: fp32 accuracy on the rounded weights


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_the_op_matches_fp64_for_1_to_max_rows(kernel_isa, dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    in_features, out_features = 139, 83  # odd on purpose: the row paths' tails
    weight = (torch.randn(out_features, in_features) * in_features**-0.5).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    for rows in range(1, MAX_ROWS + 1):
        x = torch.randn(rows, in_features).to(dtype)
        out = torch.empty(rows, out_features)
        torch.ops.moeserve.dense(x, weight, b, out)
        expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
        assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < REL_TOL, rows


@pytest.mark.parametrize("runs", RUNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_to_four_rows_match_fp64_on_every_run_count(kernel_isa, runs: int, dtype: torch.dtype) -> None:
    """The rows of a chunk read as several runs side by side: 203 outputs (chunks of 64, 64, 64, 11), K = 1030."""
    torch.manual_seed(5)
    weight = (torch.randn(203, 1030) * 1030**-0.5).to(dtype)
    with using_runs(runs):
        for rows in (1, 2, 3, 4):
            x = torch.randn(rows, 1030).to(dtype)
            out = torch.empty(rows, 203)
            torch.ops.moeserve.dense(x, weight, None, out)
            expected = F.linear(x.double(), weight.double())
            assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < REL_TOL, rows


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_the_op_rounds_into_an_output_of_the_inputs_dtype(kernel_isa, dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    weight = (torch.randn(83, 139) * 139**-0.5).to(dtype)
    b = torch.randn(83).to(dtype)
    for rows in (1, MAX_ROWS):
        x = torch.randn(rows, 139).to(dtype)
        wide, narrow = torch.empty(rows, 83), torch.empty(rows, 83, dtype=dtype)
        torch.ops.moeserve.dense(x, weight, b, wide)
        torch.ops.moeserve.dense(x, weight, b, narrow)
        assert torch.equal(narrow, wide.to(dtype))  # the fp32 result, rounded once
    with pytest.raises(RuntimeError, match="fp32 or x's dtype"):
        torch.ops.moeserve.dense(x.float(), weight, b, narrow)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_rows_is_dense_into_an_output_it_allocates(kernel_isa, dtype: torch.dtype) -> None:
    """``dense_rows`` (what RowStreamLinear calls): any leading dims, the output in x's dtype, the very values
    ``dense`` writes into an output of that dtype; a non-contiguous x is refused (the caller makes it contiguous)."""
    torch.manual_seed(3)
    weight = (torch.randn(83, 139) * 139**-0.5).to(dtype)
    b = torch.randn(83).to(dtype)
    for shape in ((1, 139), (1, 1, 139), (2, 3, 139)):
        x = torch.randn(shape).to(dtype)
        out = torch.ops.moeserve.dense_rows(x, weight, b)
        expected = torch.empty(x.numel() // 139, 83, dtype=dtype)
        torch.ops.moeserve.dense(x.reshape(-1, 139), weight, b, expected)
        assert out.shape == (*shape[:-1], 83) and out.dtype == dtype and torch.equal(out.reshape(-1, 83), expected)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.moeserve.dense_rows(torch.randn(139, 2).to(dtype).t(), weight, None)


@torch.inference_mode()
def test_row_stream_linear_equals_linear_and_hands_larger_products_to_torch(experts_kernel) -> None:
    torch.manual_seed(1)
    layer = nn.Linear(64, 48)
    swapped = RowStreamLinear(64, 48)
    swapped.load_state_dict(layer.state_dict())
    for rows in (1, 3, MAX_ROWS):
        x = torch.randn(1, rows, 64)
        assert torch.allclose(swapped(x), layer(x), rtol=REL_TOL, atol=1e-6)
    assert swapped(torch.randn(1, 0, 64)).shape == (1, 0, 48)  # a step that samples no row
    prefill = torch.randn(1, MAX_ROWS + 1, 64)
    assert torch.equal(swapped(prefill), layer(prefill))  # nn.Linear's own product, bit for bit


def test_replace_linears_keeps_the_parameters_and_their_names() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2, bias=False)))
    parameters = dict(model.named_parameters())
    assert replace_linears(model) == 2
    assert [type(m) for m in (model[0], model[2][0])] == [RowStreamLinear, RowStreamLinear]
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in parameters.items()}
    assert replace_linears(model) == 0  # only exact nn.Linear layers are swapped


def test_the_resident_loader_swaps_every_linear_layer(experts_kernel, demo_model: Callable[..., Path]) -> None:
    model = load_model(demo_model("qwen2_moe"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is RowStreamLinear for m in linears)


def test_max_rows_rises_while_the_kernel_keeps_winning() -> None:
    """kernel_max_rows: the last row count of an unbroken run of kernel wins; unbounded if it never loses."""
    assert kernel_max_rows({16: (2.0, 1.0), 32: (1.0, 2.0)}) == MAX_ROWS
    assert kernel_max_rows({16: (1.0, 2.0), 32: (3.0, 2.0), 64: (1.0, 2.0)}) == 16
    assert kernel_max_rows({16: (1.0, 2.0), 32: (1.0, 2.0), 64: (1.0, 2.0)}) == sys.maxsize


def test_calibration_sets_max_rows_per_weight_shape_and_outputs_stay_linears(experts_kernel) -> None:
    """Layers of one shape get one measured max_rows (a timer decides here: kernel faster only on the 64-wide
    layers); products of every size still equal nn.Linear's."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32, bias=False)).to(torch.bfloat16)
    assert replace_linears(model) == 3
    timed: list[tuple[int, int]] = []

    def timer(layer: RowStreamLinear, rows: int) -> tuple[float, float]:
        timed.append((layer.out_features, rows))
        return (1.0, 2.0) if layer.out_features == 64 else (2.0, 1.0)

    chosen = calibrate_row_paths(model, timer=timer)
    assert chosen == {(64, 64, torch.bfloat16, True): sys.maxsize, (32, 64, torch.bfloat16, False): MAX_ROWS}
    assert sorted(timed) == sorted((out, rows) for out in (64, 32) for rows in CALIBRATION_ROWS)
    assert [layer.max_rows for layer in model] == [sys.maxsize, sys.maxsize, MAX_ROWS]
    with torch.no_grad():
        for rows in (1, 16, 100):
            x = torch.randn(rows, 64).to(torch.bfloat16)
            for layer in model:
                expected = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
                assert (layer(x).float() - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_calibration_measures_real_timings_on_a_small_layer(experts_kernel) -> None:
    model = nn.Sequential(nn.Linear(128, 256)).to(torch.bfloat16)
    replace_linears(model)
    chosen = calibrate_row_paths(model)
    assert list(chosen) == [(256, 128, torch.bfloat16, True)]
    assert model[0].max_rows == chosen[(256, 128, torch.bfloat16, True)] >= MAX_ROWS


def test_the_model_runner_calibrates_row_and_experts_paths(experts_kernel, demo_model: Callable[..., Path]) -> None:
    """A resident CPU runner measures each dense weight shape and each experts shape once at load."""
    runner = ModelRunner(demo_model("mixtral"), num_kv_blocks=4)
    linears = [m for m in runner.model.modules() if isinstance(m, RowStreamLinear)]
    assert linears and all("max_rows" in vars(m) and m.max_rows >= MAX_ROWS for m in linears)
    (shape, measured), = runner.experts_forward.paths.measured.items()
    assert set(measured) == set(TOKEN_BUCKETS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_a_router_weight_runs_few_row_products_on_the_kernel(experts_kernel, dtype: torch.dtype, bias: bool) -> None:
    """RowStreamWeight: F.linear over 1..MAX_ROWS rows goes to the kernel (fp32 accuracy on the rounded weights, a
    plain tensor back), larger products and products under autograd to torch bit for bit, other functions too."""
    torch.manual_seed(6)
    plain = (torch.randn(8, 139) * 139**-0.5).to(dtype)
    b = torch.randn(8).to(dtype) if bias else None
    weight = RowStreamWeight(plain, requires_grad=False)
    assert isinstance(weight, nn.Parameter)
    calls = []
    with torch.no_grad():
        for rows in range(1, MAX_ROWS + 1):
            x = torch.randn(1, rows, 139).to(dtype)
            out = F.linear(x, weight, b)
            assert type(out) is torch.Tensor and out.shape == (1, rows, 8) and out.dtype == dtype
            wide = torch.empty(rows, 8)
            torch.ops.moeserve.dense(x[0], plain, b, wide)
            calls.append(torch.equal(out[0], wide.to(dtype)))  # exactly the kernel's product, rounded once
            expected = F.linear(x.double(), plain.double(), None if b is None else b.double())
            assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 1e-2
        assert all(calls)
        with torch.profiler.profile() as profile:
            F.linear(torch.randn(1, 139).to(dtype), weight, b)
            F.linear(torch.randn(MAX_ROWS + 1, 139).to(dtype), weight, b)
        assert [e.name for e in profile.events() if e.name in ("moeserve::dense_rows", "aten::linear")] == [
            "moeserve::dense_rows", "aten::linear"]
        prefill = torch.randn(MAX_ROWS + 1, 139).to(dtype)
        assert torch.equal(F.linear(prefill, weight, b), F.linear(prefill, plain, b))  # torch's own product
        assert type(weight * 2) is torch.Tensor and torch.equal(weight * 2, plain * 2)
    x = torch.randn(2, 139).to(dtype)
    with torch.enable_grad():
        assert torch.equal(F.linear(x, weight, b), F.linear(x, plain, b))


def test_the_model_runner_streams_every_router_weight(experts_kernel, demo_model: Callable[..., Path]) -> None:
    """Each MoE layer's router (transformers calls F.linear on its weight) gets a RowStreamWeight over the same
    data; a second swap changes nothing; tokens stay transformers' own (tests/integration/test_engine.py)."""
    runner = ModelRunner(demo_model("mixtral"), num_kv_blocks=4)
    routers = list(moe_routers(runner.model).values())
    assert len(routers) == runner.num_moe_layers > 0
    assert all(type(router.weight) is RowStreamWeight for router in routers)
    assert stream_router_weights(routers) == 0
