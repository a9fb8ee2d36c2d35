"""Expert-parallel CPU kernel: whole experts spread over torch's threads, one matmul each.

On several threads ``torch.nn.functional.grouped_mm`` (and a per-expert loop) splits every
small per-expert matmul between the threads: at 64 experts of ~64 rows each that is hundreds
of tiny parallel regions per call, each ending in a barrier, and on a busy machine every
barrier waits for a descheduled thread. This kernel instead runs one parallel region per
matmul over all experts: each of torch's threads takes whole experts (largest first, from a
shared counter) and runs each expert's matmul single-threaded into its slice of one output.
The per-expert matmuls are the same ``at::mm`` calls as the per-expert loop's, so the results
are the loop's, bit for bit.

The kernel is a small C++ extension (``torch.utils.cpp_extension.load_inline``), built on first
use (about a minute; cached by torch in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and only where a C++ compiler is present. Setting the
environment variable ``PIMOE_THREADED_EXPERTS=0`` disables it; a failed build warns once and
:func:`threaded_kernel` then returns None, so the callers keep their other kernels.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Activation = Callable[[Tensor], Tensor]

# The extension's source; its two entry points take the rows per expert (``splits``) as a list.
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <numeric>

// Experts with rows, largest first (threads take them in this order), and each expert's first row.
static std::vector<int64_t> order_of(const std::vector<int64_t>& splits, std::vector<int64_t>& start) {
  const int64_t E = (int64_t)splits.size();
  start.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + splits[e];
  std::vector<int64_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return splits[a] > splits[b]; });
  return order;
}

// Run job(i) for i in [0, n), each i on one thread, threads taking the next i from a counter.
// Below autograd on every thread (worker threads do not share the caller's grad or inference
// mode; the Python caller is the autograd node).
template <typename F>
static void each_on_one_thread(int64_t n, const F& job) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < n; i = next++) job(i);
  });
}

// out[rows of e] = a[rows of e] @ b[e] for a [N, K], b [E, K, M] (any strides) -> [N, M]
at::Tensor rows_mm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& splits) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 3 && b.size(0) == (int64_t)splits.size(), "rows_mm shapes");
  auto out = at::empty({a.size(0), b.size(2)}, a.options());
  std::vector<int64_t> start;
  auto order = order_of(splits, start);
  each_on_one_thread((int64_t)order.size(), [&](int64_t i) {
    const int64_t e = order[i];
    if (splits[e] == 0) return;
    auto o = out.narrow(0, start[e], splits[e]);
    at::mm_out(o, a.narrow(0, start[e], splits[e]), b.select(0, e));
  });
  return out;
}

// out[e] = a[rows of e]^T @ b[rows of e] for a [N, M], b [N, K] -> [E, M, K] (0 for no rows)
at::Tensor weights_mm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& splits) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "weights_mm shapes");
  const int64_t E = (int64_t)splits.size();
  auto out = at::empty({E, a.size(1), b.size(1)}, a.options());
  std::vector<int64_t> start;
  auto order = order_of(splits, start);
  each_on_one_thread(E, [&](int64_t i) {
    const int64_t e = order[i];
    auto o = out.select(0, e);
    if (splits[e] == 0) {
      o.zero_();
      return;
    }
    at::mm_out(o, a.narrow(0, start[e], splits[e]).t(), b.narrow(0, start[e], splits[e]));
  });
  return out;
}
"""
_NAME = "pimoe_threaded_experts"
_log = logging.getLogger(__name__)
_state: dict[str, Any] = {}


def threaded_kernel() -> Any | None:
    """The compiled extension (``rows_mm``, ``weights_mm``), built on the first call; None where
    it is disabled (``PIMOE_THREADED_EXPERTS=0``), no C++ compiler is found, or the build failed
    (warned once)."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("PIMOE_THREADED_EXPERTS", "1") != "0" and shutil.which("c++"):
        _log.info("building pimoe's threaded experts kernel (once; cached by torch)")
        try:
            from torch.utils.cpp_extension import load_inline

            module = load_inline(  # type: ignore[no-untyped-call]
                _NAME,
                cpp_sources=_SOURCE,
                functions=["rows_mm", "weights_mm"],
                extra_cflags=["-O2", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
        except Exception as err:  # any build or load failure: keep the other kernels
            warnings.warn(
                f"pimoe's threaded experts kernel could not be built ({err}); "
                "falling back to grouped_mm",
                RuntimeWarning,
                stacklevel=2,
            )
    _state["module"] = module
    return module


def rows_mm(a: Tensor, b: Tensor, splits: list[int]) -> Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]``: ``a [N, K]`` rows grouped by expert,
    ``b [E, K, M]`` (any strides, e.g. ``w.transpose(1, 2)``) -> ``[N, M]``."""
    out: Tensor = _module().rows_mm(a, b, splits)
    return out


def weights_mm(a: Tensor, b: Tensor, splits: list[int]) -> Tensor:
    """``out[e] = a[rows of e].T @ b[rows of e]`` (a weight gradient per expert): ``a [N, M]``,
    ``b [N, K]`` -> ``[E, M, K]``, zero for an expert without rows."""
    out: Tensor = _module().weights_mm(a, b, splits)
    return out


def _module() -> Any:
    module = threaded_kernel()
    if module is None:
        raise RuntimeError("pimoe's threaded experts kernel is not available")
    return module


def threaded_usable(x: Tensor | None, w_in: Tensor, w_out: Tensor) -> bool:
    """Whether :func:`threaded_ffn` may run on these operands (``x`` None: on any input of the
    weights' dtype): more than one torch thread, CPU tensors of one floating dtype, outside
    ``torch.compile``, and the extension available (built on the first call)."""
    if torch.get_num_threads() < 2 or torch.compiler.is_compiling():
        return False
    tensors = [t for t in (x, w_in, w_out) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != w_in.dtype for t in tensors):
        return False
    return w_in.dtype.is_floating_point and threaded_kernel() is not None


# Where the kernel pays (quiet 2-core machine, ``pimoe bench moe`` and
# ``benchmarks/moe_padding_vs_grouped_mm.py``, docs/benchmarks.md): with many experts per
# thread (64 experts on 2 threads: faster than grouped_mm from 128 to 16384 tokens) or few rows
# per expert (8 experts at 128-512 tokens, top-2); with few, large experts (8 experts at 2048
# and 16384 tokens, 512+ rows each) grouped_mm, which splits each large matmul between the
# threads, was 1.10-1.15x faster in forward+backward.
MIN_EXPERTS_PER_THREAD = 8
MAX_MEAN_ROWS = 128


def threaded_pays(splits: list[int]) -> bool:
    """Whether :func:`threaded_ffn` is the faster kernel for experts with ``splits`` rows on
    torch's current thread count: at least :data:`MIN_EXPERTS_PER_THREAD` experts per thread,
    or at most :data:`MAX_MEAN_ROWS` rows per expert on average."""
    experts = len(splits)
    return (
        experts >= MIN_EXPERTS_PER_THREAD * torch.get_num_threads()
        or sum(splits) <= MAX_MEAN_ROWS * experts
    )


def act_with_grad(act: Activation, h: Tensor, grad_a: Tensor) -> tuple[Tensor, Tensor]:
    """``(act(h), d act / d h applied to grad_a)`` for ``h [n, F_in]``, ``grad_a [n, F]``."""
    with torch.enable_grad():
        h_leaf = h.detach().requires_grad_()
        a = act(h_leaf)
    (grad_h,) = torch.autograd.grad(a, h_leaf, grad_a)
    return a.detach(), grad_h


def _reference_ffn(
    x: Tensor, w_in: Tensor, w_out: Tensor, splits: list[int], act: Activation
) -> Tensor:
    """The same FFN from differentiable per-expert ops (the double-backward path)."""
    outs = [
        act(x[rows] @ w_in[e].t()) @ w_out[e].t()
        for e, rows in enumerate(_slices(splits))
        if rows.stop > rows.start
    ]
    return torch.cat(outs) if outs else x.new_zeros(0, w_out.shape[1])


def _slices(splits: list[int]) -> list[slice]:
    bounds = [0, *itertools.accumulate(splits)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


class _ThreadedFFN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w_in: Tensor, w_out: Tensor, splits: list[int], act: Activation
    ) -> Tensor:
        h = rows_mm(x, w_in.transpose(1, 2), splits)  # [N, F_in]
        ctx.save_for_backward(x, w_in, w_out, h)
        ctx.splits, ctx.act = splits, act
        return rows_mm(act(h), w_out.transpose(1, 2), splits)  # [N, D]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w_in, w_out, h = ctx.saved_tensors
        splits, need = ctx.splits, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiate differentiable ops instead
            inputs = [t for t, n in zip((x, w_in, w_out), need) if n]
            with torch.enable_grad():
                y = _reference_ffn(x, w_in, w_out, splits, ctx.act)
            grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True))
            return (*(next(grads) if n else None for n in need), None, None)
        grad_out = grad_out.contiguous()
        a, grad_h = act_with_grad(ctx.act, h, rows_mm(grad_out, w_out, splits))  # [N, F], [N, F_in]
        return (
            rows_mm(grad_h, w_in, splits) if need[0] else None,
            weights_mm(grad_h, x, splits) if need[1] else None,
            weights_mm(grad_out, a, splits) if need[2] else None,
            None,
            None,
        )


def threaded_ffn(
    x: Tensor, w_in: Tensor, w_out: Tensor, splits: list[int], act: Activation, keep_hidden: bool
) -> Tensor:
    """The grouped FFN without biases on this kernel (``x [N, D]`` rows grouped by expert,
    ``w_in [E, F_in, D]``, ``w_out [E, D, F]``, ``splits`` rows per expert) -> ``[N, D]``; one
    autograd node when ``keep_hidden`` (exact gradients, none for frozen weights, double backward
    through the per-expert ops)."""
    if keep_hidden:
        out: Tensor = _ThreadedFFN.apply(x, w_in, w_out, splits, act)  # type: ignore[no-untyped-call]
        return out
    return rows_mm(act(rows_mm(x, w_in.transpose(1, 2), splits)), w_out.transpose(1, 2), splits)
