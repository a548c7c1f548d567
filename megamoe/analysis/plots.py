"""PNG figures of the routing analyses (matplotlib, no display needed)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return (n + cols - 1) // cols, cols


def saturation_plot(steps: list[int], saturation: list[list[float]], layers: list[int], path: Path) -> None:
    """saturation[c][l]: checkpoint c (at steps[c]), MoE layer l, against the final checkpoint."""
    fig, ax = plt.subplots(figsize=(6, 4))
    values = np.asarray(saturation)
    for i, layer in enumerate(layers):
        ax.plot(steps, values[:, i], marker="o", label=f"layer {layer}")
    ax.set(xlabel="checkpoint step", ylabel="top-k shared with the final checkpoint", ylim=(0, 1.02),
           title="Router saturation")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def layer_heatmaps(matrices: list[np.ndarray], layers: list[int], title: str, xlabel: str, ylabel: str,
                   path: Path, vmax: float | None = None) -> None:
    """One heatmap per MoE layer (co-activation [E, E], ...)."""
    rows, cols = _grid(len(matrices))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(matrices):]:
        ax.axis("off")
    for ax, m, layer in zip(axes.flat, matrices, layers):
        im = ax.imshow(np.asarray(m), cmap="viridis", vmin=0, vmax=vmax)
        ax.set(title=f"layer {layer}", xlabel=xlabel, ylabel=ylabel)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def domain_plot(specialisation: dict[str, np.ndarray], layers: list[int], path: Path) -> None:
    """specialisation[domain]: [layers, E] ratio to the domain's base rate (1 = none)."""
    fig, axes = plt.subplots(1, len(specialisation), figsize=(5 * len(specialisation), 3), squeeze=False)
    for ax, (domain, m) in zip(axes.flat, specialisation.items()):
        m = np.asarray(m)
        im = ax.imshow(m, cmap="coolwarm", vmin=0, vmax=2, aspect="auto")
        ax.set(title=f"{domain}: share / base rate", xlabel="expert", ylabel="layer",
               yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(im, ax=ax)
    fig.suptitle("Domain specialisation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
