"""Privacy add-ons for federated runs, built on pimoe.privacy (each imported only when switched on):
an audit log, DP-SGD on every client with a per-client budget that spans the whole run, and the
secure / homomorphic aggregation strategies.

DP budget: each client calibrates its noise (Opacus, RDP accountant) so that training in its
*planned* number of rounds, ``ceil(rounds * fraction)``, spends ``cfg.dp_epsilon`` at
``cfg.dp_delta``. The accountant's history (noise, sampling rate, steps) is kept in the client's
``context.state`` across rounds, so ε composes over every round it really trained in; a client
whose next round would exceed the budget declines (an Error reply) instead of training.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from torch import nn

from pimoe.federated.config import FederatedConfig
from pimoe.federated.task import Split, train_epochs

DP_HISTORY = "dp-history"  # context.state key of a client's accountant history


class BudgetExhausted(RuntimeError):
    """A client's next round would spend more than its ε budget."""


def make_audit(cfg: FederatedConfig) -> Any:
    """A ``pimoe.privacy.audit.AuditLog`` at ``cfg.audit_log``, or None."""
    if not cfg.audit_log:
        return None
    from pimoe.privacy.audit import AuditLog

    return AuditLog(cfg.audit_log)


def planned_rounds(cfg: FederatedConfig) -> int:
    """Rounds a client expects to train in: the budget is calibrated for this many."""
    return max(1, math.ceil(cfg.rounds * cfg.fraction))


def _history(state: RecordDict) -> list[tuple[float, float, int]]:
    if DP_HISTORY not in state:
        return []
    rec = state[DP_HISTORY]
    return list(zip(rec["noise"], rec["rate"], rec["steps"]))


ORDERS = tuple(range(2, 129))  # integer Rényi orders: fast exact RDP of the subsampled Gaussian


def _spent(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of DP-SGD steps ``history`` = [(noise multiplier, sampling rate, steps)], by RDP."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta, alphas=list(ORDERS)))


@lru_cache(maxsize=256)
def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Noise multiplier whose ``steps`` DP-SGD steps at ``sample_rate`` spend ``epsilon`` (Opacus, RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                      accountant="rdp", epsilon_tolerance=0.02, alphas=list(ORDERS)))


def dp_train(cfg: FederatedConfig, model: nn.Module, data: Split, seed: int, state: RecordDict) -> dict[str, float]:
    """One round of DP-SGD on ``data`` (in place on ``model``); returns train-loss and the ε spent so far.

    Opacus clips per-example gradients and adds noise; the noise multiplier is calibrated once per
    (budget, sampling rate) and cached (Opacus's own calibration takes seconds per call, too slow to
    repeat for every client in every round, which is why this does not go through
    ``pimoe.privacy.dp.make_private``). Raises :class:`BudgetExhausted` before training if this
    round would push ε past the budget.
    """
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    batch = min(cfg.batch_size, len(data))
    rate = batch / len(data)
    steps_per_round = cfg.local_epochs * math.ceil(len(data) / batch)
    noise = noise_for_budget(cfg.dp_epsilon, cfg.dp_delta, rate, steps_per_round * planned_rounds(cfg))
    previous = _history(state)
    if _spent(previous + [(noise, rate, steps_per_round)], cfg.dp_delta) > cfg.dp_epsilon * 1.001:
        raise BudgetExhausted(f"epsilon {_spent(previous, cfg.dp_delta):.3f} spent; one more round exceeds {cfg.dp_epsilon}")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=batch)
    with warnings.catch_warnings():  # once per client and round: Opacus's secure_mode note, a torch hook note
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp")
        dp_model, dp_opt, dp_loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                          noise_multiplier=noise, max_grad_norm=cfg.dp_max_grad_norm,
                                                          poisson_sampling=True)
        loss = train_epochs(dp_model, data, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=batch, seed=seed,
                            optimizer=dp_opt, batches=dp_loader)
    history = previous + [(float(n), float(q), int(k)) for n, q, k in engine.accountant.history]
    state[DP_HISTORY] = ConfigRecord({"noise": [h[0] for h in history], "rate": [h[1] for h in history],
                                      "steps": [h[2] for h in history]})
    return {"train-loss": loss, "epsilon": _spent(history, cfg.dp_delta)}


def make_protected_strategy(cfg: FederatedConfig, audit: Any, he_public: bytes | None) -> Any:
    """The secure- or HE-aggregation strategy when ``cfg`` asks for one, else None."""
    if not (cfg.secure_agg or cfg.he):
        return None
    from flwr.serverapp.strategy import FedAvg, FedProx

    from pimoe.federated.client import is_personal
    from pimoe.federated.secure import HomomorphicAggregation, SecureAggregation
    from pimoe.federated.selection import ClientSelector
    from pimoe.federated.task import make_model

    mode = SecureAggregation if cfg.secure_agg else HomomorphicAggregation
    base = FedProx if cfg.strategy == "fedprox" else FedAvg
    strategy_class = type(f"{mode.__name__}{base.__name__}", (mode, base), {})
    names = [k for k in make_model(cfg.model, cfg.seed).state_dict() if not is_personal(k, cfg.personal)]
    kwargs: dict[str, Any] = dict(selector=ClientSelector(cfg.fraction, cfg.min_clients, cfg.selection, cfg.seed),
                                  norm_factor=cfg.norm_factor, audit=audit, shared_names=names, fraction_evaluate=0.0)
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
    secret = context.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    return secret, public_context(context)
