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
    for key, mode, column in (("fwd_ratio_vs_dense", "fwd", "pimoe_vs_dense"), ("fwdbwd_ratio_vs_dense", "fwd+bwd", "pimoe_vs_dense"),
                              ("fwd_ratio_vs_hf", "fwd", "pimoe_vs_hf_eager")):  # geomean over the sizes' rows
        assert result[key] == pytest.approx(geomean([r[column] for r in result["rows"] if r["mode"] == mode]))
    json.dumps(result)


def test_interleaved_medians_and_geomean() -> None:
    calls: list[str] = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=0)
    assert calls == ["a", "b"] * 3 and set(medians) == {"a", "b"}
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        interleaved_medians({}, rounds=0)


def test_cli_bench_moe_passes_its_options_to_main(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr("pimoe.bench.moe_layer.main", lambda **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(app, ["bench", "moe", "--quick", "--json", str(tmp_path / "r.json"), "--rounds", "2"])
    assert result.exit_code == 0, result.output
    assert calls == [{"quick": True, "json_path": tmp_path / "r.json", "rounds": 2, "threads": 2}]
