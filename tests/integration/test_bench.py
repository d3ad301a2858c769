"""`moeserve bench throughput` end to end through the CLI's main(): the engine's own report on a demo model, with
experts resident and offloaded; the pure report arithmetic on known timelines."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from server.bench import RequestRecord, percentiles, summarize
from server.cli import EXIT_USAGE, main


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_bench_throughput_reports_every_request_and_token(demo_model: Callable[..., Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    report = run_json(["bench", "throughput", str(demo_model("mixtral")), "--num-prompts", "5", "--input-len", "7",
                       "--output-len", "4", "--max-num-seqs", "2", "--json"], capsys)
    assert (report["requests"], report["failed"]) == (5, 0)
    assert (report["prompt_tokens"], report["output_tokens"]) == (35, 20)  # ignore_eos: exactly --output-len each
    assert report["output_throughput"] == pytest.approx(20 / report["elapsed_s"], rel=1e-2)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < report[key]["median"] <= report[key]["p99"]
    # Two requests per step at most: the last requests wait for the first ones, so their TTFT is longer.
    assert report["ttft_ms"]["p99"] > report["ttft_ms"]["median"]
    assert "expert_hits" not in report["engine"]  # every expert resident: no cache to report


@pytest.mark.slow
def test_bench_throughput_offloaded_reports_the_expert_cache(demo_model: Callable[..., Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    report = run_json(["bench", "throughput", str(demo_model("mixtral")), "--num-prompts", "3", "--input-len", "5",
                       "--output-len", "3", "--expert-cache-bytes", "1MiB", "--offload-dir", str(tmp_path),
                       "--json"], capsys)
    assert report["output_tokens"] == 9
    engine = report["engine"]
    assert engine["expert_hits"] + engine["expert_misses"] > 0 and engine["expert_bytes_read"]["disk"] > 0


def test_bench_throughput_refuses_prompts_longer_than_the_model(demo_model: Callable[..., Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "throughput", str(demo_model("mixtral")), "--max-model-len", "16", "--input-len", "10",
                 "--output-len", "10"]) == EXIT_USAGE
    assert "exceeds the model's max_model_len 16" in capsys.readouterr().err


def test_summary_of_known_timelines() -> None:
    # Two requests sent at t=0: tokens at 0.1, 0.3, 0.6 and at 0.2, 0.4; a third failed.
    records = [RequestRecord(4, 0.0, [0.1, 0.3, 0.6], 3), RequestRecord(6, 0.0, [0.2, 0.4], 2),
               RequestRecord(5, 0.0, error="HTTP 500: boom")]
    report = summarize(records, elapsed=1.0)
    assert (report["requests"], report["failed"], report["first_error"]) == (2, 1, "HTTP 500: boom")
    assert (report["prompt_tokens"], report["output_tokens"], report["total_throughput"]) == (10, 5, 15.0)
    assert report["ttft_ms"] == {"mean": 150.0, "median": 150.0, "p99": 199.0}
    assert report["tpot_ms"]["mean"] == pytest.approx(225.0)  # (0.5 / 2 + 0.2 / 1) / 2
    assert report["itl_ms"]["median"] == pytest.approx(200.0)  # gaps 0.2, 0.3, 0.2
    assert report["e2e_ms"]["p99"] == pytest.approx(598.0)
    assert percentiles([]) is None
