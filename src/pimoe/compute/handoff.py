"""The token-level hand-off router between the text expert and the computation expert.

Trained separately from the text expert, as in the paper: the text expert (a :class:`PiMoELM`)
is trained first and frozen; the router reads its final hidden state at each position (the
output of ``norm_f``, captured with a forward hook, no change to the model) and decides whether
the *next* token is written by the text expert (class 0) or by the computation expert (class 1).

Labels come from the computation expert itself: position ``t`` is class 1 exactly when
``ComputationExpert.targets(idx)[t] != NO_OUTPUT``, i.e. from the ``=`` of a span through the last
result byte (the expert then writes ``CALL_END`` and control goes back to the text expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.expert import NO_OUTPUT, ComputationExpert
from pimoe.compute.task import ArithmeticTask, Problem, Split, lm_batch
from pimoe.compute.train import TrainSettings, make_optimizer, progress_bar
from pimoe.moe.model import PiMoELM
from pimoe.moe.router import Router

TEXT, COMPUTE = 0, 1


def forward_with_hidden(lm: PiMoELM, idx: Tensor) -> tuple[Tensor, Tensor]:
    """``idx [B, S]`` -> ``(logits [B, S, V], hidden [B, S, D])``; ``hidden`` is ``norm_f``'s output."""
    captured: list[Tensor] = []
    handle = lm.norm_f.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        logits = lm(idx).logits
    finally:
        handle.remove()
    return logits, captured[0]


class HandoffRouter(nn.Module):
    """Two-way token router: a one-hidden-layer MLP feature, then the core :class:`Router` gate
    (``num_experts=2``, ``top_k=1``).

    Args:
        d_model: width of the text expert's hidden state.
        hidden: width of the MLP feature.
    """

    def __init__(self, d_model: int, hidden: int = 64) -> None:
        super().__init__()
        self.feature = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU())
        self.gate = Router(hidden, num_experts=2, top_k=1, router_bias=True)

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden [..., D]`` -> routing logits ``[..., 2]`` (index 1: computation expert)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return self.gate(self.feature(flat)).logits.reshape(*hidden.shape[:-1], 2)

    @torch.no_grad()
    def hand_off(self, hidden: Tensor) -> Tensor:
        """``hidden [..., D]`` -> bool ``[...]``: True where the computation expert writes next."""
        return self(hidden).argmax(dim=-1) == COMPUTE


def handoff_labels(idx: Tensor, expert: ComputationExpert) -> Tensor:
    """``idx [B, S]`` -> long ``[B, S]``: 1 where the computation expert writes the next token."""
    return (expert.targets(idx) != NO_OUTPUT).long()


def _labelled_batch(
    problems: list[Problem], expert: ComputationExpert
) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs ``[B, S]``, labels ``[B, S]`` and the mask of real (non-padding) positions."""
    idx, targets = lm_batch(problems)
    return idx, handoff_labels(idx, expert), targets != -100


def train_router(
    lm: PiMoELM,
    task: ArithmeticTask,
    settings: TrainSettings,
    hidden: int = 64,
    progress: bool = True,
) -> tuple[HandoffRouter, list[float]]:
    """Train a :class:`HandoffRouter` on the frozen ``lm``'s hidden states over ``task``'s train
    split (problems from index 10**6 on, not the text expert's first batches); returns the router
    in eval mode and the per-step cross-entropy."""
    torch.manual_seed(settings.seed)
    router = HandoffRouter(lm.config.d_model, hidden)
    expert = ComputationExpert(lm.tok_emb, task.engine)
    optimizer, schedule = make_optimizer(list(router.parameters()), settings)
    lm.eval()
    losses: list[float] = []
    with progress_bar(progress) as bar:
        job = bar.add_task("train router", total=settings.steps, loss=float("nan"))
        for step in range(settings.steps):
            first = 10**6 + step * settings.batch_size
            idx, labels, real = _labelled_batch(
                [task.problem("train", first + i) for i in range(settings.batch_size)], expert
            )
            with torch.no_grad():
                _, hidden_states = forward_with_hidden(lm, idx)
            loss = F.cross_entropy(router(hidden_states)[real], labels[real])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(job, advance=1, loss=losses[-1])
    router.eval()
    return router, losses


@torch.no_grad()
def router_accuracy(
    lm: PiMoELM,
    router: HandoffRouter,
    task: ArithmeticTask,
    split: Split,
    indices: range,
    engine: ArithmeticEngine | None = None,
) -> dict[str, float]:
    """Teacher-forced token-level scores of ``router`` on problems ``indices`` of ``split``.

    Returns ``accuracy`` (all real positions), ``majority_baseline`` (the accuracy of always
    routing to the text expert), ``precision`` and ``recall`` of the hand-off class, and
    ``problems_all_correct`` (share of problems whose every position is routed right).
    """
    expert = ComputationExpert(lm.tok_emb, engine or task.engine)
    idx, labels, real = _labelled_batch([task.problem(split, i) for i in indices], expert)
    _, hidden_states = forward_with_hidden(lm, idx)
    predicted = router.hand_off(hidden_states).long()
    right = (predicted == labels) | ~real
    true_pos = ((predicted == 1) & (labels == 1) & real).sum().item()
    return {
        "accuracy": right[real].float().mean().item(),
        "majority_baseline": (labels[real] == TEXT).float().mean().item(),
        "precision": true_pos / max(1, int(((predicted == 1) & real).sum())),
        "recall": true_pos / max(1, int(((labels == 1) & real).sum())),
        "problems_all_correct": right.all(dim=1).float().mean().item(),
    }
