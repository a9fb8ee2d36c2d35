"""A missing optional dependency ends a command or an import with one line naming its extra."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pimoe.cli import app
from pimoe.extras import (
    EXTRA_MODULES,
    MissingExtraError,
    check_extra,
    explain_missing,
    extra_imports,
    require,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _missing(monkeypatch: pytest.MonkeyPatch, module: str, *forget: str) -> None:
    """Make ``import module`` fail as if it were not installed; drop cached pimoe modules ``forget``."""
    for name in [module, *(n for n in sys.modules if n.startswith(module + "."))]:
        monkeypatch.setitem(sys.modules, name, None)  # cached submodules too
    for name in [n for n in sys.modules if n.startswith(forget)] if forget else []:
        monkeypatch.delitem(sys.modules, name)


def test_extra_modules_match_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    modules_of: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(re.sub(r"[-_.]+", "-", dist).lower(), set()).add(module)
    for extra, requirements in extras.items():
        if extra in ("dev", "all"):
            continue
        dists = {
            re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", r)[0]).lower() for r in requirements
        }
        expected = {m for d in dists for m in modules_of[d] if m in EXTRA_MODULES[extra]}
        assert set(EXTRA_MODULES[extra]) == expected, extra
        assert len(EXTRA_MODULES[extra]) == len(dists), f"{extra}: one import name per package"


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("xxhash", ["serve", "--model", "runs/none.safetensors"], "serve"),
        ("optuna", ["search", "--task", "digits", "--trials", "1"], "search"),
        ("flwr", ["federate", "--rounds", "1"], "federated"),
        ("transformers", ["bench", "moe", "--quick"], "hf"),
        ("sklearn", ["bench", "meta", "--quick"], "meta"),
    ],
)
def test_command_without_its_extra_prints_one_line(
    monkeypatch: pytest.MonkeyPatch, module: str, args: list[str], extra: str
) -> None:
    _missing(monkeypatch, module)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # no traceback
    assert result.output.strip().splitlines() == [
        f"pimoe {' '.join(args[:2]) if args[0] == 'bench' else args[0]} needs {module!r}, which is not installed: "
        f'pip install "pimoe[{extra}]"'
    ]


def test_import_inside_a_command_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extra's module missing deep inside a command (no pre-check) still gives one line."""
    from pimoe.bench import kv_cache

    def main(**kwargs: object) -> None:
        importlib.import_module("tenseal")

    monkeypatch.setattr(kv_cache, "main", main)
    _missing(monkeypatch, "tenseal")
    result = CliRunner().invoke(app, ["bench", "kv-cache", "--quick"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # no traceback
    assert result.output.strip() == "'tenseal' is not installed: pip install \"pimoe[privacy]\""


@pytest.mark.parametrize(
    ("module", "statement", "extra"),
    [
        ("cryptography", "from pimoe.privacy.dp import make_private", "privacy"),
        ("cryptography", "import pimoe.privacy.secagg", "privacy"),
        ("optuna", "from pimoe.search import run_search", "search"),
    ],
)
def test_import_without_its_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, module: str, statement: str, extra: str
) -> None:
    _missing(monkeypatch, module, "pimoe.privacy", "pimoe.search")
    with pytest.raises(MissingExtraError, match=re.escape(f'pip install "pimoe[{extra}]"')) as info:
        exec(statement, {})
    assert info.value.name == module and info.value.extra == extra


def test_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("json", "serve") is sys.modules["json"]
    with pytest.raises(ValueError, match="unknown extra"):
        require("json", "nosuch")
    check_extra("serve")  # everything is installed in the test environment
    _missing(monkeypatch, "diskcache")
    with pytest.raises(MissingExtraError, match="pimoe x needs 'diskcache'"):
        check_extra("serve", "pimoe x")
    expected = r"'diskcache' is not installed: pip install \"pimoe\[serve\]\""
    with pytest.raises(MissingExtraError, match=expected), extra_imports("serve"):
        import diskcache  # noqa: F401
    assert explain_missing(ModuleNotFoundError("x", name="nosuch")) is None
    explained = explain_missing(ModuleNotFoundError("x", name="sklearn.datasets"))
    assert explained is not None and explained.name == "sklearn" and explained.extra == "federated"
