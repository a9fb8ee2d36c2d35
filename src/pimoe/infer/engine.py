"""``InferenceEngine``: run any ``nn.Module`` (PiMoE layers and models included) for inference.

One call, ``engine.infer(model, inputs)``, puts the model in eval mode, runs it under
``torch.inference_mode`` and, as configured, under ``torch.autocast`` (bfloat16/float16), through
``torch.compile`` (compiled once per model, with a warned fallback to eager when compilation is
unavailable or fails), with channels-last 4-D inputs, and behind an :class:`InferenceCache`
looked up by :func:`make_key` of the inputs. With ``InferenceConfig.optimize`` (an
``ArchitectureConfig``) each model is first compressed once by ``pimoe.compress`` (on a copy, with
its first call's inputs as the example batch); the engine then runs the compressed copy.

``pimoe.compress`` is imported only when ``optimize`` is set: a reasoned exception to inference
not depending on compression, so that compressing the model before serving it, when the user
asks for it, is one engine setting rather than a second API.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from pimoe.infer.cache import InferenceCache, make_key

if TYPE_CHECKING:
    from pimoe.compress import ArchitectureConfig, CompressionReport

DType = Literal["float32", "bfloat16", "float16"]
CompileStatus = Literal["off", "pending", "compiled", "eager-fallback"]
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class InferenceConfig:
    """How :class:`InferenceEngine` runs a model.

    Args:
        compile: run the model through ``torch.compile`` (compiled lazily, once per model).
        compile_mode: ``torch.compile``'s ``mode`` (None, "default", "reduce-overhead",
            "max-autotune", "max-autotune-no-cudagraphs").
        compile_backend: ``torch.compile``'s ``backend`` ("inductor"; "aot_eager" or "eager" to
            debug a compilation problem).
        dtype: "float32" (no autocast), or "bfloat16"/"float16" autocast on ``device``. float16 on
            CPU is accepted only where the installed torch's CPU autocast supports it.
        device: device the model and the inputs must be on ("cpu", "cuda", "cuda:1", ...).
        num_threads: if set, ``torch.set_num_threads(num_threads)`` when the engine is created.
            Process-wide: torch has one intra-op thread pool.
        channels_last: convert the model (``model.to(memory_format=torch.channels_last)``) and
            every 4-D input tensor to channels-last; other inputs are passed unchanged.
        check_finite: raise ``ValueError`` if a floating-point input holds NaN or inf.
        cache: a cache to use (may be shared between engines and other code).
        cache_size: if ``cache`` is None and this is > 0, the engine makes an
            ``InferenceCache(max_size=cache_size, policy=cache_policy)``.
        cache_policy: the policy of that cache ("lru", "fifo", "lfu", "tinylfu").
        cache_namespace: default namespace of cache keys; put the model's name and version in it.
        optimize: compress each model once with ``ArchitectureOptimizer(optimize)`` before running
            it (``model`` itself is not changed; ``engine.report(model)`` gives the report).
    """

    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    dtype: DType = "float32"
    device: str = "cpu"
    num_threads: int | None = None
    channels_last: bool = False
    check_finite: bool = False
    cache: InferenceCache | None = None
    cache_size: int = 0
    cache_policy: str = "lru"
    cache_namespace: str = ""
    optimize: ArchitectureConfig | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r} is not a torch device: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={self.device!r} but CUDA is not available in this torch build/machine"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {self.cache_size}")
        if self.dtype != "float32":
            _check_autocast(device.type, _DTYPES[self.dtype])


def _check_autocast(device_type: str, dtype: torch.dtype) -> None:
    """Raise ValueError unless torch can autocast to ``dtype`` on ``device_type``."""
    error = f"torch {torch.__version__} cannot autocast to {dtype} on {device_type!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns and disables autocast for unsupported dtypes
        try:
            with torch.autocast(device_type, dtype=dtype):
                if not torch.is_autocast_enabled(device_type):
                    raise ValueError(error)
        except (RuntimeError, UserWarning) as exc:
            hint = "; use dtype='bfloat16'" if device_type == "cpu" else ""
            raise ValueError(f"{error} ({exc}){hint}") from None


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was created.

    ``calls`` counts ``infer`` calls; ``model_calls`` those that ran the model (the others were
    ``cache_hits``). ``mean_latency_s`` is the mean host wall-clock time of an ``infer`` call,
    hits included; on CUDA the engine does not synchronize, so queued kernels may still run when
    ``infer`` returns. ``compiled`` counts models running compiled, ``compile_fallbacks`` models
    that fell back to eager; ``last_compile_error`` is the message of the last fallback.
    """

    calls: int
    model_calls: int
    cache_hits: int
    mean_latency_s: float
    compiled: int
    compile_fallbacks: int
    last_compile_error: str | None


class _Prepared:
    """The engine's state for one model: the model (held, so its id stays valid) and its runner."""

    def __init__(
        self,
        model: nn.Module,
        runner: Callable[..., Any] | None,
        status: CompileStatus,
        target: nn.Module | None = None,
        report: CompressionReport | None = None,
    ) -> None:
        self.model = model
        self.target = (
            model if target is None else target
        )  # what runs: the model or its compressed copy
        self.runner = runner  # the compiled callable, None when running eager
        self.status: CompileStatus = status
        self.report = report


class InferenceEngine:
    """Runs models for inference as :class:`InferenceConfig` says.

    The engine keeps a reference to every model it has run (and its compiled version) until
    :meth:`release` is called with it, and, with a cache, binds each cache namespace to the first
    model run under it for the engine's lifetime (another engine sharing the cache is not
    checked: give each model its own namespace). Calls are serialized per engine by a lock only around its
    bookkeeping, not around the forward pass; to serve concurrent requests, put the engine
    behind a :class:`~pimoe.infer.batching.MicroBatcher`.
    """

    def __init__(self, config: InferenceConfig | None = None) -> None:
        self.config = config = config if config is not None else InferenceConfig()
        self.device = torch.device(config.device)
        self.autocast_dtype = _DTYPES[config.dtype]
        self.cache = config.cache
        if self.cache is None and config.cache_size > 0:
            self.cache = InferenceCache(max_size=config.cache_size, policy=config.cache_policy)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self._lock = threading.Lock()
        self._models: dict[int, _Prepared] = {}
        self._namespaces: dict[
            str, nn.Module
        ] = {}  # cache namespace -> the model whose outputs it holds
        self._calls = self._model_calls = self._hits = 0
        self._latency = 0.0
        self._last_compile_error: str | None = None

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        with self._lock:
            statuses = [p.status for p in self._models.values()]
            return EngineStats(
                calls=self._calls,
                model_calls=self._model_calls,
                cache_hits=self._hits,
                mean_latency_s=self._latency / self._calls if self._calls else 0.0,
                compiled=statuses.count("compiled"),
                compile_fallbacks=statuses.count("eager-fallback"),
                last_compile_error=self._last_compile_error,
            )

    def compile_status(self, model: nn.Module) -> CompileStatus:
        """ "off" (compile disabled or model not seen yet), "pending" (compiled, not yet run),
        "compiled", or "eager-fallback"."""
        with self._lock:
            prepared = self._models.get(id(model))
            return "off" if prepared is None or prepared.model is not model else prepared.status

    def report(self, model: nn.Module) -> CompressionReport | None:
        """The compression report of ``model`` (None without ``config.optimize`` or before its first call)."""
        with self._lock:
            prepared = self._models.get(id(model))
            return None if prepared is None or prepared.model is not model else prepared.report

    def release(self, model: nn.Module) -> None:
        """Drop the engine's state for ``model`` (its compiled version). A cache namespace it used
        stays bound to it, since the cache may still hold its outputs under that namespace."""
        with self._lock:
            prepared = self._models.get(id(model))
            if prepared is not None and prepared.model is model:
                del self._models[id(model)]

    def infer(
        self, model: nn.Module, inputs: Tensor | Sequence[Tensor], *, namespace: str | None = None
    ) -> Any:
        """``model(*inputs)`` for inference; returns what the model returns.

        Args:
            model: any ``nn.Module``; its parameters must be on the engine's device. It is left
                in eval mode.
            inputs: one tensor or a non-empty tuple/list of tensors, all on the engine's device,
                passed positionally (e.g. ``x [B, S, D]`` for a PiMoE layer, ``idx [B, S]`` for a
                PiMoE LM).
            namespace: cache namespace of this model (default ``config.cache_namespace``). One
                namespace serves one model: a second model under a namespace this engine already
                used for another raises ``ValueError`` instead of returning the first one's outputs.

        With autocast the outputs may be bfloat16/float16. A cache hit returns the stored output
        (a copy, by default) without running the model, so per-call side effects of the model
        (e.g. ``PiMoE.last_stats``) are not updated.
        """
        start = time.perf_counter()
        args = self._check_inputs(inputs)
        prepared = self._prepare(model, args)
        ran = False

        def forward() -> Any:
            nonlocal ran
            ran = True
            return self._forward(prepared, args)

        if self.cache is None:
            out = forward()
        else:
            ns = self.config.cache_namespace if namespace is None else namespace
            self._claim(ns, model)
            out = self.cache.get_or_compute(
                make_key(self.config.dtype, args, namespace=ns), forward
            )
        with self._lock:
            self._calls += 1
            self._model_calls += ran
            self._hits += not ran
            self._latency += time.perf_counter() - start
        return out

    def _check_inputs(self, inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
        args = (inputs,) if isinstance(inputs, Tensor) else inputs
        if not isinstance(args, (tuple, list)):
            raise TypeError(
                f"inputs must be a tensor or a tuple/list of tensors, got {type(inputs).__name__}"
            )
        if not args:
            raise ValueError("inputs is empty: pass a tensor or a non-empty tuple of tensors")
        out = []
        for i, x in enumerate(args):
            if not isinstance(x, Tensor):
                raise TypeError(f"input {i} is a {type(x).__name__}, expected a torch.Tensor")
            if not _same_device(x.device, self.device):
                raise ValueError(
                    f"input {i} is on {x.device} but the engine runs on {self.device}; move it with .to({str(self.device)!r})"
                )
            if self.config.check_finite and x.is_floating_point() and not torch.isfinite(x).all():
                raise ValueError(f"input {i} contains NaN or inf")
            if self.config.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(x)
        return tuple(out)

    def _prepare(self, model: nn.Module, args: tuple[Tensor, ...]) -> _Prepared:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        with self._lock:
            prepared = self._models.get(id(model))
            if prepared is not None and prepared.model is model:
                if model.training:
                    model.eval()
                return prepared
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not _same_device(t.device, self.device):
                raise ValueError(
                    f"model tensor {name!r} is on {t.device} but the engine runs on {self.device}; "
                    f"call model.to({str(self.device)!r})"
                )
        model.eval()
        if self.config.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes it; the stubs omit it
        prepared = _Prepared(model, None, "off")
        if self.config.optimize is not None:
            from pimoe.compress import ArchitectureOptimizer

            example = args[0] if len(args) == 1 else args
            prepared.target, prepared.report = ArchitectureOptimizer(self.config.optimize).optimize(
                model, example
            )
            prepared.target.eval()
        if self.config.compile:
            try:
                prepared.runner = torch.compile(
                    prepared.target,
                    mode=self.config.compile_mode,
                    backend=self.config.compile_backend,
                )
                prepared.status = "pending"
            except (
                Exception
            ) as exc:  # torch.compile unavailable (platform, Python version, backend)
                self._fall_back(prepared, exc)
        with self._lock:
            return self._models.setdefault(id(model), prepared)

    def _forward(self, prepared: _Prepared, args: tuple[Tensor, ...]) -> Any:
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type,
                dtype=self.autocast_dtype,
                enabled=self.autocast_dtype != torch.float32,
            ),
        ):
            runner = prepared.runner
            if runner is not None:
                try:
                    out = runner(*args)
                except Exception as exc:
                    out = prepared.target(
                        *args
                    )  # an error of the inputs or the model raises here too
                    self._fall_back(prepared, exc)
                    return out
                prepared.status = "compiled"
                return out
            return prepared.target(*args)

    def _fall_back(self, prepared: _Prepared, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        warnings.warn(
            f"torch.compile failed for {type(prepared.model).__name__} ({message}); running it eagerly",
            RuntimeWarning,
            stacklevel=2,
        )
        with self._lock:
            prepared.runner, prepared.status = None, "eager-fallback"
            self._last_compile_error = message

    def _claim(self, namespace: str, model: nn.Module) -> None:
        with self._lock:
            owner = self._namespaces.setdefault(namespace, model)
        if owner is not model:
            raise ValueError(
                f"cache namespace {namespace!r} already holds outputs of another model "
                f"({type(owner).__name__}); pass infer(..., namespace=...) per model"
            )


def _same_device(actual: torch.device, expected: torch.device) -> bool:
    """True if ``actual`` is ``expected`` ("cuda" matches every CUDA index)."""
    return actual.type == expected.type and (
        expected.index is None or actual.index == expected.index
    )
