"""Tiny random models of transformers' MoE families, and the backend checked on each of them.

:func:`check_families` builds each family at a tiny seeded size and compares
``experts_implementation="pimoe"`` with transformers' ``"eager"`` loop (logits and the gradient
of every parameter, fp32) and times one forward with ``"pimoe"``, ``"grouped_mm"`` and
``"eager"``, interleaved within each round so all three see the same machine load.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pimoe.hf.backend import NAME, enable

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_COMMON: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# model_type -> config overrides on top of _COMMON. Chosen so that every routing and layout
# feature of the family is exercised: shared experts, top-k normalization on and off, DeepSeek-V3's
# group-limited sigmoid routing with a score-correction bias, DeepSeek-V2's group-limited softmax
# routing, PhiMoE's sparsemixer routing, GPT-OSS's biases, interleaved gate/up and a clamp limit
# low enough to be hit.
FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 48, "num_local_experts": 6, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "head_dim": 8,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
    },
    "olmoe": {"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2},
    "deepseek_v3": {
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "first_k_dense_replace": 1,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "head_dim": 8,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "granitemoe": {"intermediate_size": 24, "num_local_experts": 6, "num_experts_per_tok": 2},
    "phimoe": {
        "intermediate_size": 24,
        "num_local_experts": 6,
        "num_experts_per_tok": 2,
        "router_jitter_noise": 0.0,
        "input_jitter_noise": 0.0,
    },
    "deepseek_v2": {
        "num_key_value_heads": 4,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "head_dim": 8,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "gpt_oss": {
        "head_dim": 8,
        "intermediate_size": 24,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "swiglu_limit": 0.3,
        "sliding_window": 8,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "layer_types": ["sliding_attention", "full_attention"],
    },
}

IMPLEMENTATIONS = (NAME, "grouped_mm", "eager")


def _randomize_biases(model: nn.Module, std: float) -> None:
    """Give every bias parameter and score-correction bias a seeded random value (their
    initializers often zero them, which would leave the code paths that read them untested)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("bias"):
                param.normal_(0.0, std)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, std)


def build_tiny(family: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` (a key of :data:`FAMILIES`), fp32, eval mode.

    Raises:
        ValueError: unknown family.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; choose from {sorted(FAMILIES)}")
    from transformers import AutoConfig, AutoModelForCausalLM

    enable()
    config = AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    _randomize_biases(model, std=0.1)
    return model.eval()


def _logits_and_grads(
    model: PreTrainedModel, input_ids: Tensor, implementation: str
) -> tuple[Tensor, dict[str, Tensor]]:
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits.float()  # [B, S, V]
    logits.square().sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _max_grad_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, float]:
    """``(max abs difference, max abs gradient)`` over all parameters; a parameter with a
    gradient on one side only counts its whole gradient as difference."""
    diff = scale = 0.0
    for name in a.keys() | b.keys():
        ga, gb = a.get(name), b.get(name)
        ref = ga if ga is not None else gb
        assert ref is not None
        scale = max(scale, ref.abs().max().item())
        if ga is None or gb is None:
            diff = max(diff, ref.abs().max().item())
        else:
            diff = max(diff, (ga - gb).abs().max().item())
    return diff, scale


def compare_implementations(
    model: PreTrainedModel, input_ids: Tensor, implementations: tuple[str, ...] = (NAME,)
) -> dict[str, dict[str, float]]:
    """Logit and gradient differences of each implementation vs ``"eager"`` on one model
    (fp32, loss = sum of squared logits); also the scale of the eager logits and gradients."""
    ref_logits, ref_grads = _logits_and_grads(model, input_ids, "eager")
    result = {}
    for implementation in implementations:
        logits, grads = _logits_and_grads(model, input_ids, implementation)
        grad_diff, grad_scale = _max_grad_diff(ref_grads, grads)
        result[implementation] = {
            "max_abs_logit_diff": (logits - ref_logits).abs().max().item(),
            "max_abs_logit": ref_logits.abs().max().item(),
            "max_abs_grad_diff": grad_diff,
            "max_abs_grad": grad_scale,
        }
    return result


def _time_forward(
    model: PreTrainedModel, input_ids: Tensor, implementations: tuple[str, ...], repeats: int
) -> dict[str, float]:
    """Median forward milliseconds per implementation, interleaved within each round."""
    times: dict[str, list[float]] = {name: [] for name in implementations}
    with torch.no_grad():
        for name in implementations:  # warm-up
            model.set_experts_implementation(name)
            model(input_ids=input_ids)
        for _ in range(repeats):
            for name in implementations:
                model.set_experts_implementation(name)
                start = time.perf_counter()
                model(input_ids=input_ids)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def check_families(
    families: list[str] | None = None,
    *,
    seed: int = 0,
    tokens: int = 64,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Check ``experts_implementation="pimoe"`` on tiny random models of each family.

    Args:
        families: keys of :data:`FAMILIES` (default: all).
        seed: seeds the weights and the input tokens.
        tokens: tokens per forward (one sequence).
        repeats: timed rounds; each round runs pimoe, grouped_mm and eager once.
        progress: called with each family's name before it is checked.

    Returns:
        One dict per family: ``family``, ``experts_class``, ``num_experts``, ``top_k``,
        ``max_abs_logit_diff`` / ``max_abs_grad_diff`` (pimoe vs eager, loss = sum of squared
        logits), ``max_abs_logit`` / ``max_abs_grad`` (their scale),
        ``grouped_mm_max_abs_logit_diff`` (transformers' own backend vs eager, for reference) and
        ``fwd_ms_pimoe`` / ``fwd_ms_grouped_mm`` / ``fwd_ms_eager`` (median over ``repeats``).
    """
    names = list(FAMILIES) if families is None else list(families)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown MoE families {unknown}; choose from {sorted(FAMILIES)}")
    if tokens < 1 or repeats < 1:
        raise ValueError(f"tokens and repeats must be >= 1, got {tokens} and {repeats}")
    rows = []
    for name in names:
        if progress is not None:
            progress(name)
        model = build_tiny(name, seed=seed)
        config: Any = model.config
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, config.vocab_size, (1, tokens), generator=generator)
        experts: Any = next(
            m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")
        )
        row: dict[str, Any] = {
            "family": name,
            "experts_class": type(experts).__name__,
            "num_experts": int(experts.num_experts),
            "top_k": int(config.num_experts_per_tok),
        }
        diffs = compare_implementations(model, input_ids, (NAME, "grouped_mm"))
        row.update(diffs[NAME])
        row["grouped_mm_max_abs_logit_diff"] = diffs["grouped_mm"]["max_abs_logit_diff"]
        for impl, ms in _time_forward(model, input_ids, IMPLEMENTATIONS, repeats).items():
            row[f"fwd_ms_{impl}"] = round(ms, 3)
        rows.append(row)
    return rows
