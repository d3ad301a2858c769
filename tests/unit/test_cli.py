"""The `moeserve` command line: every subcommand present, usage and configuration errors exit 2 naming them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.cli import EXIT_USAGE, main

SUBCOMMANDS = ("serve", "generate", "prepare", "demo-model", "replay", "bench")


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out


def test_console_script_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "server.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("moeserve ")


def test_bench_needs_a_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench"])
    assert exit_.value.code == EXIT_USAGE
    assert "throughput" in capsys.readouterr().err


def test_bench_throughput_of_a_missing_model_directory_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "throughput", "no-such-model-dir"]) == EXIT_USAGE
    assert "model directory not found: no-such-model-dir" in capsys.readouterr().err


def test_bench_serve_without_a_server_exits_2_saying_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == "" and "did not answer" in captured.err


def test_serve_of_a_missing_model_directory_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "no-such-model-dir", "--port", "8123"]) == EXIT_USAGE
    assert "model directory not found: no-such-model-dir" in capsys.readouterr().err


def test_serve_validates_configuration_before_anything_else(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "model-dir", "--port", "70000"]) == EXIT_USAGE
    assert "port:" in capsys.readouterr().err


def test_serve_offload_flags_are_validated_as_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "model-dir", "--expert-cache-bytes", "lots"]) == EXIT_USAGE
    assert "expert_cache_bytes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "model-dir", "--expert-prefetch", "sometimes"])
    assert exit_info.value.code == EXIT_USAGE and "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda starts a server")
def test_serve_device_cuda_without_a_gpu_exits_2_before_the_server_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path), "--device", "cuda"]) == EXIT_USAGE
    assert "device: 'cuda' was requested" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tmp_path), "--device", "gpu"])
    assert exit_info.value.code == EXIT_USAGE and "invalid choice" in capsys.readouterr().err


def test_config_error_from_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MOESERVE_PROT", "8001")
    assert main(["generate", "model-dir", "--prompt", "x"]) == EXIT_USAGE
    assert "MOESERVE_PROT" in capsys.readouterr().err


def test_generate_reports_a_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == EXIT_USAGE
    assert "not a Hugging Face model directory" in capsys.readouterr().err


def test_demo_model_refuses_a_non_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["demo-model", str(tmp_path)]) == EXIT_USAGE
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_replay_prints_the_contract_json(capsys: pytest.CaptureFixture[str]) -> None:
    trace = Path(__file__).resolve().parents[1] / "data" / "mixtral-mario-2req.jsonl"
    assert main(["replay", str(trace), "--policy", "lru", "--slots-per-layer", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    contract = {"hit_rate", "belady_hit_rate", "global_belady_hit_rate", "prefetch_precision", "prefetch_recall",
                "bytes_loaded", "stall_seconds"}
    assert contract <= set(result)
    assert round(result["hit_rate"], 3) == 0.562 and round(result["global_belady_hit_rate"], 3) == 0.804


def test_replay_rejects_both_capacity_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "t.jsonl", "--slots-per-layer", "4", "--capacity", "128"])
    assert exit_.value.code == EXIT_USAGE and "not allowed with" in capsys.readouterr().err


def test_the_prefetch_gate_flag_overrides_configuration_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import build_parser, config_from_args

    monkeypatch.setenv("MOESERVE_EXPERT_PREFETCH_GATE", "false")
    parser = build_parser()
    assert config_from_args(parser.parse_args(["serve", "m"])).expert_prefetch_gate is False  # the environment's
    assert config_from_args(parser.parse_args(["serve", "m", "--expert-prefetch-gate"])).expert_prefetch_gate is True
    monkeypatch.delenv("MOESERVE_EXPERT_PREFETCH_GATE")
    assert config_from_args(parser.parse_args(["serve", "m"])).expert_prefetch_gate is True  # the default
    arguments = ["bench", "throughput", "m", "--no-expert-prefetch-gate"]
    assert config_from_args(parser.parse_args(arguments)).expert_prefetch_gate is False
