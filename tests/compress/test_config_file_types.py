"""A ``pimoe compress --config`` file with a value of the wrong JSON type is refused naming the
field (before: ``"enable_quantization": "no"`` turned quantization on, ``"skip": "lm_head"``
skipped modules matching any of its letters, ``"skip": [1]`` ended in a TypeError traceback,
``2.5`` experts after merging ran)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pimoe.cli import app
from pimoe.compress.saved import config_from_dict


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("enable_quantization", "no"),
        ("enable_pruning", 1),
        ("quantization_bits", 8.0),
        ("quantization_bits", True),
        ("experts_after_merge", 2.5),
        ("sparsity_ratio", "0.5"),
        ("sparsity_ratio", False),
        ("skip", "lm_head"),
        ("skip", [1]),
        ("order", "prune"),
        ("embedding_bits", 4.0),
        ("fidelity", []),
        ("quantization_mode", None),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        config_from_dict({field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("distill_lr", 1),  # an integer is a number
        ("embedding_bits", None),
        ("distill_steps", None),
        ("skip", ["lm_head", "*.bias"]),
        ("skip", ("lm_head",)),
        ("order", ["prune", "quantize"]),
        ("fidelity", "mse"),
    ],
)
def test_values_of_the_right_type_are_kept(field: str, value: object) -> None:
    assert getattr(config_from_dict({field: value}), field) == value


def test_the_command_names_the_field_before_loading_the_model(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"enable_quantization": "no", "enable_pruning": true}')
    missing = tmp_path / "model.safetensors"
    missing.write_bytes(b"")  # never read: the config is refused first
    result = CliRunner().invoke(
        app, ["compress", str(missing), str(tmp_path / "out"), "--config", str(config)]
    )
    assert result.exit_code == 2, result.output
    assert "pimoe compress: enable_quantization must be" in result.output
