"""Train a PiMoE layer with its experts sharded over the processes started by torchrun.

    torchrun --nproc-per-node 2 examples/expert_parallel.py [--steps 20] [--tokens 1024]

Every rank feeds its own batch; after the training steps rank 0 gathers the full state dict and
checks it against the same steps run in a single process on all ranks' batches (same initial
weights, loss = mean of the ranks' losses), then prints the expert-parallel tokens/s.
Backend: nccl on CUDA (one GPU per LOCAL_RANK), else gloo on CPU.
"""

import argparse
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pimoe.moe import PiMoE
from pimoe.moe.parallel import ExpertParallelMoE, allreduce_replicated_grads, init_process_group


def make_layer(d_model: int, num_experts: int) -> PiMoE:
    torch.manual_seed(0)  # the same initial weights in every process
    return PiMoE(d_model, num_experts=num_experts, top_k=2, ffn_dim=2 * d_model, shared_experts=1)


def batch(step: int, rank: int, tokens: int, d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: input and target, ``[tokens, D]`` each (any rank can make it)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(tokens, d_model, generator=gen)
    return x, torch.tanh(x.roll(1, dims=-1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    device = init_process_group(timeout=timedelta(minutes=2))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per process

    layer = make_layer(args.d_model, args.experts)
    ep = ExpertParallelMoE.from_layer(layer).to(device)
    opt = torch.optim.SGD(ep.parameters(), lr=0.1)
    start = time.perf_counter()
    for step in range(args.steps):
        if step == 1:  # the first step is warm-up
            dist.barrier()
            start = time.perf_counter()
        x, y = (t.to(device) for t in batch(step, rank, args.tokens, args.d_model))
        loss = F.mse_loss(ep(x), y)
        opt.zero_grad()
        loss.backward()
        allreduce_replicated_grads(ep)  # mean over ranks, as DDP would
        opt.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    tokens_per_s = (args.steps - 1) * args.tokens * world / elapsed
    full = ep.gather_full_state_dict()
    backend = dist.get_backend()
    # every rank tears the group down together, before rank 0's long reference run: a rank that
    # exits while its peer still holds the connection can abort in gloo's destructor
    dist.barrier()
    dist.destroy_process_group()

    if rank == 0:
        assert full is not None
        ref_opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for step in range(args.steps):
            pairs = [batch(step, r, args.tokens, args.d_model) for r in range(world)]
            out = layer(torch.cat([x for x, _ in pairs]))
            loss = sum(F.mse_loss(o, y) for o, (_, y) in zip(out.split(args.tokens), pairs)) / world
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
        diff = max(
            (full[k] - v.detach().cpu()).abs().max().item() for k, v in layer.state_dict().items()
        )
        print(
            f"{world} ranks ({backend}, {device.type}): {args.steps} steps of {args.tokens} tokens/rank, "
            f"d_model={args.d_model}, {args.experts} experts top-2"
        )
        print(
            f"max |weights(expert parallel) - weights(single process)| after training = {diff:.2e}"
        )
        print(f"expert-parallel fwd+bwd+step throughput: {tokens_per_s:,.0f} tokens/s (all ranks)")
        if diff > 1e-4:
            raise SystemExit(
                f"expert-parallel training diverged from the single-process run: {diff:.2e}"
            )


if __name__ == "__main__":
    main()
