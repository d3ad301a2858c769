"""The trace store: a bounded set of past requests' expert activation matrices, shared across requests.

Entries are layer-normalized activation matrices ([num_layers, num_experts], each non-empty row summing to 1:
which share of a layer's activations went to each expert), MoE-Infinity's EAMs.

- Similarity: cosine between two matrices flattened, each row weighted (`layer_weights`): in `match`, the
  layers nearest to the frontier of what the request has run weigh most (``decay ** distance``), layers not yet
  seen weigh 0; in `add`, every layer weighs 1.
- `add`: a finished request's matrix merges into its most similar entry when the similarity is at least
  ``merge_threshold`` (the entry becomes the count-weighted mean of the matrices merged into it, re-normalized
  per layer), else it becomes a new entry. A full store first evicts its least recently useful entry: each entry
  carries the logical time it was last inserted, merged into or the best match of a `match`; the oldest goes
  (ties: the lowest index). Merging keeps recurring request kinds in one entry, so the capacity holds distinct
  kinds, and eviction by last usefulness lets the store follow a changing workload.
- `match(partial, layers_seen)`: the ``top_matches`` most similar entries (positive similarity only), weighted
  by their similarity, averaged into one prediction: per layer, the expected share of each expert.
- Persistence: `save` writes safetensors (tensors ``matrices`` [N, L, E] float64, ``merged`` [N] float64 (files of
  float32 ones, as earlier versions wrote, load as well),
  ``last_used`` [N] int64, and, given the predictor's `TransitionStatistics`, their `state_tensors`:
  ``transition_counts`` [max_offset + 1, L, E, E], ``frequency_counts`` [L, E], ``transition_tokens`` [], int64;
  metadata ``format``, ``version``, ``num_layers``, ``num_experts``, ``clock``) to a temporary file in the same
  directory, fsyncs it, renames it over the target and fsyncs the directory: what past requests taught, the
  matrices and the statistics, lives in one file that is either the old or the new one. `load` of a missing
  file gives an empty store; of a file it cannot use (unreadable, not this format or a readable version,
  another model's shape, statistics of another shape — layers, experts, ``max_offset`` — than the ones to
  restore) logs a warning, renames the file to ``<name>.corrupt-<UTC timestamp>`` and gives an empty store and
  untouched (empty) statistics. Version 1 files (matrices only) still load; the statistics then start empty.
  No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

if TYPE_CHECKING:
    from engine.trace.predictor import TransitionStatistics

logger = logging.getLogger(__name__)

FORMAT_NAME = "moeserve-trace-store"
FORMAT_VERSION = 2
"""Version 2 added the transition statistics; version 1 (the matrices alone) still loads."""
READABLE_VERSIONS = ("1", "2")
STATISTICS_TENSORS = ("transition_counts", "frequency_counts", "transition_tokens")
DEFAULT_CAPACITY = 256
DEFAULT_MERGE_THRESHOLD = 0.95
DEFAULT_DECAY = 0.8
DEFAULT_TOP_MATCHES = 4


class TraceStore:
    """Bounded, shared store of layer-normalized activation matrices (module docstring for the design).

    Holds CPU tensors only; not thread-safe (the engine's step thread owns it).
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        capacity: int = DEFAULT_CAPACITY,
        merge_threshold: float = DEFAULT_MERGE_THRESHOLD,
        decay: float = DEFAULT_DECAY,
        top_matches: int = DEFAULT_TOP_MATCHES,
    ) -> None:
        if min(num_layers, num_experts, capacity, top_matches) < 1:
            raise ValueError("num_layers, num_experts, capacity and top_matches must be positive")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.capacity = capacity
        self.merge_threshold = merge_threshold
        self.decay = decay
        self.top_matches = top_matches
        # float64 throughout: similarities then agree to ~1e-16 across CPUs whose vector reductions sum in
        # different orders (in float32 the held-out store recall of tests/unit/test_replay_policies.py came out
        # 0.546 on an AVX-512 machine and 0.545 on an AVX2 one)
        self._matrices = torch.zeros(0, num_layers, num_experts, dtype=torch.float64)  # [N, L, E], rows sum to 1 or 0
        self._merged = torch.zeros(0, dtype=torch.float64)  # [N] how many requests each entry averages
        self._last_used = torch.zeros(0, dtype=torch.int64)  # [N]
        self._clock = 0

    def __len__(self) -> int:
        return self._matrices.shape[0]

    @property
    def requests_seen(self) -> int:
        """How many request matrices the entries average, all together."""
        return int(self._merged.sum().item())

    def add(self, matrix: torch.Tensor) -> int:
        """Enter a finished request's activation counts ``matrix`` [L, E]; returns the index of its entry.

        An all-zero matrix is ignored (returns -1). ValueError for a wrong shape or negative counts.
        """
        normalized = self._normalized(matrix)
        if not normalized.any():
            return -1
        self._clock += 1
        if len(self):
            similarity = _cosine(self._matrices, normalized, torch.ones(self.num_layers, dtype=torch.float64))
            best = int(similarity.argmax())
            if similarity[best] >= self.merge_threshold:
                return self._merge(best, normalized)
        return self._insert(normalized)

    def match(self, partial: torch.Tensor, layers_seen: int) -> torch.Tensor | None:
        """Predicted per-layer expert shares [L, E] (rows sum to 1) for a request whose counts so far are
        ``partial`` [L, E] and whose current step has run layers ``[0, layers_seen)``.

        None when the store is empty or nothing in it resembles the request (no positive similarity).
        """
        normalized = self._normalized(partial)
        if not len(self) or not normalized.any():
            return None
        similarity = _cosine(self._matrices, normalized, self.layer_weights(layers_seen))
        top = torch.topk(similarity, min(self.top_matches, len(self)))
        weights = top.values.clamp(min=0.0)
        if not weights.any():
            return None
        self._clock += 1
        self._last_used[top.indices[0]] = self._clock
        prediction = torch.einsum("n,nle->le", weights, self._matrices[top.indices]) / weights.sum()
        return prediction

    def layer_weights(self, layers_seen: int) -> torch.Tensor:
        """Per-layer weight of the similarity [L]: ``decay ** (distance to layer layers_seen - 1)``, wrapping
        around (the layers after the frontier were last seen one step ago); all ones when ``layers_seen`` is 0."""
        if layers_seen <= 0:
            return torch.ones(self.num_layers, dtype=torch.float64)
        layers = torch.arange(self.num_layers)
        distance = (layers_seen - 1 - layers) % self.num_layers
        return self.decay ** distance.double()

    def save(self, path: str | Path, transitions: TransitionStatistics | None = None) -> None:
        """Write the store, and ``transitions`` if given, to ``path`` atomically (temp file, fsync, rename,
        directory fsync)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"matrices": self._matrices.contiguous(), "merged": self._merged.contiguous(),
                   "last_used": self._last_used.contiguous()}
        if transitions is not None:
            tensors.update(transitions.state_tensors())
        payload = save_safetensors(
            tensors,
            metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "num_layers": str(self.num_layers),
                      "num_experts": str(self.num_experts), "clock": str(self._clock)},
        )
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)
        logger.info("saved the trace store (%d entries%s) to %s", len(self),
                    f", statistics of {transitions.tokens} tokens" if transitions is not None else "", path)

    @classmethod
    def load(cls, path: str | Path, num_layers: int, num_experts: int,
             transitions: TransitionStatistics | None = None, **options: float) -> TraceStore:
        """The store saved at ``path`` for a model of this shape (``options``: the constructor's keywords); the
        file's statistics, if it holds any, are restored into ``transitions`` when given (fresh statistics of
        the shape the caller wants; a file without statistics leaves them empty).

        A missing file gives an empty store; an unusable one a warning, the file moved aside, an empty store and
        ``transitions`` untouched. Entries beyond ``capacity`` (a store saved with a larger one) are evicted,
        least recently useful first.
        """
        store = cls(num_layers, num_experts, **options)
        path = Path(path)
        if not path.exists():
            logger.info("no trace store at %s yet: starting empty", path)
            return store
        try:
            store._restore(path.read_bytes(), transitions)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.replace(path, aside)
            logger.warning("trace store %s is unusable (%s): moved it to %s and starting empty", path, error, aside)
            return cls(num_layers, num_experts, **options)
        logger.info("loaded the trace store from %s: %d entries%s", path, len(store),
                    f", statistics of {transitions.tokens} tokens" if transitions is not None else "")
        return store

    def _restore(self, payload: bytes, transitions: TransitionStatistics | None) -> None:
        """Fill this (empty) store, and ``transitions`` if given, from a saved payload; ValueError/KeyError if
        it is not a usable one (``transitions`` then unchanged)."""
        metadata = _safetensors_metadata(payload)
        if metadata.get("format") != FORMAT_NAME or metadata.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"not a {FORMAT_NAME} file of version {' or '.join(READABLE_VERSIONS)}")
        tensors = load_safetensors(payload)
        matrices, merged, last_used = tensors["matrices"], tensors["merged"], tensors["last_used"]
        count = matrices.shape[0]
        if (matrices.dim() != 3 or tuple(matrices.shape[1:]) != (self.num_layers, self.num_experts)
                or tuple(merged.shape) != (count,) or tuple(last_used.shape) != (count,)):
            raise ValueError(f"entries of shape {tuple(matrices.shape)} do not fit a model of {self.num_layers} "
                             f"layers and {self.num_experts} experts")
        if not torch.isfinite(matrices).all() or (matrices < 0).any():
            raise ValueError("entries hold negative or non-finite shares")
        clock = int(metadata["clock"])
        if transitions is not None and metadata["version"] == "1":
            logger.info("trace store file of version 1: no transition statistics in it, they start empty")
        if transitions is not None and any(name in tensors for name in STATISTICS_TENSORS):
            transitions.restore(tensors)  # last: a file refused leaves the statistics as they were
        self._matrices, self._merged, self._last_used = matrices.double(), merged.double(), last_used.long()
        self._clock = clock
        while len(self) > self.capacity:
            self._remove(int(self._last_used.argmin()))

    def _normalized(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix`` [L, E] as float64 rows summing to 1 (all-zero rows stay zero)."""
        if tuple(matrix.shape) != (self.num_layers, self.num_experts):
            raise ValueError(f"matrix of shape {tuple(matrix.shape)}, expected ({self.num_layers}, "
                             f"{self.num_experts})")
        matrix = matrix.double()
        if (matrix < 0).any():
            raise ValueError("activation counts cannot be negative")
        totals = matrix.sum(dim=1, keepdim=True)
        return torch.where(totals > 0, matrix / totals.clamp(min=1e-12), matrix)

    def _merge(self, index: int, normalized: torch.Tensor) -> int:
        merged = self._merged[index]
        mean = (self._matrices[index] * merged + normalized) / (merged + 1)
        self._matrices[index] = self._normalized(mean)
        self._merged[index] = merged + 1
        self._last_used[index] = self._clock
        return index

    def _insert(self, normalized: torch.Tensor) -> int:
        if len(self) >= self.capacity:
            evicted = int(self._last_used.argmin())
            logger.debug("trace store full: evicting entry %d", evicted)
            self._remove(evicted)
        self._matrices = torch.cat([self._matrices, normalized.unsqueeze(0)])
        self._merged = torch.cat([self._merged, torch.ones(1, dtype=torch.float64)])
        self._last_used = torch.cat([self._last_used, torch.tensor([self._clock])])
        return len(self) - 1

    def _remove(self, index: int) -> None:
        keep = torch.arange(len(self)) != index
        self._matrices, self._merged, self._last_used = (
            self._matrices[keep], self._merged[keep], self._last_used[keep])


def _cosine(entries: torch.Tensor, query: torch.Tensor, layer_weights: torch.Tensor) -> torch.Tensor:
    """Row-weighted cosine similarity of each entry [N, L, E] with ``query`` [L, E]: [N] (0 for a zero side)."""
    weights = layer_weights.double().unsqueeze(1)  # [L, 1]
    dots = (entries * query * weights).sum(dim=(1, 2))
    entry_norms = (entries.square() * weights).sum(dim=(1, 2)).sqrt()
    query_norm = (query.square() * weights).sum().sqrt()
    return dots / (entry_norms * query_norm).clamp(min=1e-12)


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors payload (its JSON header); ValueError if the header is malformed."""
    if len(payload) < 8:
        raise ValueError("too short for a safetensors file")
    size = int.from_bytes(payload[:8], "little")
    if size > len(payload) - 8:
        raise ValueError("truncated safetensors header")
    try:
        header = json.loads(payload[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"malformed safetensors header: {error}") from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("no metadata in the safetensors header")
    return metadata


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
