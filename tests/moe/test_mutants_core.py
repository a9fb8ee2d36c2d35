"""Exact-value tests of core lines that a plausible one-line change would break unnoticed:
the capacity priority order, the imbalance statistic and gradient averaging over ranks."""

import socket
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pimoe.moe import PiMoE, Router, RoutingStats
from pimoe.moe.parallel import ExpertParallelMoE, allreduce_replicated_grads, init_process_group

D = 4


def test_capacity_serves_every_first_choice_before_any_second_choice() -> None:
    # Both tokens rank expert 0 first and expert 1 second; each expert has one slot. Rank order
    # gives expert 0 to token 0's first choice and expert 1 to token 0's second choice (token 1's
    # second choice comes after it); token order would hand token 1's first choice the slot of
    # token 0's second.
    router = Router(D, num_experts=2, top_k=2, capacity_factor=0.5)  # ceil(0.5 * 2 * 2 / 2) = 1
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [1.0, 0, 0, 0]]))
    out = router(torch.ones(2, D))
    assert router.capacity(2) == 1
    assert out.indices.tolist() == [[0, 1], [0, 1]]
    assert out.mask is not None and out.mask.tolist() == [[True, True], [False, False]]
    assert out.weights[1].tolist() == [0.0, 0.0] and (out.weights[0] > 0).all()


def stats_of(counts: list[int]) -> RoutingStats:
    probs = torch.full((sum(counts), len(counts)), 1 / len(counts))
    return RoutingStats.from_routing(probs, None, torch.tensor(counts))


def test_imbalance_is_max_over_mean_load() -> None:
    assert stats_of([2, 4, 6]).imbalance == pytest.approx(6 / 4)  # max/min would be 3
    assert stats_of([5, 5, 5, 5]).imbalance == pytest.approx(1.0)
    assert stats_of([8, 0, 0, 0]).imbalance == pytest.approx(4.0)  # one expert takes all: E
    assert stats_of([1, 3]).as_dict()["imbalance"] == pytest.approx(1.5)


class Model(nn.Module):
    """A replicated input projection feeding an expert-parallel MoE layer."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.proj(x))


def labelled(name: str) -> Callable[[str], str]:
    """An ``assert_close`` message that names the parameter and keeps torch's own report."""
    return lambda report: f"{name}: {report}"


def job_average(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    torch.manual_seed(0)
    reference = Model(PiMoE(D, num_experts=2, top_k=1, ffn_dim=8))
    model = Model(ExpertParallelMoE.from_layer(reference.moe))  # expert `rank` only
    model.proj.load_state_dict(reference.proj.state_dict())
    assert model.moe.held == (rank,)
    xs = [torch.randn(5, D), torch.randn(3, D)]  # rank r's tokens; each rank's loss is its mean
    # Reference in one process: the gradient of the mean of the ranks' losses (the DDP convention).
    (sum(reference(x).square().mean() for x in xs) / world).backward()

    model(xs[rank]).square().mean().backward()
    allreduce_replicated_grads(model, average=True)
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        ref = expected[name]
        if name.startswith("moe.experts."):  # this rank's slice [1, ...] of the stacked experts
            ref = ref[rank : rank + 1]
        torch.testing.assert_close(param.grad, ref, msg=labelled(name))
    dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes that import torch: 18 s at load average 6.6 on 2 cores
def test_allreduce_average_gives_the_gradient_of_the_mean_loss() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(job_average, args=(2, port), nprocs=2, join=True)
