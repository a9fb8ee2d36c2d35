import re

import pytest
import torch

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.task import CALL_END, CALL_START, ArithmeticTask, encode_batch, lm_batch, pretty
from pimoe.compute.text_to_computation import to_expression


def _operand_lengths(expression: str) -> list[int]:
    return [len(n) for n in re.findall(r"\d+", expression)]


def test_deterministic_by_seed() -> None:
    assert ArithmeticTask(seed=1).split("train", 20) == ArithmeticTask(seed=1).split("train", 20)
    assert ArithmeticTask(seed=1).split("train", 20) != ArithmeticTask(seed=2).split("train", 20)
    assert (
        ArithmeticTask(seed=1).problem("heldout", 7)
        == ArithmeticTask(seed=1).split("heldout", 8)[7]
    )


def test_heldout_operands_are_longer_than_training() -> None:
    task = ArithmeticTask(train_digits=3, heldout_digits=6)
    train = [max(_operand_lengths(p.expression)) for p in task.split("train", 300)]
    heldout = [max(_operand_lengths(p.expression)) for p in task.split("heldout", 300)]
    assert max(train) <= 3 and min(heldout) >= 4 and max(heldout) <= 6


def test_answers_are_exact_and_sequences_are_bytes() -> None:
    engine = ArithmeticEngine(max_digits=100)
    task = ArithmeticTask(word_fraction=0.5, seed=3)
    problems = task.split("train", 100) + task.split("heldout", 100)
    for p in problems:
        numbers = [int(n) for n in re.findall(r"\d+", p.expression)]
        assert len(numbers) == 3
        assert p.answer == engine.compute(p.expression)
        data = p.encode()
        assert data.count(CALL_START) == 1 and data.count(CALL_END) == 1
        assert all(b < 128 for b in data)
        assert pretty(data).endswith(f"<<{p.expression}={p.answer}>>\n")
    words = [p for p in problems if not p.prompt.startswith("Q: Compute")]
    assert 20 < len(words) < 180
    assert all(not p.answer.startswith("-") for p in words)


def test_encode_batch_pads() -> None:
    idx = encode_batch([b"ab", b"abcd"])
    assert idx.dtype == torch.long and idx.tolist() == [[97, 98, 0, 0], [97, 98, 99, 100]]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ArithmeticTask(train_digits=5, heldout_digits=5)
    with pytest.raises(ValueError):
        ArithmeticTask().problem("test", 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("span", "expression"),
    [
        (b"48213*907+12", "48213*907+12"),
        (b" 48213 * 907 + 12 ", "48213*907+12"),
        ("48,213 times 907 plus 12", "48213*907+12"),
        ("12 Multiplied By 3 minus 4", "12*3-4"),
        ("10 divided by 4", "10/4"),
        ("6 x 7", "6*7"),
        ("1,234,567 over 7", "1234567/7"),
    ],
)
def test_text_to_computation(span: bytes | str, expression: str) -> None:
    assert to_expression(span) == expression


def test_text_to_computation_leaves_unknown_text_for_the_engine() -> None:
    engine = ArithmeticEngine()
    assert engine.compute(to_expression("six times seven")) == "<err:malformed>"
    assert engine.compute(to_expression(b"\xff\xfe")) == "<err:malformed>"


def test_lm_batch_trains_a_pimoe_lm_step() -> None:
    from pimoe.moe.config import MoEConfig
    from pimoe.moe.model import LMConfig, PiMoELM

    problems = ArithmeticTask(seed=4).split("train", 4)
    idx, targets = lm_batch(problems)
    assert idx.shape == targets.shape
    first = problems[0].encode()
    assert idx[0, : len(first) - 1].tolist() == list(first[:-1])
    assert targets[0, : len(first) - 1].tolist() == list(first[1:])
    assert (targets == -100).any()
    model = PiMoELM(
        LMConfig(
            block_size=idx.shape[1],
            n_layer=1,
            d_model=32,
            n_head=2,
            moe=MoEConfig(num_experts=2, top_k=1),
        )
    )
    out = model(idx, targets)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
