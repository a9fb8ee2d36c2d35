"""all-MiniLM-L6-v2 compressed by pimoe.compress vs ONNX Runtime dynamic int8 (the peer), same run.

Every configuration is a list of :mod:`pimoe.compress.configs` applied to a copy of the fp32 model
(the same as ``pimoe compress <minilm folder> OUT <flags>``). Measured against the fp32 torch model:
- ``cosine``: mean (and min) cosine similarity of the sentence embeddings (mean-pooled,
  L2-normalized) on ``pimoe/data/sentences_heldout.txt``, which nothing is calibrated or trained on;
- ``size_ratio``: bytes of the saved model file (``torch.save`` of the state dict; the ``.onnx``
  file for ONNX Runtime) over the fp32 ``torch.save`` file; ``safetensors_ratio``: the same for
  the ``model.safetensors`` of the folder :func:`~pimoe.compress.save_compressed` writes;
- ``latency_ratio``: median latency at batch 32 (the first 32 held-out sentences) over fp32's,
  from interleaved rounds (every contender runs once per round).

The peer: the fp32 model exported with ``torch.onnx.export(dynamo=True)`` (the legacy exporter gave
wrong outputs on new shapes), quantized by ``onnxruntime.quantization.quantize_dynamic`` (int8
per-channel weights); its fp32 export must match torch (cosine >= 0.9999) or the run stops. The
export takes ~40 s on 2 cores, so it is cached under ``cache_dir`` (keyed by model file and torch
version).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from torch import Tensor

from pimoe.bench.printing import print_table
from pimoe.bench.timing import interleaved_medians, run_header
from pimoe.compress import (
    ArchitectureConfig,
    ArchitectureOptimizer,
    CastConfig,
    CompressConfig,
    EmbeddingQuantConfig,
    HeadPruneConfig,
    Int8DynamicConfig,
    NeuronPruneConfig,
    save_compressed,
)
from pimoe.data.minilm import MiniLM, load_minilm, load_sentences
from pimoe.io import atomic_write_bytes, atomic_write_text

TARGETS = {"size_ratio": 0.25, "cosine": 0.99, "latency_ratio": 1 / 1.5}

# name -> (`pimoe compress` flags, configs). "int8 dyn": torch.ao dynamic int8 Linears, per-channel
# weights, 8-bit activations; "emb": the word embeddings quantized too; "ORT": ONNX Runtime.
CONFIGS: dict[str, tuple[str, list[CompressConfig]]] = {
    "int8 dyn, 7-bit act (torch.ao)": (
        "--bits 8 --reduced-range --embedding-bits 0",
        [Int8DynamicConfig(full_range=False)],
    ),
    "int8 dyn": ("--bits 8 --embedding-bits 0", [Int8DynamicConfig()]),
    "int8 dyn + int8 emb": (
        "--bits 8 --embedding-bits 8",
        [Int8DynamicConfig(), EmbeddingQuantConfig(bits=8)],
    ),
    "int8 dyn + int4 emb": (
        "--bits 8",
        ArchitectureConfig(enable_pruning=False, quantization_bits=8).to_configs(),
    ),
    "bf16": ("--bits 16", [CastConfig("bfloat16")]),
    "25% heads pruned, no repair": ("--prune-heads 0.25", [HeadPruneConfig(0.25)]),
    "10% FFN neurons pruned, no repair": ("--prune-neurons 0.1", [NeuronPruneConfig(0.1)]),
}
QUICK_SKIP = ("bf16", "25% heads pruned, no repair", "10% FFN neurons pruned, no repair")


@dataclass
class CompressBenchConfig:
    """Measurement settings; ``configs`` are keys of :data:`CONFIGS`."""

    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    batch_size: int = 32
    rounds: int = 11
    threads: int = 1
    onnx: bool = True
    cache_dir: str = str(Path.home() / ".cache" / "pimoe")


Runner = Callable[[Tensor, Tensor], Tensor]


def _batches(minilm: MiniLM, sentences: list[str], size: int) -> list[tuple[Tensor, Tensor]]:
    return [minilm.tokenize(sentences[i : i + size]) for i in range(0, len(sentences), size)]


@torch.inference_mode()
def _embed(run: Runner, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    return torch.cat([run(ids, mask).float() for ids, mask in batches])


def _saved_size(state_dict: dict, folder: Path, name: str) -> int:
    path = folder / f"{name}.pt"
    with open(path, "wb") as handle:
        torch.save(state_dict, handle)
    return path.stat().st_size


def _onnx_fp32(minilm: MiniLM, cache_dir: Path) -> Path:
    """The fp32 encoder exported with the dynamo exporter (cached; dynamic batch and length)."""
    weights = minilm.path / "model.safetensors"
    stat = weights.stat()
    key = hashlib.sha256(
        f"{weights}:{stat.st_size}:{stat.st_mtime_ns}:{torch.__version__}".encode()
    ).hexdigest()[:16]
    path = cache_dir / f"minilm-fp32-{key}.onnx"
    if path.is_file():
        return path
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    sample = minilm.tokenize(
        ["a short sentence", "a slightly longer sentence to export the encoder with"]
    )
    program = torch.onnx.export(
        minilm.encoder,
        sample,
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        optimize=True,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    with tempfile.TemporaryDirectory() as tmp:
        program.save(str(Path(tmp) / "model.onnx"))
        atomic_write_bytes(path, (Path(tmp) / "model.onnx").read_bytes())
    return path


def _ort_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(ids: Tensor, mask: Tensor) -> Tensor:
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        return torch.from_numpy(session.run(None, feeds)[0])

    return run


def onnx_contenders(
    minilm: MiniLM, cfg: CompressBenchConfig, folder: Path
) -> dict[str, tuple[str, int, Runner]]:
    """``{name: (how, file bytes, runner)}`` for ONNX Runtime fp32 and dynamic int8 per-channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _onnx_fp32(minilm, Path(cfg.cache_dir))
    int8 = folder / "minilm-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
    return {
        "ORT fp32": (
            "torch.onnx.export(dynamo=True)",
            fp32.stat().st_size,
            _ort_runner(fp32, cfg.threads),
        ),
        "ORT int8 dyn (peer)": (
            "quantize_dynamic(per_channel=True, weight_type=QInt8)",
            int8.stat().st_size,
            _ort_runner(int8, cfg.threads),
        ),
    }


def run(cfg: CompressBenchConfig, console: Console | None = None) -> dict:
    """Build every configuration, measure it against fp32 and return the JSON-ready results."""
    console = console or Console()
    unknown = [name for name in cfg.configs if name not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    torch.set_num_threads(cfg.threads)
    minilm = load_minilm()
    fp32 = minilm.encoder
    batches = _batches(minilm, load_sentences("heldout"), cfg.batch_size)
    timing_batch = batches[0]
    reference = _embed(fp32, batches)
    contenders: dict[str, tuple[str, int, Runner]] = {}
    file_bytes: dict[
        str, int
    ] = {}  # model.safetensors of the saved folder (what load_compressed reads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base_bytes = _saved_size(fp32.state_dict(), folder, "fp32")
        contenders["fp32"] = ("(original)", base_bytes, fp32)
        for index, name in enumerate(
            track(cfg.configs, description="compressing", console=console)
        ):
            flags, configs = CONFIGS[name]
            model = ArchitectureOptimizer(configs).compress(fp32)
            size = _saved_size(model.state_dict(), folder, f"config{index}")
            saved = save_compressed(folder / f"folder{index}", model) / "model.safetensors"
            file_bytes[name] = saved.stat().st_size
            contenders[name] = (f"pimoe compress MINILM OUT {flags}", size, model)
        if cfg.onnx:
            console.print("ONNX Runtime: export (cached after the first run) and quantize_dynamic")
            contenders.update(onnx_contenders(minilm, cfg, folder))
        rows = [
            _fidelity_row(name, how, size, runner, batches, reference, base_bytes)
            for name, (how, size, runner) in contenders.items()
        ]
        seconds = interleaved_medians(
            {name: _bound(runner, timing_batch) for name, (_, _, runner) in contenders.items()},
            cfg.rounds,
        )
    for row in rows:
        row["latency_ms"] = seconds[row["name"]] * 1000
        row["latency_ratio"] = seconds[row["name"]] / seconds["fp32"]
        row["meets_targets"] = _meets(row)
        if row["name"] in file_bytes:
            row["safetensors_ratio"] = file_bytes[row["name"]] / base_bytes
    onnx_fp32 = next((row for row in rows if row["name"] == "ORT fp32"), None)
    if onnx_fp32 is not None and onnx_fp32["cosine_min"] < 0.9999:
        raise RuntimeError(
            f"the ONNX export does not match torch (min cosine {onnx_fp32['cosine_min']:.6f})"
        )
    result = {
        **run_header("compress", cfg),
        "model": "all-MiniLM-L6-v2",
        "sentences": int(reference.shape[0]),
        "fp32_bytes": base_bytes,
        "targets": TARGETS,
        "configurations": rows,
    }
    _print(result, console)
    return result


def _bound(runner: Runner, batch: tuple[Tensor, Tensor]) -> Callable[[], object]:
    @torch.inference_mode()
    def call() -> object:
        return runner(*batch)

    return call


def _fidelity_row(
    name: str,
    how: str,
    size: int,
    runner: Runner,
    batches: list[tuple[Tensor, Tensor]],
    reference: Tensor,
    base_bytes: int,
) -> dict:
    cos = F.cosine_similarity(_embed(runner, batches), reference, dim=-1)
    return {
        "name": name,
        "command": how,
        "bytes": size,
        "size_ratio": size / base_bytes,
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
    }


def _meets(row: dict) -> bool:
    return (
        row["size_ratio"] <= TARGETS["size_ratio"]
        and row["cosine"] >= TARGETS["cosine"]
        and row["latency_ratio"] <= TARGETS["latency_ratio"]
    )


def _print(result: dict, console: Console) -> None:
    print_table(
        console,
        f"all-MiniLM-L6-v2, {result['sentences']} held-out sentences, batch "
        f"{result['config']['batch_size']}, {result['config']['threads']} thread(s); vs fp32 torch",
        (
            "configuration",
            "size_ratio",
            "safetensors",
            "cosine",
            "min cos",
            "ms",
            "latency_ratio",
            "targets",
        ),
        [
            (
                row["name"],
                f"{row['size_ratio']:.3f}",
                f"{row['safetensors_ratio']:.3f}" if "safetensors_ratio" in row else "-",
                f"{row['cosine']:.4f}",
                f"{row['cosine_min']:.4f}",
                f"{row['latency_ms']:.0f}",
                f"{row['latency_ratio']:.3f}",
                "all 3" if row["meets_targets"] else "-",
            )
            for row in result["configurations"]
        ],
        left=1,
    )
    for row in result["configurations"]:
        console.print(f"  {row['name']}: {row['command']}")
    console.print(
        f"targets: size_ratio <= {TARGETS['size_ratio']}, cosine >= {TARGETS['cosine']}, "
        f"latency_ratio <= {TARGETS['latency_ratio']:.3f}"
    )


def main(
    quick: bool = False,
    json_path: Path | None = None,
    threads: int = 1,
    onnx: bool = True,
    rounds: int | None = None,
) -> dict:
    """Entry point of ``benchmarks/compress_minilm.py`` (and of ``pimoe bench compress``)."""
    cfg = CompressBenchConfig(threads=threads, onnx=onnx)
    if quick:
        cfg.configs = [name for name in CONFIGS if name not in QUICK_SKIP]
        cfg.rounds = 3
    if rounds is not None:
        cfg.rounds = rounds
    os.makedirs(cfg.cache_dir, exist_ok=True)
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
