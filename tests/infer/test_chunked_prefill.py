"""Chunked prefill (vLLM's enable_chunked_prefill): the same greedy tokens as a whole prefill, and
running streams keep decoding while a long prompt is prefilled."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pimoe.data import load_pydoc_text
from pimoe.infer.decode_batch import DecodeBatch, GenerationModel, PartialPrefill
from pimoe.infer.generation import GenerationEngine, GenerationEvent, SamplingParams
from pimoe.infer.lm_models import HFGenerationModel, PiMoEGenerationModel
from pimoe.infer.scheduler import SchedulerConfig, plan_step

GREEDY = SamplingParams(max_tokens=16, temperature=0)


def _long_prompt(model: GenerationModel, tokens: int) -> list[int]:
    ids = model.encode(load_pydoc_text()[5_000:15_000].decode("utf-8", "ignore"))
    assert len(ids) >= tokens
    return ids[:tokens]


def _models(
    kind: str, tiny_hf: HFGenerationModel, tiny_pimoe: PiMoEGenerationModel
) -> tuple[GenerationModel, int]:
    """The model and a long prompt's length that leaves room for GREEDY's tokens."""
    return (tiny_hf, 200) if kind == "hf" else (tiny_pimoe, 44)


@pytest.mark.parametrize("kind", ["hf", "pimoe"])
def test_chunks_of_a_prompt_give_its_whole_prefill(
    kind: str, tiny_hf: HFGenerationModel, tiny_pimoe: PiMoEGenerationModel
) -> None:
    model, length = _models(kind, tiny_hf, tiny_pimoe)
    prompt = _long_prompt(model, length)
    whole = model.new_batch(2)
    logits = whole.add([prompt])[0]
    nxt = int(logits.argmax())
    after = whole.step([nxt])[0]
    chunked = model.new_batch(2)
    prefill = PartialPrefill(prompt)
    sizes = [7, 1, length // 2, length - length // 2 - 8]
    assert sum(sizes) == length
    outs = [chunked.add_chunk(prefill, n) for n in sizes]
    assert outs[:-1] == [None] * 3 and chunked.size == 1  # a row only once the prompt is in
    assert outs[-1] is not None
    torch.testing.assert_close(outs[-1], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.step([nxt])[0], after, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk must hold"):
        chunked.add_chunk(PartialPrefill(prompt), length + 1)


@pytest.mark.parametrize("kind", ["hf", "pimoe"])
def test_chunked_engine_gives_the_unchunked_greedy_tokens(
    kind: str, tiny_hf: HFGenerationModel, tiny_pimoe: PiMoEGenerationModel
) -> None:
    model, length = _models(kind, tiny_hf, tiny_pimoe)
    prompts = [_long_prompt(model, length), model.encode("x = 1"), _long_prompt(model, length)[5:]]
    outputs = {}
    for chunked in (False, True):
        engine = GenerationEngine(
            model, max_batch_size=4, max_num_batched_tokens=16, enable_chunked_prefill=chunked
        )
        try:
            outputs[chunked] = [engine.generate(p, GREEDY).token_ids for p in prompts]
            chunks = engine.stats.prefill_chunks
        finally:
            engine.close()
        assert (chunks >= 2 * (length // 16)) == chunked  # the long prompts really were chunked
    assert outputs[True] == outputs[False]
    assert all(len(t) == GREEDY.max_tokens for t in outputs[True])


class _Recorder(DecodeBatch):
    """A decode batch that logs what each engine step runs."""

    def __init__(self, inner: DecodeBatch, log: list[tuple[str, int]]) -> None:
        self.inner, self.log = inner, log

    @property
    def size(self) -> int:
        return self.inner.size

    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        self.log.append(("add", sum(len(p) for p in prompts)))
        return self.inner.add(prompts)

    def add_chunk(self, prefill: PartialPrefill, n: int) -> torch.Tensor | None:
        self.log.append(("chunk", n))
        return self.inner.add_chunk(prefill, n)

    def step(self, tokens: list[int]) -> torch.Tensor:
        self.log.append(("step", len(tokens)))
        return self.inner.step(tokens)

    def remove(self, row: int) -> None:
        self.inner.remove(row)


@pytest.mark.parametrize("chunked", [False, True])
def test_running_streams_decode_while_a_long_prompt_is_prefilled(
    tiny_hf: HFGenerationModel, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[tuple[str, int]] = []
    new_batch = tiny_hf.new_batch
    monkeypatch.setattr(tiny_hf, "new_batch", lambda rows: _Recorder(new_batch(rows), log))
    gate, started = threading.Event(), threading.Event()

    def on_a(event: GenerationEvent) -> None:
        if not started.is_set():
            started.set()
            gate.wait(10)  # holds the worker until the long prompt is queued

    budget, length, short = 24, 200, tiny_hf.encode("x = 1")
    engine = GenerationEngine(
        tiny_hf, max_batch_size=4, max_num_batched_tokens=budget, enable_chunked_prefill=chunked
    )
    try:
        engine.submit(short, SamplingParams(max_tokens=40, temperature=0), on_a)
        assert started.wait(10)
        engine.submit(_long_prompt(tiny_hf, length), GREEDY, lambda e: None)
    finally:
        gate.set()
        engine.close()  # finishes both
    assert log[:2] == [
        ("add", len(short)),
        ("step", 1),
    ]  # a runs alone before the long prompt arrives
    chunks = [i for i, (kind, _) in enumerate(log) if kind == "chunk"]
    if not chunked:  # the whole prompt in one step: a waits for all of its prefill
        assert not chunks and log[2:4] == [("add", length), ("step", 2)]
        return
    # A chunk every step, each within the step's budget beside a's token, and a decoding step of
    # a after each: a advances one token per chunk instead of waiting for the whole prompt.
    assert len(chunks) == -(-length // (budget - 1)) and chunks == list(
        range(2, 2 + 2 * len(chunks), 2)
    )
    assert sum(log[i][1] for i in chunks) == length
    for i in chunks:
        assert log[i][1] + 1 <= budget
        assert log[i + 1] == ("step", 1 if i != chunks[-1] else 2)  # then the long one joins


def test_chunked_prefill_needs_a_budget_a_model_that_can_and_room_for_the_rows(
    tiny_hf: HFGenerationModel,
) -> None:
    with pytest.raises(ValueError, match="needs a max_num_batched_tokens"):
        GenerationEngine(tiny_hf, enable_chunked_prefill=True)
    with pytest.raises(ValueError, match="max_num_batched_tokens >= max_batch_size"):
        GenerationEngine(tiny_hf, 8, max_num_batched_tokens=4, enable_chunked_prefill=True)
    with pytest.raises(ValueError, match="must be >= 1"):
        SchedulerConfig(0)

    class NoChunks(HFGenerationModel):
        chunked_prefill = False

    plain: Any = NoChunks(tiny_hf.model, tiny_hf.tokenizer)
    with pytest.raises(ValueError, match="does not prefill in chunks"):
        GenerationEngine(plain, 4, max_num_batched_tokens=16, enable_chunked_prefill=True)


@given(
    limit=st.integers(1, 64),
    running=st.integers(0, 8),
    free=st.integers(0, 8),
    left=st.none() | st.integers(1, 100),
    waiting=st.lists(st.integers(1, 100), max_size=10),
    chunked=st.booleans(),
)
def test_plan_step_keeps_the_budget_and_the_rows(
    limit: int,
    running: int,
    free: int,
    left: int | None,
    waiting: list[int],
    chunked: bool,
) -> None:
    if chunked:
        limit = max(limit, running + 1 + (left is not None))  # the engine's own precondition
    else:
        left = None  # only chunked prefill leaves a prompt half done
    plan = plan_step(SchedulerConfig(limit, chunked), running, free, left, waiting)
    assert plan.whole + plan.start_chunked <= min(free, len(waiting))
    assert not (plan.start_chunked and left is not None)  # one prompt is chunked at a time
    tokens = running + plan.chunk + sum(waiting[: plan.whole])
    if chunked:
        assert tokens <= limit  # a step never runs more than the budget
        assert left is None or 1 <= plan.chunk <= left  # a started prompt always advances
        if plan.start_chunked:
            assert 1 <= plan.chunk < waiting[plan.whole]
    elif tokens > limit:  # only the running rows or the one prompt a step always admits
        assert plan.whole <= 1
    if plan.whole < min(free, len(waiting)) and not plan.start_chunked:
        # the next prompt did not fit
        assert running + plan.chunk + sum(waiting[: plan.whole + 1]) > limit
