"""Shared fixtures: an environment without the user's MOESERVE_* variables, demo checkpoints built once; the
`cuda` marker (tests that need a GPU)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config import ENV_PREFIX

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
