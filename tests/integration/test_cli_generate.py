"""`moeserve generate` and `moeserve demo-model` end to end through the CLI's main()."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoConfig

from engine.reference import generate_text
from server.cli import main

pytestmark = pytest.mark.slow


def test_generate_streams_the_reference_completion(
    demo_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = demo_model("mixtral")
    assert main(["generate", str(model_dir), "--prompt", "def main():", "--chat", "--max-tokens", "12"]) == 0
    streamed = capsys.readouterr().out
    expected = generate_text(model_dir, "def main():", chat=True, max_tokens=12)
    assert streamed.rstrip("\n") == expected and expected


def test_demo_model_command_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "olmoe"
    assert main(["demo-model", str(out), "--arch", "olmoe", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert AutoConfig.from_pretrained(out).num_experts == 16
