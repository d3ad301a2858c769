"""Project conventions that code review alone would let slip."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_library_code_never_prints() -> None:
    """Library modules log; only the CLI writes command output (to sys.stdout, explicitly)."""
    offenders = []
    for path in sorted((REPO / "engine").rglob("*.py")) + sorted((REPO / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_readme_documents_every_config_key() -> None:
    from engine.config import config_keys

    readme = (REPO / "README.md").read_text()
    assert [key for key in config_keys() if f"| `{key}` |" not in readme] == []


def test_import_engine_makes_openmp_threads_wait_passively_unless_told_otherwise() -> None:
    import os
    import subprocess
    import sys

    script = "import engine, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    run = [sys.executable, "-c", script]
    assert subprocess.run(run, env=env, capture_output=True, text=True, cwd=REPO).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run(run, env=env, capture_output=True, text=True, cwd=REPO).stdout.strip() == "ACTIVE"
