"""``ArchitectureConfig`` as a JSON / TOML file (what ``pimoe compress --config FILE`` reads)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import tomllib

from pimoe.compress.optimizer import ArchitectureConfig

_NOT_SAVED = ("distill_data", "output_fn")


def config_fields() -> list[str]:
    """The :class:`ArchitectureConfig` fields a config file may set."""
    return [f.name for f in dataclasses.fields(ArchitectureConfig) if f.name not in _NOT_SAVED]


def config_to_dict(config: ArchitectureConfig) -> dict[str, Any]:
    """The JSON-serializable fields of ``config`` (``ValueError`` for a callable ``fidelity``)."""
    if callable(config.fidelity):
        raise ValueError(
            "a config with a callable fidelity cannot be saved; use 'cosine', 'mse' or 'accuracy'"
        )
    out = {}
    for name in config_fields():
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _check_type(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` has the JSON type of field ``name``'s annotation (a bool is
    not a number, a float not an int, a string not a list of strings)."""
    kind = next(f.type for f in dataclasses.fields(ArchitectureConfig) if f.name == name)
    assert isinstance(kind, str)  # postponed annotations
    if value is None and "None" in kind:
        return
    if kind.startswith(("bool", "int", "float")):
        want = {"bool": "a boolean", "int": "an integer", "float": "a number"}[kind.split()[0]]
        ok = isinstance(value, bool) if want == "a boolean" else not isinstance(value, bool)
        ok = ok and isinstance(value, int if want != "a number" else (int, float))
    elif kind.startswith(("list[str]", "Sequence[str]")):
        want = "a list of strings"
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    else:  # str, LossKind, fidelity (a name; a callable only from Python)
        want = "a string"
        ok = isinstance(value, str) or (name == "fidelity" and callable(value))
    if not ok:
        raise ValueError(f"{name} must be {want}, got {type(value).__name__} {value!r:.80}")


def config_from_dict(values: dict[str, Any], **overrides: Any) -> ArchitectureConfig:
    """Build (and validate) a config from a mapping of field names; unknown names and values of
    the wrong type (``"enable_pruning": "no"``, ``"skip": "lm_head"``) raise ``ValueError``."""
    unknown = sorted(set(values) - set(config_fields()))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {config_fields()}")
    for name, value in values.items():
        _check_type(name, value)
    try:
        return ArchitectureConfig(**{**values, **overrides})
    except TypeError as error:
        raise ValueError(f"invalid config ({error})") from error


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
    except (
        json.JSONDecodeError,
        tomllib.TOMLDecodeError,
        UnicodeDecodeError,
        RecursionError,
    ) as error:
        raise ValueError(f"{path}: not a valid config file ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the config must be a table/object of ArchitectureConfig fields")
    return values
