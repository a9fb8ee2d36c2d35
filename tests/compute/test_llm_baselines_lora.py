"""The LoRA-tuned tool call (baseline c') on a tiny random Llama: data, training, cache, bench keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_llm_chain import SETTINGS, tiny_lm

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.llm_bench import (
    LORA_PIPELINE,
    PIPELINES,
    LLMBenchConfig,
    call_checks,
    evaluate,
    lora_keys,
    tool_lora_settings,
)
from pimoe.compute.llm_train import train_chain
from pimoe.compute.tool_call_lora import (
    ALL_LINEAR,
    IGNORE,
    ToolLoRASettings,
    _batch,
    cached_tool_lora,
    tool_example,
    tool_lora_cache_dir,
    tool_loss,
    train_tool_lora,
)
from pimoe.compute.word_problems import WordProblemSet
from pimoe.moe.lora import LoRALinear, lora_adapters

TINY = ToolLoRASettings(problems=16, epochs=4, batch_size=4, lr=3e-2)


def test_tool_example_learns_the_call_and_the_rest_not_the_result() -> None:
    _, tokenizer = tiny_lm()
    problem = WordProblemSet().problem("train", 3)
    ids, labels = tool_example(tokenizer, problem)
    text = tokenizer.decode(ids.tolist())
    assert text == f"Question: {problem.question}\nAnswer: {problem.tool_answer()}\n"
    learned = tokenizer.decode(ids[labels != IGNORE].tolist())
    result_end = problem.result_start + len(problem.answer)
    assert learned == (
        " " + problem.answer_text[: problem.result_start] + f"<<{problem.expression}>>"
        f"{problem.answer_text[result_end:]}\n"
    )
    assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()


def test_training_lowers_the_tool_loss_and_leaves_the_base_alone() -> None:
    model, tokenizer = tiny_lm()
    with torch.no_grad():  # a random init's output layer is near zero: give it some reach
        model.lm_head.weight.mul_(50.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, report = train_tool_lora(model, tokenizer, TINY, progress=False)
    problems = WordProblemSet().problems("train", 0, TINY.problems)
    batch = _batch([tool_example(tokenizer, p) for p in problems], tokenizer.pad_token_id)
    with torch.no_grad():
        base_loss, tuned_loss = tool_loss(model, batch).item(), tool_loss(tuned, batch).item()
    assert tuned_loss < 0.8 * base_loss, (base_loss, tuned_loss)
    assert report["steps"] == TINY.epochs * TINY.problems // TINY.batch_size
    assert report["loss_final"] < report["loss_first"]
    adapters = lora_adapters(tuned)
    assert adapters and all(isinstance(a, LoRALinear) for a in adapters.values())
    assert {name.rpartition(".")[2] for name in adapters} == set(ALL_LINEAR)
    assert len(adapters) == len(ALL_LINEAR) * model.config.num_hidden_layers
    assert report["params"] == sum(a.lora_A.numel() + a.lora_B.numel() for a in adapters.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cached_adapters_load_to_the_same_outputs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIMOE_HOME", str(tmp_path))
    model, tokenizer = tiny_lm()
    settings = replace(TINY, epochs=1)
    trained, report, source = cached_tool_lora(model, tokenizer, "tiny", settings, progress=False)
    loaded, loaded_report, loaded_source = cached_tool_lora(
        model, tokenizer, "tiny", settings, progress=False
    )
    assert (source, loaded_source) == ("trained", "cache") and loaded_report == report
    assert all(a.merged for a in lora_adapters(loaded).values())  # decodes at the base's cost
    ids = torch.tensor([tokenizer("Question: 12 apples and 30 more?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        out, again, base = (m(input_ids=ids).logits for m in (trained, loaded, model))
    torch.testing.assert_close(again, out, rtol=0, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-4)  # the adapters did change the model
    _, _, other = cached_tool_lora(model, tokenizer, "tiny", replace(settings, r=4), progress=False)
    assert other == "trained"  # other settings, another cache entry


def test_cache_key_follows_the_training_phrasings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pimoe.compute.word_problems import TEMPLATES

    before = tool_lora_cache_dir("tiny", TINY, "abc")
    assert tool_lora_cache_dir("tiny", TINY, "abc") == before
    fewer = {**TEMPLATES, "train": TEMPLATES["train"][:-1]}
    monkeypatch.setattr("pimoe.compute.tool_call_lora.TEMPLATES", fewer)
    assert tool_lora_cache_dir("tiny", TINY, "abc") != before


def test_call_checks_separate_copying_from_the_operator_tree() -> None:
    problem = WordProblemSet().problem("heldout", 7)
    a, b, c = problem.operands[:3]
    engine = ArithmeticEngine()
    assert call_checks(f"It is <<{problem.expression}>>{problem.answer}.", problem, engine) == (
        True,
        True,
        True,
    )
    wrong_tree = f"<<{a}*{b}*{c}>>1 and <<{problem.expression}>>"  # the first call counts
    assert call_checks(wrong_tree, problem, engine) == (True, True, False)
    miscopied = f"<<{problem.expression.replace(a, a[:-1], 1)}>>"  # a digit dropped
    assert call_checks(miscopied, problem, engine) == (True, False, False)
    assert call_checks(f"It is {problem.answer}.", problem, engine) == (False, False, False)


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ToolLoRASettings(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        ToolLoRASettings(lr=0.0)


def test_bench_adds_the_lora_tool_call_and_keeps_every_key() -> None:
    torch.set_num_threads(1)
    model, tokenizer = tiny_lm()
    cfg = LLMBenchConfig(model="tiny", train=SETTINGS, eval_problems=2, max_new_tokens=4)
    settings = tool_lora_settings(replace(cfg, tool_lora=replace(TINY, epochs=1)))
    assert (settings.problems, settings.seed) == (SETTINGS.problems, SETTINGS.seed)
    chain, report = train_chain(model, tokenizer, "tiny", SETTINGS, progress=False)
    tuned, lora_report = train_tool_lora(model, tokenizer, settings, progress=False)
    result = evaluate(chain, cfg, {**report, **lora_keys(lora_report, "trained")}, False, tuned)
    for name in (*PIPELINES, LORA_PIPELINE):
        for key in ("accuracy", "tokens", "latency_ms", "forward_passes", "calls"):
            assert f"{key}_{name}" in result
    assert result["train_seconds_tool_call_lora"] == lora_report["train_s"]
    assert result["train_steps_tool_call_lora"] == lora_report["steps"]
    assert result["tokens_tool_call_lora"] <= cfg.max_new_tokens
    assert LORA_PIPELINE in result["examples"]
    for name in ("tool_call", LORA_PIPELINE):
        assert 0 <= result[f"call_right_{name}"] <= result[f"call_written_{name}"] <= 1
    without = evaluate(chain, cfg, report, False)
    assert f"accuracy_{LORA_PIPELINE}" not in without
    assert {k: without[k] for k in ("accuracy_pimoe", "tokens_pimoe", "tokens_tool_call")} == {
        k: result[k] for k in ("accuracy_pimoe", "tokens_pimoe", "tokens_tool_call")
    }
