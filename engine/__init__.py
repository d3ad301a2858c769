"""moeserve's engine: configuration, models, scheduling, expert offloading and activation tracing.

The public Python API is ``from engine import LLM, SamplingParams``. ``LLM`` is imported lazily so that
``import engine.config`` (the CLI's first step) does not load torch and transformers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while they wait for work stall torch's decode whenever anything else wants a core (our
# own I/O threads, the HTTP loop, another process): on 2 cores with one other busy process, the demo model decoded
# at 1.7-29 tok/s with spinning threads and 115-119 with passive ones. libgomp reads this when torch loads it, so
# it is set here, before anything of ours imports torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.sampling import SamplingParams  # noqa: E402  (after the OpenMP setting, on purpose)

if TYPE_CHECKING:
    from engine.engine import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.engine import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
