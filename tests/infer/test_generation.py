"""GenerationEngine: continuous batching gives each sequence the output it gets alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_lm import save_tiny_llama

from pimoe.infer.decode_batch import length_groups
from pimoe.infer.generation import (
    EngineFull,
    GenerationEngine,
    GenerationEvent,
    SamplingParams,
)
from pimoe.infer.lm_models import (
    GenerationModel,
    HFGenerationModel,
    PiMoEGenerationModel,
    open_generation_model,
)
from pimoe.infer.sequence import safe_end

PROMPTS = [
    "The with statement",
    "def f(x):\n    return",
    "Lists are mutable sequences",
    "import os",
    "class A:",
    "x = 1",
    "while True:",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def _concurrent(
    engine: GenerationEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    stagger_s: float = 0.0,
) -> list[GenerationEvent]:
    out: list[GenerationEvent | None] = [None] * len(prompts)

    def run(i: int) -> None:
        out[i] = engine.generate(prompts[i], params)

    threads = []
    for i in range(len(prompts)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        time.sleep(stagger_s)  # later requests join a batch that is already decoding
    for t in threads:
        t.join(60)
    assert all(e is not None for e in out)
    return out  # type: ignore[return-value]


def test_hf_greedy_equals_hf_generate_alone_and_in_a_busy_batch(tiny_hf: HFGenerationModel) -> None:
    ids = [tiny_hf.encode(p) for p in PROMPTS]
    reference = []
    for p in ids:  # the peer: transformers' own generate, one request at a time
        out = tiny_hf.model.generate(
            torch.tensor([p]),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        reference.append(tuple(out[0, len(p) :].tolist()))
    engine = GenerationEngine(tiny_hf, max_batch_size=4)
    try:
        alone = [engine.generate(p, GREEDY).token_ids for p in ids]
        busy = [e.token_ids for e in _concurrent(engine, ids, GREEDY, stagger_s=0.005)]
        assert engine.stats.rows > engine.stats.steps  # some steps really ran several sequences
    finally:
        engine.close()
    assert alone == reference
    assert busy == reference


def test_pimoe_greedy_equals_generate(tiny_pimoe: PiMoEGenerationModel) -> None:
    ids = [tiny_pimoe.encode(p) for p in PROMPTS[:4]]
    params = SamplingParams(max_tokens=12, temperature=0)
    reference = [
        tuple(tiny_pimoe.model.generate(torch.tensor([p]), 12, temperature=0)[0, len(p) :].tolist())
        for p in ids
    ]
    engine = GenerationEngine(tiny_pimoe, max_batch_size=3)
    try:
        busy = [e.token_ids for e in _concurrent(engine, ids, params, stagger_s=0.002)]
        together = [e.token_ids for e in _concurrent(engine, ids, params)]
        assert engine.stats.rows > engine.stats.steps  # steps really ran several sequences
    finally:
        engine.close()
    assert busy == reference
    assert together == reference


@pytest.mark.parametrize("kind", ["hf", "pimoe"])
def test_batched_prefill_of_ragged_prompts_equals_one_by_one(
    kind: str, tiny_hf: HFGenerationModel, tiny_pimoe: PiMoEGenerationModel
) -> None:
    model: GenerationModel = tiny_hf if kind == "hf" else tiny_pimoe
    ids = [
        model.encode(p) for p in PROMPTS
    ]  # 2 to 9 tokens: several length groups, padded ones among them
    assert len({len(p) for p in ids}) > 3
    together = model.new_batch(len(ids))
    logits = together.add(ids)  # [7, V]
    nxt = [int(t) for t in logits.argmax(-1)]
    after = together.step(nxt)
    for i, p in enumerate(ids):
        alone = model.new_batch(1)
        torch.testing.assert_close(alone.add([p])[0], logits[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.step([nxt[i]])[0], after[i], atol=1e-5, rtol=1e-5)


def test_length_groups_bound_the_padding() -> None:
    lengths = [64, 3, 60, 4, 64, 100]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)
    assert {frozenset(g) for g in groups} >= {frozenset({0, 2, 4})}


def test_sampling_seed_top_p_and_finish_reasons(tiny_hf: HFGenerationModel) -> None:
    prompt = tiny_hf.encode("The with statement")
    engine = GenerationEngine(tiny_hf)
    try:
        greedy = engine.generate(prompt, GREEDY)
        a, b = (engine.generate(prompt, SamplingParams(max_tokens=24, seed=7)) for _ in range(2))
        c = engine.generate(prompt, SamplingParams(max_tokens=24, seed=8))
        nucleus = engine.generate(prompt, SamplingParams(max_tokens=24, seed=8, top_p=1e-6))
        stop = greedy.text[5:8]
        stopped = engine.generate(
            prompt, SamplingParams(max_tokens=24, temperature=0, stop=(stop,))
        )
    finally:
        engine.close()
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert nucleus.token_ids == greedy.token_ids  # a tiny nucleus holds only the most likely token
    assert (
        greedy.finish_reason == "length"
        and greedy.completion_tokens == 24
        and greedy.prompt_tokens == len(prompt)
    )
    assert (
        stopped.finish_reason == "stop" and stopped.text == greedy.text[: greedy.text.index(stop)]
    )


def test_eos_ends_with_stop(tiny_hf: HFGenerationModel) -> None:
    prompt = tiny_hf.encode("import os")
    first = tiny_hf.model(torch.tensor([prompt])).logits[0, -1].argmax().item()

    class EosModel(HFGenerationModel):  # the greedy first token counts as end-of-sequence
        def __init__(self) -> None:
            self.__dict__.update(tiny_hf.__dict__)
            self.eos_ids = frozenset({int(first)})

    engine = GenerationEngine(EosModel())
    try:
        event = engine.generate(prompt, GREEDY)
    finally:
        engine.close()
    assert (event.finish_reason, event.text, event.completion_tokens) == ("stop", "", 1)


def test_full_queue_deadline_and_cancel(tiny_hf: HFGenerationModel) -> None:
    prompt = tiny_hf.encode("x = 1")
    gate, started = threading.Event(), threading.Event()

    def blocking(event: GenerationEvent) -> None:  # runs on the worker: holds the engine mid-step
        started.set()
        gate.wait(10)

    engine = GenerationEngine(tiny_hf, max_batch_size=1, max_queue=1)
    try:
        first = engine.submit(prompt, SamplingParams(max_tokens=200, temperature=0), blocking)
        assert started.wait(10)
        late: list[GenerationEvent] = []
        gone = engine.submit(prompt, GREEDY, late.append)
        with pytest.raises(EngineFull):
            engine.submit(prompt, GREEDY, late.append)
        gone.cancel()  # its client went away: the queue has room again
        engine.submit(
            prompt, GREEDY, late.append, timeout_s=0.0
        )  # waits; its deadline passes meanwhile
        with pytest.raises(EngineFull):
            engine.submit(prompt, GREEDY, late.append)
        first.cancel()
        gate.set()
        deadline = time.monotonic() + 10
        while (engine.running or engine.queued or not late) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0 and engine.queued == 0
        assert late[-1].error is not None and late[-1].error[0] == 504
        assert engine.stats.tokens < 200  # the cancelled sequence left early
        assert (
            engine.generate(prompt, GREEDY).completion_tokens == GREEDY.max_tokens
        )  # still serving
    finally:
        gate.set()
        engine.close()


def test_model_failure_fails_requests_and_keeps_serving(tiny_hf: HFGenerationModel) -> None:
    calls = {"n": 0}

    class Flaky(HFGenerationModel):
        def __init__(self) -> None:
            self.__dict__.update(tiny_hf.__dict__)

        def new_batch(self, max_rows: int):  # type: ignore[no-untyped-def]
            batch = super().new_batch(max_rows)
            step = batch.step

            def flaky(tokens: list[int]) -> torch.Tensor:
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("boom")
                return step(tokens)

            batch.step = flaky  # type: ignore[method-assign]
            return batch

    engine = GenerationEngine(Flaky())
    try:
        failed = engine.generate(tiny_hf.encode("x"), GREEDY)
        ok = engine.generate(tiny_hf.encode("x"), GREEDY)
    finally:
        engine.close()
    assert failed.error is not None and failed.error[0] == 500 and "boom" in failed.error[1]
    assert ok.error is None and ok.completion_tokens == GREEDY.max_tokens


def test_safe_end_holds_back_partial_characters_and_stop_prefixes() -> None:
    assert safe_end("abc\ufffd", ()) == 3
    assert safe_end("hello wor", ("world",)) == 6
    assert safe_end("hello", ("xyz",)) == 5


def test_bad_requests(tiny_hf: GenerationModel) -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=3)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    engine = GenerationEngine(tiny_hf)
    try:
        with pytest.raises(ValueError, match="context"):
            engine.submit([1] * tiny_hf.context_length, GREEDY, print)
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], GREEDY, print)
    finally:
        engine.close()
    short = GenerationEngine(
        tiny_hf, max_context=8
    )  # bounds prompt + completion (and the KV memory)
    try:
        assert (
            short.generate(
                [5, 6, 7], SamplingParams(max_tokens=100, temperature=0)
            ).completion_tokens
            == 5
        )
        with pytest.raises(ValueError, match="holds 8"):
            short.submit([1] * 8, GREEDY, print)
    finally:
        short.close()


def test_open_generation_model_kinds(tmp_path: Path, tiny_pimoe: PiMoEGenerationModel) -> None:
    path = tmp_path / "lm.safetensors"
    tiny_pimoe.model.save(path)
    assert isinstance(open_generation_model(path), PiMoEGenerationModel)
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert open_generation_model(tmp_path / "enc") is None
    with pytest.raises(ValueError, match="routers"):
        open_generation_model(path, routers=path)


def test_upcycled_moe_served_with_routers(tmp_path: Path) -> None:
    from pimoe.models import save_routers, upcycle
    from pimoe.models.upcycle_cluster import capture_mlp_inputs

    folder = save_tiny_llama(tmp_path / "llama")
    dense = open_generation_model(folder)
    assert isinstance(dense, HFGenerationModel)
    calibration = torch.tensor(
        [dense.encode("The with statement runs a block of code inside a context manager")]
    )
    upcycle(
        dense.model, 4, 2, "split", mlp_inputs=capture_mlp_inputs(dense.model, calibration), seed=0
    )
    save_routers(dense.model, tmp_path / "routers.safetensors")
    served = open_generation_model(folder, routers=tmp_path / "routers.safetensors")
    assert (
        isinstance(served, HFGenerationModel)
        and type(served.model.model.layers[0].mlp).__name__ == "PiMoE"
    )
    ids = [served.encode(p) for p in PROMPTS[:4]]
    reference = [
        tuple(
            served.model.generate(
                torch.tensor([p]),
                max_new_tokens=GREEDY.max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(p) :].tolist()
        )
        for p in ids
    ]
    engine = GenerationEngine(served, max_batch_size=4)
    try:
        busy = [e.token_ids for e in _concurrent(engine, ids, GREEDY, stagger_s=0.005)]
    finally:
        engine.close()
    assert busy == reference


@pytest.mark.parametrize("budget", [None, 1])
def test_prefill_budget_lets_running_streams_advance_between_arrivals(
    tiny_hf: HFGenerationModel, budget: int | None
) -> None:
    order: list[tuple[str, int]] = []
    gate, started = threading.Event(), threading.Event()

    def record(name: str):  # type: ignore[no-untyped-def]
        def on_event(event: GenerationEvent) -> None:
            if name == "a" and event.completion_tokens >= 2 and not started.is_set():
                started.set()
                gate.wait(10)  # holds the worker mid-step until the others are queued
            order.append((name, event.completion_tokens))

        return on_event

    engine = GenerationEngine(tiny_hf, max_batch_size=4, max_num_batched_tokens=budget)
    try:
        params = SamplingParams(max_tokens=8, temperature=0)
        engine.submit(tiny_hf.encode("x = 1"), params, record("a"))
        assert started.wait(10)
        for name in "bcd":
            engine.submit(tiny_hf.encode("import os"), params, record(name))
        gate.set()
        deadline = time.monotonic() + 10
        while len([e for e in order if e[1] == 8]) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gate.set()
        engine.close()
    held = next(
        n for name, n in order if name == "a" and n >= 2
    )  # a's token when the worker was held
    a_third = next(i for i, (name, n) in enumerate(order) if name == "a" and n > held)
    d_first = next(i for i, (name, _) in enumerate(order) if name == "d")
    # No budget: b, c and d are all prefilled before the next step. A budget of one prompt per
    # step admits them over three steps, so a advances in between.
    assert (a_third < d_first) == (budget is not None)
