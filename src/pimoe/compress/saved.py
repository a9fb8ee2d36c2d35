"""Compressed models on disk: self-contained folders that load without the source model.

A folder written by :func:`save_compressed` holds:
- ``model.safetensors``: every tensor of the compressed state (quantized tensors as their integer
  values plus scales and zero points, see :mod:`pimoe.compress.state`), with the description of
  the non-tensor entries in its metadata;
- ``recipe.json``: the base architecture (a Hugging Face config, a PiMoELM config, or the class
  name of a plain module), the applied configs with their recorded decisions (SVD ranks, the
  modules a filter excluded), and the byte size and SHA-256 of every other file;
- ``tokenizer/``: the tokenizer files of a Hugging Face text encoder.

Loading builds the base architecture from its config (no source weights), replays the configs'
structural changes on it, and loads the tensors strictly. Before that, every file is checked
against ``recipe.json``: a missing, truncated or changed file (a flipped byte, a tampered
safetensors header) is a ``ValueError`` naming the file and the problem. The hash detects
accidents and mismatched files; it is not a signature (whoever can rewrite ``recipe.json`` can
make it agree).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from pimoe.compress.api import RECIPE_ATTR, compress_, compress_config_from_dict
from pimoe.compress.arch_files import (
    config_fields,
    config_from_dict,
    config_to_dict,
    read_config_file,
)
from pimoe.compress.state import encode_state, load_encoded
from pimoe.io import atomic_output, atomic_write_bytes, atomic_write_text, read_safetensors_header

FORMAT = "pimoe-compressed/2"
WEIGHTS = "model.safetensors"
_STATE_KEY = "pimoe.state"
_MAX_SKELETON_PER_FILE_BYTE = (
    64  # a float base model may hold at most this many bytes per stored byte
)
SourceKind = Literal["hf", "pimoe", "module"]


@dataclass
class Source:
    """A loaded source model with the inputs its fidelity is measured on (and its tokenizer)."""

    model: nn.Module
    kind: SourceKind
    path: Path
    example_inputs: tuple[Tensor, ...]
    tokenizer: Any = None


def load_source(path: str | Path, examples: int = 32) -> Source:
    """Load a source model (a Hugging Face encoder folder or a PiMoELM ``.safetensors`` file) and
    ``examples`` held-out inputs for its measurements."""
    path = Path(path)
    if path.is_dir():
        from pimoe.data.minilm import load_minilm, load_sentences

        minilm = load_minilm(path)
        inputs = minilm.tokenize(load_sentences("heldout")[:examples])
        return Source(minilm.encoder, "hf", path.resolve(), inputs, minilm.tokenizer)
    if path.is_file() and path.suffix == ".safetensors":
        from pimoe.data import byte_splits, get_batch, load_pydoc_text
        from pimoe.moe.model import PiMoELM

        model = PiMoELM.load(path).eval()
        _, val = byte_splits(load_pydoc_text())
        x, _ = get_batch(val, examples, model.config.block_size, torch.Generator().manual_seed(0))
        return Source(model, "pimoe", path.resolve(), (x,))
    if not path.exists():
        raise FileNotFoundError(path)
    raise ValueError(f"{path}: expected a Hugging Face model folder or a PiMoELM .safetensors file")


def _base_of(model: nn.Module) -> tuple[SourceKind, dict[str, Any]]:
    """What rebuilds ``model``'s uncompressed architecture without its weights."""
    from pimoe.data.minilm import SentenceEncoder
    from pimoe.moe.model import PiMoELM

    if isinstance(model, PiMoELM):
        return "pimoe", {"config": model.config.to_dict()}
    config = getattr(model.model, "config", None) if isinstance(model, SentenceEncoder) else None
    if isinstance(model, SentenceEncoder) and config is not None:
        return "hf", {
            "config": config.to_dict(),
            "pooling": model.pooling,
            "normalize": model.normalize,
        }
    return "module", {"class": f"{type(model).__module__}.{type(model).__qualname__}"}


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def _check_finite(tensors: dict[str, Tensor], where: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} holds NaN or infinite values")


def save_compressed(folder: str | Path, model: nn.Module, source: Source | None = None) -> Path:
    """Write ``model`` (compressed with :func:`~pimoe.compress.compress_`, or not) to ``folder``.

    Args:
        source: the source it came from (its tokenizer is saved for a Hugging Face encoder).

    Raises:
        ValueError: a NaN or infinite weight, or a state entry that cannot be stored.
    """
    folder = Path(folder)
    tensors, description = encode_state(model)
    _check_finite(tensors, f"{folder}: the compressed model")
    kind, base = _base_of(model)
    with atomic_output(folder / WEIGHTS) as tmp:
        tmp.write_bytes(safetensors_save(tensors, metadata={_STATE_KEY: json.dumps(description)}))
    files = {WEIGHTS: _digest(folder / WEIGHTS)}
    if kind == "hf" and source is not None and source.tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp_dir:
            source.tokenizer.save_pretrained(tmp_dir)
            for item in sorted(Path(tmp_dir).iterdir()):
                atomic_write_bytes(folder / "tokenizer" / item.name, item.read_bytes())
                files[f"tokenizer/{item.name}"] = _digest(folder / "tokenizer" / item.name)
    recipe = {
        "format": FORMAT,
        "kind": kind,
        "base": base,
        "recipe": getattr(model, RECIPE_ATTR, []),
        "source": str(source.path) if source is not None else None,
        "files": files,
    }
    atomic_write_text(
        folder / "recipe.json", json.dumps(recipe, indent=2)
    )  # last: it vouches for the rest
    return folder


def read_recipe(folder: str | Path) -> dict[str, Any]:
    """``recipe.json`` of a compressed-model folder; ``ValueError`` if missing or invalid. For a
    Hugging Face encoder, ``"tokenizer"`` (and ``"source"``) is the folder of its tokenizer files."""
    folder = Path(folder)
    try:
        recipe = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{folder}: no readable recipe.json ({error})") from error
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise ValueError(
            f"{folder}/recipe.json: not a {FORMAT} recipe (folders of older pimoe versions: compress again)"
        )
    problems = [
        k
        for k, kind in (("base", dict), ("recipe", list), ("files", dict))
        if not isinstance(recipe.get(k), kind)
    ]
    if recipe.get("kind") not in ("hf", "pimoe", "module"):
        problems.append("kind")
    if not isinstance(recipe.get("files", {}).get(WEIGHTS), dict):
        problems.append(f"files[{WEIGHTS!r}]")
    if problems:
        raise ValueError(f"{folder}/recipe.json: invalid or missing {problems}")
    if recipe["kind"] == "hf":
        recipe["tokenizer"] = recipe["source"] = str(folder / "tokenizer")
    return recipe


def _check_files(folder: Path, files: dict[str, Any], verify: bool) -> None:
    for name, expected in files.items():
        path = folder / name
        if not isinstance(expected, dict) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{folder}/recipe.json: invalid entry for {name!r}")
        if not path.is_file():
            raise ValueError(f"{path}: missing (recipe.json lists it)")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise ValueError(
                f"{path}: {size} bytes, recipe.json records {expected.get('bytes')} (truncated or changed)"
            )
        if name == WEIGHTS:
            read_safetensors_header(path)  # names the header's problem, if any
        if verify and _digest(path)["sha256"] != expected.get("sha256"):
            raise ValueError(
                f"{path}: SHA-256 differs from recipe.json's (the file was changed or corrupted)"
            )


def _build_base(
    kind: str, base: dict[str, Any], weights_bytes: int, model: nn.Module | None
) -> nn.Module:
    """The uncompressed architecture, randomly initialised, after a size check on ``meta``."""
    if kind == "module":
        if model is None:
            raise ValueError(
                f"this folder holds a compressed {base.get('class')}: pass model=<a freshly built "
                "instance of that architecture> to load it"
            )
        return model
    if model is not None:
        raise ValueError(f"this folder describes its own architecture ({kind}); do not pass model=")

    def build() -> nn.Module:
        if kind == "pimoe":
            from pimoe.moe.model import LMConfig, PiMoELM

            return PiMoELM(LMConfig.from_dict(base["config"]))
        from transformers import AutoConfig, AutoModel

        from pimoe.data.minilm import SentenceEncoder

        values = dict(base["config"])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        encoder = AutoModel.from_config(config)  # type: ignore[no-untyped-call]
        return SentenceEncoder(
            encoder, base.get("pooling", "mean"), bool(base.get("normalize", True))
        )

    with torch.device("meta"):
        skeleton = build()
    need = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    if need > _MAX_SKELETON_PER_FILE_BYTE * weights_bytes + (64 << 20):
        raise ValueError(
            f"recipe.json declares a base model of {need:,} bytes for {weights_bytes:,} bytes of weights"
        )
    return build()


def load_compressed(
    folder: str | Path, verify: bool = True, *, model: nn.Module | None = None
) -> nn.Module:
    """Rebuild the compressed model saved in ``folder`` (eval mode), without the source model.

    Args:
        verify: check each file's SHA-256 and the weights for NaN/infinite values (default).
        model: for a folder saved from a plain ``nn.Module`` (``kind: module``), a freshly built
            instance of its architecture (its weights are replaced); not allowed otherwise.

    Raises:
        ValueError (naming the file): a missing or invalid ``recipe.json``; a missing, truncated
            or changed file; weights that do not fit the rebuilt structure.
    """
    folder = Path(folder)
    recipe = read_recipe(folder)
    _check_files(folder, recipe["files"], verify)
    path = folder / WEIGHTS
    try:
        tensors = safetensors_load(path.read_bytes())
        description = json.loads(read_safetensors_header(path)[0][_STATE_KEY])
    except (KeyError, json.JSONDecodeError, OSError, RuntimeError) as error:
        raise ValueError(
            f"{path}: not a compressed pimoe state ({type(error).__name__}: {error})"
        ) from error
    if verify:
        _check_finite(tensors, str(path))
    try:
        configs = [compress_config_from_dict(entry["config"]) for entry in recipe["recipe"]]
        decisions = [dict(entry.get("decisions") or {}) for entry in recipe["recipe"]]
        base = _build_base(recipe["kind"], recipe["base"], os.path.getsize(path), model)
        compress_(base, configs, replay=decisions)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{folder}/recipe.json: invalid recipe ({type(error).__name__}: {error})"
        ) from error
    except ValueError as error:
        raise ValueError(f"{folder}/recipe.json: {error}") from error
    try:
        load_encoded(base, tensors, description)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    setattr(base, RECIPE_ATTR, recipe["recipe"])
    return base.eval()


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the files a compressed folder's ``recipe.json`` lists (the weights, a tokenizer)."""
    return sum(int(entry["bytes"]) for entry in read_recipe(folder)["files"].values())


__all__ = [
    "FORMAT",
    "Source",
    "config_fields",
    "config_from_dict",
    "config_to_dict",
    "folder_bytes",
    "load_compressed",
    "load_source",
    "read_config_file",
    "read_recipe",
    "save_compressed",
]
