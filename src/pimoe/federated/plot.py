"""PNG of test accuracy per round, one line per run, with the centralized peer as a dashed line."""

from __future__ import annotations

from pathlib import Path

from pimoe.io import save_png


def plot_accuracy(
    curves: dict[str, list[float]], centralized: float | None, path: Path, title: str = ""
) -> None:
    """Write ``curves`` (label → accuracy per round, index 0 = before training) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, acc in curves.items():
        ax.plot(range(len(acc)), acc, label=label, linewidth=1.5)
    if centralized is not None:
        ax.axhline(
            centralized,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"centralized ({centralized:.3f})",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (360 held-out digits)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Federated training on sklearn digits")
    save_png(fig, path, dpi=110, bbox_inches="tight")
