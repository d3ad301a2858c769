"""One-stream resident decode: moeserve against llama.cpp on the same bf16 checkpoint, in alternating rounds.

Issue #5 takes llama.cpp as the practical roof of resident bf16 decode on a CPU (~0.9 of the memory-bandwidth bound
on the machine class it was measured on, transformers' stock forward ~0.3). This host's memory bandwidth swings
between ~35 and ~69 GB/s within seconds (README), so a fraction of a bound measured a moment apart says little;
two systems decoding the same weights in turn, seconds apart, compare directly. For each of the issue-#5 shapes
(benchmarks/experts_decode.py's, attention heads included; ``--shapes`` also takes Mixtral-8x7B's layer):

1. a random bf16 checkpoint in Mixtral's per-expert layout (offload_memcap.write_model: one layer in memory at a
   time), which moeserve loads (all weights resident, the compiled kernel where built) and llama.cpp's own
   converter turns into a bf16 GGUF;
2. llama.cpp (llama-cpp-python, mmap as its default, ``--threads`` threads, greedy) runs in a child process of the
   tools environment that loads the GGUF once and decodes on each request from the parent;
3. ``--rounds`` rounds, each: a stream rate, one system's one-stream decode, a stream rate, the other's, a stream
   rate; the order alternates round by round. Decode tok/s excludes the prefill: moeserve's as
   benchmarks/experts_decode.py measures it ((tokens - 1) / (time to last token - time of a ``max_tokens=1`` run)),
   llama.cpp's from the first token's timestamp to the last's. Both decode from the same prompt ids.

Reported per shape: each round's tok/s of both systems, the stream rates around each, each decode's fraction of the
bound of its moment (tok/s x bytes a token touches in bf16 / the higher of the rates just before and after it,
benchmarks/bandwidth.py), and the medians of moeserve / llama.cpp per round and of the fractions; the greedy tokens'
common prefix (both bf16, different accumulation orders: a prefix of a few tokens is expected on random weights).
Results: benchmarks/results/llamacpp_decode.json.

Needs the benchmark-time tools of benchmarks/offload_memcap.py (llama-cpp-python and llama.cpp's converter in a
virtual environment outside the repository; its docstring says how to install them); without them it exits naming
what is missing. Disk: the checkpoint and its GGUF, ~2 x 5.6 GB per shape, deleted after the shape.

Usage: python benchmarks/llamacpp_decode.py [--shapes NAME ...] [--rounds 5] [--tokens 32] [--threads 2]
    [--tools-python /work/benchtools/venv/bin/python] [--converter PATH] [--work-dir /tmp] [--layers N]
(``--layers`` trims every shape for a quick check; the bound is computed for the trimmed model.)

The script runs as the parent (the project's venv) and as the llama.cpp child (``child llamacpp ...``, in the tools
venv), so its top level imports only the standard library.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from offload_memcap import DEFAULT_CONVERTER, DEFAULT_TOOLS_PYTHON, prompt_ids

logger = logging.getLogger("benchmarks.llamacpp_decode")

RESULTS = Path(__file__).parent / "results" / "llamacpp_decode.json"
STREAM_BYTES = int(1.5 * 2**30)  # the stream rate's working set (benchmarks/bandwidth.py)


# ---------------------------------------------------------------------------------------------------------------
# The llama.cpp child: load once, decode on request
# ---------------------------------------------------------------------------------------------------------------

def child_llamacpp(argv: list[str]) -> None:
    """Load the GGUF, print ``ready``, then for each ``decode`` line on stdin decode once and print a JSON line."""
    parser = argparse.ArgumentParser(prog="llamacpp_decode.py child llamacpp")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prompt", required=True, help="comma-separated token ids")
    args = parser.parse_args(argv)
    from llama_cpp import Llama, llama_print_system_info

    prompt = [int(t) for t in args.prompt.split(",")]
    start = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=len(prompt) + args.tokens + 16, n_batch=len(prompt),
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    print(json.dumps({"ready": True, "load_seconds": round(time.perf_counter() - start, 2),
                      "system_info": llama_print_system_info().decode().strip()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "decode":
            continue
        times, tokens = [], []
        llm.reset()  # no prefix reuse: every decode starts from the prompt, like moeserve's
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == args.tokens:
                break
        print(json.dumps({"decode_tok_per_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": tokens}),
              flush=True)


class LlamaChild:
    """The llama.cpp child process: started on a GGUF, asked to decode, stopped."""

    def __init__(self, python: str, gguf: Path, tokens: int, threads: int, prompt: list[int]) -> None:
        env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}  # llama.cpp's defaults
        self.process = subprocess.Popen(
            [python, __file__, "child", "llamacpp", "--model", str(gguf), "--tokens", str(tokens), "--threads",
             str(threads), "--prompt", ",".join(map(str, prompt))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._reply()

    def decode(self) -> dict[str, Any]:
        self.process.stdin.write("decode\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp child exited (code {self.process.wait()}); see its stderr above")
        return json.loads(line)


# ---------------------------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------------------------

def check_tools(args: argparse.Namespace) -> None:
    """Exit naming what is missing when the tools venv cannot run llama.cpp or its converter."""
    if not Path(args.tools_python).exists():
        raise SystemExit(f"{args.tools_python} missing: install the benchmark-time tools (benchmarks/offload_memcap.py)")
    if subprocess.run([args.tools_python, "-c", "import llama_cpp, sentencepiece"], capture_output=True).returncode:
        raise SystemExit(f"'import llama_cpp, sentencepiece' fails in {args.tools_python} (benchmarks/offload_memcap.py"
                         " says how to install them)")
    if not Path(args.converter).exists():
        raise SystemExit(f"llama.cpp's converter {args.converter} missing (benchmarks/offload_memcap.py)")


def convert_to_gguf(args: argparse.Namespace, model: Path, gguf: Path, vocab_size: int) -> float:
    """llama.cpp's converter on ``model`` (offload_memcap's ``child gguf``, tools venv); its seconds."""
    start = time.perf_counter()
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([args.tools_python, str(Path(__file__).with_name("offload_memcap.py")), "child", "gguf",
                           "--model", str(model), "--out", str(gguf), "--offload-dir", str(gguf.parent / "staging"),
                           "--vocab-size", str(vocab_size), "--converter", args.converter],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed: {done.stderr[-3000:]}")
    return time.perf_counter() - start


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure_shape(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from bandwidth import bytes_per_token, stream_rate
    from experts_decode import SHAPES, engine_decode, with_heads
    from offload_memcap import write_model

    from engine import LLM, SamplingParams

    shape = with_heads(SHAPES[name])
    layers = args.layers or shape["num_hidden_layers"]
    model, gguf = work / "model", work / "model-bf16.gguf"
    config = write_model(model, layers, shape)["config"]
    vocab_size = config.vocab_size
    prompt = prompt_ids(vocab_size)
    convert_seconds = convert_to_gguf(args, model, gguf, vocab_size)
    token_bytes = bytes_per_token(config, torch.bfloat16)

    llm = LLM(str(model), max_model_len=len(prompt) + args.tokens + 16, max_num_seqs=1, max_num_batched_tokens=512)

    llama = LlamaChild(args.tools_python, gguf, args.tokens, args.threads, prompt)
    llama_tokens: list[int] = []  # of its last decode

    def llama_decode() -> float:
        result = llama.decode()
        llama_tokens[:] = result["tokens"]
        return result["decode_tok_per_s"]

    try:
        systems = {"moeserve": lambda: engine_decode(llm, 1, args.tokens, batch=[prompt]), "llamacpp": llama_decode}
        for decode in systems.values():  # warm-up: llama.cpp's mmap pages its weights in here
            decode()
        rounds = []
        for number in range(args.rounds):
            order = list(systems) if number % 2 == 0 else list(systems)[::-1]
            rates = [stream_rate(STREAM_BYTES)["best"]]
            row: dict[str, Any] = {}
            for system in order:
                tok_per_s = systems[system]()
                rates.append(stream_rate(STREAM_BYTES)["best"])
                bound = max(rates[-2:]) / token_bytes
                row[system] = {"tok_per_s": round(tok_per_s, 2),
                               "stream_bytes_per_s_before": round(rates[-2]),
                               "stream_bytes_per_s_after": round(rates[-1]),
                               "fraction_of_bound": round(tok_per_s / bound, 3)}
            row["moeserve_over_llamacpp"] = round(row["moeserve"]["tok_per_s"] / row["llamacpp"]["tok_per_s"], 3)
            logger.info("%s round %d (%s first): moeserve %.1f tok/s (%.2f of bound), llama.cpp %.1f (%.2f): %.2f x",
                        name, number, order[0], row["moeserve"]["tok_per_s"], row["moeserve"]["fraction_of_bound"],
                        row["llamacpp"]["tok_per_s"], row["llamacpp"]["fraction_of_bound"],
                        row["moeserve_over_llamacpp"])
            rounds.append(row)
        greedy = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        moeserve_tokens = list(llm.generate([prompt], greedy)[0].outputs[0].token_ids)
    finally:
        llama.close()
        del llm
        shutil.rmtree(model)
        gguf.unlink(missing_ok=True)

    def median(key: str, system: str | None = None) -> float:
        values = [r[key] if system is None else r[system][key] for r in rounds]
        return round(statistics.median(values), 3)

    return {
        "shape": {**shape, "num_hidden_layers": layers},
        "bytes_per_token": token_bytes,
        "gguf_convert_seconds": round(convert_seconds, 1),
        "llamacpp": {key: value for key, value in llama.info.items() if key != "ready"},
        "rounds": rounds,
        "median_moeserve_over_llamacpp": median("moeserve_over_llamacpp"),
        "median_fraction_of_bound": {system: median("fraction_of_bound", system) for system in ("moeserve", "llamacpp")},
        "median_tok_per_s": {system: median("tok_per_s", system) for system in ("moeserve", "llamacpp")},
        "greedy_tokens_common_prefix": common_prefix(moeserve_tokens, llama_tokens),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child" and sys.argv[2] == "llamacpp":
        child_llamacpp(sys.argv[3:])
        return
    from experts_decode import ISSUE_SHAPES, SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(ISSUE_SHAPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (moeserve uses torch's)")
    parser.add_argument("--layers", type=int, help="trim every shape to this many layers (quick check)")
    parser.add_argument("--tools-python", default=DEFAULT_TOOLS_PYTHON)
    parser.add_argument("--converter", default=DEFAULT_CONVERTER)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from common import write_result

    from engine.logs import configure_logging

    configure_logging("info")
    check_tools(args)
    load_before = os.getloadavg()
    shapes = {}
    for name in args.shapes:
        with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="llamacpp-decode-") as work:
            shapes[name] = measure_shape(name, args, Path(work))
    write_result(args.out, "llamacpp_decode", load_before,
                 {"rounds": args.rounds, "tokens": args.tokens, "llamacpp_threads": args.threads,
                  "layers_override": args.layers, "shapes": shapes})


if __name__ == "__main__":
    main()
