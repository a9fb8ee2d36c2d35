"""The real-LLM computation chain on a tiny random Llama (fast) and on SmolLM2 (slow)."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from pimoe.bench.tiny_llama import tiny_byte_llama
from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.llm_baselines import lm_only, tool_call
from pimoe.compute.llm_chain import ComputationChain, insertion_text
from pimoe.compute.llm_prompts import final_number, question_block
from pimoe.compute.llm_train import ChainTrainSettings, train_chain
from pimoe.compute.operand_head import NONE_SLOT, locate_numbers
from pimoe.compute.word_grammar import expand
from pimoe.compute.word_problems import HELDOUT_THIRD, PATTERNS, SLOTS, TEMPLATES, WordProblemSet
from pimoe.compute.word_templates import WRITTEN_TEMPLATES


def tiny_lm(seed: int = 0):
    """A tiny random Llama (2 layers, hidden 16) with a real byte-level BPE tokenizer whose digits
    and spaces are single tokens, as in SmolLM2's."""
    return tiny_byte_llama(seed)


SETTINGS = ChainTrainSettings(problems=12, shots=2, steps=150, composed=6)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    model, tokenizer = tiny_lm()
    chain, report = train_chain(model, tokenizer, "tiny", SETTINGS, progress=False)
    return chain, report


def _rig(chain: ComputationChain, fire: bool, pattern: int | None = None) -> None:
    """Router always (never) fires; head picks ``pattern`` and fills slots in question order."""
    last = chain.router.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(20.0 if fire else -20.0)
        if pattern is not None:
            head_last, pointer_last = chain.head.pattern[-1], chain.head.pointer[-1]
            head_last.weight.zero_()
            head_last.bias.fill_(-20.0)
            head_last.bias[pattern] = 20.0
            pointer_last.weight.zero_()
            pointer_last.bias.zero_()


def test_word_problems_exact_splits_and_slots() -> None:
    problems = WordProblemSet(train_digits=5, heldout_digits=8, seed=0)
    assert problems.problem("train", 3) == problems.problem("train", 3)
    assert {t.question for t in TEMPLATES["train"]}.isdisjoint(
        t.question for t in TEMPLATES["heldout"]
    )
    assert {t.answer for t in TEMPLATES["train"]}.isdisjoint(t.answer for t in TEMPLATES["heldout"])
    assert len(TEMPLATES["heldout"]) == 24 and len(TEMPLATES["train"]) > 300
    for split in ("train", "heldout"):
        for p in problems.problems(split, 0, 60):
            longest = max(len(o) for o in p.operands)
            assert longest <= 5 if split == "train" else 5 < longest <= 8
            names = dict(zip(SLOTS, (f"Fraction({o})" for o in p.operands)))
            assert eval(PATTERNS[p.pattern].format(**names)) == Fraction(int(p.answer))
            assert p.answer_text[p.result_start :].startswith(p.answer)
            numbers = locate_numbers_text(p.question)
            assert [
                numbers[i] for i in sorted(range(len(numbers)), key=lambda i: p.operand_order[i])
            ] == list(p.operands)


def test_heldout_clauses_never_occur_in_training_phrasings() -> None:
    train = [t.question.lower() for t in TEMPLATES["train"]]
    for template in TEMPLATES["heldout"]:
        for clause in re.split(r"[.;?,:]", template.question.lower()):
            if len(clause.split()) > 4:
                assert not any(clause.strip() in q for q in train), clause


def test_third_heldout_set_shares_no_clause_with_the_other_sets() -> None:
    heldout = TEMPLATES["heldout"]
    third = [heldout[i] for i in HELDOUT_THIRD]
    assert sorted(t.pattern for t in third) == sorted(PATTERNS)
    earlier = [t.question.lower() for i, t in enumerate(heldout) if i not in HELDOUT_THIRD]
    for template in third:
        assert template.answer not in {t.answer for t in heldout if t is not template}
        for clause in re.split(r"[.;?,:]", template.question.lower()):
            if len(clause.split()) > 4:
                assert not any(clause.strip() in q for q in earlier), clause


def test_grammar_expands_every_alternative_once() -> None:
    assert expand("[A|B] has {a} [x|y|z].") == [
        "A has {a} x.",
        "A has {a} y.",
        "A has {a} z.",
        "B has {a} x.",
        "B has {a} y.",
        "B has {a} z.",
    ]
    assert expand("of {b} [each|], then") == ["of {b} each, then", "of {b}, then"]
    generated = TEMPLATES["train"][len(WRITTEN_TEMPLATES["train"]) :]
    for t in generated:  # every slot of the pattern named exactly once, no markup left
        assert all(
            t.question.count("{" + s + "}") == (("{" + s + "}") in t.pattern) for s in SLOTS
        ), t
        assert "[" not in t.question + t.answer and "{r}" in t.answer


def locate_numbers_text(question: str) -> list[str]:
    return re.findall(r"[0-9]+", question)


def test_locate_numbers_points_at_last_digit_tokens() -> None:
    _, tokenizer = tiny_lm()
    block = question_block("Had 120 apples, sold 45 and got 7.")
    found = locate_numbers(tokenizer, block)
    assert found.texts == ["120", "45", "7"]
    assert [tokenizer.decode([found.ids[i]]) for i in found.positions] == ["0", "5", "7"]


@pytest.mark.parametrize("prefix", ["Q: Tom had 3 pens. A: 3\n", ""])
def test_batched_question_features_are_single_passes(prefix: str) -> None:
    """Token lists of one length share a forward pass; each gets the features of its own pass
    after the prefix (bitwise where the matrix products are row-consistent, as on the x86 CI)."""
    from pimoe.compute.llm_runner import LMRunner

    torch.set_num_threads(1)
    model, tokenizer = tiny_lm()
    runner = LMRunner(model, tokenizer, prefix)
    texts = ["Had 120 apples.", "Sold 45 and 7?", "Got 9 pears!!!!", "Ada owns 2 cats", "A"]
    questions = [runner.encode(t) for t in texts]
    lengths = [len(q) for q in questions]
    assert max(lengths.count(n) for n in lengths) == 3  # precondition: passes of 2 and 1 lists
    batches: list[int] = []
    batched = runner.question_features(questions, batch_size=2, on_batch=batches.append)
    assert sorted(batches, reverse=True)[0] == 2 and sum(batches) == len(questions)
    single = [runner.feed_all(runner.start(), q)[1] for q in questions]  # prefix cache unchanged
    for got, want in zip(batched, single, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="at least one token"):
        runner.question_features([[], questions[0]])


def test_training_lowers_both_losses(trained) -> None:
    _, report = trained
    assert report["router_loss_final"] < 0.5 * report["router_loss_first"]
    assert report["head_loss_final"] < 0.5 * report["head_loss_first"]
    assert report["head_problems"] == SETTINGS.problems + SETTINGS.composed


def test_router_that_never_fires_is_the_lm_alone(trained) -> None:
    chain, _ = trained
    _rig(chain, fire=False)
    for question in ("Tom has 12 apples and 30 pears.", "No numbers here?"):
        run, alone = chain.run(question, 12), lm_only(chain.runner, question, 12)
        assert alone.text  # precondition: the LM alone does not stop at once (the chain may not)
        assert (run.text, run.generated_tokens, run.forward_passes) == (
            alone.text,
            alone.generated_tokens,
            alone.forward_passes,
        )
        assert run.expression is None and run.inserted_tokens == 0


def test_handoff_inserts_exact_result_in_one_prefill(trained) -> None:
    chain, _ = trained
    _rig(chain, fire=True, pattern=PATTERNS.index("{a}*{b}+{c}"))
    run = chain.run("A crate holds 48213987 bolts; 90712345 crates and 12 more bolts. How many?", 6)
    result = str(48213987 * 90712345 + 12)
    assert run.expression == "48213987*90712345+12"
    assert run.text.startswith(result)
    assert (
        not run.text[len(result) : len(result) + 2].strip()[:1].isdigit()
    )  # the LM does not extend the number
    assert run.inserted_tokens == len(result)  # one token per digit with this tokenizer
    # prompt prefill + one insertion prefill + one pass per generated token except a final stop
    assert run.forward_passes - 2 in (run.generated_tokens, run.generated_tokens - 1)


@pytest.mark.parametrize(
    "question, token",
    [
        ("From 7 apples 7 were sold and the rest shared among 0 kids. Each?", "<err:div0>"),
        ("How many apples are there?", "<err:malformed>"),
        ("Share \u0667\u0668 apples among \u0663 kids.", "<err:malformed>"),  # Arabic-Indic digits
        ("From " + "9" * 45 + " apples 3 were sold, shared among 2 kids.", "<err:overflow>"),
        (
            "Caf\u00e9 \u2615 had 12 cr\u00eapes \U0001f600, sold 2, shared among 5 friends.",
            "2",
        ),  # non-ASCII words: fine
        ("", "<err:malformed>"),
    ],
)
def test_bad_input_gives_error_token_and_continues(trained, question: str, token: str) -> None:
    chain, _ = trained
    _rig(chain, fire=True, pattern=PATTERNS.index("({a}-{b})/{c}"))
    run = chain.run(question, 5)
    assert run.text.startswith(token)
    assert run.generated_tokens == 5 or run.text != token  # the LM went on after the error token


def test_save_load_round_trip(trained, tmp_path: Path) -> None:
    chain, _ = trained
    _rig(chain, fire=True, pattern=0)
    base = tmp_path / "base"
    chain.model.save_pretrained(base)
    chain.tokenizer.save_pretrained(base)
    chain.config.base_model = str(base)
    chain.save(tmp_path / "chain")
    loaded = ComputationChain.load(tmp_path / "chain")
    question = "A shop had 500 apples, sold 20 and got 3. How many?"
    assert loaded.generate(question, max_new_tokens=8) == chain.generate(question, max_new_tokens=8)
    assert loaded.config == chain.config
    with pytest.raises(ValueError, match="not a saved computation chain"):
        ComputationChain.load(tmp_path)


def test_cli_ask_prints_the_answer(trained, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pimoe.compute.cli import chain_app

    chain, _ = trained
    _rig(chain, fire=True, pattern=0)
    base = tmp_path / "base"
    chain.model.save_pretrained(base)
    chain.tokenizer.save_pretrained(base)
    chain.config.base_model = str(base)
    chain.save(tmp_path / "chain")
    question = "Had 9 coins, lost 4 and found 2."
    out = CliRunner().invoke(
        chain_app, ["ask", str(tmp_path / "chain"), question, "--max-new-tokens", "4"]
    )
    assert out.exit_code == 0, out.output
    assert out.output.strip() == chain.generate(question, max_new_tokens=4)
    assert out.output.startswith("7")


def test_tool_call_evaluates_the_written_call(trained) -> None:
    from pimoe.compute.llm_runner import LMRunner

    chain, _ = trained
    model, tokenizer = chain.model, chain.tokenizer
    script = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("<<2+3>> ok\n")]
    script.insert(
        7, script[7]
    )  # the pass that feeds ">" predicts a token nobody uses: a spare space
    calls = iter(script)

    def scripted(module, inputs, logits):  # an LM that writes the script, one token per forward
        out = torch.full_like(logits, -1e9)
        out[..., next(calls)] = 0.0
        return out

    handle = model.lm_head.register_forward_hook(scripted)
    try:
        out = tool_call(
            LMRunner(model, tokenizer, "", chain.config.layers),
            ArithmeticEngine(),
            "What is 2+3?",
            20,
        )
    finally:
        handle.remove()
    assert out.text == "<<2+3>>5 ok" and out.calls == 1
    assert final_number(out.text) == "5"
    assert (
        out.generated_tokens == 11 and out.forward_passes == 12
    )  # prompt + 10 fed tokens + the result


def test_final_number_and_insertion_text() -> None:
    assert final_number("The shop has <<120-45+30>>105 apples.") == "105"
    assert final_number("It is 1,234,567 coins.") == "1234567"
    assert final_number("none") is None
    assert insertion_text("The shop has ", "105") == "105"
    assert insertion_text("The shop has", "105") == " 105"
    assert len(SLOTS) == NONE_SLOT


def test_run_rejects_bad_arguments(trained) -> None:
    chain, _ = trained
    with pytest.raises(TypeError, match="question must be a str"):
        chain.run(b"12 apples", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_new_tokens"):
        chain.run("12 apples", 0)
