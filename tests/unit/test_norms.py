"""RMSNorm modules on the kernel's rms_norm op (engine.norms): the op against transformers' own modules, the
verified swap, and what keeps its own forward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from engine.dense import MAX_ROWS
from engine.models.demo import ARCHITECTURES
from engine.model_runner import ModelRunner
from engine.norms import KernelRMSNorm, fuse_rms_norms, matching_rounding
from engine.replacement import original_modules

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CLASSES = {MixtralRMSNorm: True, GptOssRMSNorm: False}  # class -> the rounding order it computes (round_first)


def _norm(cls: type[nn.Module], dtype: torch.dtype, hidden: int = 333, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = cls(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
    return module


class GemmaStyleRMSNorm(nn.Module):
    """An RMSNorm class with other arithmetic (Gemma's ``1 + weight``): the op must not take its place."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda cls: cls.__name__)
def test_the_op_reproduces_the_modules_in_their_rounding_order(experts_kernel, cls: type[nn.Module],
                                                                 dtype: torch.dtype) -> None:
    """1..MAX_ROWS rows (odd width: the vector tails): bit-equal in 16-bit dtypes but for rare last-place
    differences of the mean's summation order; fp32 within a few units in the last place."""
    module = _norm(cls, dtype)
    for rows in range(1, MAX_ROWS + 1):
        x = (torch.randn(rows, module.weight.shape[0]) * 3).to(dtype)
        out = torch.empty_like(x)
        torch.ops.moeserve.rms_norm(x, module.weight, module.variance_epsilon, CLASSES[cls], out)
        expected = module(x)
        torch.testing.assert_close(out, expected, rtol=4 * torch.finfo(dtype).eps, atol=0)
        if dtype != torch.float32:
            assert (out != expected).float().mean().item() <= 0.01, rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_like_is_rms_norm_into_an_output_it_allocates(experts_kernel, dtype: torch.dtype) -> None:
    """``rms_norm_like`` (what KernelRMSNorm calls): any leading dims, an output like x, rms_norm's very values."""
    module = _norm(MixtralRMSNorm, dtype)
    width = module.weight.shape[0]
    for shape in ((1, width), (1, 1, width), (2, 3, width)):
        x = (torch.randn(shape) * 3).to(dtype)
        out = torch.ops.moeserve.rms_norm_like(x, module.weight, module.variance_epsilon, True)
        expected = torch.empty(x.numel() // width, width, dtype=dtype)
        torch.ops.moeserve.rms_norm(x.reshape(-1, width), module.weight, module.variance_epsilon, True, expected)
        assert out.shape == x.shape and out.dtype == dtype and torch.equal(out.reshape(-1, width), expected)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.moeserve.rms_norm_like(torch.randn(width, 2).to(dtype).t(), module.weight, 1e-5, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda cls: cls.__name__)
def test_verification_finds_each_classs_rounding_order(experts_kernel, cls: type[nn.Module],
                                                       dtype: torch.dtype) -> None:
    """The probe tells the two orders apart in 16-bit dtypes (in fp32 they agree: either is right); a class with
    other arithmetic matches neither."""
    verdict = matching_rounding(_norm(cls, dtype), 1e-5)
    assert verdict is (CLASSES[cls] if dtype != torch.float32 else True)
    assert matching_rounding(GemmaStyleRMSNorm(64).to(dtype), 1e-6) is None


def test_verification_does_not_rely_on_the_modules_own_weight(experts_kernel) -> None:
    """A weight of ones makes both orders agree; the probe uses a random weight on a copy, and the module is left
    as it was."""
    module = GptOssRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    assert matching_rounding(module, 1e-5) is False
    assert torch.equal(module.weight, torch.ones(64, dtype=torch.bfloat16))


def test_the_swap_keeps_weights_and_names_and_falls_back_to_the_module(experts_kernel) -> None:
    """Only the modules the op reproduces are replaced; the weight is the same tensor under the same name; more
    than max_rows rows, autograd and other dtypes run the original module, bit for bit."""
    model = nn.Sequential(_norm(MixtralRMSNorm, torch.bfloat16, 96), GemmaStyleRMSNorm(96).to(torch.bfloat16),
                          _norm(GptOssRMSNorm, torch.bfloat16, 96, seed=1))
    original = [model[0], model[2]]
    names = list(model.state_dict())
    assert fuse_rms_norms(model) == 2
    assert isinstance(model[0], KernelRMSNorm) and isinstance(model[2], KernelRMSNorm)
    assert isinstance(model[1], GemmaStyleRMSNorm)
    assert list(model.state_dict()) == names
    assert model[0].weight is original[0].weight and model[2].weight is original[1].weight
    with torch.no_grad():
        few = torch.randn(2, 3, 96).to(torch.bfloat16)  # 6 rows, batched like a decode step
        for fused, module in zip((model[0], model[2]), original):
            assert (fused(few) != module(few)).float().mean().item() <= 0.01
            many = torch.randn(MAX_ROWS + 1, 96).to(torch.bfloat16)
            assert torch.equal(fused(many), module(many))
            assert torch.equal(fused(few.float()), module(few.float()))  # another dtype than the weight's
            wide = torch.randn(1, 2 * 96).to(torch.bfloat16)  # not the weight's width: the module's own error
            with pytest.raises(RuntimeError):
                fused(wide)
    x = torch.randn(1, 96).to(torch.bfloat16).requires_grad_()
    out = model[0](x)
    assert out.grad_fn is not None and torch.equal(out, original[0](x))


def test_the_op_runs_in_place_of_the_module(experts_kernel) -> None:
    """A decode-sized call runs moeserve::rms_norm_like (rms_norm allocating its output) and none of the module's torch
    ops."""
    fused = KernelRMSNorm(_norm(MixtralRMSNorm, torch.bfloat16, 128), 1e-5, True)
    with torch.no_grad(), torch.profiler.profile() as profile:
        fused(torch.randn(1, 1, 128).to(torch.bfloat16))
    names = {event.name for event in profile.events()}
    assert "moeserve::rms_norm_like" in names and "aten::rsqrt" not in names


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_model_runner_fuses_the_norms_it_can(experts_kernel, demo_model: Callable[..., Path], arch: str) -> None:
    """Every architecture's demo model: each RMSNorm module is either on the op or keeps a forward the op does not
    reproduce (none of our architectures has such a norm today)."""
    runner = ModelRunner(demo_model(arch), num_kv_blocks=4)
    norms = [m for m in runner.model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(isinstance(m, KernelRMSNorm) for m in norms)
    assert fuse_rms_norms(runner.model) == 0  # nothing is replaced twice


def test_original_modules_runs_the_original_module_within_the_block(experts_kernel) -> None:
    """The benchmarks' switch: inside it the module's torch ops run (bit for bit), after it the op again."""
    original = _norm(MixtralRMSNorm, torch.bfloat16, 128)
    fused = KernelRMSNorm(original, 1e-5, True)
    x = torch.randn(1, 128).to(torch.bfloat16)
    with torch.no_grad():
        with original_modules(KernelRMSNorm), torch.profiler.profile() as profile:
            assert torch.equal(fused(x), original(x))
        assert "moeserve::rms_norm_like" not in {event.name for event in profile.events()}
        with torch.profiler.profile() as profile:
            fused(x)
        assert "moeserve::rms_norm_like" in {event.name for event in profile.events()}
