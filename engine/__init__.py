"""moeserve's engine: configuration, models, scheduling, expert offloading and activation tracing.

The public Python API is ``from engine import LLM, SamplingParams``. ``LLM`` is imported lazily so that
``import engine.config`` (the CLI's first step) does not load torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.engine import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.engine import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
