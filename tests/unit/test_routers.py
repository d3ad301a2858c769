"""Top-k routers on the kernel's route_topk op (engine.routers): the op against torch, the verified swap, ties and
what keeps its own forward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from engine.dense import MAX_ROWS, RowStreamWeight, stream_router_weights
from engine.model_runner import ModelRunner
from engine.offload.experts import moe_routers
from engine.replacement import original_modules
from engine.routers import KernelTopKRouter, fuse_routers, matching_variant

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _router(cls: type[nn.Module], dtype: torch.dtype, experts: int = 8, top_k: int = 2, **extra) -> nn.Module:
    model_type = {MixtralTopKRouter: "mixtral", Qwen2MoeTopKRouter: "qwen2_moe", GptOssTopKRouter: "gpt_oss"}[cls]
    count = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "gpt_oss": "num_local_experts"}[model_type]
    config = AutoConfig.for_model(model_type, hidden_size=96, num_experts_per_tok=top_k, **{count: experts}, **extra)
    router = cls(config).to(dtype)
    with torch.no_grad():
        router.weight.normal_(std=96**-0.5)
        if getattr(router, "bias", None) is not None:
            router.bias.normal_()
    return router


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (64, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_the_op_equals_softmax_and_topk_without_ties(experts_kernel, dtype: torch.dtype, experts: int, top_k: int,
                                                    renormalize: bool) -> None:
    """Rows without equal probabilities: torch's indices exactly, its scores within a few units in the last place,
    in fp32 or the logits' dtype."""
    torch.manual_seed(1)
    logits = (torch.randn(64, experts) * 2).to(dtype)
    probabilities = torch.softmax(logits.float(), dim=-1)
    values, expected_indices = torch.topk(probabilities, top_k, dim=-1)
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    for scores_dtype in {torch.float32, dtype}:
        for row in range(logits.shape[0]):
            scores = torch.empty(1, top_k, dtype=scores_dtype)
            indices = torch.empty(1, top_k, dtype=torch.int64)
            if torch.ops.moeserve.route_topk(logits[row : row + 1], top_k, renormalize, scores, indices):
                continue  # a tie: the caller hands it to torch (next test)
            assert torch.equal(indices, expected_indices[row : row + 1]), row
            torch.testing.assert_close(scores, values[row : row + 1].to(scores_dtype),
                                       rtol=4 * torch.finfo(scores_dtype).eps, atol=0)


def test_the_op_reports_ties_among_the_top_k_plus_one(experts_kernel) -> None:
    """Equal probabilities within the top k or at its boundary are reported (torch's order among them is its own);
    a tie further down is not."""
    def tied(row: list[float]) -> bool:
        scores, indices = torch.empty(1, 2), torch.empty(1, 2, dtype=torch.int64)
        return torch.ops.moeserve.route_topk(torch.tensor([row]), 2, True, scores, indices)

    assert tied([3.0, 1.0, 3.0, 0.0])  # the top two
    assert tied([3.0, 2.0, 0.0, 2.0])  # the second and the third
    assert not tied([3.0, 2.0, 1.0, 1.0])  # third and fourth: the selection is unambiguous
    assert tied([float("nan"), 1.0, 0.0, -1.0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verification_finds_each_router_classs_variant(experts_kernel, dtype: torch.dtype) -> None:
    """Mixtral renormalizes in fp32; Qwen-MoE casts to the logits' dtype and renormalizes as configured (in fp32
    both casts agree); GPT-OSS (softmax over the top k, a bias) matches none."""
    assert matching_variant(_router(MixtralTopKRouter, dtype)) == (True, False)
    in_logits_dtype = dtype != torch.float32
    assert matching_variant(_router(Qwen2MoeTopKRouter, dtype, norm_topk_prob=True)) == (True, in_logits_dtype)
    assert matching_variant(_router(Qwen2MoeTopKRouter, dtype, experts=60, top_k=4)) == (False, in_logits_dtype)
    assert matching_variant(_router(GptOssTopKRouter, dtype)) is None


def test_the_swap_reproduces_the_router_and_falls_back_to_it(experts_kernel) -> None:
    """Same weight under the same name; few rows give the original's logits and indices exactly and its scores
    within a few units in the last place; more rows, autograd, another input dtype and tied rows run the original."""
    block = nn.Module()
    block.gate = _router(MixtralTopKRouter, torch.bfloat16)
    original = block.gate
    names = list(block.state_dict())
    block.gate = KernelTopKRouter(original, 2, True, False)
    assert list(block.state_dict()) == names and block.gate.weight is original.weight
    torch.manual_seed(2)
    with torch.no_grad():
        few = torch.randn(1, 3, 96).to(torch.bfloat16)
        got, expected = block.gate(few), original(few)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
        torch.testing.assert_close(got[1], expected[1], rtol=4 * torch.finfo(torch.float32).eps, atol=0)
        many = torch.randn(MAX_ROWS + 1, 96).to(torch.bfloat16)
        assert all(torch.equal(a, b) for a, b in zip(block.gate(many), original(many)))
        tie = torch.zeros(1, 96, dtype=torch.bfloat16)  # every logit 0: all experts tie
        assert all(torch.equal(a, b) for a, b in zip(block.gate(tie), original(tie)))
        with original_modules(KernelTopKRouter), torch.profiler.profile() as profile:
            assert all(torch.equal(a, b) for a, b in zip(block.gate(few), original(few)))
        assert "moeserve::route_topk" not in {event.name for event in profile.events()}
        with torch.profiler.profile() as profile:
            block.gate(few)
        assert "moeserve::route_topk" in {event.name for event in profile.events()}
    x = torch.randn(1, 96).to(torch.bfloat16).requires_grad_()
    assert block.gate(x)[0].grad_fn is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cls", "extra"), [(MixtralTopKRouter, {}), (Qwen2MoeTopKRouter, {"norm_topk_prob": False}),
                                            (Qwen2MoeTopKRouter, {"norm_topk_prob": True})],
                         ids=["mixtral", "qwen2_moe", "qwen2_moe-renormalized"])
def test_a_streamed_weight_routes_in_one_op_call(experts_kernel, dtype: torch.dtype, cls: type[nn.Module],
                                                 extra: dict) -> None:
    """With its weight on the kernel's row paths (a RowStreamWeight), the router's product and selection are one
    ``moeserve::router_topk`` call: the original's logits and indices exactly, its scores (fp32 or the logits'
    dtype, as its class gives them) within a few units in the last place; tied rows still run the original."""
    original = _router(cls, dtype, **extra)
    variant = matching_variant(original, torch.Generator().manual_seed(1))
    assert variant is not None
    assert stream_router_weights([original]) == 1 and isinstance(original.weight, RowStreamWeight)
    router = KernelTopKRouter(original, 2, *variant)
    torch.manual_seed(4)
    with torch.no_grad():
        for rows in (1, 2, MAX_ROWS):
            hidden = torch.randn(rows, 96).to(dtype)
            with torch.profiler.profile() as profile:
                got = router(hidden)
            names = [event.name for event in profile.events() if event.name.startswith("moeserve::")]
            assert names == ["moeserve::router_topk"], names
            expected = original(hidden)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
            assert got[1].dtype == expected[1].dtype
            torch.testing.assert_close(got[1], expected[1], rtol=4 * torch.finfo(got[1].dtype).eps, atol=0)
        tie = torch.zeros(1, 96, dtype=dtype)
        assert all(torch.equal(a, b) for a, b in zip(router(tie), original(tie)))


def test_fuse_routers_replaces_the_routers_it_reproduces(experts_kernel, demo_model: Callable[..., Path]) -> None:
    """On a runner every Mixtral router is replaced (its weight on the kernel's row paths, as before), and a second
    pass replaces nothing."""
    runner = ModelRunner(demo_model("mixtral"), num_kv_blocks=4)
    routers = moe_routers(runner.model)
    assert routers and all(isinstance(router, KernelTopKRouter) for router in routers.values())
    assert all(isinstance(router.weight, RowStreamWeight) for router in routers.values())
    assert fuse_routers(runner.model) == 0


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_routers_of_other_arithmetic_keep_their_forward(experts_kernel, demo_model: Callable[..., Path],
                                                        arch: str) -> None:
    runner = ModelRunner(demo_model(arch), num_kv_blocks=4)
    routers = moe_routers(runner.model)
    assert routers and not any(isinstance(router, KernelTopKRouter) for router in routers.values())
