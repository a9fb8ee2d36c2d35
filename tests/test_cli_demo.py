import json

import pytest
import torch
from typer.testing import CliRunner

from pimoe.cli import app
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import PiMoELM


def test_demo_command_trains_compares_and_saves(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "--scratch", "--steps", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "dense" in result.output and "Routing" in result.output
    assert (
        "aux is the load-balancing loss" in result.output
        and "4 means perfectly even routing" in result.output
    )
    assert (
        "train PiMoE LM: done, 4 in " in result.output
    )  # plain progress lines when not on a terminal
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 4
    assert (
        results["moe"]["active_params"] - results["dense"]["active_params"] == 4 * 128 * 8
    )  # router gates
    assert 0 < results["moe"]["val_loss"] < 6.0 and 0 < results["dense"]["val_loss"] < 6.0
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = PiMoELM.load(tmp_path / "model.safetensors")
    assert len(model.moe_layers) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_demo_rejects_cuda_without_gpu() -> None:
    for args in (["--scratch", "--steps", "1"], []):  # both demos
        result = CliRunner().invoke(app, ["demo", "--device", "cuda", *args])
        assert result.exit_code != 0 and "CUDA" in result.output


def test_demo_trains_a_config_chosen_by_search(tmp_path) -> None:
    from dataclasses import asdict

    from pimoe.moe.model import LMConfig
    from pimoe.search.report import CHOICE_FORMAT

    chosen = LMConfig(
        block_size=32,
        n_layer=1,
        n_head=2,
        d_model=32,
        moe=MoEConfig(num_experts=4, top_k=1, ffn_dim=32),
    )
    path = tmp_path / "chosen_config.json"
    path.write_text(json.dumps({"format": CHOICE_FORMAT, "task": "lm", "model": asdict(chosen)}))
    result = CliRunner().invoke(
        app, ["demo", "--steps", "2", "--config", str(path), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"] == asdict(chosen)

    path.write_text(
        json.dumps(
            {"format": CHOICE_FORMAT, "task": "digits", "model": asdict(LMConfig(vocab_size=17))}
        )
    )
    result = CliRunner().invoke(app, ["demo", "--steps", "2", "--config", str(path)])
    assert result.exit_code != 0 and "byte-level" in result.output


def test_demo_refuses_a_config_without_an_moe_layer(tmp_path) -> None:
    from dataclasses import asdict

    from pimoe.moe.model import LMConfig
    from pimoe.search.report import CHOICE_FORMAT

    dense = LMConfig(
        block_size=32,
        n_layer=1,
        n_head=2,
        d_model=32,
        moe_every=2,
        moe=MoEConfig(num_experts=4, top_k=1, ffn_dim=32),
    )
    path = tmp_path / "chosen_config.json"
    path.write_text(json.dumps({"format": CHOICE_FORMAT, "task": "lm", "model": asdict(dense)}))
    result = CliRunner().invoke(app, ["demo", "--steps", "2", "--config", str(path)])
    assert result.exit_code == 2 and "no MoE layer" in result.output
    assert "moe_every=2" in result.output
