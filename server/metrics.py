"""Prometheus metrics of the server, with the exact names of DESIGN's contract.

Only what exists is exported: request, token, latency, KV-cache and preemption metrics, and the expert-cache
metrics the engine reports in offload mode (per-layer hits and misses, bytes loaded and cached per tier,
prefetch issued/used/wasted, the stall-time histogram, the look-ahead's prediction recall once it has predicted).
The trace store's size is exported always (the store exists in every mode); nothing is a zero-valued stand-in.
Each `ServerMetrics` has its own registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from engine.request import RequestTimes
from engine.request import RequestOutput

PREFIX = "moeserve:"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's stats snapshot at scrape time (nothing before it loads)."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        if stats is None:
            return
        yield GaugeMetricFamily(f"{PREFIX}num_requests_running", "Sequences running in the engine.",
                                value=stats["requests_running"])
        yield GaugeMetricFamily(f"{PREFIX}num_requests_waiting", "Sequences waiting to be scheduled.",
                                value=stats["requests_waiting"])
        yield GaugeMetricFamily(f"{PREFIX}kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
                                value=stats["kv_cache_usage"])
        yield CounterMetricFamily(f"{PREFIX}num_preemptions", "Sequences preempted for lack of KV blocks.",
                                  value=stats["num_preemptions"])
        yield GaugeMetricFamily(f"{PREFIX}trace_store_entries", "Entries of the shared trace store.",
                                value=stats["trace_store_entries"])
        yield from _expert_metrics(stats)


def _expert_metrics(stats: dict[str, Any]) -> Iterator[Any]:
    """Expert-cache metrics, for the keys the engine reports (only in offload mode)."""
    per_layer = stats.get("per_layer", {})
    for key, name, documentation in (("hits", "expert_cache_hits", "Expert lookups served from the cache."),
                                     ("misses", "expert_cache_misses", "Expert lookups that had to load.")):
        if key in per_layer:
            yield _labelled(CounterMetricFamily, name, documentation, "layer", enumerate(per_layer[key]))
    for key, name, documentation in (
        ("expert_prefetch_issued", "expert_prefetch_issued", "Expert reads started by prefetch."),
        ("expert_prefetch_used", "expert_prefetch_used", "Prefetched experts used before eviction."),
        ("expert_prefetch_wasted", "expert_prefetch_wasted", "Prefetched experts evicted unused."),
    ):
        if key in stats:
            yield CounterMetricFamily(f"{PREFIX}{name}", documentation, value=stats[key])
    if "expert_stall_histogram" in stats:
        yield _stall_histogram(stats["expert_stall_histogram"])
    if stats.get("expert_prediction_recall") is not None:
        yield GaugeMetricFamily(f"{PREFIX}expert_prediction_recall",
                                "Share of routed experts the gate look-ahead predicted.",
                                value=stats["expert_prediction_recall"])
    if "expert_bytes_read" in stats:
        yield _labelled(CounterMetricFamily, "expert_load_bytes", "Expert bytes loaded, by source tier.", "tier",
                        stats["expert_bytes_read"].items())
    if "expert_cache_bytes" in stats:
        yield _labelled(GaugeMetricFamily, "expert_cache_bytes", "Bytes of experts cached, by tier.", "tier",
                        stats["expert_cache_bytes"].items())


def _labelled(kind: type, name: str, documentation: str, label: str, values: Iterable[tuple[Any, float]]) -> Any:
    """A ``kind`` metric family named ``name`` with one sample per (label value, value) pair."""
    family = kind(f"{PREFIX}{name}", documentation, labels=[label])
    for label_value, value in values:
        family.add_metric([str(label_value)], value)
    return family


def _stall_histogram(snapshot: dict[str, Any]) -> HistogramMetricFamily:
    """The engine's stall histogram (per-bucket counts) as Prometheus cumulative buckets."""
    bounds = [*(str(bound) for bound in snapshot["buckets"]), "+Inf"]
    cumulative = list(accumulate(snapshot["counts"]))
    return HistogramMetricFamily(f"{PREFIX}expert_stall_seconds", "Time the experts forward waited on expert reads.",
                                 buckets=list(zip(bounds, cumulative)), sum_value=snapshot["sum"])


class ServerMetrics:
    """The server's metrics; `observe_finished` is called once per request when it ends."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", registry=self.registry)
        self.request_success = Counter(f"{PREFIX}request_success", "Requests finished, by finish reason.",
                                       ["finished_reason"], registry=self.registry)
        self.time_to_first_token = self._histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = self._histogram("inter_token_latency_seconds",
                                                   "Mean gap between tokens, per request.")
        self.e2e_latency = self._histogram("e2e_request_latency_seconds", "Arrival to the last token.")
        self.queue_time = self._histogram("request_queue_time_seconds", "Arrival to first scheduled.")

    def _histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(f"{PREFIX}{name}", documentation, buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def observe_finished(self, output: RequestOutput, times: RequestTimes) -> None:
        """Account one request that ended (finished, or cut short: its last output)."""
        end = time.monotonic()
        num_generated = sum(len(completion.token_ids) for completion in output.outputs)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(num_generated)
        for completion in output.outputs:
            self.request_success.labels(completion.finish_reason or "abort").inc()
        self.e2e_latency.observe(end - times.arrival)
        if times.scheduled is not None:
            self.queue_time.observe(times.scheduled - times.arrival)
        if times.first_token is not None:
            self.time_to_first_token.observe(times.first_token - times.arrival)
            per_sequence = num_generated / max(len(output.outputs), 1)
            if per_sequence > 1:
                self.inter_token_latency.observe((end - times.first_token) / (per_sequence - 1))
