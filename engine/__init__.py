"""moeserve's engine: configuration, models, scheduling, expert offloading and activation tracing.

The public Python API (`from engine import LLM, SamplingParams`) arrives with the continuous-batching
engine; until then this package exposes the configuration tree and the demo-checkpoint generator.
"""

__version__ = "0.1.0"
