"""Compressed-model folders: the content hash catches changed bytes and NaN weights; every bad
file is a ValueError naming it; `pimoe serve` and `pimoe compress` print one line and exit 2."""

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pimoe.cli import app as cli_app
from pimoe.compress.optimizer import ArchitectureOptimizer
from pimoe.compress.saved import (
    config_from_dict,
    load_compressed,
    load_source,
    save_compressed,
    state_digest,
)
from pimoe.infer.demo_model import save_demo_model
from pimoe.infer.served import ServedModel

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saved")
    save_demo_model(root / "lm.safetensors", steps=0)
    source = load_source(root / "lm.safetensors", examples=2)
    config = config_from_dict({"enable_pruning": False, "enable_quantization": True, "quantization_bits": 8,
                               "enable_knowledge_distillation": False})
    model = ArchitectureOptimizer(config).compress(source.model)
    return save_compressed(root / "out", model, source, config)


@pytest.fixture
def folder(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(saved, copy)
    return copy


def _emb(folder: Path) -> torch.Tensor:
    return torch.load(folder / "model.pt", weights_only=True)["tok_emb.weight"]


def test_the_hash_is_stored_and_checked(folder: Path) -> None:
    recipe = json.loads((folder / "recipe.json").read_text())
    state = torch.load(folder / "model.pt", weights_only=True)
    assert recipe["sha256"] == state_digest(state) and len(recipe["sha256"]) == 64
    assert any(isinstance(v, tuple) for v in state.values())  # packed int8 parameters are hashed too
    model = load_compressed(folder)
    assert torch.equal(model.tok_emb.weight, _emb(folder))


def test_a_flipped_byte_is_detected(saved: Path, folder: Path) -> None:
    data = bytearray((folder / "model.pt").read_bytes())
    at = data.find(_emb(folder)[3].numpy().tobytes())
    assert at > 0
    data[at + 1] ^= 0x10
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.pt: content hash .* does not match"):
        load_compressed(folder)  # before: loaded the changed weight silently
    changed = load_compressed(folder, verify=False).tok_emb.weight  # verify=False: loads, unchecked
    assert (changed != load_compressed(saved).tok_emb.weight).sum() == 1


def test_a_nan_weight_is_detected_even_with_a_matching_hash(folder: Path) -> None:
    state = torch.load(folder / "model.pt", weights_only=True)
    state["tok_emb.weight"][0, 0] = float("nan")
    torch.save(state, folder / "model.pt")
    with pytest.raises(ValueError, match="content hash"):
        load_compressed(folder)
    recipe = json.loads((folder / "recipe.json").read_text())
    (folder / "recipe.json").write_text(json.dumps({**recipe, "sha256": state_digest(state)}))
    with pytest.raises(ValueError, match=r"model\.pt: tok_emb\.weight holds NaN"):
        load_compressed(folder)


def test_saving_a_nan_model_is_refused(saved: Path, tmp_path: Path) -> None:
    model = load_compressed(saved)
    with torch.no_grad():
        model.tok_emb.weight[1, 1] = float("inf")
    source = load_source(json.loads((saved / "recipe.json").read_text())["source"], examples=1)
    with pytest.raises(ValueError, match="tok_emb.weight holds NaN or infinite"):
        save_compressed(tmp_path / "nan", model, source, config_from_dict({}))
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_an_old_recipe_without_hash_loads_with_a_warning(folder: Path, caplog) -> None:
    recipe = json.loads((folder / "recipe.json").read_text())
    del recipe["sha256"]
    (folder / "recipe.json").write_text(json.dumps(recipe))
    with caplog.at_level(logging.WARNING, logger="pimoe.compress.saved"):
        load_compressed(folder)
    assert "no sha256" in caplog.text


def _set(folder: Path, name: str, value) -> None:
    recipe = json.loads((folder / "recipe.json").read_text())
    if value is None:
        del recipe[name]
    else:
        recipe[name] = value
    (folder / "recipe.json").write_text(json.dumps(recipe))


def _declare_huge_storage(folder: Path) -> None:
    """``model.pt`` whose pickle declares 10**10 elements for a stored tensor's storage."""
    import io
    import zipfile

    with zipfile.ZipFile(folder / "model.pt") as z:
        files = {name: z.read(name) for name in z.namelist()}
    pkl = next(name for name in files if name.endswith("data.pkl"))
    numel = _emb(folder).numel()
    assert numel < 2**31
    marker = b"J" + struct.pack("<i", numel) if numel >= 2**16 else b"M" + struct.pack("<H", numel)
    assert marker in files[pkl]
    files[pkl] = files[pkl].replace(marker, b"\x8a\x05" + (10**10).to_bytes(5, "little"), 1)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    (folder / "model.pt").write_bytes(out.getvalue())


BAD = {  # how a folder is broken -> what the ValueError says (before: UnpicklingError, KeyError, TypeError, ...)
    "model.pt garbage": (lambda f: (f / "model.pt").write_bytes(b"\x80\x02not a torch file"), "model.pt: not a readable"),
    "model.pt truncated": (lambda f: (f / "model.pt").write_bytes((f / "model.pt").read_bytes()[:3000]), "model.pt: not a readable"),
    "model.pt missing": (lambda f: (f / "model.pt").unlink(), "model.pt: not a readable"),
    "model.pt not a dict": (lambda f: torch.save(torch.ones(2), f / "model.pt"), "not a state dict"),
    "model.pt a pickle": (lambda f: (f / "model.pt").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x01x\x94."),
                          "model.pt: not a readable"),
    "model.pt declares 10**10 elements": (_declare_huge_storage, "model.pt: not a readable.*does not match expected size"),
    "no config": (lambda f: _set(f, "config", None), r"recipe\.json: invalid or missing \['config'\]"),
    "config a list": (lambda f: _set(f, "config", [1, 2]), r"invalid or missing \['config'\]"),
    "config bad value": (lambda f: _set(f, "config", {"sparsity_ratio": "half"}), r"recipe\.json: invalid config"),
    "no source": (lambda f: _set(f, "source", None), r"invalid or missing \['source'\]"),
    "kind unknown": (lambda f: _set(f, "kind", "onnx"), r"invalid or missing \['kind'\]"),
    "source gone": (lambda f: _set(f, "source", str(f / "gone.safetensors")), "source model .* is gone"),
    "recipe not json": (lambda f: (f / "recipe.json").write_text("{"), "no readable recipe.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_raise_value_errors_and_serve_exits_2_with_one_line(folder: Path, case: str, monkeypatch) -> None:
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
    header = json.loads(data[8:8 + n])
    config = json.loads(header["__metadata__"]["pimoe.LMConfig"])
    config["vocab_size"] = vocab_size
    header["__metadata__"]["pimoe.LMConfig"] = json.dumps(config)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("vocab_size", [10**7, 10**12])
def test_a_memory_bomb_model_is_refused_before_allocating(saved: Path, tmp_path: Path, vocab_size: int, monkeypatch) -> None:
    bomb = tmp_path / "bomb.safetensors"
    _bomb(saved.parent / "lm.safetensors", bomb, vocab_size)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: pytest.fail("must not serve"))
    result = runner.invoke(cli_app, ["serve", str(bomb)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "bomb.safetensors" in result.output and "shape" in result.output
    result = runner.invoke(cli_app, ["compress", str(bomb), str(tmp_path / "out"), "--bits", "8"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("pimoe compress: ") and "bomb.safetensors" in result.output
