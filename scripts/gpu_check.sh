#!/usr/bin/env bash
# The GPU check: run by a session that is lent a CUDA machine (never by CI), from the repository root, in well
# under 5 minutes on one H200 with 16 cores:
#
#   1. a venv at $VENV (default .venv-gpu) that sees the machine's own CUDA torch (--system-site-packages: the
#      lent machines have torch with CUDA but reach no package index, and torch's CUDA wheel is far larger than
#      what travels with the working tree), with moeserve installed editable on top. Packages the machine lacks or
#      has in another version (transformers==5.24.0, pinned by pyproject.toml, for one) come from $WHEELS, a
#      folder of wheels carried with the tree (see the device tool's README: `pip download --no-deps
#      --only-binary=:all: --python-version 3.12 ...`); without $WHEELS pip asks the configured index;
#   2. only the CUDA-marked tests (pytest -m cuda: tests/integration/test_offload_cuda.py and any other);
#   3. a small JSON on stdout (and in $OUT/gpu_check.json when $OUT is set): host-to-device copy GB/s through
#      the expert cache's own copier (pinned host slots -> device slots on its copy stream), and greedy decode
#      tok/s of the embedded demo model (models/demo-moe, bf16) on the GPU, resident and offloaded.
#
# Exits non-zero when torch sees no GPU or a test fails; the JSON comes only after the tests passed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PYTHON" -m venv --system-site-packages "$VENV"
pip_args=()
if [ -n "${WHEELS:-}" ]; then
    pip_args=(--no-index --find-links "$WHEELS")
    "$VENV/bin/python" -m pip install --quiet "${pip_args[@]}" "$WHEELS"/*.whl
fi
# The machine's torch stays: pyproject pins the CPU development wheel's version, which is not the point here.
"$VENV/bin/python" -m pip install --quiet "${pip_args[@]}" --no-deps -e .
"$VENV/bin/python" -m engine.offload.kernels.build \
    || echo "gpu_check: the CPU experts kernel did not build; the CPU reference runs pure torch"

"$VENV/bin/python" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; is this the CUDA wheel?")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF

"$VENV/bin/pytest" -m cuda -p no:cacheprovider -q tests

"$VENV/bin/python" - <<'EOF'
import json
import logging
import os
import tempfile
import time

import torch

from engine import LLM, SamplingParams
from engine.offload.tiers import SlotArena, host_to_device

logging.basicConfig(level=logging.WARNING)


def copy_gb_per_s(slot_bytes: int = 16 << 20, slots: int = 32, rounds: int = 4) -> float:
    """Bytes per second through HostToDevice: every pinned host slot into its device slot, ``rounds`` times."""
    host = SlotArena(slots, slot_bytes, pinned=True)
    device = SlotArena(slots, slot_bytes, device="cuda")
    copier = host_to_device(host, device)
    for slot in range(slots):  # warm-up
        copier.copy(slot, slot, slot_bytes)
    copier.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        for slot in range(slots):
            copier.copy(slot, slot, slot_bytes)
    copier.synchronize()
    return rounds * slots * slot_bytes / (time.perf_counter() - start) / 1e9


def decode_tok_per_s(llm: LLM, tokens: int = 128) -> float:
    """One greedy stream of ``tokens`` tokens after a short warm-up generation."""
    llm.generate("def warm_up():", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate("import os\n\n\ndef main():\n", params)
    torch.cuda.synchronize()
    assert len(out[0].outputs[0].token_ids) == tokens
    return tokens / (time.perf_counter() - start)


model = "models/demo-moe"
result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "h2d_copy_gb_s": copy_gb_per_s()}
result["decode_tok_s_resident"] = decode_tok_per_s(LLM(model, device="cuda"))
with tempfile.TemporaryDirectory() as offload_dir:
    llm = LLM(model, device="cuda", expert_cache_bytes="8MiB", offload_dir=offload_dir)
    result["decode_tok_s_offloaded"] = decode_tok_per_s(llm)
    stats = llm.stats()
    result["offloaded"] = {key: stats[key] for key in ("expert_cache_slots", "expert_cache_bytes", "expert_bytes_read",
                                                       "expert_hits", "expert_misses", "expert_stall_seconds")}
    llm.engine.close()
text = json.dumps(result, indent=2)
print(text)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as handle:
        handle.write(text + "\n")
EOF
