"""Execute a routing decision: group assignments by expert, run each expert once, combine.

No Python loop over tokens: the only loop is over experts, inside the experts backend.

The fast path is three steps around the experts call, each one autograd node whose backward is
a gather too (no scatter-add anywhere: ``index_add_`` into few rows stalls for tens of
milliseconds when two threads compete for busy cores):

- :func:`plan_dispatch`: where each token-expert assignment goes in the experts' row buffer
  (expert 0's rows first). For a bank that accepts it, every expert is padded to the same
  number of rows when that wastes little, so that a kernel can run all experts as one batched
  matmul (:mod:`pimoe.moe.grouped`);
- :func:`gather_tokens`: the buffer rows, ``x[plan.token_rows]``;
- :func:`combine_rows`: each token's weighted sum of its rows, ``sum_j w[t, j] * y[slot[t, j]]``.

:func:`sort_by_expert` and :func:`combine` are the older, index-only halves (the expert-parallel
layer and transformers' backend put their own steps between them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pimoe.moe.combine_ops import combine_grad_rows, gather_rows, gather_sum, gather_sum_usable
from pimoe.moe.router import RouterOutput

# Pad every expert to the largest expert's row count when that is at most this many times the
# executed rows: one batched matmul over all experts then beats one matmul per expert (the
# kernel's fallback where torch's grouped_mm cannot run: biases, float64). Larger ratios mean
# idle experts, whose weights a per-expert loop does not read (decoding).
PAD_LIMIT = 2.0
# Where grouped_mm can run, padding must beat grouped_mm on the exact rows: on 2 threads
# ``torch.bmm`` over equal row counts was 1.2-1.4x faster than grouped_mm (it splits the experts
# between the threads; grouped_mm splits each small matmul), so padding pays while it adds at
# most this fraction of rows; on 1 thread it never does (``python
# benchmarks/moe_padding_vs_grouped_mm.py``, docs/benchmarks.md).
PAD_LIMIT_VS_GROUPED_MM = 1.25
PAD_MAX_MEAN_ROWS = 128


@dataclass(frozen=True)
class DispatchPlan:
    """Where each assignment of ``T`` tokens x ``k`` choices goes in an ``[R, D]`` row buffer.

    Attributes:
        token_rows: ``[R]`` long, the token of each buffer row (padding rows: token 0).
        slot: ``[T * k]`` long, the buffer row of each assignment (a dropped one: row 0).
        row_assignment: ``[R]`` long, the assignment ``t * k + j`` of each row (padding:
            ``T * k``); the inverse of ``slot``.
        counts: ``[E]`` long, executed assignments per expert.
        host_splits: rows per expert in the buffer (``counts`` as a list, or all equal when
            padded), or None where the plan was made without reading ``counts`` on the host
            (see :attr:`splits`).
        keep: ``[T, k]`` bool, the executed assignments, or None when all are.
        top_k: ``k``.
        padded: whether the buffer holds padding rows (then every split is the same).
    """

    token_rows: Tensor
    slot: Tensor
    row_assignment: Tensor
    counts: Tensor
    host_splits: list[int] | None
    keep: Tensor | None
    top_k: int
    padded: bool

    @property
    def splits(self) -> list[int]:
        """Rows per expert in the buffer, on the host (reading ``counts`` is a device sync on
        accelerators when the plan did not already hold them)."""
        return self.host_splits if self.host_splits is not None else self.counts.tolist()

    @property
    def num_tokens(self) -> int:
        """``T``."""
        return self.slot.numel() // self.top_k


def plan_dispatch(
    indices: Tensor, num_experts: int, mask: Tensor | None = None, pad_limit: float | None = None
) -> DispatchPlan:
    """Group the assignments ``indices [T, k]`` by expert (stable: token order within an expert).

    Args:
        indices: ``[T, k]`` long, the experts of each token (``< num_experts`` where executed).
        num_experts: ``E``.
        mask: ``[T, k]`` bool, the assignments to execute (None: all).
        pad_limit: pad every expert to the largest row count when the buffer is then at most
            ``pad_limit`` times the executed rows and the experts average at most
            ``PAD_MAX_MEAN_ROWS`` rows (None: never pad).

    With neither ``mask`` nor ``pad_limit`` the plan never reads ``counts`` on the host (no
    device sync on accelerators; :attr:`DispatchPlan.splits` reads them when asked).
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)  # [N]
    if mask is not None:
        flat = flat.masked_fill(~mask.reshape(-1), num_experts)  # dropped assignments sort last
    expert_sorted, order = flat.sort(stable=True)  # [N], [N]
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]  # [E]
    splits: list[int] | None = None
    executed, pad = flat.numel(), False
    if mask is not None or pad_limit is not None:  # needs the counts on the host
        splits = counts.tolist()
        executed = sum(splits)
        order = order[:executed]
        capacity = max(splits, default=0)
        pad = (
            pad_limit is not None
            and 0 < executed <= PAD_MAX_MEAN_ROWS * num_experts
            and num_experts * capacity <= pad_limit * executed
        )
    position = torch.arange(executed, device=indices.device)
    if pad:
        # row of the p-th sorted assignment of expert e: e * capacity + (p - start of e); the
        # shifts come from the host-side splits and the sort's values (no repeat_interleave,
        # cumsum or arange: on 2 busy threads each small parallel op can wait for a
        # descheduled thread)
        assert splits is not None
        shift, start = [], 0
        for e, n in enumerate(splits):
            shift.append(e * capacity - start)
            start += n
        shift_of = torch.tensor(shift, dtype=torch.long, device=indices.device)  # [E]
        rows_of_sorted = position + shift_of.index_select(0, expert_sorted[:executed])
        num_rows = num_experts * capacity
        token_rows = torch.zeros(num_rows, dtype=torch.long, device=indices.device)
        token_rows.scatter_(0, rows_of_sorted, order // k)
        row_assignment = torch.full(
            (num_rows,), flat.numel(), dtype=torch.long, device=indices.device
        )
        row_assignment.scatter_(0, rows_of_sorted, order)
        splits = [capacity] * num_experts
    else:
        rows_of_sorted, token_rows, row_assignment = position, order // k, order
    slot = torch.zeros_like(flat).scatter_(0, order, rows_of_sorted)
    return DispatchPlan(token_rows, slot, row_assignment, counts, splits, mask, k, pad)


class _GatherTokens(torch.autograd.Function):
    """``x [T, D] -> x[token_rows] [R, D]``; backward sums each token's rows (a gather)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: DispatchPlan, training: bool) -> Tensor:
        ctx.plan = plan
        if gather_sum_usable(x):  # a row buffer of the kernel's pool
            rows: Tensor = gather_rows(x, plan.token_rows, not training)
            return rows
        return x.index_select(0, plan.token_rows)

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor, None, None]:
        plan: DispatchPlan = ctx.plan
        if grad_rows.shape[0] == 0:  # every assignment dropped
            return grad_rows.new_zeros(plan.num_tokens, grad_rows.shape[-1]), None, None
        if not torch.is_grad_enabled() and gather_sum_usable(grad_rows):  # not create_graph
            slot = plan.slot.view(plan.num_tokens, plan.top_k)
            keep = torch.ones(slot.shape) if plan.keep is None else plan.keep.float()
            return gather_sum(grad_rows, slot, keep), None, None
        per_choice = grad_rows.index_select(0, plan.slot).view(
            plan.num_tokens, plan.top_k, -1
        )  # [T, k, D]
        if plan.keep is None:
            return per_choice.sum(dim=1), None, None
        keep = plan.keep.to(grad_rows.dtype).unsqueeze(1)  # [T, 1, k]
        return torch.bmm(keep, per_choice).squeeze(1), None, None


class _CombineRows(torch.autograd.Function):
    """``y [R, D]``, ``weights [T, k]`` -> ``[T, D]``: ``out[t] = sum_j w[t, j] * y[slot[t, j]]``."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, weights: Tensor, plan: DispatchPlan) -> Tensor:
        num_tokens, k = weights.shape
        w = weights if plan.keep is None else weights.masked_fill(~plan.keep, 0)
        ctx.save_for_backward(y, w)
        ctx.plan = plan
        if y.shape[0] == 0:  # every assignment dropped
            return y.new_zeros(num_tokens, y.shape[-1])
        if gather_sum_usable(y):
            out: Tensor = gather_sum(y, plan.slot.view(num_tokens, k), w.to(y.dtype))
            return out
        per_choice = y.index_select(0, plan.slot).view(num_tokens, k, -1)  # [T, k, D]
        return torch.bmm(w.to(y.dtype).unsqueeze(1), per_choice).squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        y, w = ctx.saved_tensors
        plan: DispatchPlan = ctx.plan
        num_tokens, k = w.shape
        grad_y = grad_w = None
        if y.shape[0] == 0:  # every assignment dropped
            if ctx.needs_input_grad[1]:
                grad_w = torch.zeros_like(w)
            return grad_y, grad_w, None
        # each row's token gradient, in row order, serves both gradients: one pass in the
        # threaded extension, else one [R, D] gather (then no out= or in-place ops, so that the
        # backward stays differentiable: double backward, e.g. MAML's create_graph)
        flat_w = w.reshape(-1).to(y.dtype)
        if plan.padded:  # padding rows (row_assignment == T * k) get weight 0
            flat_w = torch.cat([flat_w, flat_w.new_zeros(1)])
        row_w = flat_w.index_select(0, plan.row_assignment)  # [R]
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        per_row: Tensor | None = None  # [R]: <y[r], grad_out[token of r]>
        if not torch.is_grad_enabled() and grad_out.dtype == y.dtype and gather_sum_usable(y):
            grad_y, dots = combine_grad_rows(
                grad_out, plan.token_rows, row_w, y if need_w else y.new_empty(0)
            )
            grad_y, per_row = (grad_y if need_y else None), (dots if need_w else None)
        else:
            grad_rows = grad_out.index_select(0, plan.token_rows).to(y.dtype)  # [R, D]
            if need_y:
                grad_y = grad_rows * row_w.unsqueeze(1)
            if need_w:
                per_row = torch.bmm(y.unsqueeze(1), grad_rows.unsqueeze(2)).view(-1)
        if per_row is not None:
            grad_w = per_row.index_select(0, plan.slot).view(num_tokens, k).to(w.dtype)
            if plan.keep is not None:
                grad_w = grad_w.masked_fill(~plan.keep, 0)
        return grad_y, grad_w, None


def gather_tokens(x: Tensor, plan: DispatchPlan) -> Tensor:
    """The experts' input rows ``x[plan.token_rows]``: ``[T, D] -> [R, D]`` (with grad
    enabled, in a row buffer of the threaded kernel's pool where it runs)."""
    out: Tensor = _GatherTokens.apply(x, plan, torch.is_grad_enabled())  # type: ignore[no-untyped-call]
    return out


def combine_rows(y: Tensor, weights: Tensor, plan: DispatchPlan) -> Tensor:
    """Each token's weighted sum of its expert outputs: ``y [R, D]``, ``weights [T, k]`` -> ``[T, D]``
    in ``y``'s dtype (0 for a token with no executed assignment)."""
    out: Tensor = _CombineRows.apply(y, weights, plan)  # type: ignore[no-untyped-call]
    return out


def sort_by_expert(
    indices: Tensor, weights: Tensor, num_experts: int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Group token-expert assignments by expert.

    Args:
        indices: ``[T, k]`` long, the experts of each token.
        weights: ``[T, k]`` combine weights.
        num_experts: ``E``.
        mask: ``[T, k]`` bool, the assignments to execute (None: all).

    Returns:
        ``(token_sorted [N], weight_sorted [N], counts [E])``: the token index and combine weight
        of each executed assignment, expert 0's first (stable: token order within an expert), and
        the number of assignments per expert.
    """
    plan = plan_dispatch(indices, num_experts, mask)
    return plan.token_rows, weights.reshape(-1).index_select(0, plan.row_assignment), plan.counts


def sort_assignments(route: RouterOutput, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sort_by_expert` of a router's decision (its indices, weights and mask)."""
    return sort_by_expert(route.indices, route.weights, num_experts, route.mask)


def combine(x: Tensor, y: Tensor, token_sorted: Tensor, weight_sorted: Tensor) -> Tensor:
    """Weighted scatter-add of expert outputs back to their tokens.

    Args:
        x: ``[T, D]`` the layer's tokens (gives the output's shape and dtype).
        y: ``[N, D]`` expert outputs in the order of :func:`sort_by_expert` (scaled in place
            when grad mode is off).
        token_sorted, weight_sorted: ``[N]`` from :func:`sort_by_expert`.

    Returns:
        ``[T, D]``: each token's weighted sum of its expert outputs (0 for a token with none).
        Accumulates with ``index_put_(accumulate=True)``, which, unlike ``index_add_``, does not
        stall on a busy machine when few tokens are written (batch-1 decoding).
    """
    scale = weight_sorted.unsqueeze(-1).to(y.dtype)  # [N, 1]
    y = y * scale if torch.is_grad_enabled() else y.mul_(scale)  # in place when nothing is saved
    out = torch.zeros_like(x, dtype=y.dtype).index_put_((token_sorted,), y, accumulate=True)
    return out.to(x.dtype)


def _expert_major(x: Tensor, route: RouterOutput, experts: nn.Module) -> bool:
    """Whether the bank runs this call expert by expert from gather to weighted sum: nothing
    needs a gradient and the bank says so for this many rows (``runs_expert_major``)."""
    rule = getattr(experts, "runs_expert_major", None)
    if rule is None:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad
        or route.weights.requires_grad
        or any(p.requires_grad for p in experts.parameters())
    ):
        return False
    return bool(rule(route.indices.numel()))


def dispatch_combine(
    x: Tensor,
    route: RouterOutput,
    experts: nn.Module,
    num_experts: int,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``experts`` on the assignments in ``route`` and combine them with their weights.

    Args:
        x: ``[T, D]`` tokens.
        route: the router's decision for ``x`` (``indices``/``weights``/``mask`` are ``[T, k]``).
        experts: an expert bank (``ExpertList`` or ``StackedExperts``): called as
            ``experts(x_rows [R, D], counts [E], positions [R]) -> [R, D]``, rows grouped by
            expert. A bank whose ``accepts_padding`` is true may get padding rows (every expert
            then has the same row count, ``counts`` says so; their outputs are ignored).
        num_experts: ``E``.
        positions: ``[T]`` long token positions handed to the experts with their rows (default:
            the token index ``0..T-1``).

    Returns:
        ``(out [T, D], counts [E])``: the weighted sum of each token's expert outputs (0 for a
        token with no executed assignment) in ``x``'s dtype, and the executed assignments per
        expert.
    """
    if _expert_major(x, route, experts):  # inference of many rows: no [R, D] buffers
        plan = plan_dispatch(route.indices, num_experts, route.mask)
        row_weights = route.weights.reshape(-1).index_select(0, plan.row_assignment)
        run: Callable[..., Tensor] = experts.expert_major  # type: ignore[assignment]
        return run(x, plan.token_rows, row_weights, plan.splits), plan.counts
    pad_limit = (
        getattr(experts, "pad_limit", PAD_LIMIT)
        if getattr(experts, "accepts_padding", False)
        else None
    )
    plan = plan_dispatch(route.indices, num_experts, route.mask, pad_limit)
    row_positions = (
        plan.token_rows if positions is None else positions.index_select(0, plan.token_rows)
    )
    splits = torch.full_like(plan.counts, plan.splits[0]) if plan.padded else plan.counts
    y = experts(gather_tokens(x, plan), splits, row_positions)  # [R, D]
    return combine_rows(y, route.weights, plan).to(x.dtype), plan.counts
