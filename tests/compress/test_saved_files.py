"""Compressed folders are self-contained (no source model needed) and refuse damaged files."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pimoe.cli import app as cli_app
from pimoe.compress import ArchitectureConfig, ArchitectureOptimizer, LowRankConfig, compress_
from pimoe.compress.saved import load_compressed, load_source, read_recipe, save_compressed
from pimoe.infer.demo_model import save_demo_model
from pimoe.infer.served import ServedModel
from pimoe.io import read_safetensors_header

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saved")
    save_demo_model(root / "lm.safetensors", steps=0)
    source = load_source(root / "lm.safetensors", examples=2)
    config = ArchitectureConfig(enable_pruning=False, enable_low_rank=True, compression_ratio=0.5)
    model = ArchitectureOptimizer(config).compress(source.model)
    return save_compressed(root / "out", model, source)


@pytest.fixture
def folder(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(saved, copy)
    return copy


def _x() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_loads_without_its_source_after_moving(tmp_path: Path) -> None:
    lm = tmp_path / "src" / "lm.safetensors"
    save_demo_model(lm, steps=0)
    source = load_source(lm, examples=2)
    report = compress_(
        source.model, [LowRankConfig(energy=0.9), *ArchitectureConfig().to_configs()[1:]]
    )
    assert "factorized" in report.steps[1].note and report.steps[2].name == "int8_dynamic"
    save_compressed(tmp_path / "out", source.model, source)
    shutil.rmtree(tmp_path / "src")  # the source is gone ...
    shutil.move(tmp_path / "out", tmp_path / "moved")  # ... and the folder moved
    loaded = load_compressed(tmp_path / "moved")
    with torch.inference_mode():
        assert torch.equal(loaded(_x()).logits, source.model(_x()).logits)
    names = [type(m).__name__ for m in loaded.modules()]
    assert (
        "LowRankLinear" in names
        and "FullRangeDynamicLinear" in names
        and "Int8StackedExperts" in names
    )


def test_the_folder_lists_sizes_and_hashes(folder: Path) -> None:
    recipe = read_recipe(folder)
    entry = recipe["files"]["model.safetensors"]
    assert (
        entry["bytes"] == (folder / "model.safetensors").stat().st_size
        and len(entry["sha256"]) == 64
    )
    assert [step["config"]["type"] for step in recipe["recipe"]][:2] == [
        "LowRankConfig",
        "Int8DynamicConfig",
    ]
    assert recipe["recipe"][0]["decisions"]["ranks"]  # weight-dependent choices are recorded
    metadata, tensors = read_safetensors_header(folder / "model.safetensors")
    assert "pimoe.state" in metadata and any(dtype == "I8" for dtype, _ in tensors.values())
    assert not (folder / "model.pt").exists()


def test_every_flipped_byte_is_detected(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    rng = random.Random(0)
    for at in [rng.randrange(len(data)) for _ in range(40)]:  # before: 24 of 40 loaded silently
        damaged = bytearray(data)
        damaged[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        with pytest.raises(
            ValueError, match=r"model\.safetensors: (SHA-256 differs|not a safetensors|tensor)"
        ):
            load_compressed(folder)
    path.write_bytes(data)
    load_compressed(folder)


def _rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: same file size
    path.write_bytes(data[:8] + raw[:n] + data[8 + n :])


def test_a_tampered_header_is_detected(folder: Path) -> None:
    def retype(header: dict) -> None:
        name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "I8")
        header[name]["dtype"] = "U8"

    _rewrite_header(folder / "model.safetensors", retype)
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 differs"):
        load_compressed(folder)


def test_a_truncated_or_missing_file_is_named(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=r"model\.safetensors: \d+ bytes, recipe\.json records \d+ \(truncated"
    ):
        load_compressed(folder)
    path.unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors: missing"):
        load_compressed(folder)


def test_saving_a_nan_model_is_refused(saved: Path, tmp_path: Path) -> None:
    model = load_compressed(saved)
    with torch.no_grad():
        model.tok_emb.weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match="tok_emb.weight holds NaN or infinite"):
        save_compressed(tmp_path / "nan", model)
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def _set(folder: Path, key: str, value) -> None:
    recipe = json.loads((folder / "recipe.json").read_text())
    if value is None:
        del recipe[key]
    else:
        recipe[key] = value
    (folder / "recipe.json").write_text(json.dumps(recipe))


def _config(folder: Path, **fields) -> None:
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe["recipe"][0]["config"].update(fields)
    (folder / "recipe.json").write_text(json.dumps(recipe))


def _huge_vocab(folder: Path) -> None:
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe["base"]["config"]["vocab_size"] = 10**12
    (folder / "recipe.json").write_text(json.dumps(recipe))


BAD = {  # how a folder is broken -> what the ValueError says
    "recipe not json": (lambda f: (f / "recipe.json").write_text("{"), "no readable recipe.json"),
    "recipe nested too deeply": (
        lambda f: (f / "recipe.json").write_text("[" * 100_000 + "]" * 100_000),
        "no readable recipe.json",
    ),
    "old format": (
        lambda f: _set(f, "format", "pimoe-compressed/1"),
        "not a pimoe-compressed/2 recipe",
    ),
    "kind unknown": (lambda f: _set(f, "kind", "onnx"), r"invalid or missing \['kind'\]"),
    "no files": (lambda f: _set(f, "files", None), r"invalid or missing \['files'"),
    "unknown config": (
        lambda f: _config(f, type="Int3Config"),
        "unknown compression config type 'Int3Config'",
    ),
    "bad config value": (
        lambda f: _config(f, ratio=1.0),
        r"recipe\.json: low-rank ratio must be in \(0, 1\)",
    ),
    "path escape": (
        lambda f: _set(f, "files", {"../x": {"bytes": 1}, "model.safetensors": {}}),
        "invalid entry",
    ),
    "base of 10**12 words": (_huge_vocab, "declares a base model of"),
    "weights missing": (
        lambda f: (f / "model.safetensors").unlink(),
        r"model\.safetensors: missing",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_raise_value_errors_and_serve_exits_2_with_one_line(
    folder: Path, case: str, monkeypatch
) -> None:
    damage, message = BAD[case]
    damage(folder)
    with pytest.raises(ValueError, match=message):
        load_compressed(folder)
    with pytest.raises(ValueError, match=message):
        ServedModel.from_file(folder)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: pytest.fail("must not serve"))
    result = runner.invoke(cli_app, ["serve", str(folder)])
    assert result.exit_code == 2 and result.output.startswith("pimoe serve: ")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output


def _bomb(lm: Path, path: Path, vocab_size: int) -> None:
    """``lm`` with ``vocab_size`` changed in its safetensors metadata (the tensors are unchanged)."""
    data = lm.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    config = json.loads(header["__metadata__"]["pimoe.LMConfig"])
    config["vocab_size"] = vocab_size
    header["__metadata__"]["pimoe.LMConfig"] = json.dumps(config)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize("vocab_size", [10**7, 10**12])
def test_a_memory_bomb_model_is_refused_before_allocating(
    saved: Path, tmp_path: Path, vocab_size: int, monkeypatch
) -> None:
    bomb = tmp_path / "bomb.safetensors"
    _bomb(saved.parent / "lm.safetensors", bomb, vocab_size)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: pytest.fail("must not serve"))
    result = runner.invoke(cli_app, ["serve", str(bomb)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "bomb.safetensors" in result.output and "shape" in result.output
    result = runner.invoke(cli_app, ["compress", str(bomb), str(tmp_path / "out"), "--bits", "8"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("pimoe compress: ") and "bomb.safetensors" in result.output
