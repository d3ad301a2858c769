"""Expert-activation tracing: the routing-trace file format (format.py) and offline cache replay (replay.py)."""
