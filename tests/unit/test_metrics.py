"""Metrics exposition: the contract's names, engine gauges read at scrape time, expert metrics only when the
engine reports them."""

from __future__ import annotations

from engine.request import RequestTimes
from engine.request import CompletionOutput, RequestOutput
from server.metrics import ServerMetrics

BASE_STATS = {"kv_blocks_used": 3, "kv_blocks_total": 12, "kv_cache_usage": 0.25, "requests_running": 2,
              "requests_waiting": 1, "num_preemptions": 4, "trace_store_entries": 7}
OFFLOAD_STATS = {**BASE_STATS, "expert_hits": 5, "expert_misses": 2, "expert_bytes_read": {"disk": 4096},
                 "expert_stall_seconds": 0.5, "expert_cache_bytes": {"host": 8192}, "expert_cache_slots": 4,
                 "per_layer": {"hits": [3, 2], "misses": [1, 1]}, "expert_prefetch_issued": 6,
                 "expert_prefetch_used": 4, "expert_prefetch_wasted": 1, "expert_prediction_recall": 0.75,
                 "expert_stall_histogram": {"buckets": [0.01, 0.1], "counts": [2, 0, 1], "sum": 3.5, "count": 3}}


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_nothing_from_the_engine_before_it_loads() -> None:
    text = ServerMetrics(lambda: None).render().decode()
    assert "moeserve:num_requests_running" not in text and "moeserve:prompt_tokens_total 0.0" in text


def test_engine_gauges_and_counters_and_no_expert_metrics_without_offload() -> None:
    samples = _samples(ServerMetrics(lambda: BASE_STATS).render().decode())
    assert samples["moeserve:num_requests_running"] == 2 and samples["moeserve:num_requests_waiting"] == 1
    assert samples["moeserve:kv_cache_usage_perc"] == 0.25 and samples["moeserve:num_preemptions_total"] == 4
    assert samples["moeserve:trace_store_entries"] == 7
    assert not any("expert" in name for name in samples)


def test_expert_metrics_in_offload_mode() -> None:
    samples = _samples(ServerMetrics(lambda: OFFLOAD_STATS).render().decode())
    assert samples['moeserve:expert_cache_hits_total{layer="0"}'] == 3
    assert samples['moeserve:expert_cache_misses_total{layer="1"}'] == 1
    assert samples['moeserve:expert_load_bytes_total{tier="disk"}'] == 4096
    assert samples['moeserve:expert_cache_bytes{tier="host"}'] == 8192
    assert samples["moeserve:expert_prefetch_issued_total"] == 6
    assert samples["moeserve:expert_prefetch_used_total"] == 4
    assert samples["moeserve:expert_prefetch_wasted_total"] == 1
    assert samples["moeserve:expert_prediction_recall"] == 0.75
    assert samples['moeserve:expert_stall_seconds_bucket{le="0.01"}'] == 2
    assert samples['moeserve:expert_stall_seconds_bucket{le="0.1"}'] == 2
    assert samples['moeserve:expert_stall_seconds_bucket{le="+Inf"}'] == 3
    assert samples["moeserve:expert_stall_seconds_count"] == 3 and samples["moeserve:expert_stall_seconds_sum"] == 3.5


def test_no_recall_gauge_before_the_look_ahead_has_predicted() -> None:
    samples = _samples(ServerMetrics(lambda: {**OFFLOAD_STATS, "expert_prediction_recall": None}).render().decode())
    assert "moeserve:expert_prediction_recall" not in samples and "moeserve:expert_prefetch_issued_total" in samples


def test_a_finished_request_is_accounted() -> None:
    metrics = ServerMetrics(lambda: None)
    times = RequestTimes(arrival=10.0, scheduled=10.5, first_token=11.0)
    output = RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, "ab", [4, 5], "stop"),
                                                  CompletionOutput(1, "a", [6], "length")])
    metrics.observe_finished(output, times)
    samples = _samples(metrics.render().decode())
    assert samples["moeserve:prompt_tokens_total"] == 3 and samples["moeserve:generation_tokens_total"] == 3
    assert samples['moeserve:request_success_total{finished_reason="stop"}'] == 1
    assert samples['moeserve:request_success_total{finished_reason="length"}'] == 1
    assert samples["moeserve:request_queue_time_seconds_sum"] == 0.5
    assert samples["moeserve:time_to_first_token_seconds_sum"] == 1.0
    assert samples["moeserve:e2e_request_latency_seconds_count"] == 1
