"""Privacy add-ons for federated runs, built on pimoe.privacy (each imported only when switched on):
an audit log, DP-SGD on every client with a per-client budget that spans the whole run, and the
secure / homomorphic aggregation strategies.

DP budget: each client calibrates its noise (Opacus, RDP accountant) so that training in its
*planned* number of rounds, ``ceil(rounds * fraction)``, spends ``cfg.dp_epsilon`` at
``cfg.dp_delta``, at the sampling rate and step count of Opacus's Poisson loader
(:func:`pimoe.privacy.dp.opacus_sampling`). Every step counts, empty Poisson batches included.
The client's steps are reserved in a :class:`pimoe.privacy.budget.PrivacyBudget` before it
trains: a file ``dp-budget-client-<partition-id>.json`` in the SuperNode's ``dp-budget-dir``
node-config folder (survives a restarted client), else the client's ``context.state`` (lives as
long as the run's client state, enough for a simulation). A client whose next round would exceed
the budget declines (an Error reply) instead of training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flwr.app import ConfigRecord, Context
from torch import Tensor, nn

from pimoe.data.digits import Split
from pimoe.federated.config import FederatedConfig
from pimoe.privacy.dp import BudgetExhausted

if TYPE_CHECKING:
    from pimoe.privacy.budget import PrivacyBudget

__all__ = [
    "BUDGET_DIR_KEY",
    "BudgetExhausted",
    "client_budget",
    "dp_train",
    "he_keys",
    "keep_budget",
    "make_audit",
    "make_protected_strategy",
    "planned_rounds",
]

DP_HISTORY = (
    "dp-history"  # context.state key of a client's accountant history (without a budget folder)
)
BUDGET_DIR_KEY = "dp-budget-dir"  # node-config key: the folder of the client's persisted budget


def make_audit(cfg: FederatedConfig) -> Any:
    """A ``pimoe.privacy.audit.AuditLog`` at ``cfg.audit_log``, or None."""
    if not cfg.audit_log:
        return None
    from pimoe.privacy.audit import AuditLog

    return AuditLog(cfg.audit_log)


def planned_rounds(cfg: FederatedConfig) -> int:
    """Rounds a client expects to train in: the budget is calibrated for this many."""
    return max(1, math.ceil(cfg.rounds * cfg.fraction))


def client_budget(cfg: FederatedConfig, context: Context) -> PrivacyBudget:
    """The :class:`~pimoe.privacy.budget.PrivacyBudget` of the client running in ``context``.

    Persisted in ``<dp-budget-dir>/dp-budget-client-<partition-id>.json`` when the node config
    names that folder; otherwise its history lives in ``context.state`` (use :func:`keep_budget`
    after reserving).
    """
    from pimoe.privacy.budget import PrivacyBudget

    client = int(context.node_config["partition-id"])
    folder = context.node_config.get(BUDGET_DIR_KEY)
    if folder:
        path = Path(str(folder)) / f"dp-budget-client-{client}.json"
        return PrivacyBudget(cfg.dp_epsilon, cfg.dp_delta, path, owner=f"client-{client}")
    history: list[tuple[float, float, int]] = []
    if DP_HISTORY in context.state:
        rec = context.state[DP_HISTORY]
        noise, rate, steps = (cast("list[float]", rec[key]) for key in ("noise", "rate", "steps"))
        history = [(float(n), float(q), int(k)) for n, q, k in zip(noise, rate, steps)]
    return PrivacyBudget(cfg.dp_epsilon, cfg.dp_delta, owner=f"client-{client}", history=history)


def keep_budget(budget: PrivacyBudget, context: Context) -> None:
    """Store an in-memory budget's history in ``context.state`` (a persisted one is already on disk)."""
    if budget.path is None:
        history = budget.history
        context.state[DP_HISTORY] = ConfigRecord(
            {
                "noise": [h[0] for h in history],
                "rate": [h[1] for h in history],
                "steps": [h[2] for h in history],
            }
        )


def dp_train(
    cfg: FederatedConfig,
    model: nn.Module,
    data: Split,
    seed: int,
    context: Context,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> dict[str, float]:
    """One round of DP-SGD on ``data`` (in place on ``model``); returns train-loss and the ε spent so far.

    Any model :func:`pimoe.privacy.dp.privatize` takes (PiMoE layers included). The round's steps
    are reserved in the client's budget (:func:`client_budget`) before training; raises
    :class:`BudgetExhausted` instead if they would push ε past the budget.
    """
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from pimoe.privacy.dp import noise_for_budget, opacus_sampling, privatize, train_private

    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=min(cfg.batch_size, len(data)))
    rate, steps_per_epoch = opacus_sampling(loader)
    steps = cfg.local_epochs * steps_per_epoch
    noise = noise_for_budget(cfg.dp_epsilon, cfg.dp_delta, rate, steps * planned_rounds(cfg))
    budget = client_budget(cfg, context)
    spent = budget.reserve(noise, rate, steps)
    keep_budget(budget, context)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    with (
        warnings.catch_warnings()
    ):  # once per client and round: Opacus's secure_mode note, a torch hook note
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp")
        dp_model, dp_opt, dp_loader = privatize(
            engine,
            model,
            optimizer,
            loader,
            noise_multiplier=noise,
            max_grad_norm=cfg.dp_max_grad_norm,
        )
        loss = train_private(dp_model, dp_opt, dp_loader, epochs=cfg.local_epochs, loss_fn=loss_fn)
    if engine.accountant.history != [
        (noise, rate, steps)
    ]:  # what Opacus counted is what was reserved
        raise RuntimeError(
            f"DP accounting mismatch: reserved {(noise, rate, steps)}, Opacus counted {engine.accountant.history}"
        )
    return {"train-loss": loss, "epsilon": spent}


def make_protected_strategy(cfg: FederatedConfig, audit: Any, he_public: bytes | None) -> Any:
    """The secure- or HE-aggregation strategy when ``cfg`` asks for one, else None."""
    if not (cfg.secure_agg or cfg.he):
        return None
    from pimoe.federated.secure import PROTECTED_STRATEGIES
    from pimoe.federated.selection import ClientSelector
    from pimoe.federated.task import load_task

    strategy_class = PROTECTED_STRATEGIES["secure" if cfg.secure_agg else "he", cfg.strategy]
    names = [k for k in load_task(cfg).make_model(cfg.seed).state_dict() if not cfg.is_personal(k)]
    kwargs: dict[str, Any] = {
        "selector": ClientSelector(cfg.fraction, cfg.min_clients, cfg.selection, cfg.seed),
        "norm_factor": cfg.norm_factor,
        "audit": audit,
        "shared_names": names,
        "fraction_evaluate": 0.0,
    }
    if cfg.strategy == "fedprox":
        kwargs["proximal_mu"] = cfg.proximal_mu
    if cfg.he:
        if he_public is None:
            raise ValueError("HE aggregation needs the public CKKS context")
        kwargs["public_context"] = he_public
    return strategy_class(**kwargs)


def he_keys() -> tuple[bytes, bytes]:
    """A fresh CKKS key set: (context with the secret key, for clients; public context, for the server)."""
    from pimoe.privacy.he import make_context, public_context

    context = make_context()
    secret = context.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    return secret, public_context(context)
