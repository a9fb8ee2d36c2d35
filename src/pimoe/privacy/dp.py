"""Differential privacy: DP-SGD through Opacus, for centralized training and local client training.

DP-SGD (Abadi et al. 2016) clips every example's gradient to L2 norm ``max_grad_norm``, sums
them, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` and averages. Opacus does
the per-sample gradients (hooks for standard layers, ``torch.func`` for others), the Poisson
sampling of batches, and the accounting; :func:`make_private` picks the noise multiplier that
reaches ``(target_epsilon, target_delta)`` after ``epochs`` passes over the data, calibrated at the
sampling rate and step count that Opacus's Poisson loader and accountant really use
(:func:`opacus_sampling`). :func:`train_private` steps on every batch, empty ones included: an
empty Poisson batch is still a noisy, accounted step of the mechanism (skipping it would both
leave it out of ε and reveal that the batch was empty). :mod:`pimoe.privacy.budget` keeps a data
owner's spent budget on disk across restarts.

Models with layers Opacus refuses (BatchNorm, whose running statistics mix examples) raise a
``ValueError`` naming them; :func:`dp_compatible` swaps them for DP-friendly equivalents
(``ModuleValidator.fix``: BatchNorm -> GroupNorm) and must be applied *before* the optimizer is
built, so the optimizer holds the new parameters. Models with trainable PiMoE layers train too:
those layers sort tokens by expert, so Opacus's per-layer hooks would charge per-row gradients to
the wrong examples; :func:`privatize` computes their per-example gradients one example at a time
instead (:mod:`pimoe.privacy.per_example`), with Opacus's optimizer, noise and accountant.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from pimoe.moe.layer import MoEOutput

if TYPE_CHECKING:
    from opacus import PrivacyEngine

Accountant = Literal["prv", "rdp"]
Step = tuple[float, float, int]
"""One accountant history entry: (noise multiplier, sampling rate, number of steps), as in Opacus."""


class BudgetExhausted(RuntimeError):
    """Training further would spend more than the privacy budget (ε) allows."""


def _check_accountant(accountant: str) -> None:
    if accountant not in ("prv", "rdp"):
        raise ValueError(f"unknown accountant {accountant!r}; expected 'prv' or 'rdp'")


def opacus_sampling(data_loader: DataLoader, poisson: bool = True) -> tuple[float, int]:
    """``(sample_rate, steps_per_epoch)`` that Opacus uses for ``data_loader``.

    With ``poisson`` (Opacus's ``DPDataLoader``) each example enters a batch with probability
    ``1 / len(data_loader)`` (i.e. ``1 / ceil(n / batch_size)``, not ``batch_size / n``), an epoch
    is ``int(1 / that)`` batches (one fewer than ``len(data_loader)`` for some lengths, e.g. 93,
    through float rounding), and the accountant records rate ``1 / steps_per_epoch``; this
    returns what the accountant records. Without ``poisson``: ``(1 / len, len)``.
    """
    if len(data_loader) == 0:
        raise ValueError("data_loader is empty: DP-SGD needs at least one batch")
    if not poisson:
        return 1 / len(data_loader), len(data_loader)
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    steps = len(
        UniformWithReplacementSampler(
            num_samples=len(data_loader.dataset),  # type: ignore[arg-type]
            sample_rate=1 / len(data_loader),
        )
    )
    return 1 / steps, steps


@lru_cache(maxsize=256)
def noise_for_budget(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
) -> float:
    """Noise multiplier whose ``steps`` DP-SGD steps at ``sample_rate`` spend at most ``target_epsilon``.

    Opacus's own calibration (``get_noise_multiplier``, tolerance 0.01, default Rényi orders),
    cached: a call takes up to seconds.
    """
    from opacus.accountants.utils import get_noise_multiplier

    _check_accountant(accountant)
    with (
        warnings.catch_warnings()
    ):  # the search tries noise levels far from the answer, where Opacus
        warnings.filterwarnings(
            "ignore", message="Optimal order is the"
        )  # notes the best order is at the edge
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


@lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Rényi DP of one subsampled-Gaussian step at Opacus's default orders (RDP adds up over steps)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    return tuple(float(r) for r in rdp)


def epsilon_spent(history: Sequence[Step], delta: float, accountant: Accountant = "rdp") -> float:
    """ε at ``delta`` of the DP-SGD steps in ``history`` (Opacus's accountant); 0 for none.

    ``"rdp"`` gives what ``opacus.accountants.RDPAccountant`` gives for the same history (same
    orders and functions), with the per-step Rényi DP of each (noise, rate) cached: a client
    checking its budget every round pays the expensive part once.
    """
    from opacus.accountants import RDPAccountant, create_accountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    _check_accountant(accountant)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not history:
        return 0.0
    if accountant == "prv":
        counter = create_accountant(mechanism=accountant)
        counter.history = [(float(n), float(q), int(k)) for n, q, k in history]
        return float(counter.get_epsilon(delta))
    rdp = sum(np.asarray(_rdp_of_one_step(float(n), float(q))) * int(k) for n, q, k in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def dp_compatible(model: nn.Module) -> nn.Module:
    """``model`` with the layers Opacus cannot train privately replaced (BatchNorm -> GroupNorm).

    Returns a new module (or ``model`` itself if nothing needed fixing); build the optimizer on
    the returned module's parameters. Raises ValueError if some layer still cannot be fixed.
    """
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model) if ModuleValidator.validate(model, strict=False) else model
    check_private(fixed)
    return fixed


def routes_tokens(model: nn.Module) -> bool:
    """Whether ``model`` has a trainable MoE layer (its per-example gradients are taken one example at a time)."""
    from pimoe.moe.experts import StackedExperts

    return any(
        isinstance(m, (MoEOutput, StackedExperts)) and any(p.requires_grad for p in m.parameters())
        for m in model.modules()
    )


def check_private(model: nn.Module) -> None:
    """``ValueError`` naming the layers DP-SGD cannot train in ``model`` (BatchNorm and the other
    layers Opacus's validator refuses); None if :func:`privatize` can train it."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(str(e) for e in errors)
        raise ValueError(
            f"Opacus cannot compute per-sample gradients for this model ({len(errors)} problem(s)): "
            f"{reasons}. Call pimoe.privacy.dp_compatible(model) before building the optimizer."
        )


def privatize(
    engine: PrivacyEngine,
    model: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
) -> tuple[nn.Module, Optimizer, DataLoader]:
    """``engine.make_private`` at a given noise multiplier, for any model :func:`check_private` accepts.

    Models with trainable PiMoE layers get exact per-example gradients one example at a time
    (:func:`pimoe.privacy.per_example.make_private_per_example`); the others go through Opacus's
    hooks. Either way ``engine.accountant`` counts every optimizer step.
    """
    check_private(model)
    if routes_tokens(model):
        from pimoe.privacy.per_example import make_private_per_example

        return make_private_per_example(
            engine,
            model,
            optimizer,
            data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling,
        )
    return engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
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
        ``(model, optimizer, data_loader, engine)``: train with the first three as without DP
        (loss reduction "mean") but take the optimizer step on empty batches too, as
        :func:`train_private` does; ``engine`` is the Opacus ``PrivacyEngine`` that tracks the
        budget spent. ``model._module`` is the original module.

    Raises:
        ValueError: a non-positive budget/epochs/clip bound, an empty loader, an unknown
            accountant, or a layer Opacus cannot train privately (see :func:`dp_compatible`).
    """
    from opacus import PrivacyEngine

    _check_accountant(accountant)
    for name, value in (("target_epsilon", target_epsilon), ("max_grad_norm", max_grad_norm)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    if hasattr(model, "_module") and type(model).__module__.startswith(("opacus", "pimoe.privacy")):
        raise ValueError(
            "model is already wrapped by Opacus; pass the plain module (model._module)"
        )
    check_private(model)
    rate, steps = opacus_sampling(data_loader, poisson_sampling)
    noise = noise_for_budget(target_epsilon, target_delta, rate, steps * int(epochs), accountant)
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, data_loader = privatize(
        engine,
        model,
        optimizer,
        data_loader,
        noise_multiplier=noise,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
    )
    return model, optimizer, data_loader, engine


def train_private(
    model: nn.Module,
    optimizer: Optimizer,
    data_loader: Iterable[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> float:
    """Train ``model`` in place for ``epochs`` passes over ``data_loader`` (from :func:`make_private`).

    Every batch ``(x [B, ...], y [B])`` is one optimizer step, including empty ones (``B = 0``,
    which Poisson sampling draws now and then): Opacus adds the noise to a zero gradient and the
    accountant counts the step, exactly as the guarantee assumes. Returns the mean ``loss_fn``
    over the non-empty batches of the last epoch (NaN if all were empty).
    """
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    model.train()
    losses: list[float] = []
    for _ in range(int(epochs)):
        losses = []
        for x, y in data_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)  # NaN for an empty batch; its gradient is empty, not NaN
            loss.backward()
            optimizer.step()
            if len(y):
                losses.append(loss.item())
    return float(torch.tensor(losses).mean()) if losses else float("nan")


def epsilon(engine: PrivacyEngine, delta: float) -> float:
    """The ε spent at ``delta`` by the optimizer steps ``engine`` (from :func:`make_private`) has seen; 0 before the first."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not hasattr(engine, "get_epsilon") or not hasattr(engine, "accountant"):
        raise TypeError(
            f"expected an Opacus PrivacyEngine from make_private, got {type(engine).__name__}"
        )
    if len(engine.accountant) == 0:
        return 0.0
    return float(engine.get_epsilon(delta))
