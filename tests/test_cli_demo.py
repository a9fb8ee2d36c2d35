import json

import pytest
import torch

from typer.testing import CliRunner

from pimoe.cli import app
from pimoe.moe.model import PiMoELM


def test_demo_command_trains_compares_and_saves(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "--steps", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "dense" in result.output and "Routing" in result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 4
    assert results["moe"]["active_params"] - results["dense"]["active_params"] == 4 * 128 * 8  # router gates
    assert 0 < results["moe"]["val_loss"] < 6.0 and 0 < results["dense"]["val_loss"] < 6.0
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = PiMoELM.load(tmp_path / "model.safetensors")
    assert len(model.moe_layers) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_demo_rejects_cuda_without_gpu() -> None:
    result = CliRunner().invoke(app, ["demo", "--device", "cuda", "--steps", "1"])
    assert result.exit_code != 0 and "CUDA" in result.output
