import json

import pytest

from pimoe.bench.privacy import PrivacyBenchConfig, plot, run


def test_privacy_benchmark_small(tmp_path) -> None:
    cfg = PrivacyBenchConfig(
        epsilons=[8.0],
        epochs=2,
        accountant="rdp",
        seeds=1,
        secagg_clients=[4],
        he_clients=3,
        dropout=0.25,
        rounds=1,
    )
    result = run(cfg)
    json.dumps(result)
    (dp,) = result["dp"]
    assert 6.0 < dp["epsilon_spent"] <= 8.05 and dp["noise_multiplier"] > 0
    assert dp["accuracy_mean"] > 0.1 and result["non_private"]["accuracy_mean"] > 0.1
    (sa,) = result["secagg"]
    assert sa["bit_exact"] and sa["dropped"] == 1 and sa["dim"] == 9610
    assert max(sa["max_abs_error"], sa["max_abs_error_with_dropped"]) < 4 * 2.0**-24
    he = result["he"]
    assert he["ciphertexts_per_client"] == 3 and 0 < he["max_abs_error"] < 1e-6
    assert he["bytes_ratio_to_fp32"] > 5  # ciphertexts are much larger than the floats
    plot(result, tmp_path / "privacy.png")
    assert (tmp_path / "privacy.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_privacy_passes_its_options_to_main(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from pimoe.cli import app

    calls: list[dict] = []
    monkeypatch.setattr("pimoe.bench.privacy.main", lambda **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(
        app, ["bench", "privacy", "--quick", "--json", str(tmp_path / "p.json")]
    )
    assert result.exit_code == 0, result.output
    assert calls == [{"quick": True, "json_path": tmp_path / "p.json"}]


def test_dp_models_runs_both_models_under_one_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from pimoe.bench import privacy

    seen: list[tuple[str, str, int, float | None, int]] = []

    def fake_run(cfg: PrivacyBenchConfig, target: float | None, seed: int) -> dict:
        seen.append((cfg.model, cfg.accountant, cfg.epochs, target, seed))
        return {"accuracy": 0.5}

    monkeypatch.setattr(privacy, "dp_run", fake_run)
    result = privacy.dp_models(epsilon_target=3.0, epochs=4, seed=2)
    assert seen == [("mlp", "rdp", 4, 3.0, 2), ("moe", "rdp", 4, 3.0, 2)]
    assert set(result["runs"]) == {"mlp", "moe"} and result["config"]["epochs"] == 4
    assert len(result["load_average_before"]) == 3 and result["process_cpu_seconds"] >= 0
    json.dumps(result)
