"""The pretrained-model demo end to end on the tiny GGUF model (conversion, split, routers cache)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pimoe.cli import app
from pimoe.demo_pretrained import (
    PretrainedDemoSettings,
    routers_path,
    run_pretrained_demo,
)

TINY_SETTINGS = PretrainedDemoSettings(
    model="tiny-llama",
    window=32,
    calibration_windows=4,
    heldout_windows=2,
    router_steps=5,
    max_new_tokens=4,
    chain_problems=6,
    chain_steps=5,
    chain_questions=2,
)


@pytest.mark.slow
def test_demo_trains_then_reuses_the_routers(tiny, tmp_path) -> None:
    first = run_pretrained_demo(TINY_SETTINGS, progress=False)
    assert first["routers"] == "trained" and routers_path(TINY_SETTINGS).is_file()
    assert first["params_active"] < first["params_dense"] < first["params_total"]
    assert len(first["routing"]) == 2 and len(first["router_training"]["layers"]) == 2
    assert first["chain"]["source"] == "trained" and len(first["chain"]["rows"]) == 2
    second = run_pretrained_demo(TINY_SETTINGS, progress=False, out_dir=str(tmp_path))
    assert second["routers"] == "cache" and second["chain"]["source"] == "cache"
    assert (
        second["chain"]["rows"] == first["chain"]["rows"]
    )  # the cached chain answers as the trained one
    assert second["ppl_moe"] == first["ppl_moe"] and second["ppl_dense"] == first["ppl_dense"]
    assert json.loads((tmp_path / "results.json").read_text())["routers"] == "cache"


@pytest.mark.slow
def test_demo_with_all_experts_matches_the_dense_model(tiny) -> None:
    from dataclasses import replace

    results = run_pretrained_demo(replace(TINY_SETTINGS, top_k=8), progress=False)
    assert abs(results["ppl_moe"] - results["ppl_dense"]) < 1e-3 * results["ppl_dense"]
    assert results["answers"]["moe"] == results["answers"]["dense"]


@pytest.mark.slow
def test_demo_command_runs_the_pretrained_demo_by_default(tiny, tmp_path, monkeypatch) -> None:
    import pimoe.demo_pretrained as demo

    monkeypatch.setattr(demo, "PretrainedDemoSettings", lambda: TINY_SETTINGS)
    result = CliRunner().invoke(
        app, ["demo", "--model", "tiny-llama", "--top-k", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "Routing on held-out text" in result.output and "MoE 2/8" in result.output
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["top_k"] == 2


@pytest.mark.slow
def test_bench_models_reports_every_contender(tiny, tmp_path) -> None:
    from dataclasses import replace

    from pimoe.bench.models import QUICK, print_report, run

    result = run(
        replace(
            QUICK,
            model="tiny-llama",
            heldout_windows=2,
            window=32,
            prefill_tokens=32,
            decode_tokens=4,
            rounds=1,
            families=False,
        ),
        progress=False,
    )
    assert result["load_first_was_cached"] is False and result["routers"] == "trained"
    for key in ("ppl_dense", "ppl_moe_k4", "ppl_moe_k4_norefit", "ppl_moe_k2"):
        assert 1.0 < result[key] < 1e6
    assert set(result["decode_tokens_per_s"]) == {"dense", "moe_k4", "moe_k2", "moe_k4_packed"}
    # packed expert weights: the same model to float rounding
    assert result["ppl_moe_k4_packed"] == pytest.approx(result["ppl_moe_k4"], rel=1e-4)
    print_report(result)  # every row printable
    assert (
        result["params"]["moe_k2"]["active"]
        < result["params"]["moe_k4"]["active"]
        < result["params"]["dense"]["active"]
    )
