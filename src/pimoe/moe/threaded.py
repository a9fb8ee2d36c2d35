"""Expert-parallel CPU kernel: whole experts spread over torch's threads, one expert per thread.

On several threads ``torch.nn.functional.grouped_mm`` (and a per-expert loop) splits every
small per-expert matmul between the threads: hundreds of tiny parallel regions per call at 64
experts, each ending in a barrier that waits for a descheduled thread on a busy machine. This
kernel runs one parallel region over all experts: each thread takes whole experts (largest
first, from a shared counter).
For pimoe's activations (:data:`FUSED_ACTIVATIONS`: SwiGLU, GELU, ReLU, SiLU) the whole FFN
of an expert runs in its thread while its rows are in cache: ``x_e @ W_in[e].T``, the
activation, ``@ W_out[e].T`` in the forward (one region), and in the backward (one region)
``g_e @ W_out[e]``, the activation's gradient, the two weight gradients and ``grad_x``. Any
other activation (a Python function) runs between per-matmul regions. The activation ops are
the same ATen calls as the per-expert loop's on the same tensors. Float32 matmuls run where
:func:`expert_matmul` says: on a CPU with AVX-512 (the default there, ``"avx512"``) those of
experts of 4-128 rows in the forward and up to 512 rows in the backward on the kernel's own
matmul (:mod:`pimoe.moe.gemm_source`), the others on oneDNN (forward) and ``at::mm``
(backward), as with ``"onednn"``; both agree with the loop to float rounding, and ``"mkl"``
(``at::mm`` everywhere) gives the loop's results bit for bit.

Weight gradients of 1 MiB or more (``zero_grad()`` drops them every step) and row buffers
(:func:`set_row_pool`) take their memory from a pool of freed blocks instead of
``malloc``, which maps large buffers afresh and faults every page in again each step (~27k faults,
~50 ms of kernel time per training step at 64 experts of width 256 on d_model 512, 2 cores).
Blocks come in 8 size classes per power of two; at most 1 GiB is kept, the least recently freed
given back first; :func:`empty_cache` frees it, :func:`cached_bytes` tells how much is kept.
Inference's row buffers (the gathered rows and the experts' outputs; ~4k page faults and ~5 ms
of a 27 ms forward at 64 experts and 512 tokens from ``malloc``) come from it too, but of the
blocks they free at most 64 MiB are kept: memory idle between a server's requests is memory the
server lacks.

The kernel is a small C++ extension (``torch.utils.cpp_extension.load_inline``, source in
:mod:`pimoe.moe.threaded_source`), built on first use (about a minute; cached by torch in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and only where a C++
compiler is present. Setting the environment variable ``PIMOE_THREADED_EXPERTS=0`` disables
it; a failed build warns once and :func:`threaded_kernel` then returns None, so the callers keep
their other kernels. Its entry points are torch custom ops (``torch.ops.pimoe.*``, with fake
implementations), so ``torch.compile`` traces a call to them instead of breaking the graph.
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
import torch.nn.functional as F
from torch import Tensor

from pimoe.moe.matmul_choice import expert_matmul as expert_matmul  # re-exported
from pimoe.moe.matmul_choice import set_expert_matmul as set_expert_matmul
from pimoe.moe.threaded_source import FUNCTIONS, SOURCE

Activation = Callable[[Tensor], Tensor]

_NAME = "pimoe_expert_kernels"
_log = logging.getLogger(__name__)
_state: dict[str, Any] = {}


def threaded_kernel() -> Any | None:
    """The compiled extension (:data:`pimoe.moe.threaded_source.FUNCTIONS`), built on the first
    call; None where
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
                cpp_sources=SOURCE,
                functions=FUNCTIONS,
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
    if module is not None:
        module.set_expert_matmul(expert_matmul())
        module.set_row_pool(_state.get("row_pool", True))
    return module


def threaded_built() -> bool:
    """Whether :func:`threaded_kernel` was already called (built, or found unavailable): a check
    that never starts a build."""
    return "module" in _state


@torch.library.custom_op("pimoe::rows_mm", mutates_args=())
def rows_mm(a: Tensor, b: Tensor, splits: list[int]) -> Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]``: ``a [N, K]`` rows grouped by expert,
    ``b [E, K, M]`` (any strides, e.g. ``w.transpose(1, 2)``) -> ``[N, M]``."""
    out: Tensor = loaded_kernel().rows_mm(a, b, splits)
    return out


@rows_mm.register_fake
def _(a: Tensor, b: Tensor, splits: list[int]) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("pimoe::weights_mm", mutates_args=())
def weights_mm(a: Tensor, b: Tensor, splits: list[int]) -> Tensor:
    """``out[e] = a[rows of e].T @ b[rows of e]`` (a weight gradient per expert): ``a [N, M]``,
    ``b [N, K]`` -> ``[E, M, K]``, zero for an expert without rows."""
    out: Tensor = loaded_kernel().weights_mm(a, b, splits)
    return out


@weights_mm.register_fake
def _(a: Tensor, b: Tensor, splits: list[int]) -> Tensor:
    return a.new_empty(len(splits), a.shape[1], b.shape[1])


@torch.library.custom_op("pimoe::ffn_forward", mutates_args=())
def ffn_forward(
    x: Tensor, w_in: Tensor, w_out: Tensor, splits: list[int], act: str, keep_hidden: bool
) -> tuple[Tensor, Tensor]:
    """The fused grouped FFN (``x [N, D]`` rows grouped by expert, ``w_in [E, F_in, D]``,
    ``w_out [E, D, F]``, ``act`` a key of :data:`FUSED_ACTIVATIONS`) -> ``(y [N, D], h)``,
    ``h [N, F_in]`` the hidden activations before ``act`` when ``keep_hidden``, else ``[0, F_in]``."""
    y, h = loaded_kernel().ffn_forward(x, w_in, w_out, splits, act, keep_hidden)
    return y, h


@ffn_forward.register_fake
def _(
    x: Tensor, w_in: Tensor, w_out: Tensor, splits: list[int], act: str, keep_hidden: bool
) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], w_out.shape[1]), x.new_empty(
        x.shape[0] if keep_hidden else 0, w_in.shape[1]
    )


@torch.library.custom_op("pimoe::ffn_backward", mutates_args=())
def ffn_backward(
    grad_y: Tensor,
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    h: Tensor,
    splits: list[int],
    act: str,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`ffn_forward` from ``grad_y [N, D]`` (contiguous) and its kept ``h``:
    ``(grad_x, grad_w_in, grad_w_out)``, each ``[0]`` unless ``need`` (three flags) asks for it."""
    grads: tuple[Tensor, Tensor, Tensor] = loaded_kernel().ffn_backward(
        grad_y, x, w_in, w_out, h, splits, act, *need
    )
    return grads


@ffn_backward.register_fake
def _(
    grad_y: Tensor,
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    h: Tensor,
    splits: list[int],
    act: str,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    shapes = (x.shape, w_in.shape, w_out.shape)
    return tuple(x.new_empty(s if n else (0,)) for s, n in zip(shapes, need))  # type: ignore[return-value]


@torch.library.custom_op("pimoe::expert_major_forward", mutates_args=())
def expert_major_forward(
    x: Tensor,
    token_rows: Tensor,
    row_weights: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    splits: list[int],
    act: str,
    chunk_rows: int,
) -> Tensor:
    """Inference from gather to weighted sum (``x [T, D]``, ``token_rows [R]`` grouped by
    expert, ``row_weights [R]``, ``act`` a key of :data:`FUSED_ACTIVATIONS`) -> ``[T, D]``:
    ``out[token_rows[r]] += row_weights[r] * FFN_e(x[token_rows[r]])``, each thread taking whole
    experts dealt in advance, ``chunk_rows`` rows at a time; the same result on every run with
    the same thread count."""
    out: Tensor = loaded_kernel().expert_major_forward(
        x, token_rows, row_weights, w_in, w_out, splits, act, chunk_rows
    )
    return out


@expert_major_forward.register_fake
def _(
    x: Tensor,
    token_rows: Tensor,
    row_weights: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    splits: list[int],
    act: str,
    chunk_rows: int,
) -> Tensor:
    return torch.empty_like(x)


def loaded_kernel() -> Any:
    """The built extension (:func:`threaded_kernel`); ``RuntimeError`` where it is not available."""
    module = threaded_kernel()
    if module is None:
        raise RuntimeError("pimoe's threaded experts kernel is not available")
    return module


def empty_cache() -> int:
    """Free the blocks the kernel keeps for its weight gradients and row buffers (a block is
    kept once the tensor holding it is freed, e.g. by ``optimizer.zero_grad()``);
    returns the bytes freed (0 where the kernel is not built)."""
    module = _state.get("module")
    return 0 if module is None else int(module.release_pool())


def cached_bytes() -> int:
    """Bytes the kernel keeps now for its next weight-gradient and row buffers (see
    :func:`empty_cache`)."""
    module = _state.get("module")
    return 0 if module is None else int(module.pool_kept_bytes())


def set_row_pool(on: bool) -> None:
    """Whether the ``[rows, features]`` buffers of 1 MiB or more of training and inference (the
    experts' gathered inputs, hidden activations, outputs and their gradients) come from the
    kernel's pool (the default) or from ``malloc`` (less memory kept between steps)."""
    if not isinstance(on, bool):
        raise TypeError(f"set_row_pool takes True or False, got {on!r}")
    _state["row_pool"] = on
    module = _state.get("module")
    if module is not None:
        module.set_row_pool(on)


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


# Where the kernel pays (``pimoe bench moe``, docs/benchmarks.md): several experts per thread
# (64 experts: faster than grouped_mm from 128 to 16384 tokens; 8 experts, 4 per thread:
# forward+backward 0.73 vs 0.87 of dense at 2048 tokens) or few rows per expert. Fewer experts
# per thread were not measured: grouped_mm (each matmul split between the threads) keeps them.
MIN_EXPERTS_PER_THREAD = 4
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


def swiglu(h: Tensor) -> Tensor:
    """SwiGLU: ``silu(gate) * up`` for ``h = [gate, up]`` ``[n, 2F]`` -> ``[n, F]``."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# Activations the kernel runs in C++ (by name; the same ATen ops as these functions).
FUSED_ACTIVATIONS: dict[Activation, str] = {
    swiglu: "swiglu",
    F.gelu: "gelu",
    F.relu: "relu",
    F.silu: "silu",
}


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
    bounds = itertools.pairwise([0, *itertools.accumulate(splits)])
    outs = [act(x[a:b] @ w_in[e].t()) @ w_out[e].t() for e, (a, b) in enumerate(bounds) if b > a]
    return torch.cat(outs) if outs else x.new_zeros(0, w_out.shape[1])


class _ThreadedFFN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w_in: Tensor, w_out: Tensor, splits: list[int], act: Activation
    ) -> Tensor:
        name = FUSED_ACTIVATIONS.get(act)
        y: Tensor
        h: Tensor
        if name is None:
            h = rows_mm(x, w_in.transpose(1, 2), splits)  # [N, F_in]
            y = rows_mm(act(h), w_out.transpose(1, 2), splits)  # [N, D]
        else:
            y, h = ffn_forward(x, w_in, w_out, splits, name, True)
        ctx.save_for_backward(x, w_in, w_out, h)
        ctx.splits, ctx.act, ctx.name = splits, act, name
        return y

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
        if ctx.name is not None:
            fused = ffn_backward(grad_out, x, w_in, w_out, h, splits, ctx.name, list(need))
            return (*(g if n else None for g, n in zip(fused, need)), None, None)
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
    ``w_in [E, F_in, D]``, ``w_out [E, D, F]``, ``splits`` rows per expert) -> ``[N, D]``; fused
    per expert when ``act`` is in :data:`FUSED_ACTIVATIONS`. One autograd node when
    ``keep_hidden`` (exact gradients, none for frozen weights, double backward through the
    per-expert ops)."""
    if keep_hidden:
        out: Tensor = _ThreadedFFN.apply(x, w_in, w_out, splits, act)  # type: ignore[no-untyped-call]
        return out
    name = FUSED_ACTIVATIONS.get(act)
    if name is not None:
        out, _ = ffn_forward(x, w_in, w_out, splits, name, False)
        return out
    out = rows_mm(act(rows_mm(x, w_in.transpose(1, 2), splits)), w_out.transpose(1, 2), splits)
    return out
