from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.expert import NO_OUTPUT, ComputationExpert, next_result_bytes
from pimoe.compute.task import CALL_END, CALL_START, ArithmeticTask, encode_batch
from pimoe.moe.config import MoEConfig
from pimoe.moe.experts import FFN, ExpertList
from pimoe.moe.layer import PiMoE
from pimoe.moe.model import LMConfig, PiMoELM
from pimoe.moe.router import RouterOutput

D = 64


def _span(expr: str, result: str = "") -> bytes:
    return b"Q: x\nA: " + bytes([CALL_START]) + f"{expr}={result}".encode()


def _emitted(sequence: bytes) -> bytes:
    return bytes(b for b in next_result_bytes(sequence, ArithmeticEngine()) if b != NO_OUTPUT)


def test_next_result_bytes_teacher_forced_matches_the_completion() -> None:
    for problem in ArithmeticTask(seed=5).split("heldout", 30):
        data = problem.encode()
        targets = next_result_bytes(data, ArithmeticEngine())
        eq = data.index(b"=")
        end = data.index(bytes([CALL_END]))
        assert targets[eq:end] == list(data[eq + 1 : end + 1])  # each position emits the next byte
        assert all(t == NO_OUTPUT for t in targets[:eq] + targets[end:])


def test_error_tokens_for_bad_spans() -> None:
    assert next_result_bytes(_span("1/0"), ArithmeticEngine())[-1] == ord("<")
    full = _span("1/0", "<err:div0>")
    assert _emitted(full) == b"<err:div0>" + bytes([CALL_END])
    assert _emitted(_span("2**3", "<err:malformed>")) == b"<err:malformed>" + bytes([CALL_END])
    assert _emitted(_span("9" * 50, "x" * 20)).startswith(b"<err:overflow>")


def _layer_with_expert(
    scale: float = 1.0, top_k: int = 1
) -> tuple[PiMoE, ComputationExpert, nn.Embedding]:
    emb = nn.Embedding(256, D)
    expert = ComputationExpert(emb, scale=scale)
    layer = PiMoE(D, experts=[FFN(D, 2 * D), expert], top_k=top_k)
    with torch.no_grad():  # route on channel 0: positive -> computation expert
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[1, 0], layer.router.gate.weight[0, 0] = 20.0, -20.0
    return layer, expert, emb


def _batch() -> tuple[Tensor, Tensor]:
    task = ArithmeticTask(seed=2)
    idx = encode_batch([p.encode() for p in task.split("heldout", 3) + task.split("train", 2)])
    return idx, ComputationExpert(nn.Embedding(256, 4)).targets(idx)


def _hidden(targets: Tensor) -> Tensor:
    x = torch.randn(*targets.shape, D) * 0.1
    x[..., 0] = torch.where(targets != NO_OUTPUT, 1.0, -1.0)
    return x


def test_exact_results_inside_a_pimoe_layer() -> None:
    layer, expert, emb = _layer_with_expert()
    idx, targets = _batch()
    x = _hidden(targets)
    expert.set_context(idx)
    out = layer(x)
    routed = targets != NO_OUTPUT
    assert routed.sum() > 20
    torch.testing.assert_close(out[routed], emb.weight[targets[routed]].detach())
    decoded = (out[routed] @ emb.weight.T).argmax(-1)
    assert torch.equal(decoded, targets[routed])
    torch.testing.assert_close(out[~routed], layer.experts.experts[0](x[~routed]))
    assert layer.last_stats is not None


def test_rows_map_back_to_positions_with_top2() -> None:
    layer, expert, emb = _layer_with_expert(top_k=2)
    idx, targets = _batch()
    x = _hidden(targets)
    expert.set_context(idx)
    routes: list[RouterOutput] = []
    layer.router.register_forward_hook(lambda module, args, out: routes.append(out))
    out = layer(x)
    route = routes[0]
    weight_comp = (route.weights * (route.indices == 1)).sum(-1).reshape(targets.shape)
    routed = targets != NO_OUTPUT
    expected = weight_comp[routed].unsqueeze(-1) * emb.weight[targets[routed]].detach()
    ffn_part = out[routed] - expected
    torch.testing.assert_close(
        ffn_part,
        (1 - weight_comp[routed]).unsqueeze(-1) * layer.experts.experts[0](x[routed]),
        atol=1e-5,
        rtol=1e-4,
    )


def test_no_gradient_flows_into_the_expert() -> None:
    layer, expert, emb = _layer_with_expert()
    assert list(expert.parameters()) == [] and expert.state_dict() == {}
    idx, targets = _batch()
    x = _hidden(targets).requires_grad_()
    expert.set_context(idx)
    layer(x).sum().backward()
    assert emb.weight.grad is None
    assert layer.router.gate.weight.grad is not None


def test_expert_output_has_no_graph() -> None:
    _layer, expert, _ = _layer_with_expert()
    idx, targets = _batch()
    expert.set_context(idx)
    positions = (targets.reshape(-1) != NO_OUTPUT).nonzero().squeeze(-1)
    out = expert(torch.randn(positions.numel(), D, requires_grad=True), positions)
    assert not out.requires_grad


def test_errors_without_setup() -> None:
    emb = nn.Embedding(256, D)
    expert = ComputationExpert(emb)
    with pytest.raises(RuntimeError, match="set_context"):
        expert(torch.randn(2, D), torch.tensor([0, 1]))
    expert.set_context(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the context"):
        expert(torch.randn(2, D), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="positions"):
        expert(torch.randn(2, D), torch.tensor([0]))
    with pytest.raises(ValueError):
        expert.set_context(torch.zeros(2, dtype=torch.long))
    with pytest.raises(
        ValueError, match="needs token positions"
    ):  # a bank called without positions
        ExpertList([FFN(D, D), expert])(torch.randn(2, D), torch.tensor([0, 2]))


def test_works_in_expert_list_without_router_hooks() -> None:
    layer, _expert, _ = _layer_with_expert()
    assert isinstance(layer.experts, ExpertList)
    assert not layer.router._forward_hooks


def _oracle_route(expert: ComputationExpert, index: int):
    """Forward hook on a router: send computation positions to ``index``, the rest to 0."""

    def hook(module: nn.Module, args: tuple, output: RouterOutput) -> RouterOutput:
        comp = (expert._targets != NO_OUTPUT).to(output.indices.device)
        indices = torch.where(comp, index, 0).unsqueeze(-1)
        return replace(
            output,
            indices=indices,
            weights=torch.ones_like(indices, dtype=output.weights.dtype),
            mask=None,
        )

    return hook


def test_greedy_decoding_in_a_pimoe_lm_with_oracle_hand_off() -> None:
    """An untrained LM whose last PiMoE layer holds the computation expert: with the hand-off
    given by an oracle router, greedy decoding writes the exact result of a long held-out
    problem and closes the span."""
    config = LMConfig(
        block_size=128, n_layer=2, d_model=D, n_head=4, moe=MoEConfig(num_experts=2, top_k=1)
    )
    model = PiMoELM(config).eval()
    expert = ComputationExpert(model.tok_emb, scale=1000.0)
    block = model.blocks[-1]
    block.ffn = PiMoE(D, experts=[FFN(D, 2 * D), expert], top_k=1)
    block.ffn.router.register_forward_hook(_oracle_route(expert, 1))
    heldout = ArithmeticTask(train_digits=4, heldout_digits=8, seed=9).split("heldout", 50)
    problem = next(p for p in heldout if len(p.answer) >= 12)
    text = problem.encode()
    prefix = text[: text.index(b"=") + 1]
    idx = encode_batch([prefix])
    with torch.no_grad():
        for _ in range(len(problem.answer) + 1):
            expert.set_context(idx)
            nxt = model(idx).logits[0, -1].argmax()
            idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    written = bytes(idx[0, len(prefix) :].tolist())
    assert written == problem.answer.encode() + bytes([CALL_END])
