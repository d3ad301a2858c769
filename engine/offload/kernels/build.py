"""Build the CPU experts kernel: ``python -m engine.offload.kernels.build [--force]``.

One g++ invocation over ``experts_cpu.cpp`` with torch's include and library paths (from
``torch.utils.cpp_extension``), no CUDA, no ninja; output ``_build/moeserve_experts_cpu.so`` plus a fingerprint
file the loader checks. Up to date builds are skipped. Exits non-zero, with the compiler's message, on failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import sysconfig

import torch
from torch.utils import cpp_extension

from engine.offload.kernels import BUILD_DIR, CXX_FLAGS, LIBRARY, SOURCE, STAMP, fingerprint

logger = logging.getLogger(__name__)


class CompilerMissing(RuntimeError):
    """No C++ compiler on PATH."""


def compiler() -> str:
    """The C++ compiler to use: $CXX's choice as torch resolves it, else g++ on PATH."""
    name = cpp_extension.get_cxx_compiler()
    path = shutil.which(name) or shutil.which("g++")
    if path is None:
        raise CompilerMissing(f"no C++ compiler found (tried {name!r} and 'g++')")
    return path


def compile_command(output: str) -> list[str]:
    """The full g++ command line that builds ``SOURCE`` into ``output``."""
    includes = [*cpp_extension.include_paths("cpu"), sysconfig.get_path("include")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler(),
        *CXX_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-isystem{path}" for path in includes),
        str(SOURCE),
        "-o",
        output,
        *(f"-L{path}" for path in cpp_extension.library_paths("cpu")),
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
    ]


def is_current() -> bool:
    """True when the library exists and was built from the current source, flags and torch."""
    return LIBRARY.exists() and STAMP.exists() and STAMP.read_text().strip() == fingerprint()


def build(force: bool = False) -> None:
    """Compile the kernel unless a current build exists. Raises CompilerMissing or CalledProcessError."""
    if is_current() and not force:
        logger.info("experts kernel up to date: %s", LIBRARY)
        return
    BUILD_DIR.mkdir(exist_ok=True)
    partial = LIBRARY.with_name(f"{LIBRARY.name}.{os.getpid()}.tmp")  # concurrent builds never share a file
    command = compile_command(str(partial))
    logger.info("building experts kernel: %s", " ".join(command))
    subprocess.run(command, check=True)
    partial.replace(LIBRARY)
    STAMP.write_text(fingerprint() + "\n")
    logger.info("built %s", LIBRARY)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: build (or `--force` rebuild) and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build(force=args.force)
    except CompilerMissing as error:
        logger.error("%s", error)
        return 2
    except subprocess.CalledProcessError as error:
        logger.error("compiler failed with exit status %d", error.returncode)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
