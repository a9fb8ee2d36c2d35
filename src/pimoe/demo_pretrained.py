"""Demo on a real pretrained LM: SmolLM2-135M-Instruct split into experts (MoEfication).

``pimoe demo``: load the model (converted once, then cached), measure its held-out perplexity on
Python's bundled documentation and let it answer one prompt; split every MLP into ``E`` experts
(co-activation clustering), train the routers on the training part of the text with the dense
weights frozen (or load them from the cache of an earlier run), then measure the MoE model the
same way and print per-layer routing statistics on the held-out text. Before the split, the
computation chain (:mod:`pimoe.compute.llm_chain`: router + text-to-computation on the frozen
dense model, trained at the ``--quick`` size or loaded from the pimoe cache) answers a few held-out
word problems next to the LM alone (``chain=False`` in the settings skips it).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from pimoe.io import atomic_write_text, tensor_digest
from pimoe.tables import Table

PROMPT = "What does a Python list comprehension do? Answer in one sentence."


@dataclass(frozen=True)
class PretrainedDemoSettings:
    """Sizes of the demo. Windows are contiguous token spans of ``window`` tokens."""

    model: str = "smollm2-135m-instruct"
    num_experts: int = 8
    top_k: int = 4
    window: int = 256
    calibration_windows: int = 32  # training text for clustering, routers and refit: 8,192 tokens
    heldout_windows: int = 8  # perplexity and routing statistics: 2,048 held-out tokens
    router_steps: int = 200
    refit_ridge: float | None = (
        0.3  # closed-form refit of the experts for top_k (None: routers only)
    )
    max_new_tokens: int = 40
    seed: int = 0
    chain: bool = True  # the computation chain's answers next to the LM alone's
    # its training problems and steps: the --quick size of `pimoe chain train`
    chain_problems: int = 192
    chain_steps: int = 200
    chain_questions: int = 3


def model_fingerprint(model: nn.Module) -> str:
    """Short content hash of the first and last MLP weights (identifies the dense model whose
    neurons a saved partition refers to)."""
    from pimoe.models.upcycle import find_mlps

    mlps: list[Any] = find_mlps(model)
    return tensor_digest(
        {"first": mlps[0][1].gate_proj.weight, "last": mlps[-1][1].down_proj.weight}
    )[:16]


def routers_path(settings: PretrainedDemoSettings) -> Path:
    """Where the demo caches the partitions and routers of ``settings.model``."""
    from pimoe.models import cache_root

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.model)
    refit = f"-k{settings.top_k}-refit" if settings.refit_ridge is not None else ""
    return cache_root() / "upcycle" / f"{name}-split-e{settings.num_experts}{refit}.safetensors"


def _routers_key(settings: PretrainedDemoSettings, fingerprint: str) -> dict[str, object]:
    keys = ("num_experts", "window", "calibration_windows", "router_steps", "seed", "refit_ridge")
    refit = {"top_k": settings.top_k} if settings.refit_ridge is not None else {}
    return {"model": fingerprint, **{k: getattr(settings, k) for k in keys}, **refit}


def upcycle_with_cached_routers(
    model: nn.Module,
    train_ids: torch.Tensor,
    heldout: torch.Tensor,
    settings: PretrainedDemoSettings,
    retrain: bool = False,
    progress: bool = True,
) -> tuple[str, dict[str, object]]:
    """Split ``model`` in place into ``settings.num_experts`` experts at ``settings.top_k``.

    Loads partitions and routers saved by an earlier run with the same settings and dense weights;
    otherwise (or with ``retrain``) clusters and trains them on ``train_ids`` (held-out report on
    ``heldout [B, S]``), refits the experts' down projections for ``top_k`` when
    ``settings.refit_ridge`` is set (:mod:`pimoe.models.upcycle_refit`), and saves them. Returns
    ``("cache" | "trained", metadata)``; the metadata holds the report of the run that trained them."""
    from pimoe.models.perplexity import windows
    from pimoe.models.router_training import load_routers, save_routers, train_routers
    from pimoe.models.upcycle import upcycle
    from pimoe.models.upcycle_cluster import capture_mlp_inputs

    path = routers_path(settings)
    key = _routers_key(settings, model_fingerprint(model))
    if path.is_file() and not retrain:
        from pimoe.io import read_safetensors_header

        try:
            saved = json.loads(read_safetensors_header(path)[0].get("extra", "{}"))
        except ValueError:
            saved = {}
        if saved.get("key") == key:
            return "cache", load_routers(model, path, top_k=settings.top_k)
    start = time.perf_counter()
    calibration = windows(train_ids, settings.window, settings.calibration_windows)
    train_inputs = capture_mlp_inputs(model, calibration, batch_size=4, progress=progress)
    heldout_inputs = capture_mlp_inputs(model, heldout[:2], batch_size=2, progress=progress)
    upcycle(
        model,
        settings.num_experts,
        settings.top_k,
        "split",
        mlp_inputs=train_inputs,
        seed=settings.seed,
        progress=progress,
    )
    reports = train_routers(
        model, train_inputs, heldout_inputs, steps=settings.router_steps, progress=progress
    )
    refit_errors = None
    if settings.refit_ridge is not None:
        from pimoe.models.upcycle_refit import refit_experts

        refit_errors = [
            round(e, 4) for e in refit_experts(model, train_inputs, settings.refit_ridge, progress)
        ]
    metadata: dict[str, object] = {
        "key": key,
        "train_tokens": calibration.numel(),
        "heldout_tokens": heldout[:2].numel(),
        "seconds": round(time.perf_counter() - start, 1),
        "layers": [r.as_dict() for r in reports],
        "refit_train_rel_error": refit_errors,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_routers(model, path, metadata, experts=refit_errors is not None)
    return "trained", metadata


@torch.no_grad()
def answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """Greedy answer of ``model`` to ``prompt`` (chat template when the tokenizer has one) and
    decode tokens per second (HF ``generate`` with its KV cache)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    return str(tokenizer.decode(new, skip_special_tokens=True)).strip(), len(new) / seconds


def routing_table(stats: list, router_layers: list[dict] | None) -> Table:
    """Per-layer routing on held-out text: load per expert, imbalance, router entropy, and (when
    known) the router's held-out recall of the oracle top-k from its training."""
    import math

    table = Table(title="Routing on held-out text (load = % of assignments per expert)")
    for column in ("layer", "load per expert (%)", "imbalance", "entropy", "recall"):
        table.add_column(column, justify="right")
    for i, s in enumerate(stats):
        recall = f"{router_layers[i]['heldout_recall']:.2f}" if router_layers else "-"
        table.add_row(
            str(i),
            " ".join(f"{100 * x:2.0f}" for x in s.load),
            f"{s.imbalance:.2f}",
            f"{s.entropy:.2f}/{math.log(s.num_experts):.2f}",
            recall,
        )
    return table


def chain_stage(
    model: Any,
    tokenizer: Any,
    settings: PretrainedDemoSettings,
    console: Console,
    retrain: bool = False,
    progress: bool = True,
) -> dict:
    """The computation chain on the dense ``model`` (trained, or loaded from the cache of an earlier
    run): ``settings.chain_questions`` held-out word problems answered by the LM alone and by the
    chain, printed side by side; returns the rows and where the chain came from."""
    from dataclasses import replace

    from pimoe.compute.llm_demo import cached_chain, side_by_side
    from pimoe.compute.llm_train import QUICK_SETTINGS

    chain_settings = replace(
        QUICK_SETTINGS,
        problems=settings.chain_problems,
        steps=settings.chain_steps,
        seed=settings.seed,
    )
    start = time.perf_counter()
    chain, source = cached_chain(
        model,
        tokenizer,
        settings.model,
        chain_settings,
        model_fingerprint(model),
        retrain,
        progress,
    )
    ready_s = time.perf_counter() - start
    rows = side_by_side(chain, settings.chain_questions, settings.max_new_tokens)
    table = Table(
        title="Computation chain (router + text-to-computation + exact engine) vs the LM alone, "
        "held-out word problems",
        show_lines=True,
    )
    for column in ("question", "exact", "LM alone", "PiMoE chain"):
        table.add_column(column, overflow="fold")
    mark = {True: "[green]right[/green]", False: "[red]wrong[/red]"}
    for row in rows:
        table.add_row(
            row["question"],
            row["answer"],
            f"{row['lm_only']} ({mark[row['lm_only_right']]})",
            f"{row['pimoe']} ({mark[row['pimoe_right']]})",
        )
    console.print(table)
    training = chain.config.training
    console.print(
        f"chain {'loaded from the cache' if source == 'cache' else 'trained now'} in {ready_s:.1f} s "
        f"({chain_settings.problems} problems: LM features {training.get('feature_s')} s, router "
        f"{training.get('train_s_router')} s, text-to-computation {training.get('train_s_head')} s)"
    )
    return {"source": source, "ready_s": round(ready_s, 1), "rows": rows}


def run_pretrained_demo(
    settings: PretrainedDemoSettings = PretrainedDemoSettings(),
    device: str = "cpu",
    threads: int | None = None,
    retrain: bool = False,
    out_dir: str | None = None,
    computation: bool = False,
    progress: bool = True,
) -> dict:
    """Run the demo (see the module docs), print its tables, optionally write ``results.json`` to
    ``out_dir``; return the results. ``threads`` sets ``torch.set_num_threads`` for the run."""
    from pimoe.models import load_pretrained
    from pimoe.models.perplexity import perplexity, pydoc_token_splits, windows
    from pimoe.models.upcycle import parameter_counts, record_routing

    if threads is not None:
        torch.set_num_threads(threads)
    console = Console()
    start = time.perf_counter()
    model, tokenizer = load_pretrained(settings.model, device=device, progress=progress)
    load_s = time.perf_counter() - start
    train_ids, heldout_ids = pydoc_token_splits(tokenizer)
    heldout = windows(heldout_ids, settings.window, settings.heldout_windows)
    console.print(
        f"{settings.model}: loaded in {load_s:.1f} s; pydoc_data text: {len(train_ids):,} training and "
        f"{len(heldout_ids):,} held-out tokens; perplexity on {heldout.numel():,} held-out tokens"
    )
    dense_total, _ = parameter_counts(model)
    ppl_dense = perplexity(model, heldout, progress=progress, desc="perplexity dense")
    dense_answer, dense_tps = answer(model, tokenizer, PROMPT, settings.max_new_tokens)

    chain_results = (
        chain_stage(model, tokenizer, settings, console, retrain, progress)
        if settings.chain
        else None
    )
    source, meta = upcycle_with_cached_routers(
        model, train_ids, heldout, settings, retrain, progress
    )
    refit = "" if settings.refit_ridge is None else " and experts refit"
    console.print(
        f"split into {settings.num_experts} experts per MLP, top-{settings.top_k}; routers{refit} "
        + (
            "loaded from the cache of an earlier run"
            if source == "cache"
            else "clustered and trained now"
        )
        + f" ({meta['train_tokens']:,} training tokens, {settings.router_steps} steps, "
        f"{meta['seconds']} s when trained): {routers_path(settings)}"
    )
    total, active = parameter_counts(model)
    with record_routing(model) as stats:
        ppl_moe = perplexity(
            model, heldout, progress=progress, desc=f"perplexity MoE k={settings.top_k}"
        )
    moe_answer, moe_tps = answer(model, tokenizer, PROMPT, settings.max_new_tokens)
    layers = meta.get("layers")
    router_layers = layers if isinstance(layers, list) else None
    console.print(routing_table([s for s in stats if s is not None], router_layers))

    compare = Table(
        title=f"Dense vs split MoE (same weights; {heldout.numel():,} held-out pydoc tokens)"
    )
    for column in ("model", "total params", "active params", "perplexity", "ratio", "decode tok/s"):
        compare.add_column(column, justify="right")
    compare.add_row(
        "dense",
        f"{dense_total:,}",
        f"{dense_total:,}",
        f"{ppl_dense:.3f}",
        "1.000",
        f"{dense_tps:.1f}",
    )
    compare.add_row(
        f"MoE {settings.top_k}/{settings.num_experts}",
        f"{total:,}",
        f"{active:,}",
        f"{ppl_moe:.3f}",
        f"{ppl_moe / ppl_dense:.3f}",
        f"{moe_tps:.1f}",
    )
    console.print(compare)
    console.print(f"[bold]Prompt[/bold]: {PROMPT}")
    console.print("[bold]dense[/bold]: " + dense_answer, markup=True, highlight=False)
    console.print(
        f"[bold]MoE {settings.top_k}/{settings.num_experts}[/bold]: " + moe_answer, highlight=False
    )
    results: dict = {
        "settings": asdict(settings),
        "device": device,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 1),
        "routers": source,
        "router_training": meta,
        "ppl_dense": round(ppl_dense, 4),
        "ppl_moe": round(ppl_moe, 4),
        "params_total": total,
        "params_active": active,
        "params_dense": dense_total,
        "decode_tokens_per_s": {"dense": round(dense_tps, 2), "moe": round(moe_tps, 2)},
        "answers": {"dense": dense_answer, "moe": moe_answer},
        "routing": [s.as_dict() for s in stats if s is not None],
    }
    if chain_results is not None:
        results["chain"] = chain_results
    if computation:
        from pimoe.demo import run_computation_stage

        results["computation"] = run_computation_stage(console, settings.seed)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    console.print(f"demo wall time: {results['wall_s']:.1f} s")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            Path(out_dir) / "results.json", json.dumps(results, indent=2, default=str)
        )
        console.print(f"saved results.json in {out_dir}")
    return results
