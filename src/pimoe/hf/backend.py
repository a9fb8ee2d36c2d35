"""pimoe's grouped expert kernel as a transformers experts implementation (``"pimoe"``).

transformers >= 5 runs the experts of its MoE families (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3, GPT-OSS, ...) through ``transformers.integrations.moe.ExpertsInterface``: an
experts module decorated with ``@use_experts_implementation`` calls the function registered under
``config._experts_implementation`` as ``fn(experts, hidden_states [T, D], top_k_index [T, k],
top_k_weights [T, k]) -> [T, D]``. :func:`pimoe_experts_forward` is such a function: it runs
the same fast path as :class:`pimoe.moe.PiMoE` (:func:`pimoe.moe.dispatch.dispatch_combine`: plan,
gather, :func:`pimoe.moe.grouped.grouped_ffn` on the module's own weights, no copy, and the
weighted combine).

The decorator describes each family's layout, and this backend follows it:

- ``has_gate``: ``gate_up_proj`` (fused gate and up rows) and the family's ``_apply_gate``
  (transformers' default ``act(gate) * up`` on concatenated halves, or the family's own, e.g.
  GPT-OSS's interleaved, clamped ``(up + 1) * gate * sigmoid(alpha * gate)``); otherwise
  ``up_proj`` and ``act_fn``;
- ``is_transposed``: weights stored ``[E, D, F_in]`` / ``[E, F, D]`` (used through a view);
- ``has_bias``: ``gate_up_proj_bias`` / ``up_proj_bias`` and ``down_proj_bias``;
- ``has_post_expert_norm``: ``post_expert_norm`` applied to each expert output row;
- expert parallelism: indices ``>= num_experts`` (sentinels of other ranks) are skipped.

Experts adapted by :func:`pimoe.moe.add_lora` (``gate_up_proj`` / ``up_proj`` / ``down_proj``
parametrized as ``W + s B A``) run :func:`pimoe.moe.lora_modules.low_rank_ffn` while autograd
trains the adapters: the adapters act on the activations and ``W + s B A`` is never formed, nor
the frozen weights' gradient. Otherwise (inference, merged adapters) the kernel reads the adapted
weights.

An experts module with a parameter this layout does not name (quantization scales, per-expert
scales, ...) raises ``TypeError`` naming the family and the parameter: nothing runs silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.nn.utils import parametrize

from pimoe.moe.backends import auto_backend, grouped_mm_ffn
from pimoe.moe.dispatch import combine_rows, gather_tokens, plan_dispatch
from pimoe.moe.experts import kernel_pad_limit
from pimoe.moe.grouped import grouped_ffn
from pimoe.moe.lora_modules import ExpertLoRA, adapters_train, base_and_adapter, low_rank_ffn
from pimoe.moe.prepack import register_packable

NAME = "pimoe"
_KNOWN_PARAMETERS = frozenset(
    {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"}
)
MIN_TRANSFORMERS = "5.24"  # the oldest release on which tests/hf passes in full
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


class ExpertsLayout(NamedTuple):
    """One experts module's weights in the kernel's layout (views, never copies)."""

    w_in: Tensor  # [E, F_in, D]
    b_in: Tensor | None  # [E, F_in]
    w_out: Tensor  # [E, D, F]
    b_out: Tensor | None  # [E, D]
    act: Callable[[Tensor], Tensor]  # [n, F_in] -> [n, F]


def _family(experts: nn.Module) -> str:
    return type(experts).__name__


def experts_layout(module: nn.Module, base: bool = False) -> ExpertsLayout:
    """Read a ``@use_experts_implementation`` module's weights as ``grouped_ffn`` arguments
    (``base``: the base weights of LoRA-adapted ones, not ``W + s B A``).

    Raises:
        TypeError: the module is not a transformers experts module, or holds a parameter the
            kernel would ignore (named in the message with the family).
    """
    experts: Any = module  # transformers' experts modules are typed by convention, not by class
    family = _family(experts)
    missing = [flag for flag in _LAYOUT_FLAGS if not hasattr(experts, flag)]
    if missing or not hasattr(experts, "num_experts"):
        raise TypeError(
            f"{family} is not a transformers experts module decorated with @use_experts_implementation "
            f"(missing {missing or ['num_experts']})"
        )
    unknown = sorted(set(experts._parameters) - _KNOWN_PARAMETERS)
    if unknown:
        raise TypeError(
            f"experts_implementation='pimoe' cannot run {family}: parameters {unknown} are not part of "
            "the fused-experts layout (gate_up_proj/up_proj, down_proj, biases) that pimoe's kernel executes"
        )
    in_name = "gate_up_proj" if experts.has_gate else "up_proj"
    read = (lambda name: base_and_adapter(experts, name)[0]) if base else partial(getattr, experts)
    w_in, w_out = read(in_name), read("down_proj")
    for name, weight in (("input projection", w_in), ("down_proj", w_out)):
        if not weight.is_floating_point() or weight.dim() != 3:
            raise TypeError(
                f"experts_implementation='pimoe' cannot run {family}: its {name} is {weight.dtype} "
                f"{tuple(weight.shape)}; the kernel needs floating-point [E, out, in] weights"
            )
    if experts.is_transposed:  # stored [E, in, out]
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    b_in = b_out = None
    if experts.has_bias:
        b_in = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
        b_out = experts.down_proj_bias
    act = experts._apply_gate if experts.has_gate else experts.act_fn
    return ExpertsLayout(w_in, b_in, w_out, b_out, act)


def _adapters(experts: Any) -> tuple[ExpertLoRA | None, ExpertLoRA | None]:
    """The LoRA adapters of the input and output projections (None where not adapted)."""
    in_name = "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"
    if not parametrize.is_parametrized(experts):
        return None, None
    return base_and_adapter(experts, in_name)[1], base_and_adapter(experts, "down_proj")[1]


def pimoe_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """transformers experts implementation running pimoe's grouped kernel.

    Args:
        self: the family's experts module (``@use_experts_implementation``).
        hidden_states: ``[T, D]`` tokens.
        top_k_index: ``[T, k]`` chosen experts (``>= num_experts`` marks another rank's expert).
        top_k_weights: ``[T, k]`` combine weights.

    Returns:
        ``[T, D]`` in ``hidden_states``' dtype: each token's weighted sum of its experts' outputs.
    """
    experts: Any = self
    adapters = _adapters(experts)
    low_rank = adapters_train(adapters)
    layout = experts_layout(experts, base=True) if low_rank else experts_layout(experts)
    num_experts = int(experts.num_experts)
    mask = top_k_index < num_experts if experts._is_expert_parallel else None
    # what MoEConfig(backend="auto") runs: grouped_mm on the exact rows for bf16 on CUDA
    one_kernel = not low_rank and auto_backend(layout.w_in) == "grouped_mm"
    pad_limit = (
        None
        if low_rank or one_kernel
        else kernel_pad_limit(layout.w_in, layout.b_in, layout.w_out, layout.b_out)
    )
    plan = plan_dispatch(top_k_index, num_experts, mask, pad_limit)
    x = gather_tokens(hidden_states, plan)
    if one_kernel:
        y = grouped_mm_ffn(
            x, plan.counts, layout.w_in, layout.b_in, layout.w_out, layout.b_out, layout.act
        )
    elif low_rank:
        y = low_rank_ffn(
            x,
            plan.splits,
            layout.w_in,
            layout.b_in,
            adapters[0],
            layout.w_out,
            layout.b_out,
            adapters[1],
            layout.act,
        )
    else:
        y = grouped_ffn(
            x, layout.w_in, layout.b_in, layout.w_out, layout.b_out, plan.splits, layout.act
        )  # [R, D], padding rows ignored by the combine
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)
    return combine_rows(y, top_k_weights, plan).to(hidden_states.dtype)


def packable_experts(module: nn.Module) -> tuple[Tensor, Tensor] | str | None:
    """What :func:`pimoe.moe.pack_experts_` packs of a transformers experts module: its
    ``(w_in, w_out)`` as :func:`pimoe_experts_forward` passes them to the kernel, or why not
    (another experts implementation, LoRA adapters, biases, a layout the kernel cannot run);
    None for any other module."""
    experts: Any = module
    if not hasattr(experts, "num_experts") or any(not hasattr(experts, f) for f in _LAYOUT_FLAGS):
        return None
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if implementation != NAME:
        return f"experts_implementation={implementation!r}; packed weights run under {NAME!r}"
    if parametrize.is_parametrized(experts):
        return "parametrized weights (LoRA adapters: merge them first)"
    try:
        layout = experts_layout(experts)
    except TypeError as err:
        return str(err)
    if layout.b_in is not None or layout.b_out is not None:
        return "biases (the packed kernel runs bias-free experts)"
    return layout.w_in, layout.w_out


def enable() -> None:
    """Register :func:`pimoe_experts_forward` with transformers as ``"pimoe"`` (idempotent).

    Afterwards ``from_pretrained(..., experts_implementation="pimoe")``,
    ``model.set_experts_implementation("pimoe")`` or ``config._experts_implementation = "pimoe"``
    run a model's experts on pimoe's kernel, and :func:`pimoe.moe.pack_experts_` packs their
    weights (:func:`packable_experts`).
    """
    import transformers

    check_transformers_version(transformers.__version__)
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, pimoe_experts_forward)
    register_packable(packable_experts)


def check_transformers_version(found: str) -> None:
    """``ImportError`` naming the fix unless ``found`` >= :data:`MIN_TRANSFORMERS` (older 5.x
    releases lack experts-module flags the kernel reads, e.g. ``has_post_expert_norm`` before 5.20)."""
    from packaging.version import Version

    if Version(found) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"pimoe.hf needs transformers>={MIN_TRANSFORMERS} (found {found}): "
            "pip install 'pimoe[hf]' or pip install -U transformers"
        )
