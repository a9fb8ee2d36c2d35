"""Decoding rules of the real-LLM chain, its router's input and the LM's own-answer labels, on a
tiny random Llama whose next-token choice is scripted through a hook on its LM head."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_llm_chain import SETTINGS, tiny_lm

from pimoe.compute.llm_chain import CONFIG_FILE, ComputationChain
from pimoe.compute.llm_demo import chain_cache_dir
from pimoe.compute.llm_prompts import question_block
from pimoe.compute.llm_router import router_input
from pimoe.compute.llm_train import own_answer, train_chain
from pimoe.compute.word_problems import PATTERNS


@pytest.fixture(scope="module")
def chain() -> ComputationChain:
    torch.set_num_threads(1)
    model, tokenizer = tiny_lm(1)
    return train_chain(model, tokenizer, "tiny", SETTINGS, progress=False)[0]


def _token(chain: ComputationChain, text: str) -> int:
    (token,) = chain.runner.encode(text)
    return token


@contextmanager
def preferring(model: torch.nn.Module, *ranked: int) -> Iterator[None]:
    """The LM's logits at every position: ``ranked[0]`` first, ``ranked[1]`` second, ..., the rest far below."""

    def hook(module, inputs, logits):
        out = torch.full_like(logits, -1e4)
        for rank, token in enumerate(ranked):
            out[..., token] = -float(rank)
        return out

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _router(chain: ComputationChain, fire: bool) -> None:
    last = chain.router.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(20.0 if fire else -20.0)


def _head(chain: ComputationChain, pattern: int) -> None:
    """The head picks ``pattern`` and fills its slots in question order."""
    with torch.no_grad():
        chain.head.pattern[-1].weight.zero_()
        chain.head.pattern[-1].bias.fill_(-20.0)
        chain.head.pattern[-1].bias[pattern] = 20.0
        chain.head.pointer[-1].weight.zero_()
        chain.head.pointer[-1].bias.zero_()


def test_first_token_is_never_a_stop(chain: ComputationChain) -> None:
    _router(chain, fire=False)
    eos, a = chain.tokenizer.eos_token_id, _token(chain, "a")
    with preferring(chain.model, eos, a):
        run = chain.run("Had 9 coins, lost 4 and found 2.", 5)
    assert run.text == "a" and run.generated_tokens == 2  # "a", then the stop it prefers


def test_no_digits_after_the_last_handoff(chain: ComputationChain) -> None:
    _router(chain, fire=True)
    _head(chain, PATTERNS.index("{a}-{b}+{c}"))
    with preferring(chain.model, _token(chain, "3"), _token(chain, "x")):
        run = chain.run("Had 9 coins, lost 4 and found 2.", 4)
    assert run.expression == "9-4+2" and run.text == "7xxxx"


def test_router_input_is_features_and_digit_logprob(chain: ComputationChain) -> None:
    runner = chain.runner
    logits, features = runner.feed(runner.start(), runner.encode(question_block("Had 9 coins.")))
    digits = [t for t in range(len(chain.tokenizer)) if runner.decode([t]).lstrip()[:1].isdigit()]
    expected = logits.log_softmax(-1)[digits].logsumexp(0)
    assert len(digits) == 10 and torch.allclose(runner.digit_logprob(logits), expected)
    x = router_input(features[-1], runner.digit_logprob(logits))
    assert x.shape == (chain.config.feature_dim + 1,) and torch.equal(x[:-1], features[-1])
    assert chain.router.mean.shape == x.shape


def test_rewind_forgets_exactly_the_last_tokens(chain: ComputationChain) -> None:
    runner = chain.runner
    session = runner.start()
    runner.feed(session, runner.encode("Question: 12 apples"))
    again = runner.encode(" and 7 pears")
    first, _ = runner.feed(session, again)
    runner.rewind(session, len(again))
    second, _ = runner.feed(session, again)
    assert torch.allclose(first, second, atol=1e-5)
    with pytest.raises(ValueError, match="count"):
        runner.rewind(session, len(session.tokens) + 1)


def test_own_answer_labels_the_first_number_it_writes(chain: ComputationChain) -> None:
    runner = chain.runner
    session = runner.start()
    logits, features = runner.feed(session, runner.encode(question_block("Had 9 coins.")))
    eos, a, space, five = (
        chain.tokenizer.eos_token_id,
        _token(chain, "a"),
        _token(chain, " "),
        _token(chain, "5"),
    )
    start = torch.full_like(logits, -1e4)
    start[eos], start[a] = 0.0, -1.0  # it would stop at once: the stop is banned, "a" is written
    calls = iter([space, five])

    def scripted(module, inputs, out):  # after "a": a space, then a digit
        new = torch.full_like(out, -1e4)
        new[..., next(calls)] = 0.0
        return new

    handle = chain.model.lm_head.register_forward_hook(scripted)
    try:
        x, y = own_answer(runner, session, start, features[-1], max_tokens=8)
    finally:
        handle.remove()
    assert y.tolist() == [0.0, 0.0, 1.0] and x.shape == (3, chain.config.feature_dim + 1)
    assert x[0, -1] == runner.digit_logprob(start).clamp_min(-20.0)


def test_other_format_is_refused_and_cached_elsewhere(
    chain: ComputationChain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain.save(tmp_path)
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    del raw["format"]  # as written before the router read the digit log-probability
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format 1"):
        ComputationChain.load(tmp_path, chain.model, chain.tokenizer)
    before = chain_cache_dir("tiny", SETTINGS, "abc")
    monkeypatch.setattr("pimoe.compute.llm_demo.CHAIN_FORMAT", 99)
    assert chain_cache_dir("tiny", SETTINGS, "abc") != before


def test_demo_cache_key_follows_the_training_phrasings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pimoe.compute.word_problems import TEMPLATES

    before = chain_cache_dir("tiny", SETTINGS, "abc")
    assert chain_cache_dir("tiny", SETTINGS, "abc") == before
    fewer = {**TEMPLATES, "train": TEMPLATES["train"][:-1]}
    monkeypatch.setattr("pimoe.compute.llm_demo.TEMPLATES", fewer)
    assert chain_cache_dir("tiny", SETTINGS, "abc") != before


def test_demo_cache_key_follows_the_composed_phrasings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pimoe.compute.word_compose import composed_templates

    before = chain_cache_dir("tiny", SETTINGS, "abc")
    monkeypatch.setattr(
        "pimoe.compute.llm_demo.composed_templates", lambda n: composed_templates(n, seed=1)
    )
    assert chain_cache_dir("tiny", SETTINGS, "abc") != before
