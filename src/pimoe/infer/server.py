"""HTTP inference server: :func:`create_app` serves models over ``POST /v1/infer``.

Each served model has its own :class:`MicroBatcher` (its worker thread runs the forward passes;
the async endpoint awaits the request's future) and, with ``cache_size > 0``, the app shares one
:class:`InferenceCache` in front of the batchers. ``GET /healthz`` answers liveness and lists the
models; ``GET /metrics`` exposes Prometheus metrics from a registry owned by the app.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send
from torch import Tensor

from pimoe.infer.batching import MicroBatcher
from pimoe.infer.cache import InferenceCache, make_key
from pimoe.infer.engine import InferenceConfig, InferenceEngine
from pimoe.infer.served import InferRequest, RequestError, ServedModel, request_rows, response_body
from pimoe.moe.model import PiMoELM

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class _Metrics:
    """The app's Prometheus registry and its metrics."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    batch_size: Histogram
    cache_hit_rate: Gauge


def _make_metrics(cache: InferenceCache | None) -> _Metrics:
    registry = CollectorRegistry()
    hit_rate = Gauge("pimoe_cache_hit_rate", "Hit rate of the inference cache since start (0 without a cache)",
                     registry=registry)
    hit_rate.set_function(lambda: cache.stats.hit_rate if cache is not None else 0.0)
    return _Metrics(
        registry=registry,
        requests=Counter("pimoe_requests", "Inference requests by model and HTTP status", ["model", "status"],
                         registry=registry),
        latency=Histogram("pimoe_request_latency_seconds", "Latency of successful inference requests",
                          ["model"], registry=registry),
        batch_size=Histogram("pimoe_batch_size", "Requests per forward pass", ["model"], buckets=_BATCH_BUCKETS,
                             registry=registry),
        cache_hit_rate=hit_rate,
    )


def _batch_fn(name: str, served: ServedModel, engine: InferenceEngine, metrics: _Metrics) -> Callable[..., Tensor]:
    """The function a model's batcher runs on ``batch [B, ...]`` (with ``lengths [B]`` for text encoders)."""
    observe = metrics.batch_size.labels(model=name).observe
    if served.kind == "text":
        def run_text(batch: Tensor, lengths: Tensor) -> Tensor:
            observe(batch.shape[0])
            return engine.infer(served.module, (batch, lengths))

        return run_text

    def run(batch: Tensor) -> Tensor:
        observe(batch.shape[0])
        out = engine.infer(served.module, batch)
        return out.logits if served.kind == "lm" else out

    return run


class _BodyLimit:
    """ASGI middleware: a request whose ``Content-Length`` exceeds ``max_bytes`` gets ``reject(length)``
    (a 413) without reaching the app. Plain ASGI rather than ``@app.middleware("http")``, whose
    per-request task group cost about a tenth of the server's CPU under load."""

    def __init__(self, app: ASGIApp, max_bytes: int, reject: Callable[[int], Response]) -> None:
        self.app, self.max_bytes, self.reject = app, max_bytes, reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for key, value in scope["headers"]:
                if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                    await self.reject(int(value))(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(
    models: Mapping[str, ServedModel | PiMoELM | str | os.PathLike[str]],
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    cache_size: int = 0,
    max_request_elements: int = 65_536,
    max_body_bytes: int = 8 * 2**20,
) -> FastAPI:
    """A FastAPI app serving ``models`` (name -> :class:`ServedModel`, a :class:`PiMoELM`, or the
    path of a saved PiMoELM).

    Args:
        max_batch_size, max_wait_ms: each model's :class:`MicroBatcher` settings.
        cache_size: entries of an LRU :class:`InferenceCache` shared by the models (keys are
            namespaced by model name); 0 disables caching.
        max_request_elements: most numbers (or tokens) in one request; more is answered 413.
        max_body_bytes: largest request body (by ``Content-Length``); larger is answered 413.

    The batchers are closed (draining queued requests) when the app shuts down.
    """
    if not models:
        raise ValueError("create_app needs at least one model")
    if max_request_elements < 1 or max_body_bytes < 1:
        raise ValueError("max_request_elements and max_body_bytes must be >= 1")
    if cache_size < 0:
        raise ValueError(f"cache_size must be >= 0, got {cache_size}")
    served: dict[str, ServedModel] = {}
    for name, m in models.items():
        if isinstance(m, ServedModel):
            served[name] = m
        elif isinstance(m, PiMoELM):
            served[name] = ServedModel.lm(m)
        else:
            served[name] = ServedModel.from_file(m)
    cache = InferenceCache(max_size=cache_size) if cache_size > 0 else None
    metrics = _make_metrics(cache)
    devices = {name: s.device for name, s in served.items()}
    batchers: dict[str, MicroBatcher] = {}
    for name, s in served.items():
        engine = InferenceEngine(InferenceConfig(device=str(devices[name])))
        batchers[name] = MicroBatcher(_batch_fn(name, s, engine, metrics), max_batch_size, max_wait_ms,
                                      seq_output=s.kind == "lm" or s.seq_output)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for batcher in batchers.values():
            await asyncio.to_thread(batcher.close)
        if cache is not None:
            cache.close()

    app = FastAPI(title="pimoe inference server", lifespan=lifespan)
    app.state.models, app.state.batchers, app.state.cache, app.state.metrics = served, batchers, cache, metrics

    def reject_body(length: int) -> JSONResponse:
        metrics.requests.labels(model="", status="413").inc()
        return _error(413, f"request body of {length} bytes exceeds the limit of {max_body_bytes} bytes")

    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes, reject=reject_body)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.requests.labels(model="", status="422").inc()
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request body: {problems}", "detail": _jsonable_errors(exc)},
                            status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness and the served models."""
        return {"status": "ok", "models": {n: s.kind for n, s in served.items()}}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        """Prometheus metrics of this app."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def run_row(name: str, x: Tensor) -> tuple[Any, bool]:
        """One row's output (from the cache, else from the model's batcher) and whether it was cached."""
        key = make_key(x, namespace=name) if cache is not None else ""
        out = cache.get(key) if cache is not None else None
        if out is not None:
            return out, True
        out = await asyncio.wrap_future(batchers[name].submit(x.to(devices[name])))
        if cache is not None:
            cache.put(key, out)
        return out, False

    @app.post("/v1/infer")
    async def infer(req: InferRequest) -> JSONResponse:
        """Run one request through its model's batcher (and the cache)."""
        start = time.perf_counter()
        label = req.model if req.model in served else ""
        try:
            if req.model not in served:
                raise RequestError(404, f"unknown model {req.model!r}; served: {sorted(served)}")
            s = served[req.model]
            rows, batched = request_rows(s, req, max_request_elements)
            results = await asyncio.gather(*(run_row(req.model, x) for x in rows))
            out = torch.stack([r[0] for r in results]) if batched else results[0][0]
            cached = all(r[1] for r in results)
            body = response_body(s, out, req.return_logits)
        except RequestError as exc:
            metrics.requests.labels(model=label, status=str(exc.status)).inc()
            return _error(exc.status, exc.message)
        except Exception as exc:  # the model failed: report it and keep serving
            metrics.requests.labels(model=label, status="500").inc()
            return _error(500, f"model {req.model!r} failed: {type(exc).__name__}: {exc}")
        latency = time.perf_counter() - start
        metrics.latency.labels(model=label).observe(latency)
        metrics.requests.labels(model=label, status="200").inc()
        return JSONResponse({"model": req.model, **body, "cached": cached, "latency_ms": latency * 1000})

    return app


def _jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's validation errors reduced to JSON-safe ``{"loc", "msg", "type"}`` items."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()]


def serve(model_path: str | os.PathLike[str], name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 32, max_wait_ms: float = 5.0, cache_size: int = 0) -> None:
    """Serve ``model_path`` (a saved :class:`PiMoELM` or a Hugging Face encoder folder) with
    uvicorn until interrupted; the model's name in requests is ``name`` or the path's base name."""
    import uvicorn

    model_name = name or os.path.splitext(os.path.basename(os.path.normpath(os.fspath(model_path))))[0]
    app = create_app({model_name: ServedModel.from_file(model_path)}, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, cache_size=cache_size)
    uvicorn.run(app, host=host, port=port)


__all__ = ["InferRequest", "RequestError", "ServedModel", "create_app", "serve"]
