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
from typing import Any, Literal, cast

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel
from torch import Tensor, nn

from pimoe.infer.batching import MicroBatcher
from pimoe.infer.cache import InferenceCache, make_key
from pimoe.infer.engine import InferenceConfig, InferenceEngine
from pimoe.moe.model import PiMoELM

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServedModel:
    """A model the server runs.

    Args:
        module: a :class:`PiMoELM` (``kind="lm"``) or any ``nn.Module`` taking one float tensor
            ``[B, *input_shape]`` and returning a tensor with ``B`` rows (``kind="tensor"``).
        kind: "lm" (requests send ``token_ids`` or ``text``) or "tensor" (requests send ``inputs``).
        input_shape: for "tensor", the shape of one request's input; ``None`` entries accept any
            size (a leading ``None`` is a variable sequence length: requests of different
            lengths are padded with zeros in a batch, so the model must ignore padding).
        input_dtype: for "tensor", the dtype the JSON numbers are converted to.
        seq_output: for "tensor" with a variable length, whether outputs are per-position
            (``[B, Lmax, ...]``, cut back to each request's length) or pooled (``[B, ...]``).
    """

    module: nn.Module
    kind: Literal["lm", "tensor"]
    input_shape: tuple[int | None, ...] = ()
    input_dtype: str = "float32"
    seq_output: bool = True

    def __post_init__(self) -> None:
        if self.kind == "lm" and not isinstance(self.module, PiMoELM):
            raise TypeError(f"kind='lm' serves a PiMoELM, got {type(self.module).__name__}")
        if self.kind == "tensor":
            if not self.input_shape:
                raise ValueError("kind='tensor' needs a non-empty input_shape (one request's shape)")
            if self.input_dtype not in _DTYPES:
                raise ValueError(f"input_dtype must be one of {sorted(_DTYPES)}, got {self.input_dtype!r}")

    @classmethod
    def lm(cls, model: PiMoELM) -> ServedModel:
        """Serve a language model (token ids or UTF-8 text in; logits and next-token id out)."""
        return cls(model, "lm")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], map_location: str = "cpu") -> ServedModel:
        """Serve a :class:`PiMoELM` saved with :meth:`PiMoELM.save` (safetensors with config)."""
        return cls.lm(PiMoELM.load(path, map_location=map_location))

    @classmethod
    def tensor(cls, module: nn.Module, input_shape: tuple[int | None, ...], input_dtype: str = "float32",
               seq_output: bool = True) -> ServedModel:
        """Serve a module taking one float tensor ``[B, *input_shape]``."""
        return cls(module, "tensor", tuple(input_shape), input_dtype, seq_output)

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter or buffer (CPU for a module without any)."""
        for t in (*self.module.parameters(), *self.module.buffers()):
            return t.device
        return torch.device("cpu")


class InferRequest(BaseModel):
    """Body of ``POST /v1/infer``: ``model`` and exactly one of ``inputs``, ``token_ids``, ``text``."""

    model: str
    inputs: Any = None
    token_ids: list[int] | None = None
    text: str | None = None
    return_logits: bool = True


class RequestError(Exception):
    """A request the server rejects with ``status`` (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def _batch_fn(name: str, served: ServedModel, engine: InferenceEngine, metrics: _Metrics) -> Callable[[Tensor], Tensor]:
    """The function a model's batcher runs on ``batch [B, ...]``."""
    observe = metrics.batch_size.labels(model=name).observe

    def run(batch: Tensor) -> Tensor:
        observe(batch.shape[0])
        out = engine.infer(served.module, batch)
        return out.logits if served.kind == "lm" else out

    return run


def _to_input(served: ServedModel, req: InferRequest, max_elements: int) -> tuple[list[Tensor], bool]:
    """Validate a request's payload; return its rows (one batcher request each) and whether the
    payload was a batch of rows (``RequestError`` if it is invalid)."""
    given = [k for k in ("inputs", "token_ids", "text") if getattr(req, k) is not None]
    if len(given) != 1:
        raise RequestError(422, f"send exactly one of 'inputs', 'token_ids', 'text'; got {given or 'none'}")
    if served.kind == "lm":
        return [_lm_input(cast(PiMoELM, served.module), req, max_elements)], False
    if req.inputs is None:
        raise RequestError(422, f"model {req.model!r} takes 'inputs' (nested lists of shape {_shape_str(served)})")
    return _tensor_input(served, req.inputs, max_elements)


def _lm_input(model: PiMoELM, req: InferRequest, max_elements: int) -> Tensor:
    if req.inputs is not None:
        raise RequestError(422, f"model {req.model!r} is a language model: send 'token_ids' or 'text'")
    ids = list(req.text.encode("utf-8")) if req.text is not None else req.token_ids
    assert ids is not None
    cfg = model.config
    if len(ids) > max_elements:
        raise RequestError(413, f"request has {len(ids)} tokens; the limit is {max_elements}")
    if not 1 <= len(ids) <= cfg.block_size:
        raise RequestError(422, f"sequence length must be in [1, {cfg.block_size}] (block_size), got {len(ids)}")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise RequestError(422, f"token ids must be in [0, {cfg.vocab_size}); got {bad[:5]}")
    return torch.tensor(ids, dtype=torch.long)


def _tensor_input(served: ServedModel, inputs: Any, max_elements: int) -> tuple[list[Tensor], bool]:
    """``inputs`` of shape ``input_shape`` (one row) or ``[N, *input_shape]`` (N rows)."""
    dtype = _DTYPES[served.input_dtype]
    if _count_leaves(inputs, max_elements) > max_elements:
        raise RequestError(413, f"request has more than {max_elements} elements (max_request_elements)")
    if not isinstance(inputs, list) or any(isinstance(v, bool) for v in _leaves(inputs)):
        raise RequestError(422, f"'inputs' must be nested lists of numbers of shape {_shape_str(served)}")
    try:
        x = torch.tensor(inputs, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RequestError(422, f"'inputs' is not a rectangular array of numbers ({exc})") from None
    expected = served.input_shape
    batched = x.dim() == len(expected) + 1
    row_shape = x.shape[1:] if batched else x.shape
    if len(row_shape) != len(expected) or any(e is not None and e != a for e, a in zip(expected, row_shape)):
        raise RequestError(422, f"'inputs' has shape {list(x.shape)}; model expects {_shape_str(served)}")
    if x.numel() == 0:
        raise RequestError(422, "'inputs' is empty")
    if not torch.isfinite(x).all():
        raise RequestError(422, "'inputs' contains NaN or infinity")
    return (list(x.unbind(0)) if batched else [x]), batched


def _leaves(value: Any) -> list[Any]:
    """The non-list items of nested lists."""
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _count_leaves(value: Any, limit: int) -> int:
    """Number of non-list items in nested lists, counting stops once past ``limit``."""
    count, stack = 0, [value]
    while stack and count <= limit:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        else:
            count += 1
    return count


def _shape_str(served: ServedModel) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in served.input_shape) + "]"


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

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            metrics.requests.labels(model="", status="413").inc()
            return _error(413, f"request body of {length} bytes exceeds the limit of {max_body_bytes} bytes")
        return await call_next(request)

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
            rows, batched = _to_input(s, req, max_request_elements)
            results = await asyncio.gather(*(run_row(req.model, x) for x in rows))
            out = torch.stack([r[0] for r in results]) if batched else results[0][0]
            cached = all(r[1] for r in results)
            body = _response_body(s, out, req.return_logits)
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


def _response_body(served: ServedModel, out: Any, return_logits: bool) -> dict[str, Any]:
    """The JSON fields of a result; ``ValueError`` if it holds NaN/inf (JSON cannot carry them)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"served models must return a tensor, got {type(out).__name__}")
    out = out.float()
    if not torch.isfinite(out).all():
        raise ValueError("the output holds NaN or infinity")
    if served.kind == "lm":  # out: [L, V] logits
        body: dict[str, Any] = {"next_token_id": int(out[-1].argmax())}
        if return_logits:
            body.update(outputs=out.tolist(), shape=list(out.shape))
        return body
    return {"outputs": out.tolist(), "shape": list(out.shape)}


def serve(model_path: str | os.PathLike[str], name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 32, max_wait_ms: float = 5.0, cache_size: int = 0) -> None:
    """Load a saved :class:`PiMoELM` and serve it with uvicorn until interrupted."""
    import uvicorn

    model_name = name or os.path.splitext(os.path.basename(os.fspath(model_path)))[0]
    app = create_app({model_name: ServedModel.from_file(model_path)}, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, cache_size=cache_size)
    uvicorn.run(app, host=host, port=port)


__all__ = ["InferRequest", "RequestError", "ServedModel", "create_app", "serve"]
