"""A model's own RMSNorm modules on one kernel op (``torch.ops.moeserve.rms_norm``) for few-row inputs.

A decode step runs two RMSNorms per layer. transformers' RMSNorm modules compute them as 6-8 small torch ops
(upcast, square, mean, add, rsqrt, multiply, round, weight), each of which, in the engine, finds the caches the
previous layer's weight stream emptied (README, "small ops after a weight stream"). The op computes the same
arithmetic in one call (benchmarks/experts_decode.py compares one stream with and without it).

Nothing of transformers' code changes: `fuse_rms_norms` replaces a norm *module* (engine.replacement) by a
`KernelRMSNorm` that holds the very same weight (same parameter name, so state dicts and checkpoints are unchanged)
and keeps the original module for what the op does not take (more than ``max_rows`` rows, autograd, another device
or dtype). A module is replaced only after the op reproduced its own output on random rows in its own dtype, in one
of the two orders RMSNorm classes round in (`ROUNDINGS`); a class computing anything else (Gemma's ``1 + weight``,
a bias, an offset) matches neither and keeps its forward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from engine.offload.kernels import KERNEL_DTYPES, kernel_op, load_experts_kernel
from engine.replacement import ModuleReplacement, replace_reproduced

ROUNDINGS = {"round_first": True, "scale_first": False}
"""The orders RMSNorm modules round in (the op's ``round_first``): the Llama family (Mixtral, Qwen-MoE, OLMoE,
DeepSeek) rounds the normalized row to the input's dtype before the weight multiplies it; GPT-OSS multiplies in
fp32 and rounds once."""
PROBE_ROWS = 16
MAX_MISMATCH = 1e-3
"""Share of a 16-bit probe's elements allowed to differ (by one unit in the last place: the mean's summation order
differs from torch's). The other rounding order differs in ~25 % of them."""
EPSILON_NAMES = ("variance_epsilon", "eps")


class KernelRMSNorm(ModuleReplacement):
    """An RMSNorm module whose calls of at most ``max_rows`` rows run on ``torch.ops.moeserve.rms_norm``."""

    def __init__(self, original: nn.Module, eps: float, round_first: bool) -> None:
        super().__init__(original)
        self.eps = eps
        self.round_first = round_first

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self._parameters["weight"]  # not through Module.__getattr__: decode runs this twice a layer
        size = weight.shape[0]
        if not (0 < hidden_states.numel() <= self.max_rows * size and hidden_states.shape[-1] == size
                and hidden_states.dtype == weight.dtype and hidden_states.is_cpu and not torch.is_grad_enabled()):
            return self.original(hidden_states)
        # One op call that allocates the output (``rms_norm`` behind ``rms_norm_like``): a decode layer runs two.
        return kernel_op("rms_norm_like")(hidden_states.contiguous(), weight, self.eps, self.round_first)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, round_first={self.round_first}, " \
               f"original={type(self.original).__name__}"


def rms_norm_epsilon(module: nn.Module) -> float | None:
    """The epsilon of an RMSNorm-shaped module: no children, one parameter ``weight`` of one dimension on the CPU
    in a kernel dtype, and a float epsilon attribute; None for any other module."""
    if next(module.children(), None) is not None or "RMSNorm" not in type(module).__name__:
        return None
    parameters = dict(module.named_parameters(recurse=False))
    weight = parameters.get("weight")
    if len(parameters) != 1 or weight is None or weight.dim() != 1 or weight.device.type != "cpu":
        return None
    if weight.dtype not in KERNEL_DTYPES or not weight.is_contiguous():
        return None
    for name in EPSILON_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


@torch.no_grad()
def matching_rounding(module: nn.Module, eps: float, generator: torch.Generator | None = None) -> bool | None:
    """The op's ``round_first`` that reproduces ``module``'s class on random rows and a random weight in the module's
    dtype, or None if neither does (`MAX_MISMATCH`; fp32 within 4 units in the last place). The weight is a copy's
    (a weight of ones would make both orders agree)."""
    module = copy.deepcopy(module)
    weight = module.weight
    dtype = weight.dtype
    weight.copy_(1 + 0.3 * torch.randn(weight.shape, generator=generator))
    probe = (torch.randn(PROBE_ROWS, weight.shape[0], generator=generator) * 3).to(dtype)
    expected = module(probe)
    if expected.dtype != dtype or expected.shape != probe.shape:
        return None
    tolerance = 4 * torch.finfo(dtype).eps * expected.float().abs()
    for round_first in ROUNDINGS.values():
        out = torch.empty_like(probe)
        torch.ops.moeserve.rms_norm.default(probe, weight, eps, round_first, out)
        difference = (out.float() - expected.float()).abs()
        close = bool(torch.isfinite(out).all() and (difference <= tolerance).all())
        if close and (dtype == torch.float32 or (difference > 0).float().mean().item() <= MAX_MISMATCH):
            return round_first
    return None


def fuse_rms_norms(model: nn.Module) -> int:
    """Replace every RMSNorm module of ``model`` the op reproduces (`matching_rounding`) by a `KernelRMSNorm`;
    return how many. Nothing changes without the built kernel."""
    if load_experts_kernel() is None:
        return 0
    generator = torch.Generator().manual_seed(0)

    def kind(module: nn.Module) -> tuple | None:  # the arithmetic is the class's: one probe per class, dtype, epsilon
        eps = rms_norm_epsilon(module)
        return None if eps is None else (type(module), module.weight.dtype, eps)

    def verify(module: nn.Module) -> tuple[float, bool] | None:
        eps = rms_norm_epsilon(module)
        round_first = matching_rounding(module, eps, generator)
        return None if round_first is None else (eps, round_first)

    return replace_reproduced(model, kind, verify, lambda module, verdict: KernelRMSNorm(module, *verdict), "rms_norm")

