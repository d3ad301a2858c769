"""Pieces every benchmark script shares: a random Mixtral checkpoint on disk and the result file's envelope.

The scripts in benchmarks/ run as ``python benchmarks/NAME.py``, so this module is imported as ``common``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from engine.models.demo import build_model, build_tokenizer
from engine.offload.kernels import BUILD_COMMAND, load_experts_kernel

logger = logging.getLogger("benchmarks")


def write_mixtral(out: Path, shape: dict[str, Any], dtype: torch.dtype) -> PretrainedConfig:
    """A random Mixtral of ``shape`` (config keys) with the demo tokenizer, saved in ``dtype`` to ``out``."""
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("mixtral", **shape, vocab_size=len(tokenizer), pad_token_id=0,
                                  tie_word_embeddings=False)
    build_model(config, seed=0).to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return config


def write_result(out: Path, benchmark: str, load_before: tuple[float, ...], fields: dict[str, Any]) -> None:
    """``fields`` under the common envelope (name, date, machine, load average before and after) as JSON."""
    result = {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "platform": platform.platform(), "torch": torch.__version__},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        **fields,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", out)


def require_experts_kernel():
    """The experts kernel's op (engine.offload.kernels.load_experts_kernel); exits naming the build command when
    there is no current build, for benchmarks that measure the kernel."""
    op = load_experts_kernel()
    if op is None:
        raise SystemExit(f"experts kernel not built ({BUILD_COMMAND})")
    return op
