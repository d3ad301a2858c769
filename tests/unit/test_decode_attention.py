"""Decode attention on the kernel (``torch.ops.moeserve.decode_attention``) against an fp64 reference, and the
paged attention function with and without it on mixed steps (decode tokens beside prompt chunks), over gathered
context rows and over the whole KV store read by slot."""

from __future__ import annotations

import math

import pytest
import torch

import engine.attention as attention
from engine.attention import BatchLayout, paged_attention_forward

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_REL_TOL = 1e-5  # fp32 products and sums, exp to < 2e-7: fp32 accuracy


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[tuple[int, int, int]],
              scale: float, window: int, sinks: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """fp64 attention of each span's query row over its context (its last ``window`` rows if > 0): {row: [H, dv]}."""
    heads, groups = query.shape[0], query.shape[0] // key.shape[0]
    rows = {}
    for row, first, length in spans:
        begin = first + max(0, length - window) if window > 0 else first
        k = key[:, begin : first + length].double().repeat_interleave(groups, dim=0)  # [H, c, d]
        v = value[:, begin : first + length].double().repeat_interleave(groups, dim=0)  # [H, c, dv]
        logits = torch.einsum("hd,hcd->hc", query[:, row].double(), k) * scale  # [H, c]
        if sinks is not None:
            logits = torch.cat([logits, sinks.double().reshape(heads, 1)], dim=1)
        weights = torch.softmax(logits, dim=1)[:, : k.shape[1]]
        rows[row] = torch.einsum("hc,hcd->hd", weights, v)
    return rows


def assert_close_to(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32 within FP32_REL_TOL of the largest value; bf16/fp16 within the one rounding to ``dtype`` on top."""
    scale = expected.abs().max().item()
    rounding = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    error = (out.double() - expected).abs()
    assert (error <= expected.abs() * rounding * 1.01 + FP32_REL_TOL * scale).all(), error.max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "value_dim"),
                         [(4, 4, 64, 64), (8, 2, 128, 128), (6, 1, 13, 13), (4, 2, 192, 128)],
                         ids=["mha", "gqa4", "mqa-odd-dim", "mla-dims"])
@pytest.mark.parametrize("window", [0, 5], ids=["full", "window5"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["nosinks", "sinks"])
def test_the_op_matches_fp64(experts_kernel, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                             value_dim: int, window: int, with_sinks: bool) -> None:
    torch.manual_seed(0)
    tokens, lengths = 7, [1, 3, 8, 40, 301]  # contexts of 1 row to past the vector width and a long one
    spans, first = [], 0
    for row, length in zip((0, 2, 3, 5, 6), lengths):
        spans.append((row, first, length))
        first += length
    query = torch.randn(tokens, heads, head_dim).to(dtype).transpose(0, 1)  # [H, T, d], strided like the model's
    key = torch.randn(kv_heads, first, head_dim).to(dtype)
    value = torch.randn(kv_heads, first, value_dim).to(dtype)
    sinks = torch.randn(heads) if with_sinks else None
    out = torch.full((tokens, heads, value_dim), float("nan"), dtype=dtype)
    scale = head_dim**-0.5
    torch.ops.moeserve.decode_attention(query, key, value, torch.tensor(spans), scale, window, sinks, None, out)
    expected = reference(query, key, value, spans, scale, window, sinks)
    for row in range(tokens):
        if row in expected:
            assert_close_to(out[row], expected[row], dtype)
        else:  # rows of no span are left alone
            assert out[row].isnan().all()
    # The same rows scattered over a larger store and read through slots: the same result, bit for bit.
    slots = torch.randperm(2 * first)[:first]
    store_key = torch.zeros(kv_heads, 2 * first, head_dim, dtype=dtype).index_copy_(1, slots, key)
    store_value = torch.zeros(kv_heads, 2 * first, value_dim, dtype=dtype).index_copy_(1, slots, value)
    by_slot = torch.full_like(out, float("nan"))
    torch.ops.moeserve.decode_attention(query, store_key, store_value, torch.tensor(spans), scale, window, sinks,
                                        slots, by_slot)
    assert torch.equal(by_slot.nan_to_num(), out.nan_to_num())


def test_the_op_refuses_bad_input(experts_kernel) -> None:
    query, key, value = torch.randn(4, 1, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out = torch.empty(1, 4, 8)
    op = torch.ops.moeserve.decode_attention
    with pytest.raises(RuntimeError, match="span 0 out of range"):
        op(query, key, value, torch.tensor([[0, 2, 4]]), 1.0, 0, None, None, out)  # rows 2..5 of 5
    with pytest.raises(RuntimeError, match="span 0 out of range"):
        op(query, key, value, torch.tensor([[0, 0, 4]]), 1.0, 0, None, torch.tensor([0, 1, 2]), out)  # 3 slots
    with pytest.raises(RuntimeError, match="slot 5 out of range"):
        op(query, key, value, torch.tensor([[0, 0, 2]]), 1.0, 0, None, torch.tensor([0, 5]), out)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(query, key.double(), value, torch.tensor([[0, 0, 5]]), 1.0, 0, None, None, out)
    with pytest.raises(RuntimeError, match="divide"):
        op(torch.randn(3, 1, 8), key, value, torch.tensor([[0, 0, 5]]), 1.0, 0, None, None, torch.empty(1, 3, 8))
    with pytest.raises(RuntimeError, match="sinks"):
        op(query, key, value, torch.tensor([[0, 0, 5]]), 1.0, 0, torch.randn(3), None, out)


def mixed_step(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, by_slot: bool = False):
    """A step of three requests: one decode token at position 20, a prompt chunk of 5 tokens at 9, a decode token
    at position 0; its layout and the model's query and key / value tensors: the gathered context rows, or
    ``by_slot`` a KV store of 4 blocks holding those rows in their slots."""
    torch.manual_seed(1)
    requests = [(20, 1, [3, 1]), (9, 5, [0]), (0, 1, [2])]  # (first new position, new tokens, block table)
    layout = BatchLayout.build(requests, block_size=16, by_slot=by_slot)
    tokens, rows = 7, len(layout.read_slots)
    query = torch.randn(1, tokens, heads, dim).to(dtype).transpose(1, 2)  # [1, H, T, d]
    key = torch.randn(1, kv_heads, rows, dim).to(dtype)
    value = torch.randn(1, kv_heads, rows, dim).to(dtype)
    if by_slot:
        store = torch.zeros(1, kv_heads, 4 * 16, dim, dtype=dtype)
        key, value = (store.clone().index_copy_(2, layout.read_slots, rows) for rows in (key, value))
    return layout, query, key, value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sliding_window", [None, 4], ids=["full", "window4"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["nosinks", "sinks"])
def test_paged_attention_on_the_kernel_equals_torch(experts_kernel, monkeypatch: pytest.MonkeyPatch,
                                                    dtype: torch.dtype, sliding_window: int | None,
                                                    with_sinks: bool) -> None:
    layout, query, key, value = mixed_step(heads=8, kv_heads=2, dim=64, dtype=dtype)
    assert layout.single_token_spans.tolist() == [[0, 0, 21], [6, 35, 1]]
    assert [span.q_start for span in layout.multi_token_spans] == [1]
    sinks = torch.randn(8).to(dtype) if with_sinks else None
    kwargs = dict(scaling=0.125, sliding_window=sliding_window, s_aux=sinks, moeserve_batch=layout)
    with torch.no_grad():
        on_kernel, _ = paged_attention_forward(None, query, key, value, None, **kwargs)
        monkeypatch.setattr(attention, "load_experts_kernel", lambda: None)
        on_torch, _ = paged_attention_forward(None, query, key, value, None, **kwargs)
    assert on_kernel.shape == on_torch.shape == (1, 7, 8, 64)
    tolerance = FP32_REL_TOL if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert ((on_kernel.double() - on_torch.double()).abs().max() <= tolerance * on_torch.abs().max()).item()
    # The prompt chunk's rows are torch's in both: bit for bit.
    assert torch.equal(on_kernel[:, 1:6], on_torch[:, 1:6])


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_paged_attention_by_slot_equals_gathered_rows(experts_kernel, monkeypatch: pytest.MonkeyPatch,
                                                      kernel: bool) -> None:
    if not kernel:
        monkeypatch.setattr(attention, "load_experts_kernel", lambda: None)
    kwargs = dict(scaling=0.125, sliding_window=6, s_aux=torch.randn(8))
    results = []
    for by_slot in (False, True):
        layout, query, key, value = mixed_step(heads=8, kv_heads=2, dim=64, dtype=torch.float32, by_slot=by_slot)
        with torch.no_grad():
            results.append(paged_attention_forward(None, query, key, value, None, moeserve_batch=layout,
                                                   **kwargs)[0])
    assert torch.equal(*results)


def test_the_kv_store_hands_over_its_storage_by_slot() -> None:
    store = attention.PagedKVStore(num_layers=1, num_slots=64)
    key, value = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 4)
    for by_slot in (False, True):
        store.layout = BatchLayout.build([(20, 1, [3, 1])], block_size=16, by_slot=by_slot)
        keys, values = store.update(key, value, 0)
        assert keys.shape == ((1, 2, 64, 8) if by_slot else (1, 2, 21, 8))
        assert values.shape[2] == keys.shape[2]
        # Position 20 is in the table's second block (block 1), offset 4: slot 20; gathered, it is context row 20.
        assert torch.equal(keys[0, :, 20], key[0, :, 0]) and torch.equal(values[0, :, 20], value[0, :, 0])
    store.layout = BatchLayout.build([(20, 1, [1, 3])], block_size=16, by_slot=True)  # block 3 this time: slot 52
    assert torch.equal(store.update(key, value, 0)[0][0, :, 52], key[0, :, 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_kv_write_op_equals_index_copy(experts_kernel, dtype: torch.dtype) -> None:
    """The store's one-call write (``moeserve::kv_write``) puts every row where two ``index_copy_`` calls put it,
    from rows laid out as the model hands them: keys fresh out of RoPE, values a transposed view."""
    generator = torch.Generator().manual_seed(3)
    heads, tokens, dim, value_dim, slots = 3, 5, 8, 6, 40
    keys, values = torch.zeros(heads, slots, dim, dtype=dtype), torch.zeros(heads, slots, value_dim, dtype=dtype)
    key = torch.randn(1, tokens, heads, dim, generator=generator).to(dtype).transpose(1, 2) * 2  # [1, H, T, d]
    value = torch.randn(1, tokens, heads, value_dim, generator=generator).to(dtype).transpose(1, 2)
    assert not key.is_contiguous() and not value.is_contiguous()
    write_slots = torch.tensor([7, 0, 39, 16, 8])
    torch.ops.moeserve.kv_write(keys, values, key, value, write_slots)
    expected_keys = torch.zeros_like(keys).index_copy_(1, write_slots, key[0])
    expected_values = torch.zeros_like(values).index_copy_(1, write_slots, value[0])
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    with pytest.raises(RuntimeError, match="slot 40 out of range"):
        torch.ops.moeserve.kv_write(keys, values, key, value, torch.tensor([1, 2, 3, 4, 40]))
    with pytest.raises(RuntimeError, match="differ in dtype"):
        torch.ops.moeserve.kv_write(keys, values, key.double(), value, write_slots)


def test_the_kv_store_writes_through_the_op_as_without_it(experts_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-token step written by the kernel's op and by ``index_copy_`` (kernel missing) leaves equal stores."""
    stores = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(attention, "load_experts_kernel", lambda: None)
        store = attention.PagedKVStore(num_layers=2, num_slots=64)
        store.layout = BatchLayout.build([(3, 4, [2, 0]), (17, 1, [1, 3])], block_size=16, by_slot=True)
        generator = torch.Generator().manual_seed(5)
        for layer in range(2):
            key = torch.randn(1, 5, 2, 8, generator=generator).transpose(1, 2)
            store.update(key, torch.randn(1, 5, 2, 4, generator=generator).transpose(1, 2), layer)
        stores.append(store)
    for ours, theirs in zip((*stores[0]._keys, *stores[0]._values), (*stores[1]._keys, *stores[1]._values)):
        assert torch.equal(ours, theirs)
    assert stores[0]._keys[0].abs().sum() > 0


def test_paged_attention_scale_defaults_to_inverse_sqrt_dim(experts_kernel) -> None:
    layout, query, key, value = mixed_step(heads=4, kv_heads=4, dim=16, dtype=torch.float32)
    with torch.no_grad():
        default, _ = paged_attention_forward(None, query, key, value, None, moeserve_batch=layout)
        explicit, _ = paged_attention_forward(None, query, key, value, None, scaling=1 / math.sqrt(16),
                                              moeserve_batch=layout)
    assert torch.equal(default, explicit)
