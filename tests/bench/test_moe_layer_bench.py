import json

import pytest
from typer.testing import CliRunner

from pimoe.bench import moe_layer
from pimoe.bench.moe_layer import MoEBenchConfig, run
from pimoe.bench.timing import geomean, interleaved_medians
from pimoe.cli import app

pytest.importorskip("transformers")


def test_small_benchmark_reports_ratios_and_agreement_with_hf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(
        moe_layer.SHAPES, "E8 k2 f1024", (4, 2, 64)
    )  # tiny stand-ins for the two shapes
    monkeypatch.setitem(moe_layer.SHAPES, "E64 k8 f256", (16, 4, 32))
    result = run(MoEBenchConfig(d_model=32, tokens=[64, 512], rounds=1, threads=1))
    assert result["max_abs_diff_vs_hf"] < 1e-5  # same weights -> same outputs as both HF backends
    rows = result["rows"]
    assert len(rows) == 8 and {(r["shape"], r["mode"]) for r in rows} == {
        (s, m) for s in moe_layer.SHAPES for m in ("fwd", "fwd+bwd")
    }
    assert set(result["pimoe_vs_dense_512"]) == {
        f"{s} {m}" for s in moe_layer.SHAPES for m in ("fwd", "fwd+bwd")
    }
    for r in rows:  # pimoe / best HF is measured against the faster of the two HF backends
        best = min(r["hf_eager_vs_dense"], r["hf_grouped_mm_vs_dense"])
        assert r["pimoe_vs_best_hf"] == pytest.approx(r["pimoe_vs_dense"] / best)
    assert result["worst_pimoe_vs_best_hf"] == max(r["pimoe_vs_best_hf"] for r in rows)
    if result["threaded_experts_kernel"]:  # packed weights: forward rows only, same outputs
        assert result["max_abs_diff_packed"] < 1e-5
        assert set(result["pimoe_packed_vs_dense_512"]) == set(moe_layer.SHAPES)
        for r in rows:
            packed, dense_packed = r["pimoe_packed_vs_dense"], r["dense_packed_vs_dense"]
            if r["mode"] == "fwd+bwd":
                assert packed is None and r["pimoe_packed_vs_dense_packed"] is None
            else:
                assert r["pimoe_packed_vs_dense_packed"] == pytest.approx(packed / dense_packed)
    for r in rows:  # the weight-streaming floor: every expert weight of the shape, timed
        experts, _, width = moe_layer.SHAPES[r["shape"]]
        assert r["expert_weight_mb"] == pytest.approx(experts * 3 * width * 32 * 4 / 1e6)
        assert r["weight_stream_ms"] > 0
        assert r["floor_vs_dense"] == pytest.approx(1 + r["weight_stream_ms"] / r["dense_ms"])
    assert result["load_start"] >= 0 and result["geomean_pimoe_vs_best_hf"] == pytest.approx(
        geomean([r["pimoe_vs_best_hf"] for r in rows])
    )
    json.dumps(result)
    big = run(
        MoEBenchConfig(
            d_model=32,
            shapes=["E8 k2 f1024"],
            tokens=[64, 96],
            rounds=1,
            threads=1,
            eager_max_tokens=64,
        )
    )
    skipped = [r for r in big["rows"] if r["tokens"] == 96 and r["mode"] == "fwd+bwd"]
    assert len(skipped) == 1 and all(r["hf_eager_vs_dense"] is None for r in skipped)
    for r in skipped:  # only grouped_mm is timed there, so the best HF backend is grouped_mm
        assert r["pimoe_vs_best_hf"] == pytest.approx(
            r["pimoe_vs_dense"] / r["hf_grouped_mm_vs_dense"]
        )
    assert all(r["hf_eager_vs_dense"] is not None for r in big["rows"] if r not in skipped)
    with pytest.raises(ValueError, match="unknown shapes"):
        run(MoEBenchConfig(shapes=["E3"]))


def test_interleaved_medians_and_geomean() -> None:
    calls: list[str] = []
    medians = interleaved_medians(
        {key: (lambda key=key: calls.append(key)) for key in "abc"}, rounds=4, warmup=0
    )
    assert "".join(calls) == "abc" + "bca" + "cab" + "abc"  # each round starts one further
    assert set(medians) == {"a", "b", "c"}
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        interleaved_medians({}, rounds=0)


def test_cli_bench_moe_passes_its_options_to_main(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []
    monkeypatch.setattr("pimoe.bench.moe_layer.main", lambda **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(
        app, ["bench", "moe", "--quick", "--json", str(tmp_path / "r.json"), "--rounds", "2"]
    )
    assert result.exit_code == 0, result.output
    assert calls == [{"quick": True, "json_path": tmp_path / "r.json", "rounds": 2, "threads": 2}]
