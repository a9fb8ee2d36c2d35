from pimoe.bench.search import SearchBenchConfig, run


def test_benchmark_reports_the_issue_keys(tmp_path, tiny_space) -> None:
    cfg = SearchBenchConfig(
        tasks=["digits"], trials=3, seeds=1, steps=4, latency_repeats=1, space=tiny_space
    )
    result = run(cfg, plot_prefix=tmp_path / "bench", progress=False)
    for key in ("hypervolume_search", "hypervolume_random", "predictor_spearman"):
        assert key in result
    # both fronts are scored in the same normalized box, reference point 1.1 per objective
    assert (
        0.0 < result["hypervolume_search"] <= 1.1**3
        and 0.0 < result["hypervolume_random"] <= 1.1**3
    )
    digits = result["tasks"]["digits"]["predictor"]  # one task: the reported means are its scores
    assert (result["predictor_spearman"], result["predictor_baseline_spearman"]) == (
        digits["spearman"],
        digits["baseline_spearman"],
    )
    assert result["tasks"]["digits"]["predictor"]["n"] == 6  # both studies' trials pooled
    assert (tmp_path / "bench_digits.png").exists()
