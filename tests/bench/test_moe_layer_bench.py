import json

import pytest
from typer.testing import CliRunner

from pimoe.bench.moe_layer import MoEBenchConfig, run
from pimoe.bench.timing import geomean, interleaved_medians
from pimoe.cli import app

pytest.importorskip("transformers")


def test_small_benchmark_reports_ratios_and_agreement_with_hf() -> None:
    result = run(MoEBenchConfig(d_model=32, ffn_dim=64, num_experts=4, tokens=[64, 128], rounds=1, threads=1))
    assert result["max_abs_diff_vs_hf"] < 1e-5  # same weights -> same outputs as the peer
    assert len(result["rows"]) == 4 and {r["mode"] for r in result["rows"]} == {"fwd", "fwd+bwd"}
    for key in ("fwd_ratio_vs_dense", "fwdbwd_ratio_vs_dense", "fwd_ratio_vs_hf"):
        assert result[key] > 0
    json.dumps(result)


def test_interleaved_medians_and_geomean() -> None:
    calls: list[str] = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=0)
    assert calls == ["a", "b"] * 3 and set(medians) == {"a", "b"}
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        interleaved_medians({}, rounds=0)


def test_cli_help_lists_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output and "bench" in result.output
    result = CliRunner().invoke(app, ["bench", "moe", "--help"])
    assert result.exit_code == 0 and "--json" in result.output
