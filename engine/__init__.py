"""moeserve's engine: configuration, models, scheduling, expert offloading and activation tracing.

The public Python API is ``from engine import LLM, SamplingParams``. ``LLM`` is imported lazily so that
``import engine.config`` (the CLI's first step) does not load torch and transformers.

Imported before torch (as the ``moeserve`` command does), it makes torch's OpenMP threads wait passively
(``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise): the experts kernel runs decode's hot products
on its own thread pool, and OpenMP threads spinning beside it take the cores it needs (benchmarks/busy_core.py).
libgomp reads the variable once, when torch loads it; `engine.engine.LLM` logs how torch's threads wait.
"""

from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import TYPE_CHECKING, Any  # noqa: E402

from engine.sampling import SamplingParams  # noqa: E402

if TYPE_CHECKING:
    from engine.engine import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.engine import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
