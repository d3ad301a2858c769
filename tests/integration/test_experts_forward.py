"""The registered experts forward on tiny models of every supported architecture, against transformers' own.

fp32: logits (whole models, prefill and cached decode) and experts outputs for 1..64 tokens per expert equal the
stock implementation within 1e-5 relative, on the kernel path and on the pure-torch path. bf16: the stock forward
rounds every intermediate to bf16; ours keeps fp32 until the output, so against fp64 math on the same bf16
weights its error is at most the output's own bf16 rounding, and never larger than the stock forward's.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.models.demo import ARCH_CONFIGS, ARCHITECTURES
from engine.offload.experts import (
    ExpertsForward,
    Path,
    PathTable,
    StackedParameters,
    describe_experts,
    register_experts_forward,
    tag_experts_layers,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("experts_kernel")]  # built once: tests/conftest.py

VOCAB = 512
REL_TOL = 1e-5
BF16_ROUNDING = 2.0**-8  # one bf16 ulp, relative: twice the final rounding's worst case


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A random model of ``arch`` at toy size (engine.models.demo's shapes), routers scaled away from ties."""
    config = AutoConfig.for_model(arch, **ARCH_CONFIGS[arch], vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight", "mlp.router.weight")):
                parameter.mul_(8.0)
    tag_experts_layers(model)
    return model.to(dtype)


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")]


FORWARDS = {
    "kernel": lambda: ExpertsForward(paths=PathTable(kernel_max_tokens=1 << 30)),  # the kernel at every count
    "torch": lambda: ExpertsForward(use_kernel=False),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@torch.no_grad()
def prefill_and_decode(model: torch.nn.Module, input_ids: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Logits of a prefill and then ``steps`` cached one-token decode steps (greedy), concatenated on dim 1."""
    out = model(input_ids, use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for _ in range(steps):
        token = logits[-1][:, -1:].argmax(-1)
        out = model(token, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("path", FORWARDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_logits_equal_stock(arch: str, path: str) -> None:
    model = tiny_model(arch)
    input_ids = torch.randint(3, VOCAB, (2, 80), generator=torch.Generator().manual_seed(0))
    stock = prefill_and_decode(model, input_ids)
    model.set_experts_implementation(register_experts_forward(FORWARDS[path](), f"moeserve-test-{path}"))
    ours = prefill_and_decode(model, input_ids)
    assert relative_error(ours, stock) < REL_TOL


def stock_experts(experts: torch.nn.Module, hidden, top_k_index, top_k_weights) -> torch.Tensor:
    """transformers' own per-expert loop (the class's undecorated forward)."""
    return type(experts).forward.__wrapped__(experts, hidden, top_k_index, top_k_weights)


def routing_to_first_experts(n: int, experts: torch.nn.Module, top_k: int, dtype: torch.dtype, seed: int):
    """n tokens that all route to the same top_k experts, so each of those gets exactly n tokens."""
    spec = describe_experts(experts)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, spec.hidden, generator=generator).to(dtype)  # [n, H]
    chosen = torch.randperm(spec.num_experts, generator=generator)[:top_k]
    top_k_index = chosen.expand(n, top_k).contiguous()  # [n, k]
    top_k_weights = torch.softmax(torch.randn(n, top_k, generator=generator), dim=-1)  # [n, k]
    return hidden, top_k_index, top_k_weights


@pytest.mark.parametrize("path", FORWARDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_experts_equal_stock_for_1_to_64_tokens_per_expert(arch: str, path: str) -> None:
    model = tiny_model(arch)
    experts = experts_modules(model)[0]
    forward = FORWARDS[path]()
    top_k = model.config.num_experts_per_tok
    errors = {}
    for n in range(1, 65):
        hidden, top_k_index, top_k_weights = routing_to_first_experts(n, experts, top_k, torch.float32, seed=n)
        with torch.no_grad():
            expected = stock_experts(experts, hidden, top_k_index, top_k_weights)
        errors[n] = relative_error(forward(experts, hidden, top_k_index, top_k_weights), expected)
    assert {n: e for n, e in errors.items() if e > REL_TOL} == {}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_error_is_the_output_rounding_and_below_stock(arch: str) -> None:
    model = tiny_model(arch, torch.bfloat16)
    experts = experts_modules(model)[0]
    exact_experts = copy.deepcopy(experts).double()
    forward = FORWARDS["kernel"]()  # the kernel (fp32 accumulation) at every count
    top_k = model.config.num_experts_per_tok
    for n in (1, 2, 3, 5, 8, 13, 21, 34, 64):
        hidden, top_k_index, top_k_weights = routing_to_first_experts(n, experts, top_k, torch.bfloat16, seed=n)
        top_k_weights = top_k_weights.to(torch.bfloat16)
        with torch.no_grad():
            exact = stock_experts(exact_experts, hidden.double(), top_k_index, top_k_weights.double())
            stock = stock_experts(experts, hidden, top_k_index, top_k_weights)
        ours = forward(experts, hidden, top_k_index, top_k_weights)
        assert ours.dtype == torch.bfloat16
        error = (ours.double() - exact).abs()
        bound = BF16_ROUNDING * exact.abs() + REL_TOL * exact.abs().max()
        assert bool((error <= bound).all()), f"n={n}: error beyond the output's bf16 rounding"
        assert error.max() <= (stock.double() - exact).abs().max(), f"n={n}: less accurate than stock"


class RecordingSource(StackedParameters):
    """The default source with a group-size limit, recording every hold (layer, ids)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.holds: list[tuple[int | None, list[int]]] = []

    def max_group_size(self, layer: int | None) -> int | None:
        return self.limit

    @contextmanager
    def hold(self, experts, layer, expert_ids):
        self.holds.append((layer, list(expert_ids)))
        with super().hold(experts, layer, expert_ids) as weights:
            yield weights


class DelegatingSource:
    """The default source behind another type: the experts forward then plans the routing in Python and calls the
    kernel per group, as it does for the offload cache."""

    def __init__(self) -> None:
        self.inner = StackedParameters()

    def max_group_size(self, layer):
        return None

    def prefetch(self, layer, expert_ids) -> None:
        pass

    def hold(self, experts, layer, expert_ids):
        return self.inner.hold(experts, layer, expert_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_routed_call_equals_the_planned_groups_bit_for_bit(arch: str, dtype: torch.dtype) -> None:
    """Resident experts run as one ``moeserve::experts_routed`` call (the routing grouped in C++); it must give the
    Python plan's per-group kernel calls exactly, for random routing of 1..64 tokens."""
    model = tiny_model(arch, dtype)
    experts = experts_modules(model)[0]
    one_call = ExpertsForward(paths=PathTable(kernel_max_tokens=1 << 30))
    planned = ExpertsForward(source=DelegatingSource(), paths=PathTable(kernel_max_tokens=1 << 30))
    spec = one_call.spec(experts)
    top_k = model.config.num_experts_per_tok
    generator = torch.Generator().manual_seed(0)
    for tokens in (1, 2, 3, 7, 16, 64):
        hidden = torch.randn(tokens, spec.hidden, generator=generator).to(dtype)
        top_k_index = torch.stack([torch.randperm(spec.num_experts, generator=generator)[:top_k]
                                   for _ in range(tokens)])
        top_k_weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(dtype)
        assert one_call._routes_in_one_call(experts, spec, hidden, top_k_index)
        assert not planned._routes_in_one_call(experts, spec, hidden, top_k_index)
        with torch.no_grad():
            ours = one_call(experts, hidden, top_k_index, top_k_weights)
            expected = planned(experts, hidden, top_k_index, top_k_weights)
        assert torch.equal(ours, expected), tokens


def test_routed_call_is_skipped_where_an_expert_would_take_torchs_path() -> None:
    model = tiny_model("mixtral")
    experts = experts_modules(model)[0]
    forward = ExpertsForward(paths=PathTable(kernel_max_tokens=4))  # the kernel for 1-3 tokens per expert
    spec = forward.spec(experts)
    index = torch.zeros(4, model.config.num_experts_per_tok, dtype=torch.int64)
    assert forward._routes_in_one_call(experts, spec, torch.zeros(3, spec.hidden), index[:3])
    assert not forward._routes_in_one_call(experts, spec, torch.zeros(4, spec.hidden), index)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_grouped_execution_under_a_budget_smaller_than_the_routed_union(arch: str) -> None:
    model = tiny_model(arch)
    input_ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(input_ids).logits
    source = RecordingSource(limit=3)
    model.set_experts_implementation(register_experts_forward(ExpertsForward(source), "moeserve-test-grouped"))
    with torch.no_grad():
        ours = model(input_ids).logits
    assert relative_error(ours, stock) < REL_TOL
    moe_layers = {m.moeserve_layer for m in experts_modules(model)}
    assert {layer for layer, _ in source.holds} == moe_layers
    assert max(len(ids) for _, ids in source.holds) == 3
    for layer in moe_layers:  # each routed expert held exactly once per layer call, ascending
        held = [e for held_layer, ids in source.holds if held_layer == layer for e in ids]
        assert held == sorted(set(held))


def test_path_table_sends_large_token_counts_to_torch() -> None:
    model = tiny_model("mixtral")
    experts = experts_modules(model)[0]
    forward = ExpertsForward()
    spec = forward.spec(experts)
    forward.paths.record(spec.shape_key, 1, Path.KERNEL)
    forward.paths.record(spec.shape_key, 8, Path.TORCH)
    kernel_counts: list[list[int]] = []
    kernel = forward.kernel
    forward.kernel = lambda *args: (kernel_counts.append(list(args[4])), kernel(*args))
    hidden = torch.randn(14, spec.hidden)  # [T, H]
    top_k_index = torch.tensor([[0, 1]] * 5 + [[2, 3]] * 9)  # experts 0, 1: 5 tokens each; 2, 3: 9 each
    top_k_weights = torch.softmax(torch.randn(14, 2), dim=-1)
    with torch.no_grad():
        expected = stock_experts(experts, hidden, top_k_index, top_k_weights)
    assert relative_error(forward(experts, hidden, top_k_index, top_k_weights), expected) < REL_TOL
    assert kernel_counts == [[5, 5]]


def test_calibrate_records_a_path_for_every_bucket() -> None:
    model = tiny_model("olmoe")
    experts = experts_modules(model)[0]
    forward = ExpertsForward(paths=PathTable())
    winners = forward.calibrate(experts, buckets=(1, 4, 16))
    assert set(winners) == {1, 4, 16} and set(winners.values()) <= set(Path)
    assert forward.paths.measured[forward.spec(experts).shape_key] == winners


def test_tag_experts_layers_skips_dense_layers() -> None:
    model = tiny_model("deepseek_v2")  # first_k_dense_replace=1: layer 0 is dense
    assert [m.moeserve_layer for m in experts_modules(model)] == [1, 2, 3]
