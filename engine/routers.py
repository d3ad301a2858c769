"""A model's own top-k routers with their softmax and selection in one kernel op (``torch.ops.moeserve.route_topk``)
for few-row inputs.

After its linear layer (on the kernel's row paths already: engine.dense.RowStreamWeight), the Mixtral, Qwen-MoE and
OLMoE routers take the softmax, the top k, their sum and quotient and a cast: 4-6 small torch ops per MoE layer at
decode, each of which finds the caches the previous layer's weight stream emptied (README). The op does that
arithmetic in one call (benchmarks/experts_decode.py compares one stream with and without it).

As with engine.norms: `fuse_routers` replaces a router *module* (engine.replacement) by a `KernelTopKRouter`
holding the very same weight (same name) and keeping the original module for what it does not take: more than
``max_rows`` rows, autograd, another device, an input of another dtype than the weight's, and a call whose top
k + 1 probabilities hold equal values (torch.topk orders equal values by its own algorithm, and equal bf16 logits
are common). A router is replaced only after it reproduced its class's three outputs (logits, scores, indices) on
random rows in one of `VARIANTS`. Others match none and keep their forward: DeepSeek-V3's grouped sigmoid
selection, GPT-OSS's softmax over the top k, DeepSeek-V2's scaled weights (its greedy router matches where
``routed_scaling_factor`` is 1).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from engine.dense import streams_on_kernel
from engine.offload.experts import moe_routers
from engine.offload.kernels import KERNEL_DTYPES, kernel_op, load_experts_kernel
from engine.replacement import ModuleReplacement, replace_reproduced

VARIANTS = tuple((renormalize, scores_in_logits_dtype) for renormalize in (True, False)
                 for scores_in_logits_dtype in (False, True))
"""(renormalize the top-k probabilities, return the scores in the logits' dtype instead of fp32): Mixtral
renormalizes in fp32; Qwen-MoE and OLMoE renormalize as their config says and cast to the logits' dtype."""
PROBE_ROWS = 2
PROBE_BATCHES = 8
PROBE_DRAWS = 64
"""Verification: PROBE_BATCHES batches of PROBE_ROWS random rows without equal probabilities among a row's top
k + 1, out of at most PROBE_DRAWS (equal bf16 logits are common at 16 and more experts)."""


class KernelTopKRouter(ModuleReplacement):
    """A softmax-top-k router whose calls of at most ``max_rows`` rows run their selection on
    ``torch.ops.moeserve.route_topk``; returns ``(logits, scores, indices)`` as the original module does."""

    def __init__(self, original: nn.Module, top_k: int, renormalize: bool, scores_in_logits_dtype: bool) -> None:
        super().__init__(original)
        self.top_k = top_k
        self.renormalize = renormalize
        self.scores_in_logits_dtype = scores_in_logits_dtype

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The weight's attributes and the op as on a plain tensor: on a RowStreamWeight every attribute read would
        # go through its __torch_function__ (engine.dense.streams_on_kernel).
        with torch._C.DisableTorchFunctionSubclass():
            weight = self._parameters["weight"]  # not through Module.__getattr__
            hidden = hidden_states.reshape(-1, weight.shape[-1])
            served = (0 < hidden.shape[0] <= self.max_rows and hidden.is_cpu and hidden.dtype == weight.dtype
                      and not torch.is_grad_enabled())
            if served and streams_on_kernel(hidden, weight):
                # A weight the kernel streams: the product and the selection in one op call.
                logits, scores, indices, tied = kernel_op("router_topk")(
                    hidden.contiguous(), weight, self.top_k, self.renormalize, self.scores_in_logits_dtype)
                if not tied:
                    return logits, scores, indices
                served = False  # equal probabilities: torch's own order
        if not served:
            return self.original(hidden_states)
        logits = F.linear(hidden, weight)  # the original's product, on torch: not one the kernel takes
        routed = route(logits, self.top_k, self.renormalize, self.scores_in_logits_dtype)
        if routed is None:
            return self.original(hidden_states)  # equal probabilities: torch's own order
        return logits, *routed

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"scores_in_logits_dtype={self.scores_in_logits_dtype}, original={type(self.original).__name__}")


@torch.no_grad()
def matching_variant(router: nn.Module, generator: torch.Generator | None = None) -> tuple[bool, bool] | None:
    """The `VARIANTS` entry in which `KernelTopKRouter` gives ``router``'s class's outputs on random rows (logits and
    indices equal, scores of the same dtype within 4 units in the last place), on a copy with a random weight; None
    when none does, or the router has no ``top_k``, a bias, or outputs other than (logits, scores, indices)."""
    top_k = getattr(router, "top_k", None)
    weight = getattr(router, "weight", None)
    if not isinstance(top_k, int) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if getattr(router, "bias", None) is not None or weight.dtype not in KERNEL_DTYPES or weight.device.type != "cpu":
        return None
    probe_router = copy.deepcopy(router)
    probe_router.weight.copy_(torch.randn(weight.shape, generator=generator) * weight.shape[-1] ** -0.5)
    outputs = []
    for _ in range(PROBE_DRAWS):
        hidden = torch.randn(PROBE_ROWS, weight.shape[-1], generator=generator).to(weight.dtype)
        expected = probe_router(hidden)
        if not (isinstance(expected, tuple) and len(expected) == 3):
            return None
        if not torch.equal(F.linear(hidden, probe_router.weight), expected[0]):
            return None  # logits of another product (DeepSeek's in fp32)
        if route(expected[0], top_k, False, False) is not None:  # rows with equal probabilities tell nothing
            outputs.append(expected)
        if len(outputs) == PROBE_BATCHES:
            break
    else:
        return None
    for variant in VARIANTS:
        if all(_reproduces(expected, top_k, *variant) for expected in outputs):
            return variant
    return None


def _reproduces(expected: tuple, top_k: int, renormalize: bool, scores_in_logits_dtype: bool) -> bool:
    """Whether the op's selection over ``expected``'s logits gives its indices and scores (False on a tie)."""
    routed = route(expected[0], top_k, renormalize, scores_in_logits_dtype)
    if routed is None:
        return False
    scores, indices = routed
    if not (torch.equal(indices, expected[2]) and scores.dtype == expected[1].dtype
            and scores.shape == expected[1].shape):
        return False
    tolerance = 4 * torch.finfo(scores.dtype).eps * expected[1].float().abs()
    return bool(((scores.float() - expected[1].float()).abs() <= tolerance).all())


def route(logits: torch.Tensor, top_k: int, renormalize: bool,
          scores_in_logits_dtype: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scores, indices)`` of the op over ``logits`` [T, E], or None when it found equal probabilities among some
    row's top k + 1 (the caller then runs torch's selection)."""
    rows = logits.shape[0]
    scores = torch.empty(rows, top_k, dtype=logits.dtype if scores_in_logits_dtype else torch.float32)
    indices = torch.empty(rows, top_k, dtype=torch.int64)
    if torch.ops.moeserve.route_topk.default(logits.contiguous(), top_k, renormalize, scores, indices):
        return None
    return scores, indices


def fuse_routers(model: nn.Module) -> int:
    """Replace each MoE layer's router (engine.offload.experts.moe_routers) that the op reproduces
    (`matching_variant`) by a `KernelTopKRouter`; return how many. Nothing changes without the built kernel."""
    if load_experts_kernel() is None:
        return 0
    routers = {id(router) for router in moe_routers(model).values()}
    generator = torch.Generator().manual_seed(0)

    def kind(module: nn.Module) -> tuple | None:
        if id(module) not in routers:
            return None
        return (type(module), module.weight.dtype, getattr(module, "top_k", None),
                getattr(module, "norm_topk_prob", None))

    return replace_reproduced(model, kind, lambda module: matching_variant(module, generator),
                              lambda module, verdict: KernelTopKRouter(module, module.top_k, *verdict), "route_topk")
