"""Compressed models on disk: load a source model, save the compressed one, load it back.

A compressed model is a folder:
- ``model.pt``: ``torch.save`` of the compressed model's state dict (int8 / int4 tensors,
  torch.ao packed parameters; loaded with ``weights_only=True``);
- ``recipe.json``: the source model's path and kind, the :class:`ArchitectureConfig` fields and
  ``sha256``, the :func:`state_digest` of the state dict. Loading recomputes it (``verify=False``
  skips that) and refuses a mismatch (a flipped byte, a NaN written into a weight, a ``model.pt``
  from another save); saving and verified loading refuse NaN or infinite floating-point values.

Loading rebuilds the module structure by loading the source model again and re-running the
recipe's steps with distillation off (every structural decision of the steps is a function of the
source weights: SVD ranks, magnitudes, weight-norm head and expert scores), then loads the state
dict strictly, which restores the trained (distilled) values.

Sources: a Hugging Face encoder folder (``config.json``; wrapped as a mean-pooling
:class:`~pimoe.data.minilm.SentenceEncoder`, compared on held-out sentences) or a PiMoELM
``.safetensors`` file (:meth:`pimoe.moe.model.PiMoELM.save`; compared on held-out pydoc bytes).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pimoe.compress.optimizer import ArchitectureConfig, ArchitectureOptimizer
from pimoe.io import atomic_write_bytes, atomic_write_text, tensor_digest

logger = logging.getLogger(__name__)
FORMAT = "pimoe-compressed/1"
_NOT_SAVED = ("distill_data", "output_fn")
SourceKind = Literal["hf", "pimoe"]


@dataclass
class Source:
    """A loaded source model with the inputs its fidelity is measured on."""

    model: nn.Module
    kind: SourceKind
    path: Path
    example_inputs: tuple[Tensor, ...]


def config_fields() -> list[str]:
    """The :class:`ArchitectureConfig` fields a config file (or ``recipe.json``) may set."""
    return [f.name for f in dataclasses.fields(ArchitectureConfig) if f.name not in _NOT_SAVED]


def config_to_dict(config: ArchitectureConfig) -> dict[str, Any]:
    """The JSON-serializable fields of ``config`` (``ValueError`` for a callable ``fidelity``)."""
    if callable(config.fidelity):
        raise ValueError("a config with a callable fidelity cannot be saved; use 'cosine', 'mse' or 'accuracy'")
    out = {}
    for name in config_fields():
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(values: dict[str, Any], **overrides: Any) -> ArchitectureConfig:
    """Build (and validate) a config from a mapping of field names; unknown names raise ``ValueError``."""
    unknown = sorted(set(values) - set(config_fields()))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {config_fields()}")
    return ArchitectureConfig(**{**values, **overrides})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The field mapping of a ``.json`` or ``.toml`` config file (not yet validated)."""
    path = Path(path)
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".json":
            values = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{path}: config files must end in .json or .toml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid config file ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the config must be a table/object of ArchitectureConfig fields")
    return values


def load_source(path: str | Path, examples: int = 32) -> Source:
    """Load a source model and ``examples`` held-out inputs for its measurements."""
    path = Path(path)
    if path.is_dir():
        from pimoe.data.minilm import load_minilm, load_sentences

        minilm = load_minilm(path)
        return Source(minilm.encoder, "hf", path.resolve(), minilm.tokenize(load_sentences("heldout")[:examples]))
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


def _flat_tensors(state: Any, prefix: str) -> dict[str, Tensor]:
    """A state dict's leaves as ``{name: tensor}``: tuples (torch.ao packed parameters) get
    ``.0``, ``.1``, ... names; a non-tensor leaf (a ``torch.dtype``, ``None``, a number) becomes
    an empty tensor whose name carries its ``repr``, so it is hashed too."""
    if isinstance(state, Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        items: Any = ((f"{prefix}.{k}" if prefix else str(k), v) for k, v in state.items())
    elif isinstance(state, (tuple, list)):
        items = ((f"{prefix}.{i}", v) for i, v in enumerate(state))
    else:
        return {f"{prefix}={state!r}": torch.empty(0, dtype=torch.uint8)}
    return {name: t for key, value in items for name, t in _flat_tensors(value, key).items()}


def state_digest(state: dict[str, Any]) -> str:
    """:func:`pimoe.io.tensor_digest` of a (compressed) state dict, packed parameters included."""
    return tensor_digest(_flat_tensors(state, ""))


def _check_finite(state: dict[str, Any], where: str) -> None:
    for name, t in _flat_tensors(state, "").items():
        values = t.dequantize() if t.is_quantized else t
        if (values.is_floating_point() or values.is_complex()) and not bool(torch.isfinite(values).all()):
            raise ValueError(f"{where}: {name} holds NaN or infinite values")


def save_compressed(folder: str | Path, model: nn.Module, source: Source, config: ArchitectureConfig) -> Path:
    """Write ``model.pt`` and ``recipe.json`` (with the state's ``sha256``) into ``folder``
    (created; files written atomically). ``ValueError`` if a weight is NaN or infinite."""
    folder = Path(folder)
    state = model.state_dict()
    _check_finite(state, f"{folder}: the compressed model")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder / "model.pt", buffer.getvalue())
    recipe = {"format": FORMAT, "source": str(source.path), "kind": source.kind, "config": config_to_dict(config),
              "sha256": state_digest(state)}
    atomic_write_text(folder / "recipe.json", json.dumps(recipe, indent=2))
    return folder


def read_recipe(folder: str | Path) -> dict[str, Any]:
    """``recipe.json`` of a compressed-model folder: ``source`` (path), ``kind`` ("hf" or "pimoe"),
    ``config``; ``ValueError`` if it is missing or not a pimoe recipe."""
    folder = Path(folder)
    try:
        recipe = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder}: no readable recipe.json ({error})") from error
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise ValueError(f"{folder}/recipe.json: not a {FORMAT} recipe")
    problems = [k for k, kind in (("source", str), ("config", dict)) if not isinstance(recipe.get(k), kind)]
    if recipe.get("kind") not in ("hf", "pimoe"):
        problems.append("kind")
    if not isinstance(recipe.get("sha256", ""), str):
        problems.append("sha256")
    if problems:
        raise ValueError(f"{folder}/recipe.json: invalid or missing {problems}")
    return recipe


def load_compressed(folder: str | Path, verify: bool = True) -> nn.Module:
    """Rebuild the compressed model saved in ``folder`` (eval mode).

    ``verify`` (default) checks the state against the recipe's ``sha256`` and for NaN/infinite
    values; ``verify=False`` skips both (faster for large models).

    Raises:
        ValueError (naming the file): a missing or invalid ``recipe.json``, a source model that is
            gone or unreadable, a ``model.pt`` that is not a readable state dict, fails the
            check, or does not fit the rebuilt structure (a tampered file or a changed source).
    """
    folder = Path(folder)
    recipe = read_recipe(folder)
    try:
        config = config_from_dict(recipe["config"], enable_knowledge_distillation=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{folder}/recipe.json: invalid config ({error})") from error
    try:
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse it means the file is unusable
        first_line = (str(error).strip().splitlines() or [""])[0]  # torch's messages run over many lines
        raise ValueError(f"{folder}/model.pt: not a readable state dict ({type(error).__name__}: {first_line})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{folder}/model.pt: holds a {type(state).__name__}, not a state dict")
    if verify:
        _verify(folder, recipe, state)
    try:
        source = load_source(recipe["source"], examples=1)
    except FileNotFoundError as error:
        raise ValueError(f"{folder}/recipe.json: the source model {recipe['source']} is gone") from error
    model = ArchitectureOptimizer(config).compress(source.model)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ValueError(f"{folder}/model.pt does not match the recipe's model ({error})") from error
    return model.eval()


def _verify(folder: Path, recipe: dict[str, Any], state: dict[str, Any]) -> None:
    expected = recipe.get("sha256")
    try:
        actual = state_digest(state)
    except TypeError as error:
        raise ValueError(f"{folder}/model.pt: not a state dict of tensors ({error})") from error
    if expected is None:
        logger.warning("%s/recipe.json has no sha256 (saved by an older pimoe): model.pt is not verified", folder)
    elif actual != expected:
        raise ValueError(f"{folder}/model.pt: content hash {actual[:12]}... does not match recipe.json's "
                         f"{expected[:12]}... (a changed or corrupted file)")
    _check_finite(state, f"{folder}/model.pt")
