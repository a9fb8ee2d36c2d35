"""``pimoe federate``: one federated run (digits or a user task), with a progress bar, JSON and a PNG.

Every option is checked before any work (the task is imported and its model built once), so a
bad value ends the command with one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pimoe.federated.config import FederatedConfig


def federate(
    clients: Annotated[
        int, typer.Option(min=2, help="Number of clients (Flower SuperNodes).")
    ] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 30,
    partition: Annotated[
        str, typer.Option(help="iid or dirichlet (label-skewed non-IID).")
    ] = "dirichlet",
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration: smaller = more skewed.")
    ] = 0.5,
    dropout: Annotated[
        float,
        typer.Option(min=0.0, max=0.99, help="Probability that a sampled client fails in a round."),
    ] = 0.0,
    strategy: Annotated[
        str,
        typer.Option(
            help="fedavg, fedprox, fedmedian (coordinate-wise median) or fedtrimmedavg (trimmed mean)."
        ),
    ] = "fedavg",
    proximal_mu: Annotated[float, typer.Option(help="FedProx proximal weight mu.")] = 0.01,
    fraction: Annotated[float, typer.Option(help="Fraction of clients sampled per round.")] = 0.2,
    selection: Annotated[
        str,
        typer.Option(help="Client selection: uniform, size (by data size) or loss (by last loss)."),
    ] = "uniform",
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 5,
    lr: Annotated[float, typer.Option(help="Client SGD learning rate.")] = 0.1,
    task: Annotated[
        str,
        typer.Option(
            help="digits (built in) or module:attr naming a pimoe.federated.task.FederatedTask."
        ),
    ] = "digits",
    model: Annotated[
        str,
        typer.Option(help="The digits task's model: mlp (64-128-10) or moe (a PiMoE classifier)."),
    ] = "mlp",
    personal_layers: Annotated[
        str,
        typer.Option(help="Comma-separated parameter prefixes kept on clients, e.g. moe.experts."),
    ] = "",
    clip_norm: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Clip every client's change to this L2 norm (0 = off); works with --secure-agg / --he.",
        ),
    ] = 0.0,
    trim_beta: Annotated[
        float, typer.Option(min=0.0, max=0.49, help="fedtrimmedavg: fraction cut from each tail.")
    ] = 0.2,
    norm_factor: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Reject plain updates whose change norm is > this x the round's median (0 = off).",
        ),
    ] = 10.0,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(help="DP-SGD on every client with this target epsilon (delta 1e-5)."),
    ] = None,
    secure_agg: Annotated[
        bool,
        typer.Option(
            "--secure-agg",
            help="SecAgg+ secure aggregation (self-masks + Shamir-shared recovery): the server sees only the sum, "
            "even if it lies about dropouts, while a majority of each round's clients is honest and "
            "their public keys are not replaced (no PKI: the server relays them).",
        ),
    ] = False,
    he: Annotated[
        bool,
        typer.Option(
            "--he",
            help="Homomorphic (CKKS) aggregation: clients share the secret key and decrypt only the round's tagged sum "
            "over a majority, once each (a server asking several clients can still difference their sums).",
        ),
    ] = False,
    audit_log: Annotated[
        Path | None, typer.Option(help="Append privacy-relevant events here (JSON lines).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="ray (Flower's simulation runtime) or inprocess (no Ray).")
    ] = "ray",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results here as JSON.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="PNG of accuracy per round (default: next to --json).")
    ] = None,
) -> None:
    """Federated training of a task's model split among N clients (Flower simulation; default: sklearn digits)."""
    import torch
    from rich.progress import Progress

    from pimoe.federated.plot import plot_accuracy
    from pimoe.federated.simulation import run_federated
    from pimoe.federated.task import centralized_accuracy
    from pimoe.io import atomic_write_text

    cfg = checked_config(
        backend,
        clients=clients,
        rounds=rounds,
        partition=partition,
        alpha=alpha,
        dropout=dropout,
        strategy=strategy,
        proximal_mu=proximal_mu,
        fraction=fraction,
        selection=selection,
        local_epochs=local_epochs,
        lr=lr,
        task=task,
        model=model,
        personal_layers=personal_layers,
        clip_norm=clip_norm,
        trim_beta=trim_beta,
        norm_factor=norm_factor,
        dp_epsilon=dp_epsilon or 0.0,
        secure_agg=secure_agg,
        he=he,
        audit_log=str(audit_log or ""),
        seed=seed,
    )
    torch.set_num_threads(1)
    from pimoe.federated.task import load_task

    central = centralized_accuracy(load_task(cfg), clients, seed=seed)
    with Progress() as progress:
        bar = progress.add_task(f"{strategy} x {clients} clients", total=rounds)

        def on_round(server_round: int, acc: float) -> None:
            progress.update(
                bar,
                completed=server_round,
                description=f"{strategy} x {clients} clients, acc {acc:.3f}",
            )

        record = run_federated(cfg, backend=backend, on_round=on_round)
    result = {
        "config": cfg.to_run_config(),
        "backend": backend,
        "final_accuracy": record.accuracy[-1],
        "centralized_accuracy": central,
        "ratio_to_centralized": record.accuracy[-1] / central,
        "rounds_to_90pct_of_centralized": record.rounds_to_reach(0.9 * central),
        **record.to_dict(),
    }
    typer.echo(
        f"final accuracy {result['final_accuracy']:.3f} (centralized {central:.3f}, ratio "
        f"{result['ratio_to_centralized']:.3f}); clients per round {record.clients_per_round}"
        + (f"; epsilon {result['epsilon']:.2f}" if "epsilon" in result else "")
    )
    png = plot or (json_path.with_suffix(".png") if json_path else None)
    if png is not None:
        plot_accuracy(
            {f"{task}, {strategy}, {partition}, dropout {dropout:g}": record.accuracy},
            central,
            png,
            title=f"Federated training: {task}",
        )
        typer.echo(f"wrote {png}")
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
        typer.echo(f"wrote {json_path}")


def checked_config(backend: str, **settings: Any) -> FederatedConfig:
    """The run's :class:`FederatedConfig`, after every check that can fail before training.

    Checks the settings, the backend, that the task imports, splits its data among the clients
    and builds an ``nn.Module``, that
    ``personal_layers`` names some of its parameters, and that DP-SGD can train it. Raises
    ``typer.BadParameter`` (one line, no traceback) naming the problem.
    """
    from pimoe.federated.simulation import BACKENDS
    from pimoe.federated.task import load_task

    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"unknown backend {backend!r}; expected one of {BACKENDS}", param_hint="--backend"
        )
    try:
        cfg = FederatedConfig(**settings)
        task = load_task(cfg)
        task.client_data(0, cfg.clients)  # the partition exists (e.g. no more clients than data)
        model = task.make_model(cfg.seed)
        names = [n for n, _ in model.named_parameters()]
        missing = [
            p for p in cfg.personal if not any(n == p or n.startswith(p + ".") for n in names)
        ]
        if missing:
            raise ValueError(
                f"personal layers {missing} match no parameter of the model (e.g. {names[:3]})"
            )
        if cfg.dp_epsilon > 0:
            from pimoe.privacy.dp import check_private

            check_private(model)
    except (ValueError, TypeError) as err:
        raise typer.BadParameter(str(err)) from err
    return cfg
