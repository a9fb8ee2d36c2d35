"""The federated task: sklearn digits split and partitioned, the models, local training and evaluation.

Digits: 1,797 8x8 images, stratified 80/20 split (1,437 train / 360 test, as in ANCHORS.md),
features scaled to [0, 1] (pixel values are 0..16). Everything here is plain torch + numpy so the
same functions run inside a Flower ClientApp, a ServerApp's evaluation, and the centralized peer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from pimoe.federated.partition import make_partition
from pimoe.moe import PiMoE


@dataclass(frozen=True)
class Split:
    """Features ``x [N, 64]`` float32 and labels ``y [N]`` int64."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@lru_cache(maxsize=4)
def load_digits_split(seed: int = 0) -> tuple[Split, Split]:
    """(train, test) of sklearn digits: 1,437 / 360 samples, stratified, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=0.2, stratify=data.target, random_state=seed)
    return (Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()),
            Split(torch.from_numpy(x_te), torch.from_numpy(y_te).long()))


@lru_cache(maxsize=8)
def client_partitions(num_clients: int, kind: str, alpha: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The training-set indices of every client (same call in every process gives the same split)."""
    train, _ = load_digits_split(seed)
    return tuple(make_partition(train.y.numpy(), num_clients, kind, alpha, seed))


def client_split(client: int, num_clients: int, kind: str, alpha: float, seed: int = 0) -> Split:
    """Client ``client``'s share of the digits training set."""
    if not 0 <= client < num_clients:
        raise ValueError(f"client id {client} outside [0, {num_clients})")
    train, _ = load_digits_split(seed)
    idx = torch.from_numpy(client_partitions(num_clients, kind, alpha, seed)[client])
    return Split(train.x[idx], train.y[idx])


def mlp(in_dim: int = 64, hidden: int = 128, classes: int = 10) -> nn.Module:
    """The ANCHORS peer model: 64-128-10 MLP (9,610 parameters)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class MoEClassifier(nn.Module):
    """``x [B, in_dim]`` → embed ``[B, D]`` → residual PiMoE block → logits ``[B, classes]``.

    Its routed experts live under ``moe.experts``: a natural set of layers to keep personal.
    """

    def __init__(self, in_dim: int = 64, d_model: int = 32, num_experts: int = 4, top_k: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, d_model)
        self.moe = PiMoE(d_model, num_experts=num_experts, top_k=top_k, ffn_dim=2 * d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.embed(x))
        return self.head(h + self.moe(h))


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "moe": MoEClassifier}


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised model by name (``"mlp"`` or ``"moe"``), seeded."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name]()


def proximal_term(model: nn.Module, anchor: dict[str, Tensor]) -> Tensor:
    """FedProx's ``sum ||w - w_global||^2`` over the parameters named in ``anchor``."""
    terms = [(p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if n in anchor]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def train_epochs(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
) -> float:
    """Train in place with cross-entropy (+ ``mu/2 * ||w - w_start||^2`` when ``proximal_mu > 0``).

    ``optimizer`` defaults to SGD(lr, momentum 0.9); ``batches`` (e.g. an Opacus DP loader)
    replaces the seeded shuffled mini-batches of ``data`` for every epoch. Returns the mean loss
    of the last epoch.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty split")
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if proximal_mu > 0 else {}
    gen = torch.Generator().manual_seed(seed)
    model.train()
    last = 0.0
    for _ in range(epochs):
        losses = []
        epoch_batches = batches if batches is not None else (
            (data.x[i], data.y[i]) for i in torch.randperm(len(data), generator=gen).split(batch_size))
        for xb, yb in epoch_batches:
            if len(yb) == 0:  # Poisson sampling (DP) can draw an empty batch
                continue
            loss = nn.functional.cross_entropy(model(xb), yb)
            if proximal_mu > 0:
                loss = loss + proximal_mu / 2 * proximal_term(model, anchor)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        last = float(np.mean(losses)) if losses else last
    return last


@torch.no_grad()
def evaluate(model: nn.Module, data: Split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data``."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty split")
    model.eval()
    logits = model(data.x)
    return float(nn.functional.cross_entropy(logits, data.y)), float((logits.argmax(1) == data.y).float().mean())


def centralized_accuracy(model_name: str = "mlp", epochs: int = 30, seed: int = 0) -> float:
    """The peer: the same model trained on the pooled training set (Adam 1e-3, batch 32)."""
    train, test = load_digits_split(seed)
    model = make_model(model_name, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_epochs(model, train, epochs=epochs, lr=1e-3, batch_size=32, seed=seed, optimizer=opt)
    return evaluate(model, test)[1]
