"""Two models served by one app: the shared cache keeps their outputs apart, and /healthz lists
every model, the generation ones included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).parent))

from live_server import LiveServer
from tiny_lm import save_tiny_llama

from pimoe.infer.lm_models import GenerationModel, open_generation_model
from pimoe.infer.server import ServedModel, create_app


def _linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def test_cached_outputs_do_not_cross_models() -> None:
    a, b = _linear(0), _linear(1)
    x = [[1.0, 2.0, 3.0, 4.0]]
    app = create_app(
        {"a": ServedModel.tensor(a, (4,)), "b": ServedModel.tensor(b, (4,))}, cache_size=16
    )
    with LiveServer(app) as client:
        first = [
            client.post("/v1/infer", json={"model": m, "inputs": x}).json() for m in ("a", "b")
        ]
        again = [
            client.post("/v1/infer", json={"model": m, "inputs": x}).json() for m in ("a", "b")
        ]
    with torch.no_grad():
        expected = [m(torch.tensor(x)).tolist() for m in (a, b)]
    assert expected[0] != expected[1]
    assert [r["cached"] for r in first] == [False, False]  # same input, another model: not a hit
    assert [r["cached"] for r in again] == [True, True]
    for answers in (first, again):
        for r, want in zip(answers, expected):
            assert torch.allclose(torch.tensor(r["outputs"]), torch.tensor(want), atol=1e-6)


def test_healthz_lists_generation_models(tmp_path: Path) -> None:
    llama = open_generation_model(save_tiny_llama(tmp_path / "llama"))
    assert isinstance(llama, GenerationModel)  # a causal LM folder is served for generation
    app = create_app({"clf": ServedModel.tensor(_linear(0), (4,))}, generators={"llama": llama})
    with LiveServer(app) as client:
        health = client.get("/healthz").json()
    assert health == {
        "status": "ok",
        "models": {"clf": "tensor", "llama": "generation"},
        "generation": ["llama"],
    }
