"""Offloaded decode under a memory cap: moeserve against llama.cpp (mmap) and transformers + accelerate disk offload.

Issue #6's benchmark. A random bf16 Mixtral with Mixtral's layer and expert counts (32 layers x 8 experts, top-2,
hidden 1024, intermediate 3584: 5.6 GB of experts) is written to a temporary directory; each system then decodes
the same 16-token prompt greedily inside a memory cgroup capped at about half the model (``--caps-gib``, 3 by
default), one system at a time, each in its own subprocess, with the page cache dropped before each run:

- ``moeserve``: ``LLM(..., expert_cache_bytes=cap - headroom, offload_dir=...)`` over an expert store prepared
  beforehand (outside the cap, not timed); experts come off the disk with O_DIRECT into the byte-budgeted cache.
- ``accelerate``: transformers ``from_pretrained(device_map="auto", max_memory={"cpu": cap - headroom},
  offload_folder=...)``; the modules that do not fit are offloaded to disk and memory-mapped back at each forward.
- ``llamacpp``: llama-cpp-python on a bf16 GGUF of the same weights (llama.cpp's own HF->GGUF converter), mmap on:
  the kernel's page cache, inside the cap, is its expert cache.

Per system: decode tok/s over tokens 2..N (the prefill and first token excluded), bytes read from disk per decode
token (the child's ``/proc/self/io`` ``read_bytes``, which counts O_DIRECT reads and mmap page faults alike), the
cgroup's peak memory (``memory.max_usage_in_bytes``, page cache included) and the child's peak RSS.

The physical bound per token is ``bytes touched / stream rate + miss bytes / disk rate``:

- bytes touched: benchmarks/bandwidth.py's ``bytes_per_token`` (non-expert weights + top-2 experts per layer, bf16);
- stream rate: ``stream_rate`` measured at the start of the run, outside the cgroup;
- disk rate: the best O_DIRECT read rate over the prepared store's expert blobs (moeserve's ``BlobReader``, 1 to
  8 reads in flight), measured in the same run;
- miss bytes: the expert bytes a token routes (top-2 of 8 in each of 32 layers) times the chance that a routed
  expert is not resident when the cap holds a fraction ``f`` of all experts and routing is uniform at random,
  ``1 - f``, with ``f = moeserve's expert cache bytes at that cap / all expert bytes`` (the cap minus what the
  process needs besides experts). ``bound_measured_misses`` uses moeserve's own decode demand misses instead.
  ``bound_overlapped`` is the stricter ``max`` of the two terms (reads fully hidden behind compute).

Each system is reported as a fraction of the bound (``bound_s_per_token / measured_s_per_token``) and as moeserve's
tok/s over the baseline's. Files are deleted as soon as their system is done (the prepared store after moeserve,
each accelerate offload folder after its run, the GGUF after llama.cpp, the model at the end).
Results: benchmarks/results/offload_memcap.json.

The baselines need benchmark-time tools that are not the project's dependencies, in a separate virtual environment
outside the repository (about 15 minutes, most of it llama.cpp's build on 2 cores)::

    python3 -m venv /work/benchtools/venv && cd /work/benchtools
    venv/bin/pip install torch==2.13.0          # pinned: an unpinned torch pulls a multi-GB CUDA build
    venv/bin/pip install accelerate transformers==<the project's version> safetensors sentencepiece tqdm
    CMAKE_BUILD_PARALLEL_LEVEL=1 nice -n 19 venv/bin/pip install llama-cpp-python==0.3.36   # builds llama.cpp
    mkdir sdist && cd sdist && ../venv/bin/pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 \
        && tar xzf llama_cpp_python-0.3.36.tar.gz      # vendor/llama.cpp/convert_hf_to_gguf.py and its gguf-py

Needs root: a cgroup v1 memory controller (or cgroup v2) and ``/proc/sys/vm/drop_caches``. A system whose tools
are missing is reported as not run, with the reason. Disk: the model, the store or one baseline's files, about
12 GB at a time under ``--work-dir``.

Usage: python benchmarks/offload_memcap.py [--caps-gib 3 2] [--tokens 32] [--baseline-tokens 32]
    [--systems moeserve accelerate llamacpp] [--tools-python /work/benchtools/venv/bin/python]
    [--converter /work/benchtools/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py]
    [--work-dir /tmp] [--layers 32] [--omp-wait-policy passive]
(``--layers`` trims the model for a quick check of the machinery; the bound is computed for the trimmed model.
``--omp-wait-policy`` sets OMP_WAIT_POLICY in every child: on cores shared with other work, OpenMP's spinning
threads can stall torch's decode steps for ~0.3 s each, and passive waiting removes that.)

The script runs as a parent (the project's venv) and as children (``child SYSTEM ...``, in the project's venv for
moeserve and in the tools venv for the baselines), so its top level imports only the standard library.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.offload_memcap")

RESULTS = Path(__file__).parent / "results" / "offload_memcap.json"
SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=32, num_local_experts=8,
             num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4)
PROMPT_LEN = 16
GIB = 2**30
SYSTEMS = ("moeserve", "accelerate", "llamacpp")
DEFAULT_TOOLS_PYTHON = "/work/benchtools/venv/bin/python"
DEFAULT_CONVERTER = "/work/benchtools/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"


# ---------------------------------------------------------------------------------------------------------------
# Measurements every child takes of itself
# ---------------------------------------------------------------------------------------------------------------

def read_bytes() -> int:
    """Bytes this process (all its threads) caused to be read from storage: O_DIRECT, buffered and mmap faults."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes line")


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def prompt_ids(vocab_size: int) -> list[int]:
    """The same PROMPT_LEN token ids for every system (a fixed LCG; no torch needed)."""
    state, ids = 12345, []
    for _ in range(PROMPT_LEN):
        state = (state * 1103515245 + 12345) % 2**31
        ids.append(8 + state % (vocab_size - 8))
    return ids


class DecodeClock:
    """Timestamps and disk-read counters of each new token; decode figures exclude the prefill and first token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.read_at_first = 0
        self.read_at_last = 0

    def token(self) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            self.read_at_first = read_bytes()
        self.read_at_last = read_bytes()

    def summary(self) -> dict[str, Any]:
        decoded = len(self.times) - 1
        seconds = self.times[-1] - self.times[0]
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return {"decode_tokens": decoded, "decode_seconds": round(seconds, 3),
                "decode_tok_per_s": round(decoded / seconds, 4),
                "disk_bytes_read_per_token": round((self.read_at_last - self.read_at_first) / decoded),
                "token_seconds": [round(g, 3) for g in gaps], "peak_rss_bytes": peak_rss_bytes()}


# ---------------------------------------------------------------------------------------------------------------
# Children: one system each, started inside the cgroup; each writes its result as JSON
# ---------------------------------------------------------------------------------------------------------------

def child_moeserve(args: argparse.Namespace) -> dict[str, Any]:
    """moeserve in offload mode: a fresh engine over the prepared store, one greedy stream, stats around decode."""
    import torch

    from engine import LLM, SamplingParams
    from engine.offload.kernels import load_experts_kernel

    torch.set_num_threads(args.threads)
    prompt = prompt_ids(args.vocab_size)
    start = time.perf_counter()
    llm = LLM(args.model, expert_cache_bytes=args.budget, offload_dir=args.offload_dir, dtype="bfloat16",
              max_model_len=PROMPT_LEN + args.tokens + 16, max_num_seqs=1)
    load_seconds = time.perf_counter() - start
    engine = llm.engine
    engine.add_request("bench", prompt, SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True))
    clock, first_stats, tokens = DecodeClock(), None, []
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = output.outputs[0].token_ids
            while len(clock.times) < len(tokens):
                clock.token()
                if first_stats is None:
                    first_stats = llm.stats()
    last = llm.stats()
    engine.close()
    decoded = len(tokens) - 1
    disk = last["expert_bytes_read"]["disk"] - first_stats["expert_bytes_read"]["disk"]
    return {**clock.summary(), "load_seconds": round(load_seconds, 2), "tokens": list(tokens),
            "expert_cache_bytes": last["expert_cache_bytes"]["host"], "expert_cache_slots": last["expert_cache_slots"],
            "decode_expert_misses_per_token": round((last["expert_misses"] - first_stats["expert_misses"]) / decoded, 3),
            "decode_expert_hits_per_token": round((last["expert_hits"] - first_stats["expert_hits"]) / decoded, 3),
            "decode_expert_disk_bytes_per_token": round(disk / decoded),
            "decode_stall_seconds": round(last["expert_stall_seconds"] - first_stats["expert_stall_seconds"], 3),
            "decode_prefetch_issued": last["expert_prefetch_issued"] - first_stats["expert_prefetch_issued"],
            "decode_prefetch_used": last["expert_prefetch_used"] - first_stats["expert_prefetch_used"],
            "decode_prefetch_wasted": last["expert_prefetch_wasted"] - first_stats["expert_prefetch_wasted"],
            "read_mode": engine.offload.reader.mode.value, "experts_kernel": load_experts_kernel() is not None}


def child_accelerate(args: argparse.Namespace) -> dict[str, Any]:
    """transformers + accelerate: modules beyond ``max_memory`` offloaded to ``offload_dir`` and mapped back per forward."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        """generate() puts the prompt first, then each new token."""

        def __init__(self, clock: DecodeClock) -> None:
            self.clock, self.calls = clock, 0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            if self.calls > 1:
                self.clock.token()

        def end(self) -> None:
            pass

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": args.budget}, offload_folder=args.offload_dir)
    load_seconds = time.perf_counter() - start
    placement: dict[str, int] = {}
    for device in getattr(model, "hf_device_map", {"": "cpu"}).values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    ids = torch.tensor([prompt_ids(args.vocab_size)])
    clock = DecodeClock()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                             min_new_tokens=args.tokens, do_sample=False, pad_token_id=0, streamer=Streamer(clock))
    return {**clock.summary(), "load_seconds": round(load_seconds, 2), "tokens": out[0, PROMPT_LEN:].tolist(),
            "device_map_modules": placement,
            "offload_folder_bytes": sum(f.stat().st_size for f in Path(args.offload_dir).rglob("*") if f.is_file())}


def child_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python on the bf16 GGUF, mmap on, greedy."""
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=PROMPT_LEN + args.tokens + 16, n_batch=PROMPT_LEN,
                n_threads=args.threads, n_threads_batch=args.threads, use_mmap=True, use_mlock=False, verbose=False)
    load_seconds = time.perf_counter() - start
    clock, tokens = DecodeClock(), []
    for token in llm.generate(prompt_ids(args.vocab_size), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                              repeat_penalty=1.0):
        clock.token()
        tokens.append(int(token))
        if len(tokens) == args.tokens:
            break
    return {**clock.summary(), "load_seconds": round(load_seconds, 2), "tokens": tokens}


def child_gguf(args: argparse.Namespace) -> dict[str, Any]:
    """Convert the checkpoint to a bf16 GGUF with llama.cpp's converter (tools venv, outside the cgroup).

    The converter insists on a tokenizer it recognises; the checkpoint's byte-level BPE has no known
    pre-tokenizer hash, so the GGUF gets a SentencePiece vocabulary of the same size trained here on Python
    source. Every system is fed token ids, so the vocabulary only has to exist and be the right size.
    """
    import sentencepiece

    staging = Path(args.offload_dir)
    staging.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    for item in model.iterdir():
        if item.suffix == ".safetensors" or item.name in ("config.json", "model.safetensors.index.json"):
            (staging / item.name).symlink_to(item)
    corpus = [line for path in sorted(Path(os.__file__).parent.glob("*.py"))[:200]
              for line in path.read_text(encoding="utf-8", errors="ignore").splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(staging / "tokenizer"), vocab_size=args.vocab_size,
        model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    start = time.perf_counter()
    subprocess.run([sys.executable, args.converter, str(staging), "--outtype", "bf16", "--outfile", args.out],
                   check=True)
    shutil.rmtree(staging)
    return {"convert_seconds": round(time.perf_counter() - start, 1), "gguf_bytes": Path(args.out).stat().st_size}


CHILDREN = {"moeserve": child_moeserve, "accelerate": child_accelerate, "llamacpp": child_llamacpp,
            "gguf": child_gguf}


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="offload_memcap.py child")
    parser.add_argument("system", choices=sorted(CHILDREN))
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, help="result JSON (the GGUF path for 'gguf')")
    parser.add_argument("--offload-dir", default="")
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--converter", default=DEFAULT_CONVERTER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    result = CHILDREN[args.system](args)
    if args.system != "gguf":
        Path(args.out).write_text(json.dumps(result))
    else:
        print(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# The parent: model, store, cgroup, bound, runs
# ---------------------------------------------------------------------------------------------------------------

class MemoryCgroup:
    """A memory-capped cgroup nested under this process's own (cgroup v1 memory controller, or v2)."""

    def __init__(self, limit_bytes: int) -> None:
        self.v2 = "memory" in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split() \
            if Path("/sys/fs/cgroup/cgroup.controllers").exists() else False
        if self.v2:
            own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if line.startswith("0::"))
            self.path = Path("/sys/fs/cgroup") / own.lstrip("/") / f"moeserve-bench-{os.getpid()}"
        else:
            own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if line.split(":")[1] == "memory")
            self.path = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"moeserve-bench-{os.getpid()}"
        self.path.mkdir()
        self.limit_bytes = limit_bytes
        self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(limit_bytes))

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def reset_peak(self) -> None:
        if self.v2:
            if (self.path / "memory.peak").exists():
                self._write("memory.peak", "0")
        else:
            self._write("memory.max_usage_in_bytes", "0")

    def enter(self) -> None:
        """Move the calling process into the cgroup (used as the child's preexec_fn)."""
        self._write("cgroup.procs", str(os.getpid()))

    def usage(self) -> dict[str, int]:
        """Peak memory (page cache included) and how often the cap was hit / the OOM killer ran."""
        if self.v2:
            events = dict(line.split() for line in self._read("memory.events").splitlines())
            return {"peak_bytes": int(self._read("memory.peak")) if (self.path / "memory.peak").exists() else -1,
                    "cap_hits": int(events.get("max", 0)), "oom_kills": int(events.get("oom_kill", 0))}
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return {"peak_bytes": int(self._read("memory.max_usage_in_bytes")),
                "cap_hits": int(self._read("memory.failcnt")), "oom_kills": int(oom.get("oom_kill", 0))}

    def remove(self) -> None:
        self.path.rmdir()


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def write_model(out: Path, layers: int, shape: dict[str, int] = SHAPE) -> dict[str, Any]:
    """A random bf16 Mixtral of ``shape`` (``layers`` layers) in Mixtral's own per-expert checkpoint layout.

    Written one layer per safetensors shard so that memory holds one layer at a time (common.write_mixtral
    builds the whole model in fp32 first: 11 GB at this size), in the layout of real Mixtral checkpoints
    (``block_sparse_moe.experts.E.w1/w2/w3``) that transformers, llama.cpp's converter and moeserve all read.
    Weights ~ N(0, initializer_range), norms 1, routers scaled by the demo models' ROUTER_GAIN.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoConfig

    from engine.models.demo import ROUTER_GAIN, build_tokenizer

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("mixtral", **{**shape, "num_hidden_layers": layers}, vocab_size=len(tokenizer),
                                  pad_token_id=0, tie_word_embeddings=False, architectures=["MixtralForCausalLM"],
                                  dtype="bfloat16")
    out.mkdir(parents=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generator = torch.Generator().manual_seed(0)
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    std = config.initializer_range

    def normal(*shape: int, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * (std * gain)).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        nonlocal total
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    shards = layers + 1
    save({"model.embed_tokens.weight": normal(config.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
          "lm_head.weight": normal(config.vocab_size, h)}, f"model-00000-of-{shards:05d}.safetensors")
    for layer in tqdm(range(layers), desc="writing model", unit="layer"):
        p = f"model.layers.{layer}."
        tensors = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.k_proj.weight": normal(kv, h),
                   p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, h),
                   p + "block_sparse_moe.gate.weight": normal(e, h, gain=ROUTER_GAIN)}
        for expert in range(e):
            q = f"{p}block_sparse_moe.experts.{expert}."
            tensors.update({q + "w1.weight": normal(i, h), q + "w2.weight": normal(h, i), q + "w3.weight": normal(i, h)})
        save(tensors, f"model-{layer + 1:05d}-of-{shards:05d}.safetensors")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"config": config, "checkpoint_bytes": total}


def disk_read_rate(store: Any, seconds_per_setting: float = 3.0) -> dict[str, Any]:
    """Best O_DIRECT read rate over the store's expert blobs, 1 to 8 reads in flight (moeserve's BlobReader).

    Each setting reads distinct blobs (cycling through the store) for about ``seconds_per_setting``; the best
    setting's rate is the disk rate of the bound.
    """
    from engine.offload.tiers import BlobReader, ReadMode, ReadRequest, SlotArena

    blobs = [store.blob(layer, expert) for layer in store.moe_layers for expert in range(store.num_experts[layer])]
    slot_bytes = max(b.padded_nbytes for b in blobs)
    rates: dict[str, float] = {}
    cursor = 0
    for in_flight in (1, 2, 4, 8):
        arena = SlotArena(in_flight, slot_bytes)
        reader = BlobReader(ReadMode.DIRECT, io_threads=in_flight)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds_per_setting:
            batch = [blobs[(cursor + k) % len(blobs)] for k in range(in_flight)]
            cursor += in_flight
            futures = [reader.submit(ReadRequest(b.file, b.offset, b.padded_nbytes, arena.slot(k)))
                       for k, b in enumerate(batch)]
            for future in futures:
                future.result()
            done += sum(b.padded_nbytes for b in batch)
        rates[str(in_flight)] = done / (time.perf_counter() - start)
        reader.close()
        del arena
    best = max(rates, key=rates.get)
    return {"bytes_per_s_by_reads_in_flight": {k: round(v) for k, v in rates.items()},
            "best_bytes_per_s": round(rates[best]), "best_reads_in_flight": int(best), "blob_bytes": slot_bytes}


class Runner:
    """Starts children inside the cgroup with the page cache dropped, collects their results and the cgroup's."""

    def __init__(self, args: argparse.Namespace, work: Path, vocab_size: int) -> None:
        self.args, self.work, self.vocab_size = args, work, vocab_size

    def run(self, system: str, python: str, cgroup: MemoryCgroup, model: str, offload_dir: str, budget: int,
            tokens: int) -> dict[str, Any]:
        out = self.work / f"{system}-{cgroup.limit_bytes}.json"
        log = self.work / f"{system}-{cgroup.limit_bytes}.log"
        command = [python, __file__, "child", system, "--model", model, "--out", str(out), "--offload-dir",
                   offload_dir, "--budget", str(budget), "--tokens", str(tokens), "--threads", str(self.args.threads),
                   "--vocab-size", str(self.vocab_size)]
        drop_page_cache()
        cgroup.reset_peak()
        load = os.getloadavg()
        logger.info("%s under %.2f GiB: %s", system, cgroup.limit_bytes / GIB, " ".join(command))
        start = time.perf_counter()
        with log.open("w") as sink:
            try:
                code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=cgroup.enter,
                                      timeout=self.args.child_timeout, env=self._env()).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        row: dict[str, Any] = {"load_average_before": [round(x, 2) for x in load],
                               "wall_seconds": round(time.perf_counter() - start, 1), "cgroup": cgroup.usage(),
                               "load_average_after": [round(x, 2) for x in os.getloadavg()]}
        if code == 0 and out.exists():
            row.update(status="ok", **json.loads(out.read_text()))
            out.unlink()
        else:
            row.update(status=f"failed (exit {code})", log_tail=log.read_text()[-3000:],
                       reproduce=" ".join(command))
        logger.info("%s: %s", system, {k: v for k, v in row.items() if k not in ("tokens", "token_seconds", "log_tail")})
        return row

    def _env(self) -> dict[str, str]:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        if self.args.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = self.args.omp_wait_policy
        return env


def source_state() -> dict[str, Any]:
    """The commit benchmarked and the engine files that differ from it (the working tree is what runs)."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True).stdout

    return {"commit": git("rev-parse", "HEAD").strip(),
            "uncommitted_engine_files": git("status", "--porcelain", "engine").splitlines()}


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bound_for(cap_row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The bound at one cap (see module doc), from moeserve's cache size at that cap (its budget if it did not run)."""
    stream, disk = result["stream_bytes_per_s"]["best"], result["disk"]["best_bytes_per_s"]
    moe = cap_row.get("moeserve", {})
    resident = moe.get("expert_cache_bytes") or cap_row["moeserve_budget_bytes"]
    fraction = min(1.0, resident / result["expert_bytes"])
    miss = result["expert_bytes_per_token"] * (1 - fraction)
    compute_s, read_s = result["bytes_touched_per_token"] / stream, miss / disk
    bound = {"resident_expert_fraction": round(fraction, 4), "miss_bytes_per_token": round(miss),
             "stream_seconds_per_token": round(compute_s, 4), "disk_seconds_per_token": round(read_s, 4),
             "bound_s_per_token": round(compute_s + read_s, 4), "bound_tok_per_s": round(1 / (compute_s + read_s), 4),
             "bound_overlapped_tok_per_s": round(1 / max(compute_s, read_s), 4)}
    if moe.get("status") == "ok":
        measured = moe["decode_expert_misses_per_token"] * result["expert_blob_bytes"]
        bound["measured_miss_bytes_per_token"] = round(measured)
        bound["bound_measured_misses_tok_per_s"] = round(1 / (compute_s + measured / disk), 4)
    return bound


def parent_main(args: argparse.Namespace) -> None:
    import torch
    from bandwidth import bytes_per_token, stream_rate
    from common import write_result

    from engine.logs import configure_logging
    from engine.offload.layout import ensure_store

    configure_logging("info")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    logger.info("load average before: %s", load_before)
    rates = stream_rate(int(args.stream_gib * GIB))
    logger.info("stream rate %.1f GB/s", rates["best"] / 1e9)
    tools_ok = Path(args.tools_python).exists()
    work = Path(tempfile.mkdtemp(prefix="offload-memcap-", dir=args.work_dir))
    result: dict[str, Any] = {"shape": {**SHAPE, "num_hidden_layers": args.layers}, "prompt_tokens": PROMPT_LEN,
                              "threads": args.threads, "omp_wait_policy": args.omp_wait_policy, "source": source_state(), "stream_bytes_per_s": {k: round(v) for k, v in rates.items()}}
    caps: dict[str, dict[str, Any]] = {}
    try:
        model = work / "model"
        start = time.perf_counter()
        written = write_model(model, args.layers)
        config = written["config"]
        result["model_write_seconds"] = round(time.perf_counter() - start, 1)
        result["checkpoint_bytes"] = written["checkpoint_bytes"]
        touched = bytes_per_token(config, torch.bfloat16)
        expert_blob = 3 * config.hidden_size * config.intermediate_size * 2
        expert_bytes = expert_blob * config.num_local_experts * args.layers
        per_token_experts = expert_blob * config.num_experts_per_tok * args.layers
        result.update(bytes_touched_per_token=touched, expert_blob_bytes=expert_blob, expert_bytes=expert_bytes,
                      expert_bytes_per_token=per_token_experts)
        runner = Runner(args, work, config.vocab_size)
        for cap_gib in args.caps_gib:
            caps[str(cap_gib)] = {"cap_bytes": int(cap_gib * GIB), "layers": args.layers,
                                  "moeserve_budget_bytes": int((cap_gib - args.moeserve_headroom_gib) * GIB),
                                  "accelerate_max_memory_bytes": int((cap_gib - args.accelerate_headroom_gib) * GIB)}
        offload = work / "offload"
        start = time.perf_counter()
        store = ensure_store(model, offload)
        result["store_prepare_seconds"] = round(time.perf_counter() - start, 1)
        drop_page_cache()
        result["disk"] = disk_read_rate(store)
        logger.info("disk O_DIRECT read rates: %s", result["disk"])
        for system in args.systems:
            files = prepare_system(system, args, work, model, runner, result, tools_ok)
            for cap_gib in args.caps_gib:
                row = caps[str(cap_gib)]
                if files is None:
                    row[system] = {"status": result["not_run"][system]}
                    continue
                cgroup = MemoryCgroup(row["cap_bytes"])
                try:
                    python = sys.executable if system == "moeserve" else args.tools_python
                    budget = {"moeserve": row["moeserve_budget_bytes"],
                              "accelerate": row["accelerate_max_memory_bytes"]}.get(system, 0)
                    folder = {"moeserve": str(offload),
                              "accelerate": str(work / f"accelerate-offload-{cap_gib}")}.get(system, "")
                    tokens = args.tokens if system == "moeserve" else args.baseline_tokens
                    row[system] = runner.run(system, python, cgroup, files, folder, budget, tokens)
                finally:
                    cgroup.remove()
                    if system == "accelerate":
                        shutil.rmtree(work / f"accelerate-offload-{cap_gib}", ignore_errors=True)
            if system == "moeserve":
                shutil.rmtree(offload, ignore_errors=True)
            if system == "llamacpp" and files is not None:
                Path(files).unlink(missing_ok=True)
        for row in caps.values():
            summarize(row, result, args.systems)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["caps"] = caps
    write_result(args.out, "offload_memcap", load_before, result)


def prepare_system(system: str, args: argparse.Namespace, work: Path, model: Path, runner: Runner,
                   result: dict[str, Any], tools_ok: bool) -> str | None:
    """What the system's child opens (model dir or GGUF), or None (reason in result['not_run'])."""
    not_run = result.setdefault("not_run", {})
    if system == "moeserve":
        return str(model)
    if not tools_ok:
        not_run[system] = f"benchmark-time tools not installed ({args.tools_python} missing)"
        return None
    probe = {"accelerate": "import accelerate, transformers", "llamacpp": "import llama_cpp"}[system]
    if subprocess.run([args.tools_python, "-c", probe], capture_output=True).returncode != 0:
        not_run[system] = f"'{probe}' fails in {args.tools_python} (not installed or not built yet)"
        return None
    if system == "accelerate":
        return str(model)
    gguf = work / "model-bf16.gguf"
    start = time.perf_counter()
    done = subprocess.run(["nice", "-n", "19", args.tools_python, __file__, "child", "gguf", "--model", str(model),
                           "--out", str(gguf), "--offload-dir", str(work / "gguf-staging"), "--vocab-size",
                           str(runner.vocab_size), "--converter", args.converter],
                          capture_output=True, text=True, env=runner._env())
    if done.returncode != 0:
        not_run[system] = f"GGUF conversion failed: {done.stderr[-2000:]}"
        return None
    result["gguf"] = {**json.loads(done.stdout.strip().splitlines()[-1]),
                      "wall_seconds": round(time.perf_counter() - start, 1)}
    return str(gguf)


def summarize(row: dict[str, Any], result: dict[str, Any], systems: list[str]) -> None:
    """Bound, fractions of it, moeserve / baseline ratios and token agreement at one cap."""
    row["bound"] = bound_for(row, result)
    ok = {s: row[s] for s in systems if row.get(s, {}).get("status") == "ok"}
    row["fraction_of_bound"] = {s: round(r["decode_tok_per_s"] / row["bound"]["bound_tok_per_s"], 3)
                                for s, r in ok.items()}
    if "bound_measured_misses_tok_per_s" in row["bound"]:
        row["fraction_of_bound_measured_misses"] = {
            s: round(r["decode_tok_per_s"] / row["bound"]["bound_measured_misses_tok_per_s"], 3) for s, r in ok.items()}
    if "moeserve" in ok:
        row["moeserve_over"] = {s: round(ok["moeserve"]["decode_tok_per_s"] / r["decode_tok_per_s"], 2)
                                for s, r in ok.items() if s != "moeserve"}
        row["tokens_matching_moeserve"] = {s: matching_prefix(ok["moeserve"]["tokens"], r["tokens"])
                                           for s, r in ok.items() if s != "moeserve"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps-gib", type=float, nargs="+", default=[3.0])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--tokens", type=int, default=32, help="tokens moeserve decodes (first one excluded)")
    parser.add_argument("--baseline-tokens", type=int, default=32, help="tokens each baseline decodes")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--moeserve-headroom-gib", type=float, default=0.8,
                        help="cap minus this = moeserve's expert_cache_bytes (process, resident weights, KV)")
    parser.add_argument("--accelerate-headroom-gib", type=float, default=1.0,
                        help="cap minus this = accelerate's max_memory for cpu-resident weights")
    parser.add_argument("--stream-gib", type=float, default=1.0)
    parser.add_argument("--omp-wait-policy", choices=["active", "passive"],
                        help="OMP_WAIT_POLICY for every child (torch and llama.cpp both use OpenMP); unset by default")
    parser.add_argument("--tools-python", default=DEFAULT_TOOLS_PYTHON)
    parser.add_argument("--converter", default=DEFAULT_CONVERTER)
    parser.add_argument("--child-timeout", type=float, default=1800)
    parser.add_argument("--work-dir", default="/tmp")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parent_main(parser.parse_args())


if __name__ == "__main__":
    main()
