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

