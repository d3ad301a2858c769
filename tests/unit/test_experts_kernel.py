"""The compiled CPU experts kernel against an fp64 torch reference, its loader, and the forward's pure helpers.

The kernel widens every weight to fp32 and accumulates in fp32 (its AVX-512 BF16 path multiplies bf16 pairs, exact
in fp32, only when the input is itself bf16), so for fp32, bf16 and fp16 weights alike its output must match fp64
math on the same (already rounded) weights to fp32 accuracy: 1e-5 relative, on each instruction set the CPU has.
"""

from __future__ import annotations

import sys
import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from engine.offload import kernels
from engine.offload.experts import Path, PathTable, RoutingPlan, plan_routing

SILU, OSS = 0, 1
ALPHA, LIMIT = 1.702, 7.0
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (transposed, gate kind): Mixtral-style [out, in] halves; GPT-OSS [in, out] interleaved; and the two crossings.
LAYOUTS = ((False, SILU), (True, OSS), (True, SILU), (False, OSS))
# Odd sizes on purpose: rows not a multiple of the 4-row and 32-column blocks, K not a multiple of 8.
HIDDEN, INTERMEDIATE = 37, 45
REL_TOL = 1e-5


@pytest.fixture
def experts_group(experts_kernel, kernel_isa):
    """The kernel, its decode paths on each instruction set the CPU has in turn (tests/conftest.py)."""
    return experts_kernel


def make_expert(dtype: torch.dtype, transposed: bool, bias: bool, hidden: int = HIDDEN, inter: int = INTERMEDIATE):
    """Random weights of one expert in the given layout: (gate_up, down, gate_up_bias, down_bias)."""
    gate_up = torch.randn(hidden, 2 * inter) if transposed else torch.randn(2 * inter, hidden)
    down = torch.randn(inter, hidden) if transposed else torch.randn(hidden, inter)
    gate_up_bias = torch.randn(2 * inter).to(dtype) if bias else None
    down_bias = torch.randn(hidden).to(dtype) if bias else None
    return (gate_up * hidden**-0.5).to(dtype), (down * inter**-0.5).to(dtype), gate_up_bias, down_bias


def reference_expert(x, weights, transposed: bool, gate_kind: int) -> torch.Tensor:
    """fp64 math of one expert on [n, H] inputs: the kernel's contract, written plainly."""
    gate_up, down, gate_up_bias, down_bias = (None if w is None else w.double() for w in weights)
    h = x.double() @ (gate_up if transposed else gate_up.T)  # [n, 2I]
    if gate_up_bias is not None:
        h = h + gate_up_bias
    if gate_kind == SILU:
        gate, up = h.chunk(2, dim=-1)
        g = torch.nn.functional.silu(gate) * up
    else:
        gate, up = h[:, 0::2].clamp(max=LIMIT), h[:, 1::2].clamp(-LIMIT, LIMIT)
        g = (up + 1) * gate * torch.sigmoid(ALPHA * gate)  # [n, I]
    y = g @ (down if transposed else down.T)  # [n, H]
    return y if down_bias is None else y + down_bias


def reference_group(hidden, token_ids, route_weights, starts, counts, experts, transposed, gate_kind):
    """out[t] = sum over the group's assignments of route_weight * expert(hidden[t]), in fp64."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for start, count, weights in zip(starts, counts, experts):
        tokens = token_ids[start : start + count]
        y = reference_expert(hidden[tokens], weights, transposed, gate_kind)
        out.index_add_(0, tokens, y * route_weights[start : start + count, None].double())
    return out


def run_group(op, hidden, token_ids, route_weights, starts, counts, experts, transposed, gate_kind):
    """The kernel over a group; returns the fp32 accumulator."""
    out = torch.zeros(hidden.shape)
    op(hidden, token_ids, route_weights, starts, counts, [e[0] for e in experts], [e[1] for e in experts],
       [e[2] for e in experts], [e[3] for e in experts], transposed, gate_kind, ALPHA, LIMIT, out)
    return out


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count (which sizes the kernel's pool) set to ``count`` for the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed,gate_kind", LAYOUTS, ids=["rows-silu", "cols-oss", "cols-silu", "rows-oss"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_one_expert_matches_reference_for_1_to_64_tokens(experts_group, dtype, transposed, gate_kind, bias) -> None:
    torch.manual_seed(0)
    expert = make_expert(dtype, transposed, bias)
    errors = {}
    for n in range(1, 65):
        hidden = torch.randn(n + 5, HIDDEN).to(dtype)  # extra rows no assignment touches must stay zero
        token_ids = torch.randperm(n + 5)[:n]
        route_weights = torch.rand(n)
        out = run_group(experts_group, hidden, token_ids, route_weights, [0], [n], [expert], transposed, gate_kind)
        expected = reference_group(hidden, token_ids, route_weights, [0], [n], [expert], transposed, gate_kind)
        errors[n] = relative_error(out, expected)
    assert {n: e for n, e in errors.items() if e > REL_TOL} == {}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed,gate_kind", LAYOUTS, ids=["rows-silu", "cols-oss", "cols-silu", "rows-oss"])
def test_decode_token_counts_match_reference_past_the_unrolled_steps(experts_group, dtype, transposed,
                                                                     gate_kind) -> None:
    """1-8 tokens on rows long enough for the decode paths' unrolled steps (64 weights), plus 8-wide and 1-wide
    tails: H = 2 * 64 + 8 + 3, I = 64 + 16 + 3."""
    torch.manual_seed(3)
    hidden_size, inter = 139, 83
    expert = make_expert(dtype, transposed, True, hidden_size, inter)
    errors = {}
    for n in range(1, 9):
        hidden = torch.randn(n + 2, hidden_size).to(dtype)
        token_ids = torch.randperm(n + 2)[:n]
        route_weights = torch.rand(n)
        args = (hidden, token_ids, route_weights, [0], [n], [expert], transposed, gate_kind)
        errors[n] = relative_error(run_group(experts_group, *args), reference_group(*args))
    assert {n: e for n, e in errors.items() if e > REL_TOL} == {}


@pytest.mark.parametrize("runs", kernels.RUNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_tokens_match_reference_on_every_run_count(experts_group, runs: int, dtype) -> None:
    """1-4 tokens read a chunk's rows as several runs side by side (experts_cpu.cpp, "several runs of rows side by
    side"; AVX2 at 1-2): rows enough for runs and leftovers in every chunk (H = 139 down rows: chunks of 64, 64, 11;
    I = 300 gate units: chunks of 128, 128, 44), and a fifth token count on the paths beside them."""
    torch.manual_seed(4)
    hidden_size, inter = 139, 300
    expert = make_expert(dtype, False, True, hidden_size, inter)
    errors = {}
    with kernels.using_runs(runs):
        for n in (1, 2, 3, 4, 5):
            hidden = torch.randn(n + 2, hidden_size).to(dtype)
            token_ids = torch.randperm(n + 2)[:n]
            args = (hidden, token_ids, torch.rand(n), [0], [n], [expert], False, SILU)
            errors[n] = relative_error(run_group(experts_group, *args), reference_group(*args))
    assert {n: e for n, e in errors.items() if e > REL_TOL} == {}


def test_run_counts_are_checked_and_restored(experts_kernel) -> None:
    default = torch.ops.moeserve.experts_runs(-1)
    assert default == max(kernels.RUNS)
    with kernels.using_runs(1):
        assert torch.ops.moeserve.experts_runs(-1) == 1
    assert torch.ops.moeserve.experts_runs(-1) == default
    with pytest.raises(ValueError, match="runs must be one of"):
        with kernels.using_runs(3):
            pass
    with pytest.raises(RuntimeError, match="runs must be 1, 4 or 8"):
        torch.ops.moeserve.experts_runs(2)


def random_group(dtype, transposed, num_tokens=50, top_k=3, num_experts=6, hidden=72, inter=40):
    """A routed layer: tokens sharing experts, grouped by expert like plan_routing does."""
    top_k_index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])  # [T, k]
    plan = plan_routing(top_k_index, torch.rand(num_tokens, top_k), num_experts)
    experts = [make_expert(dtype, transposed, True, hidden, inter) for _ in plan.expert_ids]
    return torch.randn(num_tokens, hidden).to(dtype), plan, experts


@pytest.mark.parametrize("transposed,gate_kind", LAYOUTS[:2], ids=["rows-silu", "cols-oss"])
def test_group_of_experts_sharing_tokens_matches_reference(experts_group, transposed, gate_kind) -> None:
    torch.manual_seed(1)
    hidden, plan, experts = random_group(torch.bfloat16, transposed)
    args = (hidden, plan.token_ids, plan.route_weights, plan.starts, plan.counts, experts, transposed, gate_kind)
    assert relative_error(run_group(experts_group, *args), reference_group(*args)) < REL_TOL


def test_result_does_not_depend_on_the_thread_count(experts_group) -> None:
    """Each output is computed by one thread in a fixed order, so 1 and 2 threads agree bit for bit."""
    torch.manual_seed(2)
    hidden, plan, experts = random_group(torch.bfloat16, False, hidden=1024, inter=256)
    args = (hidden, plan.token_ids, plan.route_weights, plan.starts, plan.counts, experts, False, SILU)
    with torch_threads(1):
        single = run_group(experts_group, *args)
    with torch_threads(2):
        double = run_group(experts_group, *args)
    assert torch.equal(single, double)


def test_calls_from_several_threads_at_once_each_get_their_own_result(experts_group) -> None:
    """The kernel's worker pool serves one call at a time; a call arriving meanwhile runs on its own thread alone
    (torch releases the GIL around op calls, so Python threads overlap in it): every result is the single-call one."""
    torch.manual_seed(3)
    groups = [random_group(torch.bfloat16, False, hidden=512, inter=128) for _ in range(4)]
    args = [(hidden, plan.token_ids, plan.route_weights, plan.starts, plan.counts, experts, False, SILU)
            for hidden, plan, experts in groups]
    expected = [run_group(experts_group, *a) for a in args]
    with ThreadPoolExecutor(len(args)) as pool:
        for _ in range(5):
            results = list(pool.map(lambda a: run_group(experts_group, *a), args))
            assert all(torch.equal(r, e) for r, e in zip(results, expected))


def _group_in_child(args, queue) -> None:
    torch.set_num_threads(2)
    queue.put(run_group(torch.ops.moeserve.experts_group.default, *args).numpy().tobytes())


def test_a_forked_child_runs_the_kernel_without_its_parents_workers(experts_group) -> None:
    """Worker threads do not survive fork; the child's calls run on the threads it has, with the same result."""
    torch.manual_seed(4)
    hidden, plan, experts = random_group(torch.bfloat16, False, hidden=512, inter=128)
    args = (hidden, plan.token_ids, plan.route_weights, plan.starts, plan.counts, experts, False, SILU)
    with torch_threads(2):
        expected = run_group(experts_group, *args)  # the parent's pool is running now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_group_in_child, args=(args, queue))
    child.start()
    try:
        result = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert result == expected.numpy().tobytes()


def test_kernel_rejects_weights_of_the_wrong_shape(experts_group) -> None:
    gate_up, down, _, _ = make_expert(torch.float32, False, False)
    hidden = torch.randn(2, HIDDEN)
    with pytest.raises(RuntimeError, match="gate_up must be"):
        run_group(experts_group, hidden, torch.tensor([0, 1]), torch.ones(2), [0], [2],
                  [(gate_up.T.contiguous(), down, None, None)], False, SILU)


def test_kernel_rejects_token_ids_out_of_range(experts_group) -> None:
    expert = make_expert(torch.float32, False, False)
    with pytest.raises(RuntimeError, match="token id out of range"):
        run_group(experts_group, torch.randn(2, HIDDEN), torch.tensor([0, 2]), torch.ones(2), [0], [2], [expert],
                  False, SILU)


def test_the_default_instruction_set_is_the_best_and_unknown_ones_are_refused(experts_kernel) -> None:
    assert torch.ops.moeserve.experts_isa(-1) == kernels.ISAS.index(kernels.best_isa())
    with pytest.raises(ValueError, match="unknown instruction set 'sse2'"):
        kernels.select_isa("sse2")
    if kernels.best_isa() != kernels.ISAS[-1]:
        with pytest.raises(RuntimeError, match="this CPU lacks"):
            kernels.select_isa(kernels.ISAS[-1])


def test_fp32_inputs_on_bf16_weights_match_reference(experts_group) -> None:
    """An fp32 hidden state with bf16 weights (no bf16 pair products: the input is not exact in bf16)."""
    torch.manual_seed(4)
    expert = make_expert(torch.bfloat16, False, True, 139, 83)
    for n in (1, 2, 3, 4, 5):
        hidden = torch.randn(n, 139)
        args = (hidden, torch.arange(n), torch.rand(n), [0], [n], [expert], False, SILU)
        assert relative_error(run_group(experts_group, *args), reference_group(*args)) < REL_TOL


def test_loader_refuses_a_stale_build(tmp_path, monkeypatch, caplog) -> None:
    library, stamp = tmp_path / "lib.so", tmp_path / "fingerprint.txt"
    library.write_bytes(b"not a library")
    stamp.write_text("an older fingerprint\n")
    monkeypatch.setattr(kernels, "LIBRARY", library)
    monkeypatch.setattr(kernels, "STAMP", stamp)
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert kernels.load_experts_kernel.__wrapped__() is None
    assert "stale" in caplog.text and kernels.BUILD_COMMAND in caplog.text


def test_loader_falls_back_when_not_built(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(kernels, "LIBRARY", tmp_path / "missing.so")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert kernels.load_experts_kernel.__wrapped__() is None
    assert "not built" in caplog.text and len(caplog.records) == 1


def test_plan_routing_groups_assignments_by_expert() -> None:
    top_k_index = torch.tensor([[2, 0], [0, 3], [2, 3]])  # [T=3, k=2]
    top_k_weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]], dtype=torch.bfloat16)
    plan = plan_routing(top_k_index, top_k_weights, num_experts=5)
    assert plan.expert_ids == [0, 2, 3]
    assert plan.counts == [2, 2, 2] and plan.starts == [0, 2, 4]
    assert plan.token_ids.tolist() == [0, 1, 0, 2, 1, 2]
    assert plan.route_weights.dtype == torch.float32
    assert plan.route_weights.tolist() == pytest.approx([0.4, 0.7, 0.6, 0.5, 0.3, 0.5], abs=4e-3)


@pytest.mark.parametrize("num_tokens", [1, 8, 32, 33, 200])
def test_host_and_tensor_routing_plans_agree(monkeypatch, num_tokens: int) -> None:
    from engine.offload import experts as experts_module

    generator = torch.Generator().manual_seed(num_tokens)
    top_k_index = torch.rand(num_tokens, 16, generator=generator).argsort(dim=-1)[:, :2]  # distinct per token
    top_k_weights = torch.rand(num_tokens, 2, generator=generator).to(torch.bfloat16)
    plans = []
    for limit in (0, 10**6):  # every call on the tensors, then every call on the host
        monkeypatch.setattr(experts_module, "HOST_PLAN_MAX_ASSIGNMENTS", limit)
        plans.append(plan_routing(top_k_index, top_k_weights, num_experts=16))
    tensor, host = plans
    assert (host.expert_ids, host.starts, host.counts) == (tensor.expert_ids, tensor.starts, tensor.counts)
    assert torch.equal(host.token_ids, tensor.token_ids) and torch.equal(host.route_weights, tensor.route_weights)


def test_plan_groups_respect_the_size_limit() -> None:
    plan = RoutingPlan(list(range(7)), [0] * 7, [1] * 7, torch.zeros(7, dtype=torch.long), torch.ones(7))
    assert [list(g) for g in plan.groups(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(g) for g in plan.groups(None)] == [list(range(7))]


def test_path_table_uses_the_largest_bucket_not_above_the_count() -> None:
    table = PathTable()
    key = (torch.bfloat16, False, 1024, 3584)
    assert table.choose(key, 5) is Path.KERNEL and table.choose(key, 16) is Path.TORCH  # unmeasured: the default
    for bucket, path in {1: Path.KERNEL, 4: Path.KERNEL, 16: Path.TORCH}.items():
        table.record(key, bucket, path)
    assert [table.choose(key, n) for n in (1, 3, 4, 15, 16, 200)] == [Path.KERNEL] * 4 + [Path.TORCH] * 2


def test_kernel_upto_is_the_last_count_below_the_first_torch_choice() -> None:
    key = (torch.bfloat16, False, 1024, 3584)
    assert PathTable().kernel_upto(key) == 15  # unmeasured: the kernel below KERNEL_MAX_TOKENS (16)
    assert PathTable(kernel_max_tokens=1).kernel_upto(key) == 0
    table = PathTable()
    for bucket, path in {1: Path.KERNEL, 2: Path.KERNEL, 4: Path.TORCH, 8: Path.KERNEL}.items():
        table.record(key, bucket, path)
    assert table.kernel_upto(key) == 3
    assert all(table.choose(key, n) is Path.KERNEL for n in range(1, 4)) and table.choose(key, 4) is Path.TORCH
    table.record(key, 4, Path.KERNEL)  # a new measurement is seen (the cached answer is dropped)
    assert table.kernel_upto(key) == sys.maxsize
    table.record(key, 1, Path.TORCH)
    assert table.kernel_upto(key) == 0
