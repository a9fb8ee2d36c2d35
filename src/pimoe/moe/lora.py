"""LoRA adapters on fused 3-D expert weights and on ``nn.Linear`` layers.

Fused experts keep all experts' weights in one ``[E, out, in]`` parameter (pimoe's
``StackedExperts.w_in`` / ``w_out``, transformers 5's ``gate_up_proj`` / ``down_proj``), so there
is no ``nn.Linear`` per expert for a module-swapping adapter to replace. :class:`ExpertLoRA` is a
``torch.nn.utils.parametrize`` parametrization of such a parameter: reading the weight gives

    ``W[e] + (lora_alpha / r) * B[e] @ A[e]``     ``A [E, r, in]`` (or ``[1, r, in]``: shared-A),
                                                  ``B [E, out, r]`` (zeros at creation)

so every reader of the weight (pimoe's experts backends, transformers' eager / grouped_mm /
``"pimoe"`` experts implementations) runs the adapted expert, and autograd trains ``A`` and
``B`` only. pimoe's own :class:`~pimoe.moe.experts.StackedExperts` do not read the sum while
training: adapted, they run the experts backend ``"lora"``, which keeps the low-rank path on the
activations (:func:`~pimoe.moe.lora_modules.low_rank_ffn`:
``h = x W[e]^T + (alpha / r) (x A[e]^T) B[e]^T``, both projections), so the frozen ``W`` gets no
gradient and its ``[E, out, in]`` gradient is never formed. transformers' experts modules get the
same path: :func:`add_lora` switches them to the ``"pimoe"`` experts implementation
(:mod:`pimoe.hf.backend`) and :func:`merge_and_unload` switches them back. Weights
stored transposed (``is_transposed``: ``[E, in, out]``, GPT-OSS) get the
transposed update. :class:`LoRALinear` wraps an ``nn.Linear`` (attention projections) and adds
the low-rank path on the activations, ``y = x W^T + (alpha / r) (x A^T) B^T``.

Conventions follow PEFT: ``r``, ``lora_alpha``, ``target_modules`` (names of ``nn.Linear``
modules), ``target_parameters`` (names of 3-D parameters), a folder with
``adapter_model.safetensors`` and ``adapter_config.json``; ``merge_and_unload`` returns plain
weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pimoe.moe.backends import get_experts_backend, register_experts_backend
from pimoe.moe.experts import StackedExperts
from pimoe.moe.lora_modules import (
    Adapter,
    ExpertLoRA,
    LoRALinear,
    adapters_train,
    base_and_adapter,
    low_rank_ffn,
)

__all__ = [
    "ExpertLoRA",
    "LoRAConfig",
    "LoRALinear",
    "add_lora",
    "load_lora",
    "lora_adapters",
    "lora_state_dict",
    "merge_and_unload",
    "merge_lora",
    "save_lora",
    "unmerge_lora",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "pimoe-lora/1"
BACKEND = "lora"  # the experts backend of adapted StackedExperts
HF_BASE_IMPLEMENTATION = "lora_base_experts_implementation"  # on adapted transformers experts


@dataclass(frozen=True)
class LoRAConfig:
    """What :func:`add_lora` adapts, and how.

    Attributes:
        r: rank of every adapter (>= 1).
        lora_alpha: the update is scaled by ``lora_alpha / r``.
        shared_a: fused experts share one ``A [1, r, in]`` (their input subspace), each keeps its
            own ``B``; ``False``: one ``A`` per expert.
        target_parameters: names of 3-D ``[E, out, in]`` parameters to adapt (pimoe's
            ``w_in``/``w_out``, transformers' ``gate_up_proj``/``up_proj``/``down_proj``).
        target_modules: names (last component) of ``nn.Linear`` modules to wrap in
            :class:`LoRALinear`, e.g. ``("q_proj", "k_proj", "v_proj", "o_proj")``.
    """

    r: int = 8
    lora_alpha: float = 16.0
    shared_a: bool = False
    target_parameters: tuple[str, ...] = ("w_in", "w_out", "gate_up_proj", "up_proj", "down_proj")
    target_modules: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an int >= 1, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        for name in ("target_parameters", "target_modules"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a sequence of names, got {value!r}")
            object.__setattr__(self, name, tuple(value))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown LoRAConfig keys: {sorted(unknown)}")
        return cls(**data)


def low_rank_experts(
    experts: StackedExperts, x_sorted: Tensor, counts: Tensor, positions: Tensor | None
) -> Tensor:
    """Experts backend ``"lora"``: adapted :class:`StackedExperts` without forming ``W + B A``.

    When autograd will train the adapters, the experts run :func:`low_rank_ffn` on the rows of
    ``x_sorted [N, D]`` (``counts [E]`` rows per expert): ``x W[e]^T + scaling (x A[e]^T) B[e]^T``
    for both projections, so the frozen base weights are differentiated only with respect to
    their inputs. Otherwise (no grad, frozen or merged adapters) the backend the experts had
    before :func:`add_lora` runs on the adapted weights ``W + scaling B A`` (bit for bit the base
    output while ``B`` is zero). Returns ``[N, D]``.
    """
    base = getattr(experts, "lora_base_backend", None)
    if base is None:
        raise ValueError(
            f"experts backend {BACKEND!r} runs StackedExperts adapted by pimoe.moe.add_lora"
        )
    w_in, lora_in = base_and_adapter(experts, "w_in")
    w_out, lora_out = base_and_adapter(experts, "w_out")
    if not adapters_train((lora_in, lora_out)):
        return get_experts_backend(base, w_in)(experts, x_sorted, counts, positions)
    splits = [int(n) for n in counts.tolist()]
    return low_rank_ffn(
        x_sorted, splits, w_in, experts.b_in, lora_in, w_out, experts.b_out, lora_out, experts.act
    )


register_experts_backend(BACKEND, low_rank_experts)


def _use_low_rank_hf_experts(modules: list[nn.Module]) -> None:
    """Transformers experts modules (``@use_experts_implementation``) among ``modules`` run the
    ``"pimoe"`` experts implementation while adapted: it trains the adapters on the activations,
    where transformers' own implementations would read ``W + s B A`` (:mod:`pimoe.hf.backend`;
    the reason for this one import of ``pimoe.hf`` from ``pimoe.moe``). The implementation each
    had is kept in ``module.<HF_BASE_IMPLEMENTATION>`` for :func:`merge_and_unload`."""
    hf_experts: list[Any] = [
        m
        for m in dict.fromkeys(modules)
        if hasattr(m, "has_gate") and hasattr(getattr(m, "config", None), "_experts_implementation")
    ]
    if not hf_experts:
        return
    from pimoe.hf.backend import NAME, enable

    enable()
    for module in hf_experts:  # all recorded before any shared config is switched
        setattr(module, HF_BASE_IMPLEMENTATION, module.config._experts_implementation)
    for module in hf_experts:
        module.config._experts_implementation = NAME


def lora_adapters(model: nn.Module) -> dict[str, Adapter]:
    """Every adapter in ``model`` by target name: ``"<module>.<parameter>"`` for fused experts,
    ``"<module>"`` for a :class:`LoRALinear`."""
    found: dict[str, Adapter] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found[name] = module
        elif parametrize.is_parametrized(module):
            for param_name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, ExpertLoRA):
                        found[f"{name}.{param_name}" if name else param_name] = p
    return found


def add_lora(model: nn.Module, config: LoRAConfig | None = None) -> list[str]:
    """Attach adapters to ``model`` **in place** and freeze every other parameter (PEFT's
    ``get_peft_model``); returns the adapted target names.

    Raises:
        ValueError: nothing in ``model`` matches the targets, or it already has adapters.
    """
    config = config or LoRAConfig()
    if lora_adapters(model):
        raise ValueError("the model already has LoRA adapters (merge_and_unload it first)")
    params = [
        (module, pname)
        for module in model.modules()
        for pname, p in list(module._parameters.items())
        if pname in config.target_parameters and p is not None and p.dim() == 3
    ]
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in config.target_modules
    ]
    if not params and not linears:
        raise ValueError(
            f"no 3-D parameter named {list(config.target_parameters)} and no nn.Linear named "
            f"{list(config.target_modules)} in {type(model).__name__}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for module, pname in params:
        weight = module._parameters[pname]
        assert weight is not None
        transposed = bool(getattr(module, "is_transposed", False))
        adapter = ExpertLoRA(weight, config.r, config.lora_alpha, config.shared_a, transposed)
        parametrize.register_parametrization(module, pname, adapter)
        if isinstance(module, StackedExperts) and module.backend != BACKEND:
            module.lora_base_backend = module.backend  # type: ignore[assignment]
            module.backend = BACKEND
    _use_low_rank_hf_experts([module for module, _ in params])
    for name, linear in linears:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(linear, config.r, config.lora_alpha))
    model.lora_config = config  # type: ignore[assignment]  # what save_lora writes
    return list(lora_adapters(model))


def _base_weight(model: nn.Module, target: str, adapter: Adapter) -> Tensor:
    if isinstance(adapter, LoRALinear):
        return adapter.base.weight
    module_name, _, pname = target.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    original: Tensor = module.parametrizations[pname].original  # type: ignore[union-attr,index]
    return original


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Add every adapter's update into its base weight; the model then runs at the base
    model's cost and gives the adapted output. :func:`unmerge_lora` undoes it."""
    for target, adapter in lora_adapters(model).items():
        if not adapter.merged:
            weight = _base_weight(model, target, adapter)
            weight.add_(adapter.delta().to(weight.dtype))
            adapter.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Subtract the adapters merged by :func:`merge_lora` (the base weights come back to within
    one rounding of each element)."""
    for target, adapter in lora_adapters(model).items():
        if adapter.merged:
            weight = _base_weight(model, target, adapter)
            weight.sub_(adapter.delta().to(weight.dtype))
            adapter.merged = False


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and remove them: plain parameters and ``nn.Linear`` modules again
    (what to save as a full model); returns ``model``."""
    merge_lora(model)
    for target, adapter in lora_adapters(model).items():
        module_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(module_name) if module_name else model
        if isinstance(adapter, LoRALinear):
            setattr(parent, attr, adapter.base)
        else:
            parametrize.remove_parametrizations(parent, attr, leave_parametrized=False)
    for module in model.modules():
        if isinstance(module, StackedExperts) and hasattr(module, "lora_base_backend"):
            module.backend = str(module.lora_base_backend)
            del module.lora_base_backend
        if hasattr(module, HF_BASE_IMPLEMENTATION):
            config: Any = getattr(module, "config")  # noqa: B009  # transformers' config
            config._experts_implementation = getattr(module, HF_BASE_IMPLEMENTATION)
            delattr(module, HF_BASE_IMPLEMENTATION)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<target>.lora_A": A, "<target>.lora_B": B}`` for every adapter (detached)."""
    state = {}
    for target, adapter in lora_adapters(model).items():
        state[f"{target}.lora_A"] = adapter.lora_A.detach()
        state[f"{target}.lora_B"] = adapter.lora_B.detach()
    return state


def save_lora(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Write the adapters alone: ``folder/adapter_model.safetensors`` (float tensors as trained)
    and ``folder/adapter_config.json`` (the :class:`LoRAConfig`, the targets and their shapes),
    each atomically."""
    from safetensors.torch import save

    from pimoe.io import atomic_write_bytes, atomic_write_text

    state = lora_state_dict(model)
    config = getattr(model, "lora_config", None)
    if not state or not isinstance(config, LoRAConfig):
        raise ValueError("the model has no LoRA adapters (add_lora first)")
    folder = Path(folder)
    tensors = {k: v.cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, save(tensors, metadata={"format": FORMAT}))
    info = {
        "format": FORMAT,
        **config.to_dict(),
        "targets": {k: list(v.shape) for k, v in tensors.items()},
    }
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(info, indent=2))


def load_lora(model: nn.Module, folder: str | os.PathLike[str]) -> LoRAConfig:
    """Attach the adapters saved by :func:`save_lora` to ``model`` (a model without adapters,
    built like the one they were trained on) and load their weights; returns their config.

    Raises:
        ValueError: not an adapter folder, or adapters that do not fit ``model`` (targets or
            shapes differ; checked before any tensor is read).
    """
    from safetensors.torch import load_file

    from pimoe.io import check_safetensors_shapes

    folder = Path(folder)
    try:
        info = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}: no readable {ADAPTER_CONFIG} ({err})") from err
    if not isinstance(info, dict) or info.pop("format", None) != FORMAT:
        raise ValueError(f"{folder / ADAPTER_CONFIG}: not a pimoe LoRA adapter config")
    info.pop("targets", None)
    config = LoRAConfig.from_dict(info)
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    add_lora(model, config)
    expected = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    try:
        check_safetensors_shapes(folder / ADAPTER_WEIGHTS, expected)
    except (ValueError, OSError):
        # the fresh adapters' update is exactly zero: unloading them leaves the model as it was
        merge_and_unload(model)
        for param, flag in trainable:
            param.requires_grad_(flag)
        raise
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    with torch.no_grad():
        for target, adapter in lora_adapters(model).items():
            adapter.lora_A.copy_(tensors[f"{target}.lora_A"])
            adapter.lora_B.copy_(tensors[f"{target}.lora_B"])
    return config
