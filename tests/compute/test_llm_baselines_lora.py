"""The LoRA-tuned tool call (baseline c') on a tiny random Llama: data, training, cache, bench keys."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_llm_chain import SETTINGS, tiny_lm

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.llm_bench import (
    LORA_PIPELINE,
    PIPELINES,
    QUICK,
    TOOL_LORA_EPOCHS,
    LLMBenchConfig,
    call_checks,
    evaluate,
    lora_keys,
    pipeline_names,
    run,
    tool_lora_settings,
)
from pimoe.compute.llm_train import train_chain
from pimoe.compute.tool_call_lora import (
    ALL_LINEAR,
    IGNORE,
    ToolLoRASettings,
    _batch,
    cached_tool_lora,
    step_batches,
    tool_example,
    tool_lora_cache_dir,
    tool_loss,
    train_tool_lora,
    training_problems,
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
    assert report["steps"] == math.ceil(TINY.epochs * TINY.problems / TINY.batch_size) == 16
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


def test_cache_key_follows_the_training_data_and_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from pimoe.compute import word_compose
    from pimoe.compute.word_problems import TEMPLATES

    settings = replace(TINY, composed=8)
    before = tool_lora_cache_dir("tiny", settings, "abc")
    assert tool_lora_cache_dir("tiny", settings, "abc") == before
    for other in (replace(settings, composed=7), replace(settings, epochs=3.5), TINY):
        assert tool_lora_cache_dir("tiny", other, "abc") != before
    with monkeypatch.context() as patch:  # other template phrasings
        patch.setattr(
            "pimoe.compute.word_problems.TEMPLATES",
            {
                **TEMPLATES,
                "train": tuple(replace(t, answer=t.answer + "!") for t in TEMPLATES["train"]),
            },
        )
        assert tool_lora_cache_dir("tiny", settings, "abc") != before
    drawn = word_compose.composed_templates

    def reworded(count: int, seed: int = 0):  # the grammar changed one composed phrasing
        out = list(drawn(count, seed))
        out[-1] = replace(out[-1], question=out[-1].question.replace("?", " then?"))
        return tuple(out)

    monkeypatch.setattr(word_compose, "composed_templates", reworded)
    assert tool_lora_cache_dir("tiny", settings, "abc") != before


def test_training_problems_are_the_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapters train on the questions the chain's modules train on (templates, then the
    composed ones), for the bench's quick and full settings."""
    import pimoe.compute.llm_train as llm_train

    seen: list[str] = []
    collect, questions = llm_train.collect_features, llm_train.questions_features

    def record_all(runner, problems, *args, **kwargs):
        seen.extend(p.question for p in problems)
        return collect(runner, problems, *args, **kwargs)

    def record_questions(runner, problems, *args, **kwargs):
        seen.extend(p.question for p in problems)
        return questions(runner, problems, *args, **kwargs)

    monkeypatch.setattr(llm_train, "collect_features", record_all)
    monkeypatch.setattr(llm_train, "questions_features", record_questions)
    model, tokenizer = tiny_lm()
    cfg = LLMBenchConfig(model="tiny", train=replace(SETTINGS, steps=1, seed=3))
    train_chain(model, tokenizer, "tiny", cfg.train, progress=False)
    settings = tool_lora_settings(cfg)
    assert [p.question for p in training_problems(settings)] == seen
    assert len(seen) == SETTINGS.problems + SETTINGS.composed
    for bench in (QUICK, LLMBenchConfig()):
        s = tool_lora_settings(bench)
        assert (s.problems, s.composed, s.seed) == (
            bench.train.problems,
            bench.train.composed,
            bench.train.seed,
        )
        assert s.composed > 0 and s.epochs == TOOL_LORA_EPOCHS


@pytest.mark.parametrize("epochs", [1.0, 0.8, 2.3])
def test_step_batches_follow_fractional_epochs(epochs: float) -> None:
    settings = ToolLoRASettings(epochs=epochs, batch_size=4, seed=5)
    batches = step_batches(30, settings)
    assert len(batches) == math.ceil(epochs * 30 / 4)
    flat = [i for b in batches for i in b]
    per_pass = 8  # batches per pass over 30 examples (the last one of 2)
    for start in range(0, len(batches), per_pass):
        chunk = [i for b in batches[start : start + per_pass] for i in b]
        assert len(chunk) == len(set(chunk))  # a pass sees each example at most once
    if epochs >= 1:
        assert set(flat) == set(range(30))
    if epochs > 2:
        assert batches[:per_pass] != batches[per_pass : 2 * per_pass]  # reshuffled each pass
    assert step_batches(30, settings) == batches


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
    with pytest.raises(ValueError, match="epochs"):
        ToolLoRASettings(epochs=0)
    with pytest.raises(ValueError, match="composed"):
        ToolLoRASettings(composed=-1)
    with pytest.raises(ValueError, match="unknown pipelines"):
        pipeline_names(["pimoe", "tool_cal"])
    with pytest.raises(TypeError, match="sequence"):
        pipeline_names("pimoe")


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


@pytest.mark.slow
def test_bench_runs_only_the_chosen_pipelines_and_reports_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIMOE_HOME", str(tmp_path))
    monkeypatch.setattr("pimoe.models.load_pretrained", lambda name, progress=True: tiny_lm())
    cfg = LLMBenchConfig(
        model="tiny", train=SETTINGS, tool_lora=TINY, eval_problems=2, max_new_tokens=4
    )
    result = run(cfg, progress=False, pipelines=[LORA_PIPELINE])
    assert {k for k in result if k.startswith("accuracy_") and "phrasings" not in k} == {
        "accuracy_pimoe",
        f"accuracy_{LORA_PIPELINE}",
    } | {f"accuracy_by_template_{p}" for p in ("pimoe", LORA_PIPELINE)}
    assert result["train_examples_tool_call_lora"] == SETTINGS.problems + SETTINGS.composed
    assert result["train_steps_tool_call_lora"] == math.ceil(
        TINY.epochs * (SETTINGS.problems + SETTINGS.composed) / TINY.batch_size
    )
    assert result["train_cpu_ratio_tool_call_lora"] == round(
        result["train_cpu_seconds_tool_call_lora"] / result["train_cpu_seconds_pimoe"], 3
    )
    assert result["source_tool_call_lora"] == "trained"
    trained = json.loads(json.dumps(result["config"]["tool_lora"]))  # tuples as lists
    assert trained == result["settings_tool_call_lora"]
    without = run(cfg, progress=False, pipelines=["tool_call"])
    assert f"accuracy_{LORA_PIPELINE}" not in without and "accuracy_tool_call" in without
    assert "train_cpu_seconds_tool_call_lora" not in without
    chain, report = train_chain(*tiny_lm(), "tiny", SETTINGS, progress=False)
    with pytest.raises(ValueError, match="tuned model"):
        evaluate(chain, cfg, report, False, None, [LORA_PIPELINE])
