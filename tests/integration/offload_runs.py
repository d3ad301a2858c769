"""What the offload integration tests share: a fixed batch of prompts run greedily through an `LLMEngine`.

Imported by tests/integration/test_offload*.py (pytest puts this directory on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import SamplingParams
from engine.config import load_config
from engine.engine import LLMEngine
from engine.offload.layout import BlobEntry, StoreError

PROMPTS = [
    "def fib(n):",
    "import os\nimport sys\nfrom pathlib import Path\n\n\nclass Config:\n    def __init__(self, root):\n",
    "for i in range(10):\n    print(i)",
    "x",
]
LIMITS = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=32)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def generate(engine: LLMEngine) -> list[list[int]]:
    """Greedy tokens of every prompt of PROMPTS, submitted together (one batch)."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    return [finished[f"r{i}"].outputs[0].token_ids for i in range(len(PROMPTS))]


def engine_for(model_dir: Path, tier: torch.device | None = None, **overrides) -> LLMEngine:
    """An engine on ``model_dir`` with LIMITS and ``overrides``; ``tier``: the two-level cache's fast tier."""
    return LLMEngine(load_config(overrides=dict(model=str(model_dir), **{**LIMITS, **overrides})),
                     expert_tier_device=tier)


def top_k_of(model_dir: Path) -> int:
    """Experts per token of the checkpoint."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).get_text_config().num_experts_per_tok


def flip_a_byte(entry: BlobEntry) -> None:
    """Corrupt ``entry``'s blob on disk: its byte 100 inverted."""
    with open(entry.file, "r+b") as handle:
        handle.seek(entry.offset + 100)
        byte = handle.read(1)
        handle.seek(entry.offset + 100)
        handle.write(bytes([byte[0] ^ 0xFF]))


def checksum_error(engine: LLMEngine, layer: int, good: int, bad: int) -> str:
    """Hold expert ``good`` of ``layer`` (it loads), then ``good`` and ``bad`` together: the text of the
    StoreError that ``bad``'s failed checksum must raise."""
    offload = engine.offload
    experts = next(m for m in engine.runner.model.modules() if getattr(m, "moeserve_layer", None) == layer)
    with offload.hold(experts, layer, [good]):
        pass
    with pytest.raises(StoreError) as error:
        with offload.hold(experts, layer, [good, bad]):
            pass
    return str(error.value)
