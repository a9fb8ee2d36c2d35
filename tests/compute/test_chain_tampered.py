"""A saved computation chain whose ``chain.json`` or weights were tampered with, cut short or
crafted: ``ComputationChain.load`` answers ``ValueError`` naming the file and the field, before
building anything from the bad values (no huge allocation, no crash deep in torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pimoe.bench.tiny_llama import tiny_byte_llama
from pimoe.compute.llm_chain import CONFIG_FILE, WEIGHTS_FILE, ChainConfig, ComputationChain
from pimoe.compute.llm_router import TokenRouter
from pimoe.compute.operand_head import OperandHead


@pytest.fixture(scope="module")
def lm():
    return tiny_byte_llama()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, lm) -> Path:
    model, tokenizer = lm
    torch.manual_seed(0)
    feature_dim = 2 * int(model.config.hidden_size)
    config = ChainConfig(
        base_model="tiny",
        prefix="",
        layers=(1, 2),
        feature_dim=feature_dim,
        router_hidden=8,
        head_hidden=8,
    )
    folder = tmp_path_factory.mktemp("chain") / "chain"
    ComputationChain(
        model, tokenizer, TokenRouter(feature_dim, 8), OperandHead(feature_dim, 8), config
    ).save(folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "chain"
    shutil.copytree(saved, folder)
    return folder


def _tamper(saved: Path, tmp_path: Path, **fields: object) -> Path:
    folder = _copy(saved, tmp_path)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    raw.update(fields)
    raw = {k: v for k, v in raw.items() if v is not _DROP}
    (folder / CONFIG_FILE).write_text(json.dumps(raw))
    return folder


_DROP = object()


def test_the_untampered_chain_loads(saved: Path, lm) -> None:
    chain = ComputationChain.load(saved, *lm)
    assert chain.config.layers == (1, 2) and chain.config.router_hidden == 8


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"feature_dim": _DROP}, "feature_dim"),
        ({"base_model": _DROP}, "base_model"),
        ({"surprise": 1}, "surprise"),
        ({"feature_dim": "32"}, "feature_dim"),
        ({"feature_dim": 32.0}, "feature_dim"),
        ({"router_hidden": True}, "router_hidden"),
        ({"layers": "12"}, "layers"),
        ({"layers": [1, "2"]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": {"a": 1}}, "layers"),
        ({"threshold": "0.5"}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": 2.0}, "threshold"),
        ({"max_handoffs": -1}, "max_handoffs"),
        ({"engine_max_digits": 10**9}, "engine_max_digits"),
        ({"engine_max_digits": 0}, "engine_max_digits"),
        ({"prefix": None}, "prefix"),
        ({"base_model": ""}, "base_model"),
        ({"base_model": 7}, "base_model"),
        ({"training": [1, 2]}, "training"),
        ({"format": True}, "format"),
        ({"format": 99}, "format"),
    ],
)
def test_a_tampered_field_is_a_value_error_naming_it(
    saved: Path, lm, tmp_path: Path, fields: dict, named: str
) -> None:
    folder = _tamper(saved, tmp_path, **fields)
    with pytest.raises(ValueError, match=named) as err:
        ComputationChain.load(folder, *lm)
    assert CONFIG_FILE in str(err.value)


@pytest.mark.parametrize("field", ["feature_dim", "router_hidden", "head_hidden"])
def test_a_huge_size_is_refused_before_anything_is_allocated(
    saved: Path, lm, tmp_path: Path, field: str
) -> None:
    """Sizes must match the saved weights: before, ``feature_dim = 10**12`` asked torch for a
    multi-terabyte ``Linear`` (a crash or a machine brought to a halt)."""
    folder = _tamper(saved, tmp_path, **{field: 10**12})
    with pytest.raises(ValueError, match=field):
        ComputationChain.load(folder, *lm)


@pytest.mark.parametrize(
    "text", ["", "{", "[1, 2]", '"chain"', "null", '{"a": 1, "a": 2}', "\udcff"]
)
def test_a_config_that_is_not_a_json_object_is_a_value_error(
    saved: Path, lm, tmp_path: Path, text: str
) -> None:
    folder = _copy(saved, tmp_path)
    (folder / CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=CONFIG_FILE):
        ComputationChain.load(folder, *lm)


def test_tampered_weights_are_a_value_error(saved: Path, lm, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(saved, tmp_path)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    cut = dict(tensors)
    del cut["router.net.2.bias"]
    save_file(cut, str(folder / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="router.net.2.bias"):
        ComputationChain.load(folder, *lm)
    extra = dict(tensors, **{"head.extra": torch.zeros(2)})
    save_file(extra, str(folder / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="head.extra"):
        ComputationChain.load(folder, *lm)
    poisoned = dict(tensors)
    poisoned["head.pattern.0.weight"] = poisoned["head.pattern.0.weight"].clone()
    poisoned["head.pattern.0.weight"][0, 0] = float("nan")
    save_file(poisoned, str(folder / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="NaN"):
        ComputationChain.load(folder, *lm)
    (folder / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        ComputationChain.load(folder, *lm)
