"""HTTP inference server: :func:`create_app` serves models over ``POST /v1/infer``.

Each served model has its own :class:`MicroBatcher` (its worker thread runs the forward passes;
the async endpoint awaits the request's future) and, with ``cache_size > 0``, the app shares one
:class:`InferenceCache` in front of the batchers. ``GET /healthz`` answers liveness and lists the
models; ``GET /metrics`` exposes Prometheus metrics from a registry owned by the app.

Every request first passes :class:`~pimoe.infer.security.RequestGuard` (API key, body size and
deadline); every error answer has :mod:`pimoe.infer.http_errors`' shape.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import torch
from torch import Tensor

from pimoe.extras import extra_imports
from pimoe.infer.batching import MicroBatcher
from pimoe.infer.cache import InferenceCache, make_key
from pimoe.infer.engine import InferenceConfig, InferenceEngine
from pimoe.infer.http_errors import clip, error_response
from pimoe.infer.lm_models import GenerationModel, HFGenerationModel, open_generation_model
from pimoe.infer.openai_api import TOKENIZE_AT_ONCE, mount_generation
from pimoe.infer.security import (
    DOCS_PATHS,
    OPEN_PATHS,
    RequestGuard,
    ServerLimits,
    is_loopback,
    total_body_budget,
    uvicorn_options,
)
from pimoe.infer.served import InferRequest, RequestError, ServedModel, request_rows, response_body
from pimoe.infer.server_metrics import ServerMetrics, make_metrics
from pimoe.infer.text_generator import TextGenerator
from pimoe.moe.model import PiMoELM

with extra_imports("serve", "pimoe.infer.server"):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException


def _batch_fn(
    name: str, served: ServedModel, engine: InferenceEngine, metrics: ServerMetrics
) -> Callable[..., Tensor]:
    """The function a model's batcher runs on ``batch [B, ...]`` (with ``lengths [B]`` for text encoders)."""
    observe = metrics.batch_size.labels(model=name).observe
    if served.kind == "text":

        def run_text(batch: Tensor, lengths: Tensor) -> Tensor:
            observe(batch.shape[0])
            out: Tensor = engine.infer(served.module, (batch, lengths))
            return out

        return run_text

    def run(batch: Tensor) -> Tensor:
        observe(batch.shape[0])
        out = engine.infer(served.module, batch)
        result: Tensor = out.logits if served.kind == "lm" else out
        return result

    return run


def create_app(
    models: Mapping[str, ServedModel | PiMoELM | str | os.PathLike[str]],
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    cache_size: int = 0,
    max_request_elements: int = 65_536,
    max_body_bytes: int = 8 * 2**20,
    max_total_body_bytes: int | None = None,
    body_timeout_s: float = 30.0,
    api_key: str | None = None,
    docs: bool = False,
    generators: Mapping[str, GenerationModel | TextGenerator] | None = None,
    max_num_batched_tokens: int | None = 512,
    enable_chunked_prefill: bool = False,
) -> FastAPI:
    """A FastAPI app serving ``models`` (name -> :class:`ServedModel`, a :class:`PiMoELM`, or the
    path of a saved PiMoELM).

    Args:
        max_batch_size, max_wait_ms: each model's :class:`MicroBatcher` settings.
        cache_size: entries of an LRU :class:`InferenceCache` shared by the models (keys are
            namespaced by model name); 0 disables caching.
        max_request_elements: most numbers (or tokens) in one request; more is answered 413.
        max_body_bytes: largest request body (by ``Content-Length``, or counted while reading a
            chunked one); larger is answered 413.
        max_total_body_bytes: most body bytes all requests in flight hold together (from the
            headers to the end of the answer); a request that would pass it is answered 503.
            Default (``None``): ``32 * max_body_bytes``, 256 MiB with the default 8 MiB bodies
            (without it, every connection up to ``limit_concurrency`` could hold a full body).
        body_timeout_s: a body not fully received this many seconds after the headers is
            answered 408.
        api_key: if given, every path but ``/healthz`` (and the docs, when on) needs
            ``Authorization: Bearer <api_key>``; otherwise 401.
        docs: serve ``/docs``, ``/redoc`` and ``/openapi.json`` (off by default).
        generators: language models served for text generation on the OpenAI routes
            (:func:`~pimoe.infer.openai_api.mount_generation`, ``max_batch_size`` rows each), or
            engines (e.g. :class:`~pimoe.infer.chain_serving.ChainEngine`).
        max_num_batched_tokens, enable_chunked_prefill: the generation engines' step budget
            and chunked prefill (:class:`~pimoe.infer.generation.GenerationEngine`).

    ``ValueError`` if a model's weights hold NaN or infinity. The batchers are closed (draining
    queued requests) when the app shuts down.
    """
    if not models and not generators:
        raise ValueError("create_app needs at least one model")
    if max_request_elements < 1 or max_body_bytes < 1:
        raise ValueError("max_request_elements and max_body_bytes must be >= 1")
    if cache_size < 0:
        raise ValueError(f"cache_size must be >= 0, got {cache_size}")
    if not 0 < body_timeout_s < math.inf:  # inf: a body may trickle in for ever
        raise ValueError(f"body_timeout_s must be > 0 and finite, got {body_timeout_s}")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: give a non-empty key, or None for no key")
    served: dict[str, ServedModel] = {}
    for name, m in models.items():
        if isinstance(m, ServedModel):
            served[name] = m
        elif isinstance(m, PiMoELM):
            served[name] = ServedModel.lm(m)
        else:
            served[name] = ServedModel.from_file(m)
        served[name].check_weights(name)
    cache = InferenceCache(max_size=cache_size) if cache_size > 0 else None
    metrics = make_metrics(cache)
    devices = {name: s.device for name, s in served.items()}
    batchers: dict[str, MicroBatcher] = {}
    for name, s in served.items():
        engine = InferenceEngine(InferenceConfig(device=str(devices[name])))
        batchers[name] = MicroBatcher(
            _batch_fn(name, s, engine, metrics),
            max_batch_size,
            max_wait_ms,
            seq_output=s.kind == "lm" or s.seq_output,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for batcher in batchers.values():
            await asyncio.to_thread(batcher.close)
        if cache is not None:
            cache.close()

    app = FastAPI(
        title="pimoe inference server",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.models, app.state.batchers, app.state.cache, app.state.metrics = (
        served,
        batchers,
        cache,
        metrics,
    )
    app.add_middleware(
        RequestGuard,
        api_key=api_key,
        open_paths=OPEN_PATHS | (DOCS_PATHS if docs else set()),
        max_body_bytes=max_body_bytes,
        max_total_body_bytes=total_body_budget(max_body_bytes, max_total_body_bytes),
        body_timeout_s=body_timeout_s,
        on_response=lambda status: metrics.responses.labels(status=str(status)).inc(),
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.requests.labels(model="", status="422").inc()
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in errors[:5]
        )
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        param = ".".join(map(str, errors[0].get("loc", ()))) if errors else None
        return error_response(
            422,
            clip(f"invalid request body: {problems}{more}", 1000, quote=False),
            param=param,
            code="invalid_body",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {
            404: f"no route {clip(request.url.path)}",
            405: f"method {request.method} not allowed on {clip(request.url.path)}",
        }
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness and every served model: its ``/v1/infer`` kind, else its generation kind."""
        generation: dict[str, Any] = getattr(app.state, "generation", {})
        kinds = {n: str(getattr(e, "kind", "generation")) for n, e in generation.items()}
        return {
            "status": "ok",
            "models": {**kinds, **{n: s.kind for n, s in served.items()}},
            "generation": sorted(generation),
        }

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        """Prometheus metrics of this app."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    tokenizing = asyncio.Semaphore(TOKENIZE_AT_ONCE)  # bounds the memory of huge texts

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
                raise RequestError(
                    404, f"unknown model {clip(req.model)}; served: {sorted(served)}"
                )
            s = served[req.model]
            # off the event loop: tokenizing megabytes of text takes seconds
            async with tokenizing:
                rows, batched = await asyncio.to_thread(request_rows, s, req, max_request_elements)
            results = await asyncio.gather(*(run_row(req.model, x) for x in rows))
            out = torch.stack([r[0] for r in results]) if batched else results[0][0]
            cached = all(r[1] for r in results)
            body = response_body(s, out, req.return_logits)
        except RequestError as exc:
            metrics.requests.labels(model=label, status=str(exc.status)).inc()
            return error_response(
                exc.status, exc.message, code="model_not_found" if exc.status == 404 else None
            )
        except Exception as exc:  # the model failed: report it and keep serving
            metrics.requests.labels(model=label, status="500").inc()
            detail = clip(str(exc), 1000, quote=False)
            return error_response(500, f"model {label!r} failed: {type(exc).__name__}: {detail}")
        latency = time.perf_counter() - start
        metrics.latency.labels(model=label).observe(latency)
        metrics.requests.labels(model=label, status="200").inc()
        return JSONResponse(
            {"model": req.model, **body, "cached": cached, "latency_ms": latency * 1000}
        )

    if generators:
        mount_generation(
            app,
            generators,
            max_batch_size=max_batch_size,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
        )
    return app


def serve(
    model_path: str | os.PathLike[str] | None,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    cache_size: int = 0,
    *,
    api_key: str | None = None,
    docs: bool = False,
    max_body_bytes: int = 8 * 2**20,
    max_total_body_bytes: int | None = None,
    body_timeout_s: float = 30.0,
    limits: ServerLimits | None = None,
    ssl_certfile: str | os.PathLike[str] | None = None,
    ssl_keyfile: str | os.PathLike[str] | None = None,
    routers: str | os.PathLike[str] | None = None,
    chain: str | os.PathLike[str] | None = None,
    max_num_batched_tokens: int | None = 512,
    enable_chunked_prefill: bool = False,
    pack_experts: bool = False,
) -> None:
    """Serve ``model_path`` (a saved :class:`PiMoELM`, a Hugging Face encoder or causal-LM folder, or
    a name known to :func:`pimoe.models.load_pretrained`; ``routers`` upcycles a causal LM, see
    :func:`~pimoe.infer.lm_models.open_generation_model`), or the computation chain saved in the
    folder ``chain`` (:mod:`pimoe.infer.chain_serving`), with uvicorn until interrupted; give
    exactly one of the two. The name in requests is ``name`` or the path's base name. Language
    models and the chain get the OpenAI generation routes (a HF causal LM and the chain only
    those, a PiMoELM also ``/v1/infer``).

    ``api_key``, ``docs``, ``max_body_bytes``, ``max_total_body_bytes`` and ``body_timeout_s``
    are :func:`create_app`'s;
    ``limits`` the connection limits (:class:`ServerLimits`); both ``ssl_*`` files turn on TLS.
    ``max_num_batched_tokens`` and ``enable_chunked_prefill`` set the generation engine's step
    budget and chunked prefill (:mod:`pimoe.infer.scheduler`). ``pack_experts`` prepacks the
    generation model's expert weights (:func:`pimoe.moe.pack_experts_`; a model or chain without
    experts to pack is a ``ValueError``).
    Warns (``UserWarning``) when ``host`` is not a loopback address and there is no ``api_key``.
    """
    import uvicorn

    if (model_path is None) == (chain is None):
        raise ValueError("serve one model path or one chain folder")
    # settings checked before the model loads: TLS files, body budget
    options = uvicorn_options(limits, ssl_certfile, ssl_keyfile)
    total_body_budget(max_body_bytes, max_total_body_bytes)
    if not is_loopback(host) and api_key is None:
        warnings.warn(
            f"serving on {host}, reachable from other machines, without an API key: anyone who can "
            "connect can use the models (set --api-key or PIMOE_API_KEY)",
            UserWarning,
            stacklevel=2,
        )
    spec = os.fspath(model_path if model_path is not None else chain)  # type: ignore[arg-type]  # one is set
    model_name = name or os.path.splitext(os.path.basename(os.path.normpath(spec)))[0]
    models: dict[str, ServedModel] = {}
    generator: GenerationModel | TextGenerator | None
    if chain is not None:
        from pimoe.infer.chain_serving import open_chain

        if pack_experts:
            raise ValueError("pack_experts packs a model's experts; a computation chain has none")
        generator = open_chain(chain)
    else:  # a causal LM also gets the OpenAI routes
        generator = open_generation_model(spec, routers, pack_experts=pack_experts)
        if pack_experts and generator is None:
            raise ValueError(f"pack_experts packs a language model's experts; {spec} is not one")
        if not isinstance(generator, HFGenerationModel):
            models[model_name] = ServedModel.from_file(spec)
    app = create_app(
        models,
        generators={model_name: generator} if generator else None,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        cache_size=cache_size,
        max_body_bytes=max_body_bytes,
        max_total_body_bytes=max_total_body_bytes,
        body_timeout_s=body_timeout_s,
        api_key=api_key,
        docs=docs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
    )
    uvicorn.run(app, host=host, port=port, **options)


__all__ = ["InferRequest", "RequestError", "ServedModel", "ServerLimits", "create_app", "serve"]
