"""The pictures a training run writes besides its sample grids: the loss curve."""
from __future__ import annotations

from pathlib import Path

from carrara.fileio import atomic_path


def plot_loss(metrics: list[dict], path: Path, title: str) -> None:
    """Loss curve (raw and smoothed, log scale) as a PNG."""
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    loss = [m["loss"] for m in metrics]
    smooth, s = [], loss[0] if loss else 0.0
    for v in loss:
        s = 0.9 * s + 0.1 * v
        smooth.append(s)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
    ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="smoothed")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
