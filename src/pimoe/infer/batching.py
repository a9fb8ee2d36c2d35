"""``MicroBatcher``: coalesce concurrent single requests into batched forward passes.

Callers (any number of threads) submit one request at a time: a tensor ``x [L, ...]`` whose
first dimension is a sequence length that may vary between requests (token ids ``[L]``,
embeddings ``[L, D]``), or a fixed-shape tensor (an image ``[C, H, W]``). One worker thread waits
for the first request, then up to ``max_wait_ms`` for more (or until ``max_batch_size`` are
queued), and runs ``fn`` once per group of compatible requests (same dtype, device and trailing
shape ``x.shape[1:]``):

- equal lengths: ``batch = stack(xs)`` of shape ``[B, L, ...]``;
- different lengths: ``batch [B, Lmax, ...]``, request ``i`` in ``batch[i, :L_i]``, the rest
  filled with ``pad_value``.

``fn(batch) -> out`` or, when it takes lengths, ``fn(batch, lengths=lengths)`` with
``lengths [B]`` (int64, on the batch's device) holding each request's ``L_i``
(:func:`lengths_to_mask` turns it into a ``[B, Lmax]`` mask). ``out`` is a tensor or a
tuple/list/dict of tensors, each with ``B`` rows. Request ``i`` gets row ``i`` of every tensor;
in a padded batch with ``seq_output=True`` that row is cut to ``[:L_i]`` along its first
dimension, which must then be ``Lmax`` (per-position outputs such as ``[B, Lmax, V]`` logits).
With ``seq_output=False`` rows are returned whole (pooled outputs such as ``[B, C]``).

Padding must not change a request's result: ``fn`` has to ignore padded positions, which holds
for per-position models, for causal models (padding comes after every real position), and for
models that mask with ``lengths``. A model that mixes positions without masking (bidirectional
attention, mean pooling over all of ``Lmax``, MoE routing with a capacity limit) does not qualify.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_log = logging.getLogger(__name__)


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``lengths [B]`` -> boolean mask ``[B, max_len]``, True at real (non-padded) positions."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


@dataclass(frozen=True)
class BatcherStats:
    """Counters since the batcher was created.

    ``batches`` counts calls of ``fn``; ``batch_sizes`` holds the sizes of the last ``history``
    batches (oldest first, e.g. for a histogram) and ``batch_size_counts`` every batch's size as
    ``{size: count}``; ``errors`` counts batches whose ``fn`` call or collation raised.
    """

    requests: int
    batches: int
    mean_batch_size: float
    batch_sizes: tuple[int, ...]
    batch_size_counts: dict[int, int]
    errors: int


class _Request:
    __slots__ = ("future", "x")

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.future: Future[Any] = Future()


class MicroBatcher:
    """Batch concurrent requests to ``fn`` on one background thread (see the module docstring).

    Args:
        fn: ``fn(batch [B, L, ...]) -> out`` or ``fn(batch, lengths=lengths [B]) -> out``; runs on
            the worker thread under ``torch.inference_mode`` (e.g. ``partial(engine.infer, model)``
            or a lambda around it).
        max_batch_size: most requests per ``fn`` call.
        max_wait_ms: longest time the oldest queued request waits for others before its batch
            runs (0: run whatever is queued at once). The batcher never sleeps in a loop: the
            worker blocks on a condition variable.
        pad_value: fill value of padded positions.
        pass_lengths: call ``fn(batch, lengths=...)``; None (default): only if ``fn``'s signature
            has a parameter named ``lengths``.
        seq_output: cut each request's output rows to its length in padded batches.
        history: how many recent batch sizes ``stats.batch_sizes`` keeps.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        pad_value: float = 0,
        *,
        pass_lengths: bool | None = None,
        seq_output: bool = True,
        history: int = 10_000,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0 <= max_wait_ms < math.inf:  # NaN or infinity: a batch deadline never reached
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.pad_value = pad_value
        self.pass_lengths = _takes_lengths(fn) if pass_lengths is None else pass_lengths
        self.seq_output = seq_output
        self._queue: deque[tuple[float, _Request]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._dead: RuntimeError | None = None  # set when the worker ended on a non-Exception error
        self._requests = self._errors = 0
        self._sizes: deque[int] = deque(maxlen=history)
        self._counts: Counter[int] = Counter()
        self._worker = threading.Thread(target=self._run, name="pimoe-microbatcher", daemon=True)
        self._worker.start()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, x: Tensor, timeout: float | None = None) -> Any:
        """Submit ``x [L, ...]`` and block until its result (``fn``'s output for it) is ready."""
        return self.submit(x).result(timeout)

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        with self._cond:
            batches = sum(self._counts.values())
            total = sum(size * n for size, n in self._counts.items())
            return BatcherStats(
                requests=self._requests,
                batches=batches,
                mean_batch_size=total / batches if batches else 0.0,
                batch_sizes=tuple(self._sizes),
                batch_size_counts=dict(self._counts),
                errors=self._errors,
            )

    def submit(self, x: Tensor) -> Future[Any]:
        """Queue request ``x [L, ...]`` (at least 1-D); the future gets its result or ``fn``'s exception.

        A future cancelled before its batch starts is skipped. If ``fn`` raises something that is
        not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt``), the worker stops: the futures
        of that batch and of every queued request get a ``RuntimeError`` caused by it, and later
        calls raise one (``RuntimeError`` too after :meth:`close`).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"a request is a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError("a request must be at least 1-D ([L, ...]); got a 0-D tensor")
        if threading.current_thread() is self._worker:
            raise RuntimeError(
                "fn must not submit to its own MicroBatcher (the worker would wait for itself)"
            )
        request = _Request(x)
        with self._cond:
            if self._dead is not None:
                raise RuntimeError(
                    f"MicroBatcher refuses requests: {self._dead}"
                ) from self._dead.__cause__
            if self._closed:
                raise RuntimeError("MicroBatcher is closed")
            self._queue.append((time.monotonic(), request))
            self._requests += 1
            self._cond.notify()
        return request.future

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests and stop the worker.

        ``drain=True`` runs every queued request first; ``drain=False`` cancels the queued ones
        (their futures raise ``CancelledError``). A batch already running always completes.
        Blocks until the worker exits (at most ``timeout`` seconds); calling it again is a no-op.
        """
        with self._cond:
            self._closed = True
            if not drain:
                while self._queue:
                    self._queue.popleft()[1].future.cancel()
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def _take(self) -> list[_Request] | None:
        """Block until a batch is due; return its requests (None: closed and drained)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = self._queue[0][0] + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(len(self._queue), self.max_batch_size)
            return [self._queue.popleft()[1] for _ in range(n)]

    def _run(self) -> None:
        live: list[_Request] = []
        try:
            while (taken := self._take()) is not None:
                live = [r for r in taken if r.future.set_running_or_notify_cancel()]
                groups: dict[tuple[Any, ...], list[_Request]] = {}
                for r in live:
                    groups.setdefault((r.x.dtype, r.x.device, tuple(r.x.shape[1:])), []).append(r)
                for group in groups.values():
                    self._run_group(group)
        except BaseException as exc:
            self._die(exc, live)

    def _die(self, exc: BaseException, running: list[_Request]) -> None:
        """The worker is ending on ``exc`` (e.g. ``SystemExit`` from ``fn``): fail the running and
        queued requests with a ``RuntimeError`` caused by it, and refuse new ones."""
        error = RuntimeError(f"MicroBatcher worker stopped: fn raised {type(exc).__name__}({exc})")
        error.__cause__ = exc
        with self._cond:
            self._dead = error
            self._closed = True
            self._errors += 1
            queued = [r for _, r in self._queue]
            self._queue.clear()
        for r in (*running, *queued):
            if not r.future.done():
                r.future.set_exception(error)
        _log.error("%s; pending requests failed, new ones are refused", error)

    def _run_group(self, group: list[_Request]) -> None:
        with self._cond:
            self._sizes.append(len(group))
            self._counts[len(group)] += 1
        try:
            results = self._forward([r.x for r in group])
        except Exception as exc:
            with self._cond:
                self._errors += 1
            for r in group:
                r.future.set_exception(exc)
            return
        for r, result in zip(group, results):
            r.future.set_result(result)

    def _forward(self, xs: list[Tensor]) -> list[Any]:
        """Collate ``xs`` (each ``[L_i, ...]``), run ``fn`` once, split its output per request."""
        lengths = [x.shape[0] for x in xs]
        max_len = max(lengths)
        padded = min(lengths) != max_len
        if padded:
            batch = xs[0].new_full(
                (len(xs), max_len, *xs[0].shape[1:]), self.pad_value
            )  # [B, Lmax, ...]
            for i, x in enumerate(xs):
                batch[i, : x.shape[0]] = x
        else:
            batch = torch.stack(xs)  # [B, L, ...]
        with torch.inference_mode():
            if self.pass_lengths:
                out = self.fn(
                    batch, lengths=torch.tensor(lengths, dtype=torch.long, device=batch.device)
                )
            else:
                out = self.fn(batch)
        cut = padded and self.seq_output
        return [
            _select(out, i, lengths[i] if cut else None, max_len, len(xs)) for i in range(len(xs))
        ]


def _select(out: Any, i: int, length: int | None, max_len: int, batch_size: int) -> Any:
    """Request ``i``'s part of ``out``: row ``i`` of every tensor (cut to ``[:length]``), copied."""
    if isinstance(out, Tensor):
        if out.dim() < 1 or out.shape[0] != batch_size:
            raise ValueError(
                f"fn returned a tensor of shape {tuple(out.shape)}; expected {batch_size} rows (one per request)"
            )
        row = out[i]
        if length is not None:
            if row.dim() < 1 or row.shape[0] != max_len:
                raise ValueError(
                    f"fn returned [B, ...] = {tuple(out.shape)} for a padded batch of length {max_len}; "
                    "per-position outputs must be [B, Lmax, ...], or pass seq_output=False for pooled outputs"
                )
            row = row[:length]
        return row.clone()
    if isinstance(out, (tuple, list)):
        parts = [_select(o, i, length, max_len, batch_size) for o in out]
        return type(out)(*parts) if hasattr(out, "_fields") else type(out)(parts)  # namedtuples too
    if isinstance(out, dict):
        return {k: _select(v, i, length, max_len, batch_size) for k, v in out.items()}
    raise TypeError(
        f"fn must return a tensor or a tuple/list/dict of tensors, got {type(out).__name__}"
    )


def _takes_lengths(fn: Callable[..., Any]) -> bool:
    """True if ``fn``'s signature has a parameter named ``lengths``."""
    try:
        return "lengths" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
