"""The optional compiled CPU experts kernel: where it lives and how it is loaded.

The kernel (``experts_cpu.cpp``: the torch ops ``torch.ops.moeserve.experts_group``, ``dense`` for engine.dense,
``rms_norm`` for engine.norms, ``route_topk`` for engine.routers and ``decode_attention`` for engine.attention) is
built ahead of time by ``python -m engine.offload.kernels.build`` into ``_build/`` beside this file. Loading never
compiles: when the library is missing, stale (source, flags or torch changed since the build) or the CPU lacks
AVX2+FMA, ``load_experts_kernel()`` logs one line and returns ``None``, and callers use their pure-torch path.

The kernel's paths for bf16 weight rows (at up to 64 tokens: decode, and the few-row products of engine.dense)
come in three instruction sets, chosen at load time by what the CPU has: ``avx512_bf16`` (AVX-512 F, BW, VL and
BF16: from 3 tokens, bf16 inputs are multiplied with the weights in bf16 pairs, exact in fp32), else ``avx512``
(AVX-512 F, BW and VL), else ``avx2``. ``select_isa`` switches between them (tests check each the CPU has;
benchmarks compare them in one run).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("experts_cpu.cpp")
BUILD_DIR = Path(__file__).with_name("_build")
LIBRARY = BUILD_DIR / "moeserve_experts_cpu.so"
STAMP = BUILD_DIR / "fingerprint.txt"
BUILD_COMMAND = "python -m engine.offload.kernels.build"
# -O3 and the ISA the kernel is written for; OpenMP so at::parallel_for uses torch's own thread pool.
CXX_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++20", "-fPIC", "-shared")


def fingerprint() -> str:
    """A hash of everything the built library depends on: source text, compiler flags, torch version."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(CXX_FLAGS).encode())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()


def _cpu_supported() -> bool:
    """True when torch reports at least AVX2 (which on x86 comes with FMA and F16C)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes of inputs and weights the kernel's ops take."""
ISAS = ("avx2", "avx512", "avx512_bf16")
"""The kernel's instruction sets, in the order of its ``experts_isa`` codes (each includes the ones before)."""
RUNS = (1, 4, 8)
"""How many runs of rows a kernel thread may read side by side at 1-2 tokens, and at most 4 at 3-4 tokens on the
bf16 pair products (``experts_runs``; 8 by default, 1 is the single sequential run of the paths before: see
experts_cpu.cpp, "several runs of rows side by side")."""


@functools.cache
def load_experts_kernel() -> Callable[..., None] | None:
    """``torch.ops.moeserve.experts_group`` when a current build exists for this CPU, else ``None`` (logged once).

    The op's one overload itself (``.default``): calling the overload packet resolves the overload in Python on every
    call, which a decode step pays once per MoE layer."""
    if not _cpu_supported():
        logger.info("experts kernel: CPU lacks AVX2+FMA; using the pure-torch experts forward")
        return None
    if not LIBRARY.exists():
        logger.info("experts kernel not built (run `%s`); using the pure-torch experts forward", BUILD_COMMAND)
        return None
    if not STAMP.exists() or STAMP.read_text().strip() != fingerprint():
        logger.warning("experts kernel is stale (rebuild with `%s`); using the pure-torch experts forward", BUILD_COMMAND)
        return None
    torch.ops.load_library(str(LIBRARY))
    return torch.ops.moeserve.experts_group.default


@functools.cache
def kernel_op(name: str) -> Callable[..., object]:
    """``torch.ops.moeserve.<name>``'s one overload itself (``.default``), looked up once: calling the overload packet
    resolves the overload in Python, and the lookup is a chain of attribute reads, on every call of a decode step's
    hot ops. Needs the kernel loaded (`load_experts_kernel`)."""
    return getattr(torch.ops.moeserve, name).default


def best_isa() -> str:
    """The richest of ISAS this CPU runs: the loaded kernel's default. Needs the kernel loaded."""
    return ISAS[torch.ops.moeserve.experts_best_isa()]


def select_isa(name: str) -> str:
    """Make the loaded kernel's decode paths use ``name`` (one of ISAS); returns the one used before.

    Raises ValueError for an unknown name and RuntimeError when this CPU lacks that instruction set."""
    if name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; expected one of {', '.join(ISAS)}")
    previous = torch.ops.moeserve.experts_isa(-1)
    torch.ops.moeserve.experts_isa(ISAS.index(name))
    return ISAS[previous]


@contextmanager
def using_isa(name: str) -> Iterator[str]:
    """The loaded kernel's decode paths on ``name`` for the block (`select_isa`), the previous one restored after."""
    previous = select_isa(name)
    try:
        yield name
    finally:
        select_isa(previous)


def best_seconds(fn: Callable[[], None], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed runs of ``fn`` after one warm-up: how the engine times kernel against torch
    at load (engine.dense, engine.offload.experts) and benchmarks/bandwidth.py its stream rates."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@contextmanager
def using_runs(count: int) -> Iterator[int]:
    """The loaded kernel reading ``count`` (one of RUNS) runs of rows side by side at few tokens for the block,
    the previous count restored after (benchmarks and tests compare the settings in one process)."""
    if count not in RUNS:
        raise ValueError(f"runs must be one of {RUNS}, not {count!r}")
    previous = torch.ops.moeserve.experts_runs(-1)
    torch.ops.moeserve.experts_runs(count)
    try:
        yield count
    finally:
        torch.ops.moeserve.experts_runs(previous)
