"""The registered experts forward: every MoE layer's routed experts, streamed once per token batch.

transformers calls ``fn(experts_module, hidden_states, top_k_index, top_k_weights)`` for each MoE layer once the
model selects an implementation registered in ``ALL_EXPERTS_FUNCTIONS`` (see ``register_experts_forward``). This
module's ``ExpertsForward`` is that function:

- routing is planned once per call (tokens grouped by expert, stable order);
- routed experts run in groups no larger than the weight source allows (``ExpertWeightSource.max_group_size``), so
  an offload budget smaller than a layer's routed union still works; the source holds a group's weights while the
  group computes;
- each expert's weights are read in one pass for all of its tokens (gate/up fused, then down), and its
  routing-weighted output is added into one fp32 accumulator; no gathers of whole expert stacks;
- per expert, the compute path is the compiled CPU kernel (``engine.offload.kernels``) or pure torch, chosen by
  ``PathTable`` from measurements per (dtype, layout, shape, tokens per expert). The torch path is always
  available and always correct; the kernel path allocates nothing per call beyond the returned tensor;
- a call whose experts are the module's own resident stacks and would all take the kernel (decode, typically) skips
  the Python plan: one ``moeserve::experts_routed`` op groups the router's [T, k] choice in C++, in the plan's
  order, and runs the same kernel, with the same result bit for bit (``ExpertsForward._routes_in_one_call``): about
  half the Python and dispatch a decode layer's experts forward cost before (benchmarks/decode_overhead.py).

Supported expert layouts are those of transformers' ``use_experts_implementation``: gated experts with
``gate_up_proj`` / ``down_proj`` stacks, plain or transposed, with or without biases (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3, GPT-OSS). Inference only: no autograd graph is recorded.
"""

from __future__ import annotations

import enum
import logging
import re
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from engine.offload.kernels import KERNEL_DTYPES, best_seconds, kernel_op, load_experts_kernel

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "moeserve"
LAYER_ATTRIBUTE = "moeserve_layer"


class GateKind(enum.IntEnum):
    """How gate_up outputs become the down projection's input (values are the kernel's gate codes)."""

    SILU_HALVES = 0  # silu(h[:, :I]) * h[:, I:]  (transformers' default gate with a SiLU act_fn)
    OSS_SWIGLU = 1  # GPT-OSS: interleaved (gate, up) columns, clamped, (up + 1) * gate * sigmoid(alpha * gate)
    MODULE = 2  # anything else: the module's own ``_apply_gate`` (torch path only)


class Path(enum.Enum):
    """Where one expert's matmuls run."""

    KERNEL = "kernel"
    TORCH = "torch"


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights, as views (no copies). Transposed layouts store [in, out] instead of [out, in]."""

    gate_up: torch.Tensor  # [2I, H], or [H, 2I] when transposed
    down: torch.Tensor  # [H, I], or [I, H] when transposed
    gate_up_bias: torch.Tensor | None = None  # [2I]
    down_bias: torch.Tensor | None = None  # [H]


class ExpertWeightSource(Protocol):
    """Where expert weights come from, per (layer, expert). The offload cache implements this too."""

    def max_group_size(self, layer: int | None) -> int | None:
        """How many experts of ``layer`` may be held at once; ``None`` for no limit."""

    def hold(
        self, experts: nn.Module, layer: int | None, expert_ids: Sequence[int]
    ) -> AbstractContextManager[Sequence[ExpertWeights]]:
        """Make the weights of ``expert_ids`` (at most ``max_group_size``) available until the context exits.

        Yields one ``ExpertWeights`` per id, in order, in the module's layout and dtype.
        """

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """A hint that ``layer`` will soon route to ``expert_ids``: start loading what is missing, never block."""


class StackedParameters:
    """The default source: views into the experts module's own stacked parameters.

    Each module's views (one ``ExpertWeights`` per expert) are built on its first ``hold`` and kept, weakly keyed
    by the module, for as long as its ``gate_up_proj`` is the same tensor: views share the parameters' storage,
    so they cost no weight memory, and a decode step indexes a list instead of slicing four stacks per expert.
    """

    def __init__(self) -> None:
        self._views: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, list[ExpertWeights]]] = (
            weakref.WeakKeyDictionary())

    def max_group_size(self, layer: int | None) -> int | None:
        """No limit: every expert is resident."""
        return None

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Nothing to fetch: every expert is resident."""

    def hold(
        self, experts: nn.Module, layer: int | None, expert_ids: Sequence[int]
    ) -> AbstractContextManager[list[ExpertWeights]]:
        """Views of ``experts.gate_up_proj[e]``, ``down_proj[e]`` (and biases when the module has them); nothing to
        release, so a ``nullcontext`` (a generator-based context manager costs a decode step a few us per layer)."""
        views = self.views(experts)
        return nullcontext([views[e] for e in expert_ids])

    def views(self, experts: nn.Module) -> list[ExpertWeights]:
        """Every expert's views into the module's stacks, built again if its parameters were replaced."""
        cached = self._views.get(experts)
        if cached is None or cached[0] is not experts.gate_up_proj:
            biased = experts.has_bias
            cached = self._views[experts] = (experts.gate_up_proj, [
                ExpertWeights(
                    gate_up=experts.gate_up_proj[e],
                    down=experts.down_proj[e],
                    gate_up_bias=experts.gate_up_proj_bias[e] if biased else None,
                    down_bias=experts.down_proj_bias[e] if biased else None,
                )
                for e in range(experts.gate_up_proj.shape[0])
            ])
        return cached[1]


@dataclass(frozen=True)
class ExpertsSpec:
    """What the forward needs to know about one experts module (computed once per module)."""

    layer: int | None
    num_experts: int
    hidden: int
    intermediate: int
    transposed: bool
    gate: GateKind
    alpha: float
    limit: float
    dtype: torch.dtype

    @property
    def shape_key(self) -> tuple:
        """The key under which compute-path measurements are stored."""
        return (self.dtype, self.transposed, self.hidden, self.intermediate)

    @property
    def kernel_capable(self) -> bool:
        """True when the compiled kernel can compute this layout (given CPU tensors)."""
        return self.gate is not GateKind.MODULE and self.dtype in KERNEL_DTYPES


def describe_experts(experts: nn.Module) -> ExpertsSpec:
    """Read an experts module's layout. Raises NotImplementedError for layouts this forward does not handle."""
    if not experts.has_gate:
        raise NotImplementedError(f"{type(experts).__name__}: ungated experts (up_proj only) are not supported")
    if experts.has_post_expert_norm:
        raise NotImplementedError(f"{type(experts).__name__}: post-expert norms are not supported")
    if experts._is_expert_parallel:
        raise NotImplementedError(f"{type(experts).__name__}: expert parallelism is not supported")
    transposed = bool(experts.is_transposed)
    down = experts.down_proj  # [E, H, I], or [E, I, H] when transposed
    return ExpertsSpec(
        layer=getattr(experts, LAYER_ATTRIBUTE, None),
        num_experts=down.shape[0],
        hidden=down.shape[2] if transposed else down.shape[1],
        intermediate=down.shape[1] if transposed else down.shape[2],
        transposed=transposed,
        gate=_gate_kind(experts),
        alpha=float(getattr(experts, "alpha", 0.0)),
        limit=float(getattr(experts, "limit", 0.0)),
        dtype=down.dtype,
    )


def _gate_kind(experts: nn.Module) -> GateKind:
    """Which gate the module applies: by identity of its ``_apply_gate`` (and act_fn for the default gate)."""
    apply_gate = type(experts)._apply_gate
    if apply_gate is GptOssExperts._apply_gate:
        return GateKind.OSS_SWIGLU
    if apply_gate is _default_apply_gate and isinstance(experts.act_fn, (SiLUActivation, nn.SiLU)):
        return GateKind.SILU_HALVES
    return GateKind.MODULE


@dataclass
class LookaheadStats:
    """Gate look-ahead accuracy: experts predicted, routed (where a prediction existed) and both."""

    predicted: int = 0
    routed: int = 0
    correct: int = 0

    @property
    def recall(self) -> float | None:
        """Fraction of routed experts that were predicted; None before any prediction was scored."""
        return self.correct / self.routed if self.routed else None


@dataclass(frozen=True)
class RoutingPlan:
    """A call's (token, expert) assignments grouped by expert, ascending; tokens ascending within an expert."""

    expert_ids: list[int]  # routed experts
    starts: list[int]  # expert_ids[i] owns assignments [starts[i], starts[i] + counts[i])
    counts: list[int]
    token_ids: torch.Tensor  # [S] int64
    route_weights: torch.Tensor  # [S] fp32

    def groups(self, max_size: int | None) -> Iterator[range]:
        """Index ranges into ``expert_ids`` of at most ``max_size`` experts (all at once when ``None``)."""
        size = max_size or max(len(self.expert_ids), 1)
        for begin in range(0, len(self.expert_ids), size):
            yield range(begin, min(begin + size, len(self.expert_ids)))


HOST_PLAN_MAX_ASSIGNMENTS = 64
"""Up to this many (token, expert) assignments a call's routing is grouped on the host (see ``plan_routing``)."""


def plan_routing(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Group the [T, k] routing by expert. One host sync.

    Decode-sized calls (at most HOST_PLAN_MAX_ASSIGNMENTS assignments) copy the ids to the host once and sort them
    there: a few Python operations instead of argsort, bincount and a per-expert list of E entries on tensors.
    Larger ones group on the tensors and copy only the per-expert counts. Both give the same plan.
    """
    flat = top_k_index.reshape(-1)  # [S]
    if flat.numel() <= HOST_PLAN_MAX_ASSIGNMENTS:
        ids = flat.tolist()
        host_order = sorted(range(len(ids)), key=ids.__getitem__)  # stable: tokens ascending within an expert
        expert_ids, starts, counts = [], [], []
        for position, s in enumerate(host_order):
            if not expert_ids or ids[s] != expert_ids[-1]:
                expert_ids.append(ids[s])
                starts.append(position)
                counts.append(0)
            counts[-1] += 1
        order = torch.tensor(host_order, device=flat.device)
    else:
        order = torch.argsort(flat, stable=True)  # [S], assignments grouped by expert
        counts_all = torch.bincount(flat, minlength=num_experts).tolist()  # [E]
        starts_all = [0, *accumulate(counts_all)][:-1]
        expert_ids = [e for e, count in enumerate(counts_all) if count]
        starts, counts = [starts_all[e] for e in expert_ids], [counts_all[e] for e in expert_ids]
    return RoutingPlan(
        expert_ids=expert_ids,
        starts=starts,
        counts=counts,
        token_ids=order.div(top_k_index.shape[-1], rounding_mode="floor"),
        route_weights=top_k_weights.reshape(-1).index_select(0, order).float(),
    )


TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
KERNEL_MAX_TOKENS = 16
"""Unmeasured shapes: tokens per expert from which torch's path is the default (see `PathTable`)."""


@dataclass
class PathTable:
    """Measured compute paths: shape key -> {token bucket -> Path}; unmeasured shapes use the default below.

    A count of tokens uses the largest bucket not above it (counts above 64 use the 64 bucket). An unmeasured shape
    uses the kernel below ``kernel_max_tokens`` (KERNEL_MAX_TOKENS) tokens and torch from there (benchmarks/experts_kernel.py: in bf16 the
    kernel streams 0.9-1.0 of STREAM triad at one token, torch ~0.45; from 16 tokens torch's GEMM wins, 2x at
    64); ``ExpertsForward.calibrate`` replaces that default with measurements for the shape.
    """

    measured: dict[tuple, dict[int, Path]] = field(default_factory=dict)
    kernel_max_tokens: int = KERNEL_MAX_TOKENS
    # The answers of `choose` and `kernel_upto`, keyed with kernel_max_tokens and dropped by `record` (``measured``
    # changes through it): a decode step asks the same few questions at every layer.
    _chosen: dict[tuple, Path] = field(default_factory=dict, repr=False, compare=False)
    _upto: dict[tuple, int] = field(default_factory=dict, repr=False, compare=False)

    def choose(self, key: tuple, tokens: int) -> Path:
        """The path for ``tokens`` tokens on an expert of shape ``key``."""
        chosen = self._chosen.get((key, tokens, self.kernel_max_tokens))
        if chosen is None:
            chosen = self._chosen[(key, tokens, self.kernel_max_tokens)] = self._lookup(key, tokens)
        return chosen

    def _lookup(self, key: tuple, tokens: int) -> Path:
        by_bucket = self.measured.get(key)
        if not by_bucket:
            return Path.KERNEL if tokens < self.kernel_max_tokens else Path.TORCH
        bucket = max((b for b in by_bucket if b <= tokens), default=min(by_bucket))
        return by_bucket[bucket]

    def kernel_upto(self, key: tuple) -> int:
        """The most tokens per expert up to which `choose` gives the kernel at every count (from 1) for shape
        ``key``: 0 when it gives torch at one token, sys.maxsize when it never gives torch."""
        upto = self._upto.get((key, self.kernel_max_tokens))
        if upto is None:
            by_bucket = self.measured.get(key)
            if not by_bucket:
                upto = max(0, self.kernel_max_tokens - 1)
            else:
                upto = sys.maxsize
                for bucket in sorted(by_bucket):  # a bucket's path holds from it to the next one (from 1 for the first)
                    if by_bucket[bucket] is not Path.KERNEL:
                        upto = 0 if bucket == min(by_bucket) else bucket - 1
                        break
            self._upto[(key, self.kernel_max_tokens)] = upto
        return upto

    def record(self, key: tuple, bucket: int, path: Path) -> None:
        """Store the measured winner for one bucket."""
        self.measured.setdefault(key, {})[bucket] = path
        self._chosen.clear()
        self._upto.clear()


class ExpertsForward:
    """The experts forward to register with transformers (a callable; see ``register_experts_forward``).

    ``source`` supplies expert weights per (layer, expert) (default: the module's own parameters); ``paths``
    chooses kernel or torch per expert; ``use_kernel=False`` forces the pure-torch path. Not thread-safe: one
    instance serves one model-running thread (its fp32 scratch is reused across calls).
    """

    def __init__(
        self,
        source: ExpertWeightSource | None = None,
        paths: PathTable | None = None,
        use_kernel: bool = True,
    ) -> None:
        self.source = source if source is not None else StackedParameters()
        self.paths = paths if paths is not None else PathTable()
        self.kernel: Callable[..., None] | None = load_experts_kernel() if use_kernel else None
        # The same kernel taking a layer's [T, k] routing and stacked weights (see `_routes_in_one_call`).
        self.routed_kernel: Callable[..., torch.Tensor] | None = (kernel_op("experts_routed") if self.kernel is not None
                                                                  else None)
        self._specs: weakref.WeakKeyDictionary[nn.Module, ExpertsSpec] = weakref.WeakKeyDictionary()
        self._scratch = torch.empty(0)
        self._scratch_view = self._scratch  # the last shape's view into it (decode asks for the same one each layer)
        # Benchmark-only: replaces the router's choice, (layer, top_k_index, top_k_weights) -> (index, weights),
        # before anything sees it (benchmarks/trace_prefetch.py replays recorded routing through it). Outputs are
        # then not the model's; never set in serving.
        self.routing_override: Callable[[int | None, torch.Tensor, torch.Tensor],
                                        tuple[torch.Tensor, torch.Tensor]] | None = None
        # Called with (layer, top_k_index, top_k_weights) at every MoE layer: the activation tracer's tap.
        self.routing_observer: Callable[[int | None, torch.Tensor, torch.Tensor], None] | None = None
        # Gate look-ahead: layer -> (the next MoE layer, its router); see ``look_ahead``. Empty = off.
        self.lookahead: dict[int, tuple[int, nn.Module]] = {}
        self.lookahead_stats = LookaheadStats()
        self._predicted: dict[int, set[int]] = {}
        # Called with the layer once its first group of experts is held (pinned): where trace-driven priorities
        # and prefetches act (engine.trace.batch.BatchPrefetcher.plan). None = off.
        self.on_layer_held: Callable[[int | None], None] | None = None

    def spec(self, experts: nn.Module) -> ExpertsSpec:
        """The module's layout, read once and cached."""
        spec = self._specs.get(experts)
        if spec is None:
            spec = self._specs[experts] = describe_experts(experts)
        return spec

    @torch.no_grad()
    def __call__(
        self,
        experts: nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """sum_k top_k_weights[t, k] * expert_{top_k_index[t, k]}(hidden_states[t]) -> [T, H] in the input dtype."""
        spec = self.spec(experts)
        if self.routing_override is not None:
            top_k_index, top_k_weights = self.routing_override(spec.layer, top_k_index, top_k_weights)
        if self.routing_observer is not None:
            self.routing_observer(spec.layer, top_k_index, top_k_weights)
        hidden = hidden_states.contiguous()  # [T, H]
        if top_k_weights.dtype in KERNEL_DTYPES and self._routes_in_one_call(experts, spec, hidden, top_k_index):
            # The op sums in fp32 from zero and returns the sum in hidden's dtype, as the planned path below does.
            return self.routed_kernel(hidden, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj,
                                      experts.gate_up_proj_bias if experts.has_bias else None,
                                      experts.down_proj_bias if experts.has_bias else None, spec.transposed,
                                      int(spec.gate), spec.alpha, spec.limit)
        out = self._accumulator(hidden)  # [T, H] fp32, zeroed
        self._run_planned(experts, spec, hidden, top_k_index, top_k_weights, out)
        return out if hidden.dtype == torch.float32 else out.to(hidden.dtype)

    def _run_planned(self, experts: nn.Module, spec: ExpertsSpec, hidden: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, out: torch.Tensor) -> None:
        """The routing planned in Python and run group by group through the source (module docstring)."""
        plan = plan_routing(top_k_index, top_k_weights, spec.num_experts)
        self._score_prediction(spec.layer, plan.expert_ids)
        for number, group in enumerate(plan.groups(self.source.max_group_size(spec.layer))):
            ids = [plan.expert_ids[i] for i in group]
            with self.source.hold(experts, spec.layer, ids) as weights:
                if number == 0:
                    self.look_ahead(spec.layer, hidden)
                    if self.on_layer_held is not None:
                        self.on_layer_held(spec.layer)
                self._run_group(experts, spec, hidden, plan, group, weights, out)

    def _routes_in_one_call(self, experts: nn.Module, spec: ExpertsSpec, hidden: torch.Tensor,
                            top_k_index: torch.Tensor) -> bool:
        """Whether this call can run as one ``moeserve::experts_routed`` op, which groups the routing itself and
        gives what the plan below gives, bit for bit: the module's own resident stacks (the default source), every
        expert on the kernel (at most `PathTable.kernel_upto` tokens, what any expert can get), and nothing to do
        between holding the experts and computing them (no look-ahead, prediction or layer hook on this layer)."""
        return (self.routed_kernel is not None and type(self.source) is StackedParameters
                and self._kernel_applies(spec, hidden) and top_k_index.dtype == torch.int64
                and hidden.shape[0] <= self.paths.kernel_upto(spec.shape_key)
                and self.on_layer_held is None and spec.layer not in self.lookahead
                and spec.layer not in self._predicted and experts.down_proj.device.type == "cpu")

    def look_ahead(self, layer: int | None, hidden: torch.Tensor) -> None:
        """Gate look-ahead (HOBBIT): route this layer's input with the next MoE layer's router and ask the source
        to prefetch those experts, so their reads overlap this layer's compute and the next layer's attention.

        Called once this layer's first group is held (pinned), so a prefetch never evicts what it computes with.
        """
        if layer not in self.lookahead:
            return
        next_layer, router = self.lookahead[layer]
        _, _, indices = router(hidden)  # [T, k] the next router's choice for this layer's input
        predicted = sorted(set(indices.flatten().tolist()))
        self._predicted[next_layer] = set(predicted)
        self.source.prefetch(next_layer, predicted)

    def _score_prediction(self, layer: int | None, routed: Sequence[int]) -> None:
        """Compare the look-ahead's prediction for ``layer`` (if any) with the experts it routed to."""
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            self.lookahead_stats.routed += len(routed)
            self.lookahead_stats.correct += len(predicted.intersection(routed))
            self.lookahead_stats.predicted += len(predicted)

    def _accumulator(self, hidden: torch.Tensor) -> torch.Tensor:
        """A zeroed fp32 [T, H]: fresh when it is returned as is (fp32 input), else reused scratch."""
        if hidden.dtype == torch.float32:
            return torch.zeros_like(hidden)
        view = self._scratch_view
        if view.shape != hidden.shape or view.device != hidden.device:
            if self._scratch.numel() < hidden.numel() or self._scratch.device != hidden.device:
                self._scratch = torch.empty(hidden.numel(), dtype=torch.float32, device=hidden.device)
            view = self._scratch_view = self._scratch[: hidden.numel()].view(hidden.shape)
        return view.zero_()

    def _kernel_applies(self, spec: ExpertsSpec, hidden: torch.Tensor) -> bool:
        """Whether the kernel is built and computes this layout for this input (CPU, a kernel dtype)."""
        return (self.kernel is not None and spec.kernel_capable and hidden.device.type == "cpu"
                and hidden.dtype in KERNEL_DTYPES)

    def _run_group(
        self,
        experts: nn.Module,
        spec: ExpertsSpec,
        hidden: torch.Tensor,
        plan: RoutingPlan,
        group: range,
        weights: Sequence[ExpertWeights],
        out: torch.Tensor,
    ) -> None:
        """Add the group's experts into ``out``: kernel experts in one op call, torch experts one by one."""
        # Kernel where it is built, applies and was measured (or assumed) faster; torch otherwise.
        kernel_applies = self._kernel_applies(spec, hidden)
        paths = [self.paths.choose(spec.shape_key, plan.counts[i]) if kernel_applies else Path.TORCH for i in group]
        on_kernel = [(i, w) for i, w, path in zip(group, weights, paths) if path is Path.KERNEL]
        if on_kernel:
            self._kernel_experts(spec, hidden, plan, on_kernel, out)
        for i, w, path in zip(group, weights, paths):
            if path is Path.TORCH:
                begin, end = plan.starts[i], plan.starts[i] + plan.counts[i]
                torch_expert(experts, spec, hidden, plan.token_ids[begin:end], plan.route_weights[begin:end], w, out)

    def _kernel_experts(
        self,
        spec: ExpertsSpec,
        hidden: torch.Tensor,
        plan: RoutingPlan,
        experts: list[tuple[int, ExpertWeights]],
        out: torch.Tensor,
    ) -> None:
        """One ``moeserve::experts_group`` call over ``experts`` (plan index, weights)."""
        self.kernel(
            hidden,
            plan.token_ids,
            plan.route_weights,
            [plan.starts[i] for i, _ in experts],
            [plan.counts[i] for i, _ in experts],
            [w.gate_up for _, w in experts],
            [w.down for _, w in experts],
            [w.gate_up_bias for _, w in experts],
            [w.down_bias for _, w in experts],
            spec.transposed,
            int(spec.gate),
            spec.alpha,
            spec.limit,
            out,
        )

    def calibrate(
        self,
        experts: nn.Module,
        buckets: Sequence[int] = TOKEN_BUCKETS,
        trial_experts: int = 4,
    ) -> dict[int, Path]:
        """Measure kernel vs torch for this module's shape at each token bucket; record and return the winners.

        Each trial runs ``trial_experts`` distinct experts (so weights stream from memory, not cache) once to warm
        up and once timed. Does nothing (returns {}) when the kernel cannot serve this module.
        """
        spec = self.spec(experts)
        if self.kernel is None or not spec.kernel_capable or experts.down_proj.device.type != "cpu":
            return {}
        ids = list(range(min(trial_experts, spec.num_experts)))
        winners: dict[int, Path] = {}
        with self.source.hold(experts, spec.layer, ids) as weights:
            for tokens in buckets:
                timings = {path: self._time_path(experts, spec, weights, tokens, path) for path in Path}
                winners[tokens] = min(timings, key=timings.get)
                self.paths.record(spec.shape_key, tokens, winners[tokens])
                logger.debug("experts path %s tokens=%d: %s", spec.shape_key, tokens, timings)
        return winners

    @torch.no_grad()
    def _time_path(
        self, experts: nn.Module, spec: ExpertsSpec, weights: Sequence[ExpertWeights], tokens: int, path: Path
    ) -> float:
        """Seconds for one pass over ``weights`` with ``tokens`` tokens each, on ``path`` (after one warm-up)."""
        hidden = torch.randn(tokens, spec.hidden, dtype=spec.dtype)  # [n, H]
        token_ids = torch.arange(tokens)
        route_weights = torch.ones(tokens)
        out = torch.zeros(tokens, spec.hidden)
        plan = RoutingPlan([0], [0], [tokens], token_ids, route_weights)

        def run() -> None:
            for w in weights:
                if path is Path.KERNEL:
                    self._kernel_experts(spec, hidden, plan, [(0, w)], out)
                else:
                    torch_expert(experts, spec, hidden, token_ids, route_weights, w, out)

        return best_seconds(run, repeats=1)


def torch_expert(
    experts: nn.Module,
    spec: ExpertsSpec,
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    route_weights: torch.Tensor,
    weights: ExpertWeights,
    out: torch.Tensor,
) -> None:
    """The pure-torch path for one expert, in the module's dtype like the stock forward: out[tok] += rw * y."""
    x = hidden.index_select(0, token_ids).to(weights.gate_up.dtype)  # [n, H]
    h = x @ weights.gate_up if spec.transposed else F.linear(x, weights.gate_up)  # [n, 2I]
    if weights.gate_up_bias is not None:
        h = h + weights.gate_up_bias
    g = experts._apply_gate(h)  # [n, I]
    y = g @ weights.down if spec.transposed else F.linear(g, weights.down)  # [n, H]
    if weights.down_bias is not None:
        y = y + weights.down_bias
    out.index_add_(0, token_ids, y.float() * route_weights.unsqueeze(1))


def register_experts_forward(forward: ExpertsForward, name: str = EXPERTS_IMPLEMENTATION) -> str:
    """Register ``forward`` in transformers' ExpertsInterface; then ``model.set_experts_implementation(name)``."""
    ALL_EXPERTS_FUNCTIONS.register(name, forward)
    return name


_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def moe_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Each MoE layer's (tagged) router: the module beside that layer's experts (``gate`` or ``router``) that
    returns (logits, weights, indices), as every supported architecture's does."""
    routers: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        layer = getattr(module, LAYER_ATTRIBUTE, None)
        if layer is None:
            continue
        block = model.get_submodule(name.rsplit(".", 1)[0])
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        if isinstance(router, nn.Module) and hasattr(router, "weight"):
            routers[layer] = router
    return routers


def lookahead_routers(model: nn.Module) -> dict[int, tuple[int, nn.Module]]:
    """For each MoE layer (tagged), the next MoE layer and its router (`moe_routers`)."""
    routers = moe_routers(model)
    layers = sorted(routers)
    return {layer: (following, routers[following]) for layer, following in zip(layers, layers[1:])}


def is_experts_module(module: nn.Module) -> bool:
    """Modules decorated by transformers' ``use_experts_implementation`` (the ones our experts forward replaces)."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def tag_experts_layers(model: nn.Module) -> int:
    """Set ``moeserve_layer`` (the decoder layer index) on every experts module of ``model``; return how many.

    Experts modules are those transformers' ``use_experts_implementation`` decorated; the index is read from the
    module path (``...layers.<i>...``).
    """
    tagged = 0
    for name, module in model.named_modules():
        match = _LAYER_IN_NAME.search(name)
        if match and is_experts_module(module):
            setattr(module, LAYER_ATTRIBUTE, int(match.group(1)))
            tagged += 1
    return tagged
