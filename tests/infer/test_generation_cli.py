"""`pimoe serve --model` for language models: generation engines behind the OpenAI routes (uvicorn.run replaced)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")

from typer.testing import CliRunner  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import save_tiny_llama  # noqa: E402

from pimoe.cli import app as cli_app  # noqa: E402
from pimoe.infer.lm_models import HFGenerationModel, PiMoEGenerationModel  # noqa: E402
from pimoe.moe.config import MoEConfig  # noqa: E402
from pimoe.moe.model import LMConfig, PiMoELM  # noqa: E402


def _serve(monkeypatch: pytest.MonkeyPatch, *args: str) -> object:
    calls: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(app))
    result = CliRunner().invoke(cli_app, ["serve", *args])
    assert result.exit_code == 0, result.output
    (app,) = calls
    return app


def test_serve_hf_causal_lm_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _serve(monkeypatch, "--model", str(save_tiny_llama(tmp_path / "llama")))
    engines = app.state.generation  # type: ignore[attr-defined]
    assert list(engines) == ["llama"] and isinstance(engines["llama"].model, HFGenerationModel)
    assert app.state.models == {}  # type: ignore[attr-defined]  # a causal LM is served for generation only
    engines["llama"].close()


def test_serve_pimoe_lm_gets_generation_and_infer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lm.safetensors"
    PiMoELM(
        LMConfig(
            block_size=32,
            n_layer=1,
            n_head=2,
            d_model=16,
            moe=MoEConfig(num_experts=2, top_k=1, ffn_dim=16),
        )
    ).save(path)
    app = _serve(monkeypatch, "--model", str(path))
    assert isinstance(app.state.generation["lm"].model, PiMoEGenerationModel)  # type: ignore[attr-defined]
    assert app.state.models["lm"].kind == "lm"  # type: ignore[attr-defined]
    app.state.generation["lm"].close()  # type: ignore[attr-defined]
    app.state.batchers["lm"].close()  # type: ignore[attr-defined]


def test_serve_unknown_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--model", "no-such-model"])
    assert result.exit_code != 0 and "pretrained name" in result.output
    path = tmp_path / "lm.safetensors"
    PiMoELM(LMConfig(block_size=32, n_layer=1, n_head=2, d_model=16)).save(path)
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(path), "--routers", str(path)])
    assert result.exit_code == 2 and "routers upcycle a Hugging Face causal LM" in result.output


def test_serve_pack_experts(
    threaded_kernel_built: None,
    tiny_pimoe: PiMoEGenerationModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--pack-experts packs the served language model's experts (same logits to float rounding)
    and refuses, naming why, a model without experts to pack."""
    import torch

    from pimoe.moe import PiMoE
    from pimoe.moe.prepack import packed_experts

    path = tmp_path / "lm.safetensors"
    tiny_pimoe.model.save(path)
    app = _serve(monkeypatch, "--model", str(path), "--pack-experts")
    served = app.state.generation["lm"].model.model  # type: ignore[attr-defined]
    layers = [m for m in served.modules() if isinstance(m, PiMoE)]
    assert layers and all(packed_experts(m.experts.w_in, m.experts.w_out) for m in layers)
    ids = torch.tensor([list(b"pack the experts")])
    with torch.inference_mode():
        got = served(ids).logits
        want = PiMoELM.load(path)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    app.state.generation["lm"].close()  # type: ignore[attr-defined]
    app.state.batchers["lm"].close()  # type: ignore[attr-defined]
    llama = save_tiny_llama(tmp_path / "llama")
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(llama), "--pack-experts"])
    assert result.exit_code == 2 and "holds no expert bank" in result.output
