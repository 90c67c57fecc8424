"""Prometheus metrics (prefix `cpm2_`), in a registry of the app's own.

Request-side metrics (latencies, token counts, outcomes) are observed as requests complete; engine
and prompt-store state (queue, running, steps, expert traffic, prompt cache) is read at scrape time
by a collector, so it is never stale. Step-level histograms (batch size, distinct prompts per
batch, forward time) are fed from the engine's step records when /metrics is scraped. Labels stay
low-cardinality: no per-prompt labels.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.serving.protocol import EngineClient, EngineRequest, StepRecord, TokenEvent
from server import version
from server.prompt_store import PromptStore

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cpm2_requests", "HTTP requests by route and status", ["route", "code"], registry=r)
        self.failures = Counter(
            "cpm2_request_failures", "failed requests by error type", ["route", "error_type"], registry=r
        )
        self.rejected_requests = Counter(
            "cpm2_requests_rejected", "requests refused before running", ["reason"], registry=r
        )
        self.success = Counter(
            "cpm2_request_success",
            "finished generations by finish reason",
            ["route", "finish_reason"],
            registry=r,
        )
        self.duration = Histogram(
            "cpm2_request_duration_seconds", "arrival to last token", ["route"], buckets=LATENCY, registry=r
        )
        self.queue = Histogram("cpm2_request_queue_duration_seconds", "time queued", buckets=LATENCY, registry=r)
        self.ttft = Histogram(
            "cpm2_time_to_first_token_seconds",
            "arrival to first token",
            ["route"],
            buckets=LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "cpm2_inter_token_latency_seconds", "time between tokens of a stream", buckets=LATENCY, registry=r
        )
        self.input_tokens = Histogram(
            "cpm2_request_input_tokens", "text tokens of the input", buckets=TOKENS, registry=r
        )
        self.virtual_tokens = Histogram(
            "cpm2_request_virtual_tokens", "soft-prompt tokens of the input", buckets=TOKENS, registry=r
        )
        self.generated_tokens = Histogram(
            "cpm2_request_generated_tokens", "tokens generated per request", buckets=TOKENS, registry=r
        )
        self.batch_size = Histogram("cpm2_batch_size", "rows per engine step", ["phase"], buckets=BATCH, registry=r)
        self.batch_prompts = Histogram(
            "cpm2_batch_distinct_prompts", "distinct soft prompts per step", buckets=BATCH, registry=r
        )
        self.forward = Histogram(
            "cpm2_batch_forward_duration_seconds", "engine step time", ["phase"], buckets=LATENCY, registry=r
        )
        self.uploads = Counter("cpm2_prompt_uploads", "prompt uploads by result", ["result"], registry=r)
        self.ready = Gauge("cpm2_ready", "1 when accepting requests", registry=r)
        self.draining = Gauge("cpm2_draining", "1 while draining for shutdown", registry=r)
        self.build = Gauge(
            "cpm2_build_info", "build and model", ["version", "model", "dtype", "torch", "python"], registry=r
        )

    def describe_build(self, *, model: str, dtype: str) -> None:
        self.build.labels(version(), model, dtype, torch.__version__, platform.python_version()).set(1)

    def attach(self, engine: EngineClient, store: PromptStore, in_flight: Callable[[], int]) -> None:
        self.registry.register(_StateCollector(engine, store, in_flight, self))
        engine.add_step_listener(self.observe_step)

    # ---- request events ------------------------------------------------------------------------

    def rejected(self, route: str, reason: str) -> None:
        self.rejected_requests.labels(reason).inc()

    def first_token(self, route: str, seconds: float, queue_seconds: float) -> None:
        self.ttft.labels(route).observe(seconds)
        self.queue.observe(queue_seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, route: str, request: EngineRequest, last: TokenEvent, seconds: float) -> None:
        self.duration.labels(route).observe(seconds)
        self.success.labels(route, last.finish_reason or "length").inc()
        self.input_tokens.observe(last.num_input_tokens)
        self.virtual_tokens.observe(last.num_virtual_tokens)
        self.generated_tokens.observe(last.index)

    def response(self, route: str, code: int, error_type: str | None = None) -> None:
        self.requests.labels(route, str(code)).inc()
        if error_type is not None:
            self.failures.labels(route, error_type).inc()

    def observe_step(self, step: StepRecord) -> None:
        """Called by the engine after every step, on its thread (prometheus_client is thread-safe)."""
        self.batch_size.labels(step.phase).observe(step.batch_size)
        self.forward.labels(step.phase).observe(step.seconds)
        if step.phase == "decode":
            self.batch_prompts.observe(step.distinct_prompts)

    def exposition(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Engine and prompt-store state, read when Prometheus scrapes."""

    def __init__(
        self, engine: EngineClient, store: PromptStore, in_flight: Callable[[], int], metrics: Metrics
    ) -> None:
        self.engine = engine
        self.store = store
        self.in_flight = in_flight
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.engine.stats()
        info = self.engine.info()
        gauges = {
            "cpm2_requests_running": ("requests in the decode batch", stats.running),
            "cpm2_requests_waiting": ("requests queued", stats.waiting),
            "cpm2_requests_in_flight": ("requests being served over HTTP", self.in_flight()),
            "cpm2_queue_limit": ("queued requests allowed", info.max_queue),
            "cpm2_batch_limit": ("rows per batch allowed", info.max_batch_size),
            "cpm2_engine_last_step_timestamp_seconds": (
                "unix time of the last engine step",
                stats.last_step_unix,
            ),
            "cpm2_prompts_registered": ("soft prompts in the store", len(self.store.records())),
            "cpm2_prompt_cache_bytes": ("bytes of soft prompts cached in memory", self.store.cached_bytes),
            "cpm2_prompt_cache_entries": ("soft prompts cached in memory", self.store.num_cached),
            "cpm2_expert_memory_bytes": ("expert pool budget", info.expert_memory_bytes),
            "cpm2_expert_pool_used_bytes": (
                "most bytes the expert pool has held at once (high-water mark; <= the budget)",
                stats.experts.get("pool_used_bytes_peak", 0.0),
            ),
            "cpm2_expert_resident_bytes": (
                "expert bytes in RAM now: the pool plus the mapped store's pages in the page cache",
                stats.experts.get("resident_bytes", 0.0),
            ),
            "cpm2_expert_mapped_resident_bytes": (
                "bytes of the memory-mapped expert store in the page cache (page-cache mode computes from "
                "them in place; the budget does not bound them)",
                stats.experts.get("mapped_resident_bytes", 0.0),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        c = self.store.counters
        counters = {
            "cpm2_engine_steps": ("engine steps", stats.steps_total),
            "cpm2_generation_tokens": ("tokens generated", stats.generated_tokens_total),
            "cpm2_prompt_tokens": ("input text tokens", stats.prompt_tokens_total),
            "cpm2_virtual_tokens": ("soft-prompt tokens", stats.virtual_tokens_total),
            "cpm2_requests_cancelled": ("requests cancelled by their client", stats.requests_cancelled),
            "cpm2_requests_timed_out": ("requests past their deadline", stats.requests_timed_out),
            "cpm2_engine_request_failures": ("requests failed inside the engine", stats.requests_failed),
            "cpm2_prompt_cache_hits": ("soft-prompt cache hits", c.cache_hits),
            "cpm2_prompt_cache_misses": ("soft-prompt cache misses", c.cache_misses),
            "cpm2_prompt_cache_evictions": ("soft-prompt cache evictions", c.cache_evictions),
            "cpm2_prompt_load_failures": ("soft-prompt loads that failed", c.load_failures),
            "cpm2_prompt_load_seconds": ("time spent loading soft prompts", c.load_seconds_total),
        }
        experts = stats.experts
        expert_counters = {
            "cpm2_expert_bytes_moved": ("bytes moved into the expert pool", "bytes_moved"),
            "cpm2_expert_transfers": ("expert loads into the pool", "transfers"),
            "cpm2_expert_cache_hits": ("experts found in the pool", "hits"),
            "cpm2_expert_in_place": ("experts used from the page cache in place", "in_place"),
            "cpm2_expert_cache_misses": ("experts loaded on demand", "misses"),
            "cpm2_expert_prefetches": ("experts loaded by prediction", "prefetches"),
            "cpm2_expert_predicted": ("experts predicted for a layer before it ran", "predicted"),
            "cpm2_expert_predicted_used": ("predicted experts the layer then needed", "predicted_used"),
            "cpm2_expert_needed_after_prediction": (
                "experts needed by layers that had a prediction (precision = predicted_used / predicted, "
                "recall = predicted_used / needed_after_prediction)",
                "needed_after_prediction",
            ),
            "cpm2_expert_stall_seconds": ("time compute waited for expert transfers", "stall_seconds"),
            "cpm2_expert_transfer_seconds": ("time spent moving experts", "transfer_seconds"),
        }
        for name, (doc, key) in expert_counters.items():
            counters[name] = (doc, experts.get(key, 0.0))
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))
        yield from _per_layer(stats.expert_layers)


#: Per-MoE-layer counters (label `layer`, e.g. "decoder.3"): the hit rate and the prediction's
#: precision and recall of each layer follow from them, as for the totals.
LAYER_COUNTERS = {
    "cpm2_expert_layer_hits": ("experts found in the pool, per MoE layer", "hits"),
    "cpm2_expert_layer_in_place": ("experts used from the page cache in place, per MoE layer", "in_place"),
    "cpm2_expert_layer_misses": ("experts loaded on demand, per MoE layer", "misses"),
    "cpm2_expert_layer_predicted": ("experts predicted for the layer before it ran", "predicted"),
    "cpm2_expert_layer_predicted_used": ("predicted experts the layer then needed", "predicted_used"),
    "cpm2_expert_layer_needed_after_prediction": (
        "experts the layer needed when it had a prediction",
        "needed_after_prediction",
    ),
}


def _per_layer(layers: dict[str, dict[str, float]]) -> Iterator[CounterMetricFamily]:
    if not layers:
        return
    for name, (doc, key) in LAYER_COUNTERS.items():
        family = CounterMetricFamily(name, doc, labels=["layer"])
        for layer, counts in layers.items():
            family.add_metric([layer], float(counts.get(key, 0.0)))
        yield family
