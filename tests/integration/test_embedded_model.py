"""The embedded demo checkpoint (models/demo-moe, `make serve`'s default) is the trained MoE: a bf16 Mixtral
directory under 50 MB that models held-out Python far better than its untrained initialization, and that the
engine completes Python prompts with Python."""

from __future__ import annotations

import json
import math
import re
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams
from engine.models.train import TrainConfig, init_model, mean_loss, tokenize_files, validation_windows

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "demo-moe"
MAX_CHECKPOINT_BYTES = 50 * 10**6
HELD_OUT_WINDOWS = 4
# On these windows the committed model scores a perplexity of 108, its untrained initialization 4,287.
MAX_TRAINED_PERPLEXITY = 200.0
MIN_IMPROVEMENT = 15.0


@pytest.fixture(scope="module")
def provenance() -> dict:
    return json.loads((MODEL_DIR / "moeserve_demo.json").read_text())


@pytest.fixture(scope="module")
def held_out(provenance: dict) -> torch.Tensor:
    """The first windows of the validation files (never trained on) that this interpreter has; (N, T) int64."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in provenance["corpus"]["validation_files"] if (stdlib / name).is_file()]
    assert files, "none of the held-out standard-library files exists in this interpreter"
    config = TrainConfig(**provenance["train_config"])
    tokens = tokenize_files(AutoTokenizer.from_pretrained(MODEL_DIR), files[:4])
    windows = validation_windows(tokens, config.seq_len, HELD_OUT_WINDOWS)
    assert len(windows) == HELD_OUT_WINDOWS
    return windows


def test_embedded_checkpoint_is_a_trained_bf16_mixtral_under_50_mb(provenance: dict) -> None:
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= MAX_CHECKPOINT_BYTES
    assert provenance["arch"] == "mixtral" and provenance["trained"] and provenance["dtype"] == "bfloat16"
    assert provenance["steps"] == provenance["train_config"]["max_steps"], "a finished run, not a checkpoint"
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2


def test_trained_model_beats_its_initialization_on_held_out_python(provenance: dict, held_out: torch.Tensor) -> None:
    """Held-out perplexity of the committed weights, computed here, against the same model untrained."""
    trained = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    untrained = init_model(TrainConfig(**provenance["train_config"]), tokenizer).eval()
    trained_perplexity = math.exp(mean_loss(trained, held_out))
    untrained_perplexity = math.exp(mean_loss(untrained, held_out))
    assert trained_perplexity < MAX_TRAINED_PERPLEXITY
    assert untrained_perplexity > MIN_IMPROVEMENT * trained_perplexity


def test_engine_completes_python_with_python() -> None:
    """Greedy completion of a function header through the engine, in the checkpoint's bf16, reads as Python:
    it uses Python keywords or ``self`` and calls something (its untrained initialization
    answers "okiokiokioki linkoki linkoptions ...")."""
    llm = LLM(str(MODEL_DIR), max_model_len=256, max_num_seqs=1)
    text = llm.generate(["def fib(n):"], SamplingParams(max_tokens=40, temperature=0))[0].outputs[0].text
    assert re.search(r"\b(self|def|return|if|for|import|class|None)\b", text), text
    assert re.search(r"[A-Za-z_]\w*\(", text), f"no call in {text!r}"
