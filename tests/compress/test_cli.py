"""`pimoe compress` on a small saved PiMoELM: files written, the saved model loads back, bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from pimoe.compress.cli import compress
from pimoe.compress.saved import load_compressed, load_source
from pimoe.infer.demo_model import save_demo_model

app = typer.Typer()
app.command()(compress)
runner = CliRunner()


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm") / "lm.safetensors"
    save_demo_model(path, steps=0)
    return path


def test_compress_writes_a_model_that_loads_back(lm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = tmp_path / "cfg.toml"
    config.write_text(
        "enable_pruning = true\nsparsity_ratio = 0.3\nenable_quantization = false\n"
        "enable_expert_drop = true\nexpert_drop_ratio = 0.5\n"
    )
    result = runner.invoke(
        app, [str(lm_path), str(out), "--config", str(config), "--bits", "8", "--repeats", "1"]
    )
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "recipe.json", "report.md", "report.json", "report.png"):
        assert (out / name).stat().st_size > 0
    steps = json.loads((out / "report.json").read_text())["steps"]
    names = [
        "before",
        "expert_drop",
        "magnitude_prune",
        "int8_dynamic",
        "int8_experts",
        "embeddings",
    ]
    assert [s["name"] for s in steps] == names
    assert "4 -> 2 experts" in steps[1]["note"] and "8-bit activations" in steps[3]["note"]
    assert steps[-1]["bytes_torch_save"] < 0.4 * steps[0]["bytes_torch_save"]
    assert (
        steps[4]["note"] == "int8 weight-only experts: blocks.0.ffn.experts, blocks.1.ffn.experts"
    )
    # embeddings (tok_emb is tied to the LM head) and router gates stay float, and the report says so
    assert "tok_emb (Embedding)" in steps[-1]["left_in_float"]
    assert "`blocks.0.ffn.router.gate (Linear)`" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    loaded = load_compressed(out)
    source = load_source(lm_path, examples=4)
    x = source.example_inputs[0]
    with torch.inference_mode():
        again = load_compressed(out)(x).logits
        assert torch.equal(loaded(x).logits, again)
        cos = torch.nn.functional.cosine_similarity(
            again.flatten(1), source.model(x).logits.flatten(1)
        )
    assert float(cos.mean()) > 0.9


@pytest.mark.slow
def test_minilm_gets_the_best_8_bit_recipe_and_serves_from_its_folder(tmp_path: Path) -> None:
    from pimoe.data.minilm import load_minilm, minilm_path
    from pimoe.infer.encoder import ServedEncoder

    out = tmp_path / "minilm"
    result = runner.invoke(app, [str(minilm_path()), str(out), "--bits", "8", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    steps = json.loads((out / "report.json").read_text())["steps"]
    assert [s["name"] for s in steps] == ["before", "int8_dynamic", "int8_experts", "embeddings"]
    assert "8-bit activations" in steps[1]["note"] and "int4 embeddings" in steps[3]["note"]
    assert steps[-1]["bytes_torch_save"] < 0.22 * steps[0]["bytes_torch_save"]  # measured 0.214
    assert steps[-1]["fidelity"] > 0.985  # measured 0.991 on these 32 held-out sentences
    shutil.move(out, tmp_path / "moved")  # the tokenizer travels inside the folder
    served = ServedEncoder.from_compressed(tmp_path / "moved")
    minilm = load_minilm()
    ids = served.encode_text("a sentence to embed")[None]
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(
            served(ids), minilm.encoder(ids, torch.ones_like(ids))
        )
    assert float(cos) > 0.98


def test_bad_input(lm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    result = runner.invoke(app, [str(lm_path), str(out), "--bits", "6"])
    assert result.exit_code != 0 and "quantization_bits" in result.output
    result = runner.invoke(app, [str(lm_path), str(out)])
    assert result.exit_code != 0 and "no step enabled" in result.output
    bad_cfg = tmp_path / "cfg.json"
    bad_cfg.write_text('{"sparsity": 0.5}')
    result = runner.invoke(app, [str(lm_path), str(out), "--config", str(bad_cfg)])
    assert result.exit_code != 0 and "unknown config field" in result.output
    bad_cfg.write_text("[" * 100_000 + "]" * 100_000)  # nested too deeply
    result = runner.invoke(app, [str(lm_path), str(out), "--config", str(bad_cfg)])
    assert result.exit_code == 2 and "cfg.json: not a valid config file" in result.output
    result = runner.invoke(app, [str(lm_path), str(out), "--sparsity", "1.5"])
    assert result.exit_code != 0 and "sparsity_ratio" in result.output
    assert not out.exists()
    assert (
        result.exit_code == 2
        and result.output.startswith("pimoe compress: ")
        and result.output.count("\n") == 1
    )


def test_tampered_model_file_is_refused(lm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        runner.invoke(app, [str(lm_path), str(out), "--bits", "8", "--repeats", "1"]).exit_code == 0
    )
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: 1000 bytes, recipe\.json records"):
        load_compressed(out)
    (out / "recipe.json").write_text("{}")
    with pytest.raises(ValueError, match="recipe"):
        load_compressed(out)
