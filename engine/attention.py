"""Paged attention for transformers' own model code, through its registration interfaces.

The model runner flattens one step's requests into a single sequence of T new tokens (batch size 1) and
calls the transformers model with

- ``cache=PagedKVStore``: every attention layer calls ``cache.update(key, value, layer_idx, kwargs=...)``;
  the store writes the new tokens' key/value rows into their slots (block * 16 + offset; on the CPU one
  ``torch.ops.moeserve.kv_write`` call for both, else two ``index_copy_``) and returns, for
  each request of the step, the rows of its whole context, concatenated request after request. Rows are
  whatever the layer caches — heads x head_dim for most models, DeepSeek's single-head compressed latent
  and rotary key — so per-layer storage is allocated on first use with the shapes it is given. In a step
  laid out ``by_slot`` the store returns the layer's whole storage instead, and attention reads each context
  through ``read_slots`` in place: no gathered copy of every context at every layer (the runner chooses it on
  the CPU for the architectures whose attention takes the cached rows as they are: not DeepSeek's, which
  expands its cached latents after the update, `GATHERED_CACHE_MODEL_TYPES`).
- ``attn_implementation="moeserve_paged"`` (registered with ``AttentionInterface``): attention computed
  request by request over those contexts, so no query ever sees another request's keys; causal within a
  request, a sliding window where the layer has one, gpt_oss's attention sinks where it has them. On the CPU,
  every request with one new token this step (decode) is served by one call of the compiled kernel's
  ``torch.ops.moeserve.decode_attention`` (engine.offload.kernels; torch's SDPA costs 2-13 x more per call at
  decode sizes: benchmarks/decode_attention.py), as ``decode_attention_rows``, which takes the model's
  [1, heads, rows, dim] tensors and allocates the output itself; requests with more new tokens (prompt chunks), other devices
  and a missing kernel take ``F.scaled_dot_product_attention``.
- ``moeserve_batch=BatchLayout``: the step's layout, passed through the model's ``**kwargs`` to every
  attention call.

Since this attention is not registered as a mask function, transformers builds no mask of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from engine.offload.kernels import KERNEL_DTYPES, kernel_op, load_experts_kernel

ATTENTION_NAME = "moeserve_paged"
GATHERED_CACHE_MODEL_TYPES = frozenset({"deepseek_v2", "deepseek_v3"})
"""Architectures whose attention transforms what the cache returns before attending (DeepSeek expands its cached
latents into keys and values with ``expand_kv``): their steps gather the context rows, since expanding a whole
store at every layer would cost far more than the gather."""


@dataclass(frozen=True)
class RequestSpan:
    """One request's share of a step: new query tokens [q_start, q_end) of the flattened batch, context rows
    [k_start, k_end) of the gathered keys, and the position of its first new token (= context before it)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    first_position: int


@dataclass(frozen=True)
class BatchLayout:
    """Where each request's tokens and context live in one step.

    ``write_slots[t]`` is the KV slot of new token t; ``read_slots`` lists, request after request, the slots of
    every position of each request's context (earlier tokens and this step's), in position order. ``by_slot``:
    the KV store hands attention its whole storage and attention reads the contexts through ``read_slots``
    (context row r is storage row ``read_slots[r]``), rather than a gathered copy whose row r is that row.
    """

    spans: tuple[RequestSpan, ...]
    write_slots: torch.Tensor  # [T] int64
    read_slots: torch.Tensor  # [sum of context lengths] int64
    by_slot: bool = False

    @classmethod
    def build(cls, requests: Sequence[tuple[int, int, Sequence[int]]], block_size: int,
              device: torch.device | str = "cpu", by_slot: bool = False) -> BatchLayout:
        """From (first new position, number of new tokens, block table) per request, in batch order; the slot
        tensors on ``device`` (the KV store's)."""
        spans, write, read = [], [], []
        q = k = 0
        for first_position, num_new, block_table in requests:
            context = first_position + num_new
            slots = _slots(block_table, context, block_size)
            spans.append(RequestSpan(q, q + num_new, k, k + context, first_position))
            write.append(slots[first_position:])
            read.append(slots)
            q, k = q + num_new, k + context
        return cls(tuple(spans), torch.cat(write).to(device), torch.cat(read).to(device), by_slot)

    @cached_property
    def single_token_spans(self) -> torch.Tensor:
        """[S, 3] int64 on the CPU: (query row, first context row, context length) of each request with one new
        token this step, the rows ``torch.ops.moeserve.decode_attention`` serves (computed once per step)."""
        rows = [(span.q_start, span.k_start, span.k_end - span.k_start) for span in self.spans
                if span.q_end - span.q_start == 1]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    @cached_property
    def multi_token_spans(self) -> tuple[RequestSpan, ...]:
        """The requests with more than one new token this step (prompt chunks)."""
        return tuple(span for span in self.spans if span.q_end - span.q_start > 1)


def _slots(block_table: Sequence[int], length: int, block_size: int) -> torch.Tensor:
    """Slots of positions 0..length-1 through ``block_table``: [length] int64."""
    blocks = torch.as_tensor(block_table[: (length + block_size - 1) // block_size], dtype=torch.int64)
    offsets = torch.arange(block_size, dtype=torch.int64)
    return (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)[:length]


class PagedKVStore:
    """The KV tensors of every layer, indexed by slot; block bookkeeping lives in engine.kv_cache.

    Storage of a layer is allocated on its first update ([heads, num_slots, dim] for the key and the value
    separately, each with its own shape and the incoming dtype, on the incoming rows' device: the model's) and
    reused for the life of the store. Heads outermost, like the model's [1, heads, T, dim] rows: writes are one
    ``index_copy_`` and the gathered context comes out of one ``index_select`` already in the layout attention
    reads, with no transposed copies.
    """

    def __init__(self, num_layers: int, num_slots: int) -> None:
        self.num_slots = num_slots
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self.layout: BatchLayout | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of KV storage allocated so far."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values) if t is not None)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's rows, return every request's context rows (the whole storage in a ``by_slot`` step).

        key: [1, heads_k, T, dim_k], value: [1, heads_v, T, dim_v] -> ([1, heads_k, R, dim_k], [1, heads_v, R, dim_v])
        with R the sum of the step's context lengths (BatchLayout.read_slots), or R = num_slots ``by_slot``.
        """
        layout = self.layout
        if layout is None:
            raise RuntimeError("PagedKVStore.update called outside a step (no BatchLayout set)")
        keys = self._storage(self._keys, layer_idx, key)
        values = self._storage(self._values, layer_idx, value)
        if key.is_cpu and key.stride(-1) == 1 and value.stride(-1) == 1 and load_experts_kernel() is not None:
            kernel_op("kv_write")(keys, values, key, value, layout.write_slots)  # both in one op call
        else:
            keys.index_copy_(1, layout.write_slots, key[0])
            values.index_copy_(1, layout.write_slots, value[0])
        if layout.by_slot:
            return keys[None], values[None]
        return keys.index_select(1, layout.read_slots)[None], values.index_select(1, layout.read_slots)[None]

    def _storage(self, tensors: list[torch.Tensor | None], layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
        """The layer's [heads, num_slots, dim] tensor, allocated on first use with ``rows``' shape and dtype."""
        storage = tensors[layer_idx]
        if storage is None:
            _, heads, _, dim = rows.shape
            storage = torch.zeros(heads, self.num_slots, dim, dtype=rows.dtype, device=rows.device)
            tensors[layer_idx] = storage
        return storage


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    moeserve_batch: BatchLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of each request's new tokens over its own context.

    query: [1, H, T, d], key: [1, Hk, R, d], value: [1, Hk, R, dv] (Hk divides H) -> ([1, T, H, dv], None).
    ``sliding_window`` w lets position p see positions > p - w (transformers' convention); ``s_aux`` are
    gpt_oss's per-head sink logits, which join the softmax and are then dropped. In a ``by_slot`` step key and
    value are the whole KV store's (R = its slots), read through ``moeserve_batch.read_slots``.
    """
    layout = moeserve_batch
    if layout is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs the step's BatchLayout (moeserve_batch)")
    if not _kernel_serves(query, key, value):
        outputs = [_span_attention(query, *_span_rows(key, value, span, layout), span, scaling, sliding_window, s_aux)
                   for span in layout.spans]
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None
    # One call for every decode token's row of the new [1, T, H, dv] output (none in a step of prompt chunks only).
    out = kernel_op("decode_attention_rows")(
        query, key, value, layout.single_token_spans, scaling if scaling is not None else query.shape[3] ** -0.5,
        sliding_window or 0, s_aux.float().contiguous() if s_aux is not None else None,
        layout.read_slots if layout.by_slot else None)
    for span in layout.multi_token_spans:
        out[:, span.q_start : span.q_end] = _span_attention(query, *_span_rows(key, value, span, layout), span,
                                                            scaling, sliding_window, s_aux).transpose(1, 2)
    return out, None


def _span_rows(key: torch.Tensor, value: torch.Tensor, span: RequestSpan,
               layout: BatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's context rows of ``key`` and ``value``: [1, Hk, c, d], [1, Hk, c, dv] (gathered through its
    slots in a ``by_slot`` step, else a slice of the gathered rows)."""
    if layout.by_slot:
        slots = layout.read_slots[span.k_start : span.k_end]
        return key.index_select(2, slots), value.index_select(2, slots)
    return key[:, :, span.k_start : span.k_end], value[:, :, span.k_start : span.k_end]


def _kernel_serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``torch.ops.moeserve.decode_attention`` takes these tensors: on the CPU, one kernel dtype, no
    autograd, the kernel built."""
    return (query.is_cpu and query.dtype in KERNEL_DTYPES and key.dtype == value.dtype == query.dtype
            and not torch.is_grad_enabled() and load_experts_kernel() is not None)


def _span_attention(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: RequestSpan,
                    scaling: float | None, sliding_window: int | None, s_aux: torch.Tensor | None) -> torch.Tensor:
    """One request's attention through torch over its context rows ``k`` [1, Hk, c, d], ``v`` [1, Hk, c, dv]:
    [1, H, t, dv]."""
    q = query[:, :, span.q_start : span.q_end]
    mask = _span_mask(span, sliding_window, query.device)
    groups = query.shape[1] // k.shape[1]
    if s_aux is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    return _attention_with_sinks(q, k, v, mask, scaling, s_aux, groups)


def _span_mask(span: RequestSpan, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """[t, c] bool, True where new token i (position first_position + i) may see context position j; None = all."""
    num_new, context = span.q_end - span.q_start, span.k_end - span.k_start
    if num_new == 1 and (sliding_window is None or context <= sliding_window):
        return None
    query_positions = torch.arange(span.first_position, span.first_position + num_new, device=device)[:, None]
    key_positions = torch.arange(context, device=device)[None, :]
    mask = key_positions <= query_positions
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask


def _attention_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    sinks: torch.Tensor, groups: int,
) -> torch.Tensor:
    """Eager attention whose softmax includes one extra logit per head (gpt_oss); [1, H, t, dv]."""
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # [1, H, t, c]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.reshape(1, -1, 1, 1).expand(1, -1, scores.shape[2], 1).to(scores.dtype)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
