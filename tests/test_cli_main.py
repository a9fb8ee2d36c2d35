"""The ``pimoe`` command: --version, the table-driven ``pimoe bench`` commands, parameter counts."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pimoe
from pimoe.bench.cli import BENCHMARKS
from pimoe.cli import app


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"pimoe {pimoe.__version__}\n"


@pytest.mark.parametrize("bench", BENCHMARKS, ids=lambda b: b.name)
def test_every_bench_row_matches_its_main(bench) -> None:
    """Each option of a row is a parameter of its module's ``main`` (a typo would fail at run time)."""
    main = importlib.import_module(f"pimoe.bench.{bench.module}").main
    names = ["quick", "json_path", *(p.name for p in bench.options)]
    inspect.signature(main).bind(**dict.fromkeys(names))
    result = CliRunner().invoke(app, ["bench", bench.name, "--help"])
    assert result.exit_code == 0 and bench.summary[:30] in " ".join(result.output.split())


def test_bench_command_passes_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pimoe.bench import meta

    calls: list[dict] = []
    monkeypatch.setattr(meta, "main", lambda **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "meta",
            "--quick",
            "--json",
            str(tmp_path / "m.json"),
            "--plot",
            str(tmp_path / "m.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        {"quick": True, "json_path": tmp_path / "m.json", "plot_path": tmp_path / "m.png"}
    ]
    result = CliRunner().invoke(app, ["bench", "computation", "--calls", "nosuch"])
    assert result.exit_code == 2 and "nosuch" in result.output
    assert len({b.name for b in BENCHMARKS}) == len(BENCHMARKS)


def _saved_demo_model(tmp_path: Path) -> tuple[int, Path]:
    path = tmp_path / "m.safetensors"
    saved = CliRunner().invoke(app, ["save-demo-model", str(path), "--steps", "0"])
    assert saved.exit_code == 0, saved.output
    match = re.search(r"\(([\d,]+) parameters", saved.output)
    assert match is not None, saved.output
    return int(match.group(1).replace(",", "")), path


def test_save_demo_model_prints_the_unique_parameter_count(tmp_path: Path) -> None:
    from pimoe.moe.model import PiMoELM

    printed, path = _saved_demo_model(tmp_path)
    model = PiMoELM.load(path)
    assert (
        printed == model.num_params() == sum(p.numel() for p in model.parameters())
    )  # tied head once


def test_compress_counts_the_parameters_save_demo_model_prints(tmp_path: Path) -> None:
    from pimoe.compress.report import param_counts
    from pimoe.moe.model import PiMoELM

    printed, path = _saved_demo_model(tmp_path)
    assert param_counts(PiMoELM.load(path))[0] == printed
