import json
import re
from dataclasses import replace

import pytest
import torch

from pimoe.bench.computation import QUICK, main
from pimoe.compute.chain import MODES, InferenceChain, open_call, span_answer
from pimoe.compute.expert import ComputationExpert
from pimoe.compute.handoff import HandoffRouter, forward_with_hidden, handoff_labels
from pimoe.compute.task import CALL_END, CALL_START, ArithmeticTask, lm_batch
from pimoe.compute.train import TrainSettings
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM

MICRO = LMConfig(
    block_size=128,
    n_layer=1,
    n_head=2,
    d_model=32,
    moe=MoEConfig(num_experts=2, top_k=1, ffn_dim=32),
)
SPAN = bytes([CALL_START])


def _lm() -> PiMoELM:
    torch.manual_seed(0)
    return PiMoELM(MICRO).eval()


def _fixed_router(hand_off: bool) -> HandoffRouter:
    """A router whose gate ignores its input and always picks one expert."""
    router = HandoffRouter(MICRO.d_model, 8)
    with torch.no_grad():
        router.gate.gate.weight.zero_()
        router.gate.gate.bias.copy_(torch.tensor([-5.0, 5.0] if hand_off else [5.0, -5.0]))
    return router.eval()


@pytest.mark.parametrize("calls", ["expression", "reference"])
def test_router_labels_are_the_span_result_positions(calls: str) -> None:
    problems = ArithmeticTask(calls=calls, seed=4).split("heldout", 12)
    idx, _targets = lm_batch(problems)
    labels = handoff_labels(idx, ComputationExpert(torch.nn.Embedding(256, 4)))
    for row, problem in enumerate(problems):
        data = problem.encode()
        eq, end = data.index(b"="), data.index(bytes([CALL_END]))
        expected = [int(eq <= t < end) for t in range(idx.shape[1])]  # "=" .. last result byte
        assert labels[row].tolist() == expected
        assert data[eq + 1 : end + 1] == problem.answer.encode() + bytes([CALL_END])


def test_reference_calls_resolve_to_the_expression() -> None:
    from pimoe.compute.text_to_computation import to_expression

    task = ArithmeticTask(calls="reference", seed=1)
    for problem in task.split("heldout", 50) + task.split("train", 50):
        assert re.fullmatch(r"#1[-+*]#2[-+*]#3", problem.call)  # no digits to copy
        assert to_expression(problem.call, problem.prompt) == problem.expression
    assert (
        to_expression("#1*#4", "3 and 5") == "3*#4"
    )  # out of range: left for the engine to reject


def test_forward_with_hidden_is_the_head_input() -> None:
    lm = _lm()
    idx = torch.randint(0, 256, (2, 9))
    logits, hidden = forward_with_hidden(lm, idx)
    torch.testing.assert_close(lm.lm_head(hidden), logits)
    assert not lm.norm_f._forward_hooks


def test_open_call_and_span_answer() -> None:
    assert open_call(list(b"Q: 7 and 8\nA: " + SPAN + b"#1*#2=")) == (b"Q: 7 and 8\nA: ", b"#1*#2")
    assert open_call(list(SPAN + b"1+2=3\x03 x=")) is None
    assert open_call(list(SPAN + b"1+2")) is None
    assert span_answer(b"x" + SPAN + b"1+2=3\x03\n") == b"3"
    assert span_answer(b"no span\n") is None and span_answer(SPAN + b"1+2=3") is None


@pytest.mark.parametrize(
    "prompt, result",
    [
        (b"Q: x\nA: " + SPAN + b"123456789*987654321=", str(123456789 * 987654321).encode()),
        (b"Q: 48213 bolts, 907 crates, 12\nA: " + SPAN + b"#1*#2+#3=", b"43729203"),
        (b"A: " + SPAN + b"1/0=", b"<err:div0>"),
        (b"A: " + SPAN + b"2**3=", b"<err:malformed>"),
        (b"Q: 5\nA: " + SPAN + b"#1+#2=", b"<err:malformed>"),
        (b"A: " + SPAN + b"9" * 50 + b"*2=", b"<err:overflow>"),
    ],
)
def test_handoff_and_tool_call_insert_exact_results_and_error_tokens(
    prompt: bytes, result: bytes
) -> None:
    chain = InferenceChain(_lm(), _fixed_router(hand_off=True), max_new_tokens=40)
    expected = result + bytes([CALL_END])
    outs = {mode: chain.run(prompt, mode) for mode in ("pimoe", "pimoe_span", "tool_call")}
    for mode, out in outs.items():
        assert out.completion.startswith(expected), mode
        assert out.inserted >= len(expected)
    # token by token: one forward pass per expert byte; the span and tool modes insert for free
    assert outs["pimoe"].steps - outs["pimoe_span"].steps == len(expected) - 1
    assert outs["pimoe_span"].steps - outs["tool_call"].steps == 1  # the router's hand-off step


def test_router_that_never_hands_off_is_the_lm_alone() -> None:
    lm = _lm()
    chain = InferenceChain(lm, _fixed_router(hand_off=False), max_new_tokens=20)
    prompt = b"Q: x\nA: " + SPAN + b"12*12="
    alone, routed = chain.run(prompt, "lm_only"), chain.run(prompt, "pimoe")
    assert routed.completion == alone.completion and routed.inserted == 0
    assert alone.steps == len(alone.completion) == 20
    expected = lm.generate(torch.tensor([list(prompt)]), 20, temperature=0, use_cache=False)[
        0, len(prompt) :
    ]
    assert alone.completion == bytes(expected.tolist())  # the cached chain equals uncached decoding


def test_inserted_spans_extend_the_cache_like_a_full_forward() -> None:
    """pimoe_span appends several expert bytes at once: the next cached step must see them all."""
    lm = _lm()
    chain = InferenceChain(lm, _fixed_router(hand_off=True), max_new_tokens=30)
    prompt = b"Q: x\nA: " + SPAN + b"12*12="
    out = chain.run(prompt, "pimoe_span")
    sequence = list(prompt + out.completion)
    after = sequence.index(CALL_END, len(prompt)) + 1  # first byte the LM wrote after the span
    assert after < len(sequence)
    expected = int(lm(torch.tensor([sequence[:after]])).logits[0, -1].argmax())
    assert sequence[after] == expected


def test_chain_rejects_bad_input() -> None:
    chain = InferenceChain(_lm())
    with pytest.raises(ValueError, match="non-empty"):
        chain.run(b"", "lm_only")
    with pytest.raises(ValueError, match="mode"):
        chain.run(b"Q", "oracle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="router"):
        chain.run(b"Q", "pimoe")
    with pytest.raises(ValueError, match="max_new_tokens"):
        InferenceChain(_lm(), max_new_tokens=0)
    with pytest.raises(ValueError, match="calls"):
        ArithmeticTask(calls="digits")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        TrainSettings(steps=0)


def test_micro_benchmark_trains_a_router_and_writes_the_json(tmp_path) -> None:
    config = replace(
        QUICK,
        lm=MICRO,
        lm_train=TrainSettings(steps=60, batch_size=8, lr=1e-2),
        router_train=TrainSettings(steps=80, batch_size=8, lr=1e-2),
        eval_problems=3,
        router_eval_problems=40,
        max_new_tokens=24,
    )
    path = tmp_path / "computation.json"
    main(json_path=path, config=config, progress=False)
    result = json.loads(path.read_text())
    for key in (
        "accuracy_lm_only",
        "accuracy_pimoe",
        "accuracy_tool_call",
        "latency_ms_pimoe",
        "latency_ms_tool_call",
        "tokens_pimoe",
        "tokens_tool_call",
        "router_accuracy_heldout",
    ):
        assert key in result
    for mode in MODES:
        assert 0.0 <= result[f"accuracy_{mode}"] <= 1.0
        assert 0 < result[f"tokens_{mode}"] <= 24
    # the ratios are those of the per-mode means reported next to them (rounded to 0.01)
    for ratio, mean in (("latency_ratio", "latency_ms"), ("tokens_ratio", "tokens")):
        expected = result[f"{mean}_pimoe"] / result[f"{mean}_tool_call"]
        assert result[f"{ratio}_pimoe_vs_tool_call"] == pytest.approx(expected, abs=1e-3)
    router = result["router_heldout"]
    assert router["accuracy"] > router["majority_baseline"] + 0.03  # it learned where spans are
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_computation_stage_prints_the_comparison(monkeypatch) -> None:
    import io

    from rich.console import Console

    import pimoe.bench.computation as bench
    from pimoe.demo import run_computation_stage

    micro = replace(
        QUICK,
        lm=MICRO,
        lm_train=TrainSettings(steps=20, batch_size=4, lr=1e-2),
        router_train=TrainSettings(steps=5, batch_size=4, lr=1e-2),
        router_eval_problems=8,
        max_new_tokens=12,
    )
    monkeypatch.setattr(bench, "QUICK", micro)
    out = io.StringIO()
    result = run_computation_stage(Console(file=out, width=200), seed=1)
    assert result["eval_problems"] == 20 and result["config"]["seed"] == 1
    assert "tool_call" in out.getvalue() and "router (held-out" in out.getvalue()
    assert (
        torch.get_num_threads() == 1
    )  # the stage restores the caller's setting (1 in these tests)
