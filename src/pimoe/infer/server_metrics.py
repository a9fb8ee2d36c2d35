"""The inference server's Prometheus metrics, in a registry owned by its app: every HTTP answer
by status, ``/v1/infer`` requests by model and status, their latency, the batch sizes of the
forward passes and the inference cache's hit rate."""

from __future__ import annotations

from dataclasses import dataclass

from pimoe.extras import extra_imports
from pimoe.infer.cache import InferenceCache

with extra_imports("serve", "pimoe.infer.server"):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServerMetrics:
    """The app's Prometheus registry and its metrics."""

    registry: CollectorRegistry
    responses: Counter
    requests: Counter
    latency: Histogram
    batch_size: Histogram
    cache_hit_rate: Gauge


def make_metrics(cache: InferenceCache | None) -> ServerMetrics:
    """The metrics in a new registry; the hit-rate gauge reads ``cache`` (0 without one)."""
    registry = CollectorRegistry()
    hit_rate = Gauge(
        "pimoe_cache_hit_rate",
        "Hit rate of the inference cache since start (0 without a cache)",
        registry=registry,
    )
    hit_rate.set_function(lambda: cache.stats.hit_rate if cache is not None else 0.0)
    return ServerMetrics(
        registry=registry,
        responses=Counter(
            "pimoe_http_responses",
            "Every HTTP answer of the app, by status",
            ["status"],
            registry=registry,
        ),
        requests=Counter(
            "pimoe_requests",
            "Inference requests by model and HTTP status",
            ["model", "status"],
            registry=registry,
        ),
        latency=Histogram(
            "pimoe_request_latency_seconds",
            "Latency of successful inference requests",
            ["model"],
            registry=registry,
        ),
        batch_size=Histogram(
            "pimoe_batch_size",
            "Requests per forward pass",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        ),
        cache_hit_rate=hit_rate,
    )


__all__ = ["ServerMetrics", "make_metrics"]
