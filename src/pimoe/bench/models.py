"""Real pretrained models: SmolLM2-135M-Instruct dense vs split into 8 experts (MoEfication).

Measured in one run: load time (first call, converting or reading the cache as it finds it, then a
cached call), held-out perplexity on Python's bundled documentation of the dense model and the
split model at k=4 of 8 (experts refit for k=4, as in the demo) and, with the same partition and
routers but the original expert weights, at k=4 and k=2 (routers from the demo's cache, trained
there when missing),
active parameters, prefill and decode tokens/s (HF ``generate`` with its KV cache, contenders
interleaved; ``moe_k4_packed`` is the k=4 model with its expert weights prepacked by
:func:`pimoe.moe.pack_experts_`, where packing can run), and the transformers experts-backend equivalence table of
:func:`pimoe.hf.families.check_families` (pimoe vs eager on tiny random MoE families).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from pimoe.bench.printing import print_table
from pimoe.bench.timing import interleaved_medians, run_header
from pimoe.io import atomic_write_text


@dataclass
class ModelsBenchConfig:
    """Sizes: ``heldout_windows`` windows of ``window`` held-out tokens for perplexity; timing on a
    ``prefill_tokens`` prompt and ``decode_tokens`` greedy new tokens."""

    model: str = "smollm2-135m-instruct"
    heldout_windows: int = 32
    window: int = 256
    prefill_tokens: int = 256
    decode_tokens: int = 64
    rounds: int = 3
    threads: int = 2
    families: bool = True


QUICK = ModelsBenchConfig(heldout_windows=8, prefill_tokens=128, decode_tokens=16, rounds=1)


def _timers(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    def prefill() -> None:
        with torch.inference_mode():
            model(prompt, use_cache=False)

    def decode() -> None:
        short = prompt[:, :16]
        model.generate(
            short,
            attention_mask=torch.ones_like(short),
            max_new_tokens=new_tokens,  # type: ignore[operator]
            min_new_tokens=new_tokens,
            do_sample=False,
        )

    return prefill, decode


def _packed_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of ``model`` with its expert weights prepacked, or None where packing cannot run."""
    from pimoe.moe import pack_experts_

    packed = copy.deepcopy(model)
    try:
        pack_experts_(packed)
    except ValueError:
        return None
    return packed


def run(cfg: ModelsBenchConfig, progress: bool = True) -> dict:
    """Run the benchmark (see the module docs); returns the results dict."""
    from pimoe.demo_pretrained import (
        PretrainedDemoSettings,
        routers_path,
        upcycle_with_cached_routers,
    )
    from pimoe.models import cache_path, load_pretrained
    from pimoe.models.perplexity import perplexity, pydoc_token_splits, windows
    from pimoe.models.router_training import load_routers
    from pimoe.models.upcycle import parameter_counts, set_top_k

    torch.set_num_threads(cfg.threads)
    result: dict = run_header("models", cfg)
    was_cached = cache_path(cfg.model).is_dir()
    start = time.perf_counter()
    dense, tokenizer = load_pretrained(cfg.model, progress=progress)
    result["load_first_s"] = round(time.perf_counter() - start, 2)
    result["load_first_was_cached"] = was_cached
    start = time.perf_counter()
    moe, _ = load_pretrained(cfg.model, progress=progress)
    result["load_cached_s"] = round(time.perf_counter() - start, 2)

    train_ids, heldout_ids = pydoc_token_splits(tokenizer)
    heldout = windows(heldout_ids, cfg.window, cfg.heldout_windows)
    settings = replace(PretrainedDemoSettings(), model=cfg.model, top_k=4)
    source, _ = upcycle_with_cached_routers(moe, train_ids, heldout, settings, progress=progress)
    plain, _ = load_pretrained(
        cfg.model, progress=progress
    )  # same partition and routers, experts not refit
    load_routers(plain, routers_path(settings), top_k=2, experts=False)
    result["routers"] = source
    result["refit_ridge"] = settings.refit_ridge
    result["heldout_tokens"] = heldout.numel()
    result["ppl_dense"] = round(
        perplexity(dense, heldout, progress=progress, desc="perplexity dense"), 4
    )
    dense_params = parameter_counts(dense)[0]
    result["params"] = {"dense": {"total": dense_params, "active": dense_params}}
    variants = (("moe_k4", moe, 4), ("moe_k4_norefit", plain, 4), ("moe_k2", plain, 2))
    for name, model, k in variants:
        set_top_k(model, k)
        result[f"ppl_{name}"] = round(
            perplexity(model, heldout, progress=progress, desc=f"perplexity {name}"), 4
        )
        result[f"ppl_ratio_{name}"] = round(result[f"ppl_{name}"] / result["ppl_dense"], 4)
        total, active = parameter_counts(model)
        result["params"][name] = {"total": total, "active": active}

    timed: dict[str, torch.nn.Module] = {"dense": dense, "moe_k4": moe, "moe_k2": plain}
    packed = _packed_copy(moe)
    if packed is not None:
        timed["moe_k4_packed"] = packed
        ppl = perplexity(packed, heldout, progress=progress, desc="perplexity moe_k4_packed")
        result["ppl_moe_k4_packed"] = round(ppl, 4)
        result["params"]["moe_k4_packed"] = result["params"]["moe_k4"]
    prompt = heldout_ids[: cfg.prefill_tokens].unsqueeze(0)
    contenders: dict[str, Callable[[], object]] = {}
    for name, timed_model in timed.items():
        contenders[f"prefill/{name}"], contenders[f"decode/{name}"] = _timers(
            timed_model, prompt, cfg.decode_tokens
        )
    seconds = interleaved_medians(contenders, rounds=cfg.rounds)
    for phase, tokens in (("prefill", cfg.prefill_tokens), ("decode", cfg.decode_tokens)):
        rates = {
            name.split("/")[1]: tokens / s for name, s in seconds.items() if name.startswith(phase)
        }
        result[f"{phase}_tokens_per_s"] = {n: round(r, 1) for n, r in rates.items()}
        result[f"{phase}_ratio_vs_dense"] = {
            n: round(r / rates["dense"], 3) for n, r in rates.items()
        }

    if cfg.families:
        from pimoe.hf.families import check_families

        rows = check_families(repeats=1)
        result["hf_families"] = rows
        result["max_abs_logit_diff_hf"] = max(float(row["max_abs_logit_diff"]) for row in rows)
    return result


def print_report(result: dict, console: Console | None = None) -> None:
    """Tables of the results."""
    console = console or Console()
    console.print(
        f"load: first call {result['load_first_s']} s (cache {'present' if result['load_first_was_cached'] else 'built'}), "
        f"cached {result['load_cached_s']} s; routers {result['routers']}"
    )
    rows = []
    names = ("dense", "moe_k4", "moe_k4_packed", "moe_k4_norefit", "moe_k2")
    for name in (n for n in names if n == "dense" or f"ppl_{n}" in result):
        ppl = result["ppl_dense"] if name == "dense" else result[f"ppl_{name}"]
        timing = name if name in result["decode_tokens_per_s"] else "moe_k4"
        rows.append(
            (
                name,
                f"{result['params'][name]['active']:,}",
                f"{ppl:.3f}",
                f"{ppl / result['ppl_dense']:.3f}",
                f"{result['prefill_tokens_per_s'][timing]:.1f}",
                f"{result['decode_tokens_per_s'][timing]:.1f}",
            )
        )
    print_table(
        console,
        f"Dense vs split 8 experts ({result['heldout_tokens']:,} held-out pydoc tokens)",
        ("model", "active params", "perplexity", "ppl ratio", "prefill tok/s", "decode tok/s"),
        rows,
    )
    if "hf_families" in result:
        console.print(
            f"transformers experts backend 'pimoe' vs eager: max |logit diff| over "
            f"{len(result['hf_families'])} families = {result['max_abs_logit_diff_hf']:.2e}"
        )


def main(quick: bool = False, json_path: Path | None = None, rounds: int | None = None) -> dict:
    """Entry point of ``pimoe bench models`` (``rounds``: timing rounds instead of the size's)."""
    cfg = QUICK if quick else ModelsBenchConfig()
    result = run(cfg if rounds is None else replace(cfg, rounds=rounds))
    if json_path is not None:  # first: a report that fails to print loses no run
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str))
    print_report(result)
    return result
