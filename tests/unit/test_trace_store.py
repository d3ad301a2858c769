"""The shared trace store: growth, merging, the capacity bound, matching, and atomic versioned persistence
(with the transition statistics, and of version 1 files without them)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from engine.trace.format import read_traces
from engine.trace.predictor import TransitionStatistics
from engine.trace.store import FORMAT_NAME, FORMAT_VERSION, TraceStore

DATA = Path(__file__).resolve().parents[1] / "data"


def one_hot(rows: list[list[int]], num_experts: int = 4) -> torch.Tensor:
    """[L, E] counts: one activation of each listed expert per layer."""
    matrix = torch.zeros(len(rows), num_experts)
    for layer, experts in enumerate(rows):
        matrix[layer, experts] = 1.0
    return matrix


def decode_matrix(request) -> torch.Tensor:
    """A real request's decode activation matrix [L, E]."""
    header = request.header
    matrix = torch.zeros(header.num_layers, header.num_experts)
    for step in request.steps:
        if step.phase == "decode":
            for layer, experts in enumerate(step.experts):
                matrix[layer, list(experts)] += 1
    return matrix


def test_distinct_requests_grow_the_store_and_similar_ones_merge() -> None:
    store = TraceStore(num_layers=2, num_experts=4, merge_threshold=0.9)
    assert store.add(one_hot([[0], [1]])) == 0
    assert store.add(one_hot([[2], [3]])) == 1
    assert (len(store), store.requests_seen) == (2, 2)
    # The same shape scaled (more tokens) is cosine 1: it merges into entry 0 instead of growing the store.
    assert store.add(3 * one_hot([[0], [1]])) == 0
    assert (len(store), store.requests_seen) == (2, 3)
    assert store.add(torch.zeros(2, 4)) == -1 and len(store) == 2


def test_real_requests_grow_the_store_across_adds() -> None:
    requests = read_traces(DATA / "mixtral-mario-2req.jsonl")
    store = TraceStore(32, 8)
    for count, request in enumerate(requests, start=1):
        store.add(decode_matrix(request))
        assert len(store) == count  # a HumanEval and a GSM8K answer are different kinds of request


def test_capacity_bound_evicts_the_least_recently_useful_entry() -> None:
    store = TraceStore(num_layers=1, num_experts=4, capacity=2, merge_threshold=0.99)
    store.add(one_hot([[0]]))
    store.add(one_hot([[1]]))
    # Entry 0 (expert 0) is used by a match; adding a third kind evicts entry 1, the least recently useful.
    assert store.match(one_hot([[0]]), layers_seen=1).argmax().item() == 0
    store.add(one_hot([[2]]))
    assert len(store) == 2
    remaining = {int(store.match(one_hot([[e]]), 1).argmax()) for e in (0, 2)}
    assert remaining == {0, 2}
    assert store.match(one_hot([[1]]), 1) is None  # nothing left resembles expert 1


def test_match_weights_the_entries_by_similarity_and_the_layers_by_distance() -> None:
    store = TraceStore(num_layers=3, num_experts=4, merge_threshold=1.1, decay=0.1, top_matches=2)
    store.add(one_hot([[0], [0], [2]]))
    store.add(one_hot([[1], [0], [3]]))
    # Layer 1 (seen last) agrees with both; layer 0 decides, weighted 0.1: the first entry dominates.
    prediction = store.match(one_hot([[0], [0], []]), layers_seen=2)
    assert prediction.shape == (3, 4)
    assert prediction[2, 2] > prediction[2, 3] > 0
    assert torch.allclose(prediction.sum(dim=1), torch.ones(3, dtype=prediction.dtype))
    assert store.layer_weights(2).tolist() == pytest.approx([0.1, 1.0, 0.01])
    assert TraceStore(3, 4).match(one_hot([[0], [0], [2]]), 1) is None


def test_store_survives_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "state" / "store.safetensors"
    store = TraceStore(num_layers=2, num_experts=4)
    store.add(one_hot([[0], [1]]))
    store.add(one_hot([[2], [3]]))
    store.save(path)
    loaded = TraceStore.load(path, 2, 4)
    assert (len(loaded), loaded.requests_seen) == (2, 2)
    query = one_hot([[2], []])
    assert torch.equal(loaded.match(query, 1), store.match(query, 1))
    loaded.add(one_hot([[1], [2]]))  # it keeps growing after a restart
    assert len(loaded) == 3
    assert [p.name for p in path.parent.iterdir()] == ["store.safetensors"]  # no temporary file left behind


def test_missing_file_gives_an_empty_store(tmp_path: Path) -> None:
    assert len(TraceStore.load(tmp_path / "absent.safetensors", 2, 4)) == 0


@pytest.mark.parametrize("content", [b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_file_is_moved_aside_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "store.safetensors"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="engine.trace.store"):
        store = TraceStore.load(path, 2, 4)
    assert len(store) == 0 and not path.exists()
    aside = list(tmp_path.glob("store.safetensors.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert "unusable" in caplog.text and aside[0].name in caplog.text
    store.add(one_hot([[0], [1]]))
    store.save(path)  # the server can persist again at once
    assert len(TraceStore.load(path, 2, 4)) == 1


def test_another_models_store_or_version_is_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "store.safetensors"
    store = TraceStore(num_layers=2, num_experts=4)
    store.add(one_hot([[0], [1]]))
    store.save(path)
    assert len(TraceStore.load(path, 3, 4)) == 0
    assert not path.exists() and list(tmp_path.glob("store.safetensors.corrupt-*"))
    store.save(path)
    payload = path.read_bytes()
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    assert header["__metadata__"]["format"] == FORMAT_NAME
    header["__metadata__"]["version"] = "999"
    encoded = json.dumps(header).encode()
    encoded += b" " * (size - len(encoded)) if len(encoded) <= size else b""
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + payload[8 + size :])
    assert len(TraceStore.load(path, 2, 4)) == 0


def test_a_larger_saved_store_is_cut_to_the_capacity(tmp_path: Path) -> None:
    path = tmp_path / "store.safetensors"
    store = TraceStore(num_layers=1, num_experts=4, merge_threshold=1.1)
    for expert in range(4):
        store.add(one_hot([[expert]]))
    store.save(path)
    assert len(TraceStore.load(path, 1, 4, capacity=2)) == 2


def learned_statistics(max_offset: int = 2) -> TransitionStatistics:
    """Statistics of 2 layers x 4 experts after a few top-2 decode tokens."""
    stats = TransitionStatistics(2, 4, max_offset=max_offset, top_k=2)
    previous = None
    for token in range(7):
        current = [[token % 4, (token + 1) % 4], [(token * 3) % 4, (token * 3 + 2) % 4]]
        stats.observe(current, previous)
        previous = current
    return stats


def test_transition_statistics_survive_save_and_load_with_the_store(tmp_path: Path) -> None:
    path = tmp_path / "store.safetensors"
    store, stats = TraceStore(2, 4), learned_statistics()
    store.add(one_hot([[0], [1]]))
    store.save(path, stats)
    restored = TransitionStatistics(2, 4, max_offset=2, top_k=2)
    loaded = TraceStore.load(path, 2, 4, transitions=restored)
    assert len(loaded) == 1 and restored.tokens == stats.tokens == 7
    for name, tensor in stats.state_tensors().items():
        assert torch.equal(restored.state_tensors()[name], tensor), name
    # Integer counts over a prior of 2 (smoothing 4 x top_k 2 / 4 experts): the sums are exact, so are the logs.
    assert torch.equal(restored.counts, stats.counts) and torch.equal(restored.frequency, stats.frequency)
    assert stats.state_tensors()["frequency_counts"].sum() == 7 * 2 * 2, "the prior is not saved as counts"
    # Loaded under another prior (smoothing), the counts are the file's and the prior is the new object's.
    other_prior = TransitionStatistics(2, 4, max_offset=2, smoothing=1.0, top_k=2)
    TraceStore.load(path, 2, 4, transitions=other_prior)
    assert torch.equal(other_prior.state_tensors()["transition_counts"], stats.state_tensors()["transition_counts"])
    assert not torch.equal(other_prior.frequency, restored.frequency)
    # A store-only reader ignores the statistics in the file.
    assert len(TraceStore.load(path, 2, 4)) == 1


def test_a_version_1_file_loads_and_the_statistics_start_empty(tmp_path: Path) -> None:
    path = tmp_path / "store.safetensors"
    store = TraceStore(2, 4)
    store.add(one_hot([[0], [1]]))
    store.add(one_hot([[2], [3]]))
    path.write_bytes(save_safetensors(  # what version 1 wrote: the matrices alone
        {"matrices": store._matrices, "merged": store._merged, "last_used": store._last_used},
        metadata={"format": FORMAT_NAME, "version": "1", "num_layers": "2", "num_experts": "4", "clock": "2"}))
    stats = TransitionStatistics(2, 4, max_offset=2, top_k=2)
    loaded = TraceStore.load(path, 2, 4, transitions=stats)
    assert (len(loaded), loaded.requests_seen) == (2, 2) and path.exists()
    assert stats.tokens == 0 and not stats.state_tensors()["transition_counts"].any()
    loaded.save(path, learned_statistics())  # the next save writes the current version, statistics included
    assert _metadata(path)["version"] == str(FORMAT_VERSION) == "2"
    assert len(TraceStore.load(path, 2, 4, transitions=stats)) == 2 and stats.tokens == 7


@pytest.mark.parametrize("shape", [(2, 4, 3), (3, 4, 2), (2, 8, 2)])
def test_statistics_of_another_shape_make_the_file_foreign(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, shape: tuple[int, int, int]
) -> None:
    path = tmp_path / "store.safetensors"
    store = TraceStore(2, 4)
    store.add(one_hot([[0], [1]]))
    store.save(path, learned_statistics(max_offset=2))
    layers, experts, max_offset = shape
    stats = TransitionStatistics(layers, experts, max_offset=max_offset, top_k=2)
    with caplog.at_level(logging.WARNING, logger="engine.trace.store"):
        loaded = TraceStore.load(path, layers, experts, transitions=stats)
    assert len(loaded) == 0 and stats.tokens == 0 and not stats.state_tensors()["frequency_counts"].any()
    assert not path.exists() and len(list(tmp_path.glob("store.safetensors.corrupt-*"))) == 1
    assert "unusable" in caplog.text


def test_restoring_statistics_of_another_shape_changes_nothing() -> None:
    stats = learned_statistics(max_offset=2)
    before = stats.state_tensors()
    with pytest.raises(ValueError, match="max_offset 2"):
        stats.restore(learned_statistics(max_offset=1).state_tensors())
    negative = {**before, "frequency_counts": -before["frequency_counts"] - 1}
    with pytest.raises(ValueError, match="negative"):
        stats.restore(negative)
    after = stats.state_tensors()
    assert all(torch.equal(after[name], before[name]) for name in before) and stats.tokens == 7


def _metadata(path: Path) -> dict[str, str]:
    payload = path.read_bytes()
    size = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + size])["__metadata__"]
