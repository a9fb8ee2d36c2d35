import json
import re

import optuna
import pytest
from typer.testing import CliRunner

from pimoe.cli import app
from pimoe.compress.optimizer import ArchitectureOptimizer
from pimoe.compress.saved import config_from_dict, read_config_file
from pimoe.moe.model import PiMoELM
from pimoe.search.report import (
    choose,
    describe,
    front_table,
    load_compression,
    load_config,
    plot_front,
    save_choice,
    save_compress_config,
    to_architecture_config,
)
from pimoe.search.space import Compression, SearchSpace


def _front(space) -> tuple[optuna.Study, list]:
    study = optuna.create_study(directions=["minimize"] * 3)
    distributions = {
        k: optuna.distributions.CategoricalDistribution(v) for k, v in space.choices().items()
    }
    params = {k: v[0] for k, v in space.choices().items()}
    for values in ([1.0, 10.0, 900.0], [2.0, 2.0, 500.0], [3.0, 1.0, 100.0], [3.5, 5.0, 950.0]):
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, values=values)
        )
    return study, study.best_trials


def test_choose_front_member_within_limits(tiny_space) -> None:
    _study, front = _front(tiny_space)
    assert sorted(t.values[0] for t in front) == [1.0, 2.0, 3.0]  # the 4th is dominated
    assert choose(front).values == [2.0, 2.0, 500.0]  # closest to the ideal point
    assert choose(front, max_bytes=200).values[0] == 3.0
    with pytest.raises(ValueError, match="no front trial"):
        choose(front, max_latency_ms=0.5)
    with pytest.raises(ValueError, match="empty"):
        choose([])
    assert front_table(front, tiny_space).row_count == 3


def test_describe_shows_the_clamped_candidate() -> None:
    space = SearchSpace()
    params = dict(
        n_layer=1,
        d_model=32,
        num_experts=4,
        top_k=2,
        ffn_dim=64,
        shared_experts=0,
        moe_every=2,
        bits=8,
        sparsity=0.3,
        low_rank_ratio=1.0,
    )
    # moe_every 2 > n_layer 1 is clamped: the one block is a PiMoE block
    assert describe(params, space) == "L1 d32 E4k2 f64 s0 m1 | int8 p0.3 r1"
    assert describe({**params, "n_layer": 2}, space) == "L2 d32 E4k2 f64 s0 m2 | int8 p0.3 r1"


def test_saved_choice_round_trips(tmp_path, tiny_space) -> None:
    study, front = _front(tiny_space)
    path = tmp_path / "chosen.json"
    record = save_choice(path, front[0], tiny_space, study, task="digits")
    config = load_config(path)
    assert config == tiny_space.candidate(front[0].params).model
    assert PiMoELM(config).num_params() > 0
    compression = load_compression(path)
    assert compression == Compression(**record["compression"])
    ArchitectureOptimizer(
        to_architecture_config(Compression(bits=8, sparsity=0.3, low_rank_ratio=0.5))
    )
    assert not save_compress_config(tmp_path / "none.json", Compression())  # nothing to compress
    assert not (tmp_path / "none.json").exists()
    assert save_compress_config(tmp_path / "c.json", Compression(bits=4, sparsity=0.3))
    arch = config_from_dict(
        read_config_file(tmp_path / "c.json")
    )  # what `pimoe compress --config` does
    assert arch.enabled_steps() == ["prune", "quantize"] and arch.quantization_bits == 4
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path)
    path.write_bytes(b"\xff\xfe{}")  # not UTF-8: the message still names the file
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        load_config(path)
    path.write_text("[" * 100_000 + "]" * 100_000)  # nested too deeply
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        load_config(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a pimoe search choice"):
        load_config(path)
    path.write_text(json.dumps({**record, "model": {**record["model"], "top_k": 99}}))
    with pytest.raises(ValueError, match="invalid model configuration"):
        load_config(path)
    huge = {**record["model"], "n_layer": 10**9}  # a crafted or careless file: no allocation
    path.write_text(json.dumps({**record, "model": huge}))
    with pytest.raises(ValueError, match="parameters, more than"):
        load_config(path)
    path.write_text(json.dumps({**record, "model": {**record["model"], "block_size": True}}))
    with pytest.raises(ValueError, match="block_size must be an int"):
        load_config(path)


def test_plot_writes_png(tmp_path, tiny_space) -> None:
    study, _ = _front(tiny_space)
    plot_front({"tpe": study.trials}, tmp_path / "front.png", title="t")
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_search_resumes_and_saves(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 's.db'}"
    args = [
        "search",
        "--task",
        "digits",
        "--trials",
        "2",
        "--budget-minutes",
        "5",
        "--storage",
        db,
        "--steps",
        "3",
        "--no-prune",
        "--out",
        str(tmp_path),
        "--json",
        str(tmp_path / "r.json"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["trials_complete"] == 2 and report["front"] and "chosen" in report
    assert load_config(tmp_path / "chosen_config.json").d_model in (32, 64)
    assert (tmp_path / "pareto.png").exists()
    assert "nothing left to do" not in _text(result.output)
    again = CliRunner().invoke(app, args)  # the stored study already has its 2 trials
    assert again.exit_code == 0 and "nothing left to do" in _text(again.output)
    assert json.loads((tmp_path / "r.json").read_text())["trials_complete"] == 2
    bad = CliRunner().invoke(app, [*args[:8], "sqlite:////no/such/dir/s.db", "--steps", "3"])
    assert bad.exit_code != 0 and "cannot open Optuna storage" in _text(bad.output)
    zero = CliRunner().invoke(app, ["search", "--task", "digits", "--trials", "0"])
    assert zero.exit_code != 0 and "trials must be >= 1" in _text(zero.output)


def _text(output: str) -> str:
    """Rich's error box without its borders and line breaks."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)
