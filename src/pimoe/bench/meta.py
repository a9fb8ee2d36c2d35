"""Meta-learning and continual learning, measured: MAML vs a pretrained baseline on the MAML paper's
sinusoids, 5-way few-shot digits (ProtoNets, MAML, a raw-pixel nearest-class-mean reference) and
EWC / replay on digits 0-4 then 5-9.

Every number is a mean over held-out tasks with a 95% confidence interval (1.96 standard errors).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from tqdm import tqdm

from pimoe.adapt import (
    EWC,
    MAML,
    ReplayBuffer,
    SinusoidTasks,
    Task,
    load_digits_tensors,
    run,
    sgd_steps,
    task_incremental_loss,
    train_task,
    trainable_params,
)
from pimoe.bench.meta_fewshot import FewShotSetup, ci95, fewshot_accuracy
from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text, save_png

# Finn et al. 2017, Fig. 3 (K=5, read from the chart).
PAPER_K5 = {"maml_1step": 0.7, "maml_from_4_steps": 0.3, "pretrained": "> 2"}


@dataclass
class MetaBenchConfig:
    """Sizes of every part (the paper's sinusoid setup except the number of meta-iterations)."""

    shots: list[int] = field(default_factory=lambda: [5, 10])
    sinusoid_iterations: int = 10_000
    meta_batch: int = 25
    inner_lr: float = 0.01
    eval_tasks: int = 600
    eval_points: int = 100
    max_steps: int = 10
    fewshot_episodes: int = 2000
    fewshot_eval: int = 600
    maml_digits_inner_lr: float = 0.5
    ewc_lambda: float = 1000.0
    ewc_epochs_b: int = 30
    replay_size: int = 500
    seed: int = 0


def sinusoid_net() -> nn.Sequential:
    """The paper's regressor: 1 -> 40 -> 40 -> 1, ReLU."""
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def mse_curve(
    model: nn.Module, tasks: Task, max_steps: int, lr: float
) -> list[tuple[float, float]]:
    """Query MSE (mean, CI) after 0..max_steps SGD steps on each task's support set."""
    per_step: list[list[float]] = [[] for _ in range(max_steps + 1)]
    for i in range(tasks.support_x.shape[0]):
        task = tasks.task(i)
        params = trainable_params(model)
        for step in range(max_steps + 1):
            with torch.no_grad():
                per_step[step].append(
                    float(F.mse_loss(run(model, params, task.query_x), task.query_y))
                )
            params = sgd_steps(model, params, task.support_x, task.support_y, F.mse_loss, 1, lr)
    return [ci95(v) for v in per_step]


def sinusoid(cfg: MetaBenchConfig, k: int) -> dict:
    """MAML (second order, vmapped) and the pretrained-on-all-tasks baseline, trained for the same
    number of Adam steps; both adapted with SGD at ``inner_lr`` on K points of new sinusoids."""
    torch.manual_seed(cfg.seed)
    maml_net, base_net = sinusoid_net(), sinusoid_net()
    base_net.load_state_dict(maml_net.state_dict())
    maml = MAML(maml_net, inner_lr=cfg.inner_lr, vectorize=True)
    source = SinusoidTasks(seed=cfg.seed + 1)
    base_opt = torch.optim.Adam(base_net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in tqdm(range(cfg.sinusoid_iterations), desc=f"MAML sinusoid K={k}", leave=False):
        maml.step(source.sample(cfg.meta_batch, k, k))
    maml_s = time.perf_counter() - start
    for _ in tqdm(range(cfg.sinusoid_iterations), desc=f"pretrained K={k}", leave=False):
        x, y = source.sample_points(cfg.meta_batch * k)
        loss = F.mse_loss(base_net(x), y)
        base_opt.zero_grad()
        loss.backward()
        base_opt.step()
    test = SinusoidTasks(seed=cfg.seed + 1000).sample(cfg.eval_tasks, k, cfg.eval_points)
    return {
        "k": k,
        "maml": mse_curve(maml_net, test, cfg.max_steps, cfg.inner_lr),
        "pretrained": mse_curve(base_net, test, cfg.max_steps, cfg.inner_lr),
        "maml_step_ms": 1000 * maml_s / cfg.sinusoid_iterations,
    }


def fewshot(cfg: MetaBenchConfig, shots: int, data: tuple[Tensor, Tensor]) -> dict:
    """5-way ``shots``-shot on meta-test digits 5-9 after episodic training on rotated digits 0-4:
    the raw-pixel reference, ProtoNet and MAML, both on the convnet without batch norm (the ablation
    of ``pimoe.bench.meta_fewshot``: batch norm costs ProtoNet 1-shot and MAML accuracy here)."""
    setups = {
        "pixel_nearest_mean": FewShotSetup(method="pixels"),
        "protonet": FewShotSetup(method="protonet", norm="none", episodes=cfg.fewshot_episodes),
        "maml": FewShotSetup(
            method="maml",
            backbone="conv",
            norm="none",
            episodes=cfg.fewshot_episodes // 4,
            inner_lr=cfg.maml_digits_inner_lr,
        ),
    }
    return {
        name: fewshot_accuracy(s, shots, data, cfg.fewshot_eval, cfg.seed)
        for name, s in setups.items()
    }


def continual(cfg: MetaBenchConfig, data: tuple[Tensor, Tensor]) -> dict:
    """Task A = digits 0-4, then task B = digits 5-9 (task-incremental: each task has its own five
    logits); accuracy on A's held-out images after learning B, without EWC, with EWC, with replay."""
    x, y = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    x, y = x[order], y[order]
    cut = int(0.7 * len(x))
    train, test = (x[:cut], y[:cut]), (x[cut:], y[cut:])

    def part(split: tuple[Tensor, Tensor], task_b: bool) -> tuple[Tensor, Tensor]:
        keep = (split[1] >= 5) if task_b else (split[1] < 5)
        return split[0][keep], split[1][keep]

    def accuracy(model: nn.Module, task_b: bool) -> float:
        xs, ys = part(test, task_b)
        offset = 5 if task_b else 0
        with torch.no_grad():
            return float(
                (model(xs)[:, offset : offset + 5].argmax(-1) + offset == ys).float().mean()
            )

    def loss(out: Tensor, target: Tensor) -> Tensor:
        return task_incremental_loss(out, target, 5)

    results = {}
    for method in ("none", "ewc", "replay"):
        torch.manual_seed(cfg.seed)
        model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
        replay = ReplayBuffer(cfg.replay_size, seed=cfg.seed) if method == "replay" else None
        train_task(model, *part(train, False), loss=loss, epochs=10, replay=replay, seed=cfg.seed)
        after_a = accuracy(model, False)
        ewc = (
            EWC(model, *part(train, False), lam=cfg.ewc_lambda, loss=loss)
            if method == "ewc"
            else None
        )
        train_task(
            model,
            *part(train, True),
            loss=loss,
            epochs=cfg.ewc_epochs_b,
            ewc=ewc,
            replay=replay,
            seed=cfg.seed + 1,
        )
        results[method] = {
            "task_a_after_a": after_a,
            "task_a_after_b": accuracy(model, False),
            "task_b": accuracy(model, True),
        }
    return results


def run_all(
    cfg: MetaBenchConfig, console: Console | None = None, plot_path: Path | None = None
) -> dict:
    """Measure everything and return the results as a JSON-serializable dict."""
    console = console or Console()
    torch.set_num_threads(1)
    data = load_digits_tensors()
    sin = {k: sinusoid(cfg, k) for k in cfg.shots}
    shots = {s: fewshot(cfg, s, data) for s in (1, 5)}
    cl = continual(cfg, data)
    result: dict = {
        **run_header("meta", cfg),
        "paper_k5_fig3": PAPER_K5,
        "sinusoid": sin,
        "fewshot": shots,
        "continual": cl,
    }
    for k, r in sin.items():
        for steps in (1, 10):
            result[f"sinusoid_k{k}_mse_{steps}step"] = r["maml"][steps][0]
            result[f"sinusoid_k{k}_mse_{steps}step_baseline"] = r["pretrained"][steps][0]
    for s, r in shots.items():
        for method in ("protonet", "maml", "pixel_nearest_mean"):
            result[f"{method}_5way_{s}shot_acc"], result[f"{method}_5way_{s}shot_ci95"] = r[method]
    result["ewc_task_a_acc"] = cl["ewc"]["task_a_after_b"]
    result["no_ewc_task_a_acc"] = cl["none"]["task_a_after_b"]
    result["replay_task_a_acc"] = cl["replay"]["task_a_after_b"]
    _print(result, console)
    if plot_path is not None:
        _plot(sin, plot_path)
    return result


def _print(result: dict, console: Console) -> None:
    print_table(
        console,
        "Sinusoid regression: query MSE after k SGD steps on K points (mean ± 95% CI)",
        ("K", "model", "0 steps", "1 step", "4 steps", "10 steps", "paper (K=5, Fig. 3)"),
        [
            (
                str(k),
                name,
                *(f"{r[name][s][0]:.3f} ± {r[name][s][1]:.3f}" for s in (0, 1, 4, 10)),
                paper if k == 5 else "",
            )
            for k, r in result["sinusoid"].items()
            for name, paper in (("maml", "0.7 / 0.3 from 4 steps"), ("pretrained", "> 2"))
        ],
    )
    print_table(
        console,
        "5-way few-shot on unseen digits 5-9 (query accuracy, mean ± 95% CI)",
        ("shots", "pixel nearest mean", "ProtoNet", "MAML"),
        [
            (
                str(s),
                *(
                    f"{r[m][0]:.3f} ± {r[m][1]:.3f}"
                    for m in ("pixel_nearest_mean", "protonet", "maml")
                ),
            )
            for s, r in result["fewshot"].items()
        ],
    )
    print_table(
        console,
        "Digits 0-4 then 5-9 (task-incremental): accuracy on held-out images",
        ("method", "A after A", "A after B", "B after B"),
        [
            (method, *(f"{r[c]:.3f}" for c in ("task_a_after_a", "task_a_after_b", "task_b")))
            for method, r in result["continual"].items()
        ],
    )


def _plot(sin: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, r in sin.items():
        for name, style in (("maml", "-"), ("pretrained", "--")):
            ax.plot([m for m, _ in r[name]], style, marker="o", label=f"{name}, K={k}")
    ax.set_xlabel("gradient steps on the K support points")
    ax.set_ylabel("query MSE")
    ax.set_yscale("log")
    ax.set_title("Sinusoids: query MSE after adaptation (MAML Fig. 3 setup)")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def main(quick: bool = False, json_path: Path | None = None, plot_path: Path | None = None) -> dict:
    """Entry point of ``benchmarks/meta.py`` (and of ``pimoe bench meta``)."""
    cfg = MetaBenchConfig()
    if quick:
        cfg = MetaBenchConfig(
            shots=[10],
            sinusoid_iterations=600,
            eval_tasks=100,
            fewshot_episodes=200,
            fewshot_eval=100,
            ewc_epochs_b=15,
        )
    result = run_all(cfg, plot_path=plot_path)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
