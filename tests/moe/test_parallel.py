"""Expert parallelism on 2 and 4 local gloo processes vs the single-process PiMoE, same weights.

Spawning is slow (each process imports torch), so each spawned job runs several checks.
"""

import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pimoe.moe import FFN, PiMoE, SwiGLU
from pimoe.moe.parallel import (
    ExpertParallelError,
    ExpertParallelMoE,
    allreduce_replicated_grads,
    init_process_group,
)
from pimoe.moe.placement import (
    ExpertPlacement,
    expert_shard,
    select_experts,
    shard_state_dict,
    unshard_state_dict,
)

D, T = 16, 12  # model width, tokens per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(rank: int, world: int, port: int, timeout_s: float = 30.0) -> None:
    torch.set_num_threads(1)
    init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def check_against_single_process(
    layer: PiMoE, rank: int, world: int, tokens: list[int], positive: bool = False, replicas=None
) -> ExpertParallelMoE:
    """Rank ``r`` feeds ``tokens[r]`` tokens; outputs and all gradients must match one process."""
    ep = ExpertParallelMoE.from_layer(layer, replicas=replicas)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(sum(tokens), D, generator=gen)
    if positive:
        x_all = x_all.abs() + 0.1
    g_all = torch.randn(sum(tokens), D, generator=gen)  # upstream gradient
    start = sum(tokens[:rank])
    rows = slice(start, start + tokens[rank])

    x_ref = x_all.clone().requires_grad_()
    layer.zero_grad()
    out_ref = layer(x_ref)
    (out_ref * g_all).sum().backward()

    x = x_all[rows].clone().requires_grad_()
    out = ep(x)
    (out * g_all[rows]).sum().backward()
    allreduce_replicated_grads(ep, average=False)

    torch.testing.assert_close(out, out_ref[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad[rows], atol=1e-5, rtol=1e-5)
    full_grads = {name: p.grad for name, p in layer.named_parameters()}
    local_grads = {name: p.grad for name, p in ep.named_parameters()}
    local_ref = select_experts(full_grads, layer.num_experts, ep.held)
    assert local_grads.keys() == local_ref.keys()
    for name, grad in local_grads.items():
        torch.testing.assert_close(grad, local_ref[name], atol=1e-5, rtol=1e-5, msg=name)
    return ep


def check_state_dict_round_trip(
    layer: PiMoE, ep: ExpertParallelMoE, make_layer, rank: int, replicas=None
) -> None:
    full = ep.gather_full_state_dict()
    if rank == 0:
        assert full is not None and full.keys() == layer.state_dict().keys()
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(full[key], value, msg=key)
    else:
        assert full is None
    torch.manual_seed(123)  # a differently initialized layer takes the weights back on every rank
    other = ExpertParallelMoE.from_layer(make_layer(), replicas=replicas)
    other.load_full_state_dict(layer.state_dict())
    x = torch.randn(T, D)
    with torch.no_grad():
        torch.testing.assert_close(other(x), ep(x))


def job_two_ranks(rank: int, world: int, port: int) -> None:
    setup(rank, world, port)
    tokens = [T, T + 5]

    def swiglu_layer() -> PiMoE:
        return PiMoE(D, num_experts=4, top_k=2, ffn_dim=24, shared_experts=1, shared_gate=True)

    torch.manual_seed(0)
    layer = swiglu_layer()
    ep = check_against_single_process(layer, rank, world, tokens)
    assert sum(ep.last_send_splits) == tokens[rank] * 2  # dropless top-2
    check_state_dict_round_trip(layer, ep, swiglu_layer, rank)

    # Biased FFN experts, top-1, sigmoid scores.
    torch.manual_seed(0)
    check_against_single_process(
        PiMoE(D, num_experts=4, top_k=1, ffn_dim=24, activation="gelu", bias=True, score="sigmoid"),
        rank,
        world,
        tokens,
    )

    # Uneven routing: with positive inputs every token goes to experts 0 and 1 (rank 0's), so
    # rank 1 receives no row at all.
    torch.manual_seed(0)
    layer = PiMoE(D, num_experts=4, top_k=2, ffn_dim=24)
    with torch.no_grad():
        layer.router.gate.weight.copy_(
            torch.tensor([1.0, 1.1, -1.0, -1.0]).unsqueeze(1).expand(4, D)
        )
    ep = check_against_single_process(layer, rank, world, tokens, positive=True)
    assert ep.last_recv_splits == ([2 * T, 2 * (T + 5)] if rank == 0 else [0, 0])
    assert ep.last_send_splits == [2 * tokens[rank], 0]

    # A rank with no tokens at all still takes part.
    torch.manual_seed(0)
    check_against_single_process(PiMoE(D, num_experts=4, top_k=2, ffn_dim=24), rank, world, [T, 0])

    # Only rank 0's input needs a gradient: the backward collectives must still pair up.
    x = torch.randn(T, D, requires_grad=rank == 0)
    ep(x).sum().backward()
    assert (x.grad is not None) == (rank == 0)

    # Arbitrary expert modules (ExpertList) of different shapes.
    def list_layer() -> PiMoE:
        return PiMoE(
            D, top_k=2, experts=[FFN(D, 8), SwiGLU(D, 12), FFN(D, 20, "relu"), SwiGLU(D, 4)]
        )

    torch.manual_seed(0)
    layer = list_layer()
    ep = check_against_single_process(layer, rank, world, tokens)
    check_state_dict_round_trip(layer, ep, list_layer, rank)

    # Replicas: expert 0 (rank 0's) also on rank 1, expert 3 (rank 1's) also on rank 0, for both backends.
    replicas = {0: [1], 3: [0]}
    for make in (swiglu_layer, list_layer):
        torch.manual_seed(0)
        layer = make()
        ep = check_against_single_process(layer, rank, world, tokens, replicas=replicas)
        assert ep.held == ((0, 1, 3) if rank == 0 else (0, 2, 3))
        check_state_dict_round_trip(layer, ep, make, rank, replicas)
    dist.destroy_process_group()


def job_four_ranks(rank: int, world: int, port: int) -> None:
    setup(rank, world, port)

    def make_layer() -> PiMoE:
        return PiMoE(D, num_experts=8, top_k=2, ffn_dim=24, shared_experts=2)

    torch.manual_seed(0)
    layer = make_layer()
    ep = check_against_single_process(layer, rank, world, [T, 3, T + 1, 7])
    assert list(ep.shard) == [2 * rank, 2 * rank + 1]
    check_state_dict_round_trip(layer, ep, make_layer, rank)
    with pytest.raises(ValueError, match="not divisible"):
        ExpertParallelMoE.from_layer(PiMoE(D, num_experts=6, top_k=2))

    # Expert 0 copied to every rank: each rank computes its own rows for it (nothing is sent for it).
    replicas = {0: range(4), 5: [0, 1]}
    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():  # route every token to experts 0 and 5
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0
        layer.router.gate.weight[5] = 0.9
    ep = check_against_single_process(
        layer, rank, world, [T, 3, T + 1, 7], positive=True, replicas=replicas
    )
    n = [T, 3, T + 1, 7][rank]
    # Ranks 0-2 hold both experts; rank 3 keeps expert 0's rows and sends expert 5's to copy 3 mod 3 = rank 0.
    expected = [[2 * n, 0, 0, 0], [0, 2 * n, 0, 0], [0, 0, 2 * n, 0], [n, 0, 0, n]][rank]
    assert ep.last_send_splits == expected, (rank, ep.last_send_splits)
    check_state_dict_round_trip(layer, ep, make_layer, rank, replicas)
    dist.destroy_process_group()


def job_dead_peer(
    rank: int, world: int, port: int, timeout_s: float, hang: bool, result_dir: str
) -> None:
    setup(rank, world, port, timeout_s)
    torch.manual_seed(0)
    ep = ExpertParallelMoE.from_layer(PiMoE(D, num_experts=4, top_k=2))
    dist.barrier()
    if rank == 1:  # leaves without taking part in the forward: exits at once, or hangs first
        if hang:
            time.sleep(timeout_s + 1.0)
        return
    start = time.perf_counter()
    try:
        ep(torch.randn(T, D))
    except ExpertParallelError as err:
        Path(result_dir, "error.txt").write_text(f"{time.perf_counter() - start}\n{err}")
        dist.destroy_process_group()  # else gloo may abort the process at exit (see docs/parallel.md)


def spawn(job, world: int, *args) -> None:
    mp.spawn(job, args=(world, free_port(), *args), nprocs=world, join=True)


def test_two_ranks_match_single_process() -> None:
    spawn(job_two_ranks, 2)


def test_four_ranks_match_single_process() -> None:
    spawn(job_four_ranks, 4)


@pytest.mark.parametrize("hang", [False, True], ids=["peer-exits", "peer-hangs"])
def test_dead_peer_raises_within_timeout(tmp_path: Path, hang: bool) -> None:
    # A peer that exits is seen through the closed connection, well before a long timeout (the
    # exit itself can take seconds on a busy machine); a hung peer only after the short one.
    timeout_s = 2.0 if hang else 30.0
    spawn(job_dead_peer, 2, timeout_s, hang, str(tmp_path))
    elapsed, message = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert "rank 0 of 2" in message and "peer rank" in message
    if hang:  # gloo waits for the full timeout, then raises
        assert timeout_s - 0.1 < float(elapsed) < timeout_s + 3
    else:  # the closed connection is seen at once
        assert float(elapsed) < timeout_s


def test_shard_helpers_without_processes() -> None:
    assert expert_shard(8, 3, 4) == range(6, 8)
    with pytest.raises(ValueError, match="not divisible"):
        expert_shard(6, 0, 4)
    layer = PiMoE(
        D, num_experts=4, top_k=2, experts=[FFN(D, 8), FFN(D, 8), SwiGLU(D, 8), SwiGLU(D, 4)]
    )
    full = layer.state_dict()
    shards = [shard_state_dict(full, 4, r, 2) for r in range(2)]
    assert (
        "experts.experts.0.gate_up.weight" in shards[1]
        and "experts.experts.2.up.weight" not in shards[0]
    )
    back = unshard_state_dict(shards, 4)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)


def test_placement_without_processes() -> None:
    placement = ExpertPlacement(8, 4, {0: range(4), 5: [0]})
    assert (
        placement.holders[0] == (0, 1, 2, 3)
        and placement.holders[5] == (0, 2)
        and placement.holders[3] == (1,)
    )
    assert placement.held == ((0, 1, 5), (0, 2, 3), (0, 4, 5), (0, 6, 7))
    assert placement.replicated == (0, 5)
    assert [placement.destination(5, src) for src in range(4)] == [
        0,
        2,
        2,
        2,
    ]  # holders (0, 2): own copy, else copy src mod 2
    # slots number (rank, held expert): rank 3 sends expert 0 to itself (slot 9), expert 5 to rank 2 (slot 8)
    slots = placement.slots(3).tolist()
    assert slots[0] == 9 and slots[5] == 8 and slots[1] == 1 and slots[7] == 11
    assert sorted(set(ExpertPlacement(8, 4).slots(0).tolist())) == list(range(8))
    with pytest.raises(ValueError, match="expert 9"):
        ExpertPlacement(8, 4, {9: [0]})
    with pytest.raises(ValueError, match="rank 4"):
        ExpertPlacement(8, 4, {1: [4]})
    with pytest.raises(ValueError, match="not divisible"):
        ExpertPlacement(6, 4)


def test_layer_needs_a_process_group() -> None:
    assert not dist.is_initialized()  # the other tests only initialize groups in spawned processes
    with pytest.raises(RuntimeError, match="process group"):
        ExpertParallelMoE.from_layer(PiMoE(D, num_experts=4))


@pytest.mark.parametrize(("local_rank", "gpus"), [("1", 1), ("0", 0)])
def test_nccl_with_more_processes_than_gpus_is_refused(
    monkeypatch: pytest.MonkeyPatch, local_rank: str, gpus: int
) -> None:
    """Two processes on a one-GPU machine (the default backend where CUDA is available) get a
    clear error before any process group starts, not an invalid-device-ordinal crash."""
    from pimoe.moe.collectives import init_process_group

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ValueError, match=f"LOCAL_RANK is {local_rank} and {gpus} CUDA device"):
        init_process_group("nccl", init_method="tcp://127.0.0.1:1", rank=0, world_size=2)
    assert not dist.is_initialized()
