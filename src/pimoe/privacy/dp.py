"""Differential privacy: DP-SGD through Opacus, for centralized training and local client training.

DP-SGD (Abadi et al. 2016) clips every example's gradient to L2 norm ``max_grad_norm``, sums
them, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` and averages. Opacus does
the per-sample gradients (hooks for standard layers, ``torch.func`` for others), the Poisson
sampling of batches, and the accounting; :func:`make_private` picks the noise multiplier that
reaches ``(target_epsilon, target_delta)`` after ``epochs`` passes over the data.

Models with layers Opacus refuses (BatchNorm, whose running statistics mix examples) raise a
``ValueError`` naming them, and so do trainable PiMoE layers: they sort tokens by expert, so the
per-sample gradients Opacus computes inside them would belong to the wrong examples (frozen PiMoE
layers are fine: gradients flow through them to the trainable layers around them); :func:`dp_compatible` swaps them for DP-friendly equivalents
(``ModuleValidator.fix``: BatchNorm -> GroupNorm) and must be applied *before* the optimizer is
built, so the optimizer holds the new parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from pimoe.moe.layer import MoEOutput

if TYPE_CHECKING:
    from opacus import PrivacyEngine

Accountant = Literal["prv", "rdp"]


def dp_compatible(model: nn.Module) -> nn.Module:
    """``model`` with the layers Opacus cannot train privately replaced (BatchNorm -> GroupNorm).

    Returns a new module (or ``model`` itself if nothing needed fixing); build the optimizer on
    the returned module's parameters. Raises ValueError if some layer still cannot be fixed.
    """
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model) if ModuleValidator.validate(model, strict=False) else model
    _check_supported(fixed)
    return fixed


def _check_supported(model: nn.Module) -> None:
    from opacus.validators import ModuleValidator

    for name, module in model.named_modules():
        if isinstance(module, MoEOutput) and any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"layer {name or '<root>'} ({type(module).__name__}) routes tokens out of batch order, so "
                "Opacus would attribute its per-sample gradients to the wrong examples (no DP guarantee). "
                "Freeze it (requires_grad_(False)) and train the other layers privately."
            )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(str(e) for e in errors)
        raise ValueError(
            f"Opacus cannot compute per-sample gradients for this model ({len(errors)} problem(s)): "
            f"{reasons}. Call pimoe.privacy.dp_compatible(model) before building the optimizer."
        )


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    *,
    target_epsilon: float,
    target_delta: float,
    epochs: int,
    max_grad_norm: float,
    accountant: Accountant = "prv",
    poisson_sampling: bool = True,
) -> tuple[nn.Module, Optimizer, DataLoader, PrivacyEngine]:
    """Wrap ``model``, ``optimizer`` and ``data_loader`` for DP-SGD at ``(target_epsilon, target_delta)``.

    Args:
        model: an ``nn.Module`` whose forward takes batch-first inputs ``[B, ...]``; not already
            wrapped (pass the plain module to each new client/round).
        optimizer: built on ``model.parameters()``; becomes an Opacus ``DPOptimizer``.
        data_loader: the training loader; its dataset size and batch size set the sampling rate.
            With ``poisson_sampling`` (required for the accountant's guarantee) it is replaced by
            a loader whose batches have random size with mean ``batch_size``.
        target_epsilon, target_delta: the privacy budget reached after ``epochs`` epochs.
        epochs: passes over the data the budget covers; training longer spends more than
            ``target_epsilon`` (read the real value with :func:`epsilon`).
        max_grad_norm: per-example L2 clipping bound ``C``.
        accountant: ``"prv"`` (privacy random variables, tighter) or ``"rdp"`` (Rényi DP).

    Returns:
        ``(model, optimizer, data_loader, engine)``: train with the first three exactly as
        without DP (loss reduction "mean"); ``engine`` is the Opacus ``PrivacyEngine`` that
        tracks the budget spent. ``model._module`` is the original module.

    Raises:
        ValueError: a non-positive budget/epochs/clip bound, an empty loader, an unknown
            accountant, or a layer Opacus cannot train privately (see :func:`dp_compatible`).
    """
    from opacus import PrivacyEngine

    if accountant not in ("prv", "rdp"):
        raise ValueError(f"unknown accountant {accountant!r}; expected 'prv' or 'rdp'")
    for name, value in (("target_epsilon", target_epsilon), ("max_grad_norm", max_grad_norm)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    if len(data_loader) == 0:
        raise ValueError("data_loader is empty: DP-SGD needs at least one batch")
    if hasattr(model, "_module") and type(model).__module__.startswith("opacus"):
        raise ValueError("model is already wrapped by Opacus; pass the plain module (model._module)")
    _check_supported(model)
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, data_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        epochs=int(epochs),
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
    )
    return model, optimizer, data_loader, engine


def epsilon(engine: PrivacyEngine, delta: float) -> float:
    """The ε spent at ``delta`` by the optimizer steps ``engine`` (from :func:`make_private`) has seen; 0 before the first."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not hasattr(engine, "get_epsilon") or not hasattr(engine, "accountant"):
        raise TypeError(f"expected an Opacus PrivacyEngine from make_private, got {type(engine).__name__}")
    if len(engine.accountant) == 0:
        return 0.0
    return float(engine.get_epsilon(delta))
