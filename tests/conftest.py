"""Shared fixtures: an environment without the user's MOESERVE_* variables, demo checkpoints built once, the
compiled experts kernel built once and run on each instruction set the CPU has; the `cuda` marker (tests that
need a GPU)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config import ENV_PREFIX
from engine.offload import kernels

DATA_DIR = Path(__file__).parent / "data"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU (skipped without one; scripts/gpu_check.sh runs them on a GPU machine)"
    )


@pytest.fixture(autouse=True)
def _clean_moeserve_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no MOESERVE_* variable unless they set it themselves."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``demo_model(arch, seed=0)`` -> a demo checkpoint directory, written once per session per (arch, seed)."""
    from engine.models.demo import DemoModelSpec, write_demo_model

    built: dict[tuple[str, int], Path] = {}

    def get(arch: str = "mixtral", seed: int = 0) -> Path:
        if (arch, seed) not in built:
            out = tmp_path_factory.mktemp(f"demo-{arch}-{seed}")
            built[arch, seed] = write_demo_model(out, DemoModelSpec(arch=arch, seed=seed))
        return built[arch, seed]

    return get


@pytest.fixture(scope="session")
def experts_kernel():
    """``torch.ops.moeserve.experts_group``, built once per session (skipped only without a C++ compiler)."""
    from engine.offload.kernels import build

    try:
        build.build()
    except build.CompilerMissing as error:
        pytest.skip(f"{error}: the kernel cannot be built here (the pure-torch path still runs)")
    kernels.load_experts_kernel.cache_clear()
    op = kernels.load_experts_kernel()
    assert op is not None, "kernel built but not loadable"
    return op


@pytest.fixture(params=kernels.ISAS)
def kernel_isa(request: pytest.FixtureRequest, experts_kernel) -> str:
    """The kernel with its decode paths on each instruction set in turn (those this CPU lacks are skipped)."""
    if kernels.ISAS.index(request.param) > kernels.ISAS.index(kernels.best_isa()):
        pytest.skip(f"this CPU lacks {request.param} (best: {kernels.best_isa()})")
    with kernels.using_isa(request.param):
        yield request.param
