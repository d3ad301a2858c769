"""`moeserve serve` with an engine that faults: run as ``python faulty_server.py MODEL --port P``.

`FaultyEngine` raises from `step` whenever a request has generated `FAULT_AFTER_TOKENS` tokens, as a broken
kernel would; shorter requests are served normally. It is injected through `create_app`'s engine factory.
"""

from __future__ import annotations

import argparse
import sys

from engine.config import load_config
from engine.engine import LLMEngine
from engine.logs import configure_logging
from server.app import run_server

FAULT_AFTER_TOKENS = 2


class FaultyEngine(LLMEngine):
    def step(self):
        outputs = super().step()
        if any(len(c.token_ids) >= FAULT_AFTER_TOKENS and not c.finished for o in outputs for c in o.outputs):
            raise RuntimeError("injected fault")
        return outputs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    args = parser.parse_args()
    configure_logging("info")
    config = load_config(overrides={"model": args.model, "port": args.port, "max_model_len": args.max_model_len,
                                    "served_model_name": "demo"})
    return run_server(config, engine_factory=FaultyEngine)


if __name__ == "__main__":
    sys.exit(main())
