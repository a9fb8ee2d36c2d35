"""5-way few-shot classification of unseen digits (5-9) after meta-training on digits 0-4: every
method of ``pimoe bench meta`` and the simple baselines, described by one :class:`FewShotSetup`,
and the one-factor-at-a-time ablation behind docs/adapt.md (``python -m pimoe.bench.meta_fewshot``).

Accuracies are means over test episodes with a 95% confidence interval (1.96 standard errors).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from tqdm import tqdm

from pimoe.adapt import MAML, ConvNet, DigitsEpisodes, ProtoNet, Task, load_digits_tensors, run
from pimoe.adapt.backbones import Norm
from pimoe.bench.printing import print_table
from pimoe.io import atomic_write_text

META_TRAIN, META_TEST = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% normal confidence interval."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return mean, 1.96 * math.sqrt(var / n)


@dataclass(frozen=True)
class FewShotSetup:
    """One way to solve 5-way episodes on the meta-test digits (defaults: the ablation's ProtoNet).

    ``method``: ``"protonet"`` (episodic training of ``backbone``), ``"maml"`` (second order unless
    ``first_order``), ``"linear"`` (MAML's inner loop run from a zero linear classifier on pixels:
    SGD with no meta-training), ``"pixels"`` (nearest class mean on raw pixels), ``"pca"`` (nearest
    mean in the top ``pca_dim`` principal components of the meta-train images), ``"random"``
    (nearest mean in the embedding of an untrained ``backbone``).
    ``episodes``: ProtoNet training episodes, or MAML meta-steps of ``meta_batch`` episodes.
    ``train_shots`` 0 means the test shots; ``test_steps`` 0 means ``inner_steps``.
    ``standardize``: inputs minus the meta-train pixel means, over their standard deviations + 0.1.
    ``train_digits``: meta-train on the first that many of digits 0-4 (fewer classes to learn from).
    ``oracle``: meta-train on the test digits themselves, on the even-numbered images, and test on
    the odd-numbered ones (what a learned embedding gains when its classes are seen in training).
    """

    method: str = "protonet"
    backbone: str = "conv"
    norm: Norm = "batch"
    episodes: int = 2000
    train_way: int = 5
    train_shots: int = 0
    rotations: bool = True
    standardize: bool = False
    inner_lr: float = 0.5
    inner_steps: int = 5
    test_steps: int = 0
    first_order: bool = False
    meta_batch: int = 4
    pca_dim: int = 20
    train_digits: int = 5
    oracle: bool = False


def _backbone(setup: FewShotSetup, num_classes: int | None) -> nn.Module:
    if setup.backbone == "conv":
        return ConvNet(norm=setup.norm, num_classes=num_classes)
    if setup.backbone == "mlp":
        return nn.Sequential(
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes or 64),
        )
    raise ValueError(f"unknown backbone {setup.backbone!r}; expected 'conv' or 'mlp'")


def _standardized(data: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    x, y = data
    seen = x[torch.isin(y, torch.tensor(META_TRAIN))]
    return (x - seen.mean(0)) / (seen.std(0) + 0.1), y


def _half(data: tuple[Tensor, Tensor], parity: int) -> tuple[Tensor, Tensor]:
    return data[0][parity::2], data[1][parity::2]


class PCA(nn.Module):
    """``z [M, D]`` -> ``[M, dim]``: coordinates in the top ``dim`` principal components of ``x [N, D]``."""

    mean: Tensor
    basis: Tensor

    def __init__(self, x: Tensor, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer(
            "basis", torch.linalg.svd(x - self.mean, full_matrices=False).Vh[:dim].T
        )

    def forward(self, z: Tensor) -> Tensor:
        return (z - self.mean) @ self.basis


def fewshot_predictor(
    setup: FewShotSetup, shots: int, data: tuple[Tensor, Tensor], seed: int
) -> Callable[[Task], Tensor]:
    """Train ``setup`` on the meta-train digits (rotated if ``setup.rotations``) and return
    ``predict(task) -> query labels [Q]`` for test episodes (of data standardized as ``setup`` says)."""
    torch.manual_seed(seed)
    classes = META_TEST if setup.oracle else META_TRAIN[: setup.train_digits]
    train = DigitsEpisodes(
        classes,
        setup.train_way,
        setup.train_shots or shots,
        15,
        seed=seed,
        data=_half(data, 0) if setup.oracle else data,
        rotations=setup.rotations,
    )
    if setup.method in ("pixels", "pca", "random"):
        encoder = {
            "pixels": nn.Identity,
            "random": lambda: _backbone(setup, None),
            "pca": lambda: PCA(torch.cat(list(train.by_class.values())), setup.pca_dim),
        }[setup.method]()
        proto = ProtoNet(encoder).eval()
        return lambda e: proto(*e[:3]).argmax(-1)
    if setup.method == "protonet":
        proto = ProtoNet(_backbone(setup, None))
        optimizer = torch.optim.Adam(proto.parameters(), lr=1e-3)
        for _ in tqdm(range(setup.episodes), desc=f"ProtoNet {shots}-shot", leave=False):
            loss = proto.loss(train.sample())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        proto.eval()
        return lambda e: proto(*e[:3]).argmax(-1)
    if setup.method == "linear":
        linear = nn.Linear(64, 5)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        net: nn.Module = linear
    elif setup.method == "maml":
        net = _backbone(setup, 5)
    else:
        raise ValueError(f"unknown method {setup.method!r}")
    maml = MAML(
        net,
        inner_lr=setup.inner_lr,
        inner_steps=setup.inner_steps,
        first_order=setup.first_order,
        loss="cross_entropy",
        vectorize=setup.norm == "none" or setup.first_order,
    )
    if setup.method == "maml":
        for _ in tqdm(range(setup.episodes), desc=f"MAML {shots}-shot", leave=False):
            maml.step(train.sample_batch(setup.meta_batch))

    def maml_predict(e: Task) -> Tensor:
        params = maml.adapt(e.support_x, e.support_y, steps=setup.test_steps or setup.inner_steps)
        with torch.no_grad():
            return run(net, params, e.query_x).argmax(-1)

    return maml_predict


def fewshot_accuracy(
    setup: FewShotSetup, shots: int, data: tuple[Tensor, Tensor], num_episodes: int, seed: int = 0
) -> tuple[float, float]:
    """Query accuracy (mean, CI) of ``setup`` on ``num_episodes`` 5-way ``shots``-shot episodes of the
    meta-test digits (the same episodes for every setup with this seed)."""
    if setup.standardize:
        data = _standardized(data)
    test = DigitsEpisodes(
        META_TEST, 5, shots, 15, seed=seed + 1, data=_half(data, 1) if setup.oracle else data
    )
    episodes = [test.sample() for _ in range(num_episodes)]
    return episode_accuracy(fewshot_predictor(setup, shots, data, seed), episodes)


def episode_accuracy(
    predict: Callable[[Task], Tensor], episodes: list[Task]
) -> tuple[float, float]:
    """Mean query accuracy (with CI) of ``predict(task) -> labels [Q]`` over episodes."""
    return ci95([float((predict(e) == e.query_y).float().mean()) for e in episodes])


def ablation_rows(
    protonet_episodes: int = 1000, maml_steps: int = 200
) -> list[tuple[str, int, FewShotSetup]]:
    """``(name, shots, setup)`` rows: baselines, then one factor at a time from the benchmark's MAML
    (5-shot) and ProtoNet (1-shot) settings."""
    maml = FewShotSetup(method="maml", backbone="conv", norm="none", episodes=maml_steps)
    mlp = replace(maml, backbone="mlp")
    proto = FewShotSetup(episodes=protonet_episodes)
    rows = [
        (f"{name}, {s}-shot", s, setup)
        for s in (1, 5)
        for name, setup in (
            ("pixel nearest mean", FewShotSetup(method="pixels")),
            (
                "pixel nearest mean, standardized inputs",
                FewShotSetup(method="pixels", standardize=True),
            ),
            ("PCA-20 of meta-train images, nearest mean", FewShotSetup(method="pca")),
            ("untrained conv embedding, nearest mean", FewShotSetup(method="random")),
            (
                "linear classifier from zero, 5 SGD steps (no meta-training)",
                FewShotSetup(method="linear"),
            ),
            ("MAML conv (reference)", maml),
            ("ProtoNet conv (reference)", proto),
        )
    ]
    rows += [
        (f"MAML {name}, 5-shot", 5, setup)
        for name, setup in (
            ("MLP, 10 test steps (first benchmark)", replace(mlp, test_steps=10)),
            ("MLP", mlp),
            ("MLP, first order", replace(mlp, first_order=True)),
            ("MLP, standardized inputs", replace(mlp, standardize=True)),
            ("conv, transductive batch norm", replace(maml, norm="batch_transductive")),
            ("conv, first order", replace(maml, first_order=True)),
            ("conv, inner lr 0.1", replace(maml, inner_lr=0.1)),
            ("conv, no rotations (5 meta-train classes)", replace(maml, rotations=False)),
        )
    ]
    rows += [
        (f"ProtoNet {name}, 1-shot", 1, setup)
        for name, setup in (
            (
                f"conv, {protonet_episodes // 4} episodes",
                replace(proto, episodes=protonet_episodes // 4),
            ),
            (
                f"conv, {protonet_episodes * 2} episodes",
                replace(proto, episodes=protonet_episodes * 2),
            ),
            ("conv, 20-way training", replace(proto, train_way=20)),
            ("conv, 5-shot training", replace(proto, train_shots=5)),
            ("conv, no batch norm", replace(proto, norm="none")),
            ("MLP", replace(proto, backbone="mlp")),
            ("conv, standardized inputs", replace(proto, standardize=True)),
            ("conv, no rotations (5 meta-train classes)", replace(proto, rotations=False)),
            ("conv, digits 0-2 only (12 meta-train classes)", replace(proto, train_digits=3)),
            ("conv, digits 0-1 only (8 meta-train classes)", replace(proto, train_digits=2)),
            (
                "conv, oracle: trained on digits 5-9 (even images), tested on odd images",
                replace(proto, oracle=True),
            ),
        )
    ]
    rows += [
        (
            "pixel nearest mean, oracle's test images (odd), 1-shot",
            1,
            FewShotSetup(method="pixels", oracle=True),
        ),
        ("ProtoNet conv, no batch norm, 5-shot", 5, replace(proto, norm="none")),
    ]
    return rows


def ablation(
    rows: list[tuple[str, int, FewShotSetup]],
    seeds: list[int],
    num_episodes: int,
    data: tuple[Tensor, Tensor],
    json_path: Path | None = None,
) -> dict:
    """Every row on ``num_episodes`` test episodes per seed: per-seed (mean, CI), their mean and
    their spread (max - min over seeds), with the machine's load average before and after.
    The results so far are rewritten to ``json_path`` after every row."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    out: dict = {"seeds": seeds, "eval_episodes": num_episodes, "rows": []}
    bar = tqdm(total=len(rows) * len(seeds), desc="few-shot ablation")
    for name, shots, setup in rows:
        start = time.perf_counter()
        per_seed = []
        for seed in seeds:
            per_seed.append(fewshot_accuracy(setup, shots, data, num_episodes, seed))
            bar.update()
        means = [m for m, _ in per_seed]
        out["rows"].append(
            {
                "name": name,
                "shots": shots,
                "setup": asdict(setup),
                "per_seed": per_seed,
                "mean": sum(means) / len(means),
                "spread": max(means) - min(means),
                "seconds": time.perf_counter() - start,
            }
        )
        out["load_average_before"], out["load_average_after"] = load_before, os.getloadavg()
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(out, indent=2))
    bar.close()
    return out


def print_ablation(result: dict, console: Console | None = None) -> None:
    """The ablation as a table: mean accuracy over seeds, spread, first seed's 95% CI."""
    print_table(
        console or Console(),
        f"5-way few-shot on unseen digits 5-9, seeds {result['seeds']}, "
        f"{result['eval_episodes']} test episodes each",
        ("setting", "accuracy", "spread over seeds", "95% CI (first seed)", "s"),
        [
            (
                r["name"],
                f"{r['mean']:.3f}",
                f"{r['spread']:.3f}",
                f"± {r['per_seed'][0][1]:.3f}",
                f"{r['seconds']:.0f}",
            )
            for r in result["rows"]
        ],
        left=1,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Few-shot digits ablation (docs/adapt.md).")
    parser.add_argument(
        "--match", default="", help="only rows whose name matches this regular expression"
    )
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--episodes", type=int, default=300, help="test episodes per row and seed")
    parser.add_argument("--protonet-episodes", type=int, default=1000)
    parser.add_argument("--maml-steps", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--benchmark",
        action="store_true",
        help="instead, the few-shot part of `pimoe bench meta` at its full sizes",
    )
    args = parser.parse_args()
    if args.benchmark:
        from pimoe.bench.meta import MetaBenchConfig, fewshot

        torch.set_num_threads(1)
        data, load_before = load_digits_tensors(), os.getloadavg()
        bench: dict[str, Any] = {str(s): fewshot(MetaBenchConfig(), s, data) for s in (1, 5)}
        bench["load_average_before"], bench["load_average_after"] = load_before, os.getloadavg()
        print(json.dumps(bench, indent=2))
        if args.json is not None:
            atomic_write_text(args.json, json.dumps(bench, indent=2))
        raise SystemExit(0)
    chosen = [
        r
        for r in ablation_rows(args.protonet_episodes, args.maml_steps)
        if re.search(args.match, r[0])
    ]
    seeds = [int(s) for s in args.seeds.split(",")]
    print_ablation(ablation(chosen, seeds, args.episodes, load_digits_tensors(), args.json))
