"""The pictures a run and its evaluations leave: expert-load heat-maps, confusion matrices, reliability diagrams.

Each function draws on a bare matplotlib `Figure` (rendered with Agg; no pyplot, no global backend) and writes
one PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .metrics import N_BINS, reliability_bins


def plot_expert_load(
    load: torch.Tensor | np.ndarray,
    path: str | Path,
    title: str | None = None,
    marked: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """Heat-map of a [L, 2, E] expert load (share of tokens): MoA and MoE panels, layers x experts.
    Cells where the boolean [L, 2, E] `marked` is true get a red frame."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no global backend
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter

    load = np.asarray(load.detach().cpu() if isinstance(load, torch.Tensor) else load, dtype=float)
    num_layers, _, num_experts = load.shape
    vmax = max(float(load.max()), 1e-9)
    size = (min(2.0 + 1.1 * num_experts, 24.0), min(1.2 + 0.45 * num_layers, 16.0))
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for k, (ax, name) in enumerate(zip(axes, ("MoA (attention experts)", "MoE (MLP experts)"), strict=True)):
        image = ax.imshow(load[:, k], cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        _annotate(ax, load[:, k], vmax)
        if marked is not None:
            for row, col in np.argwhere(np.asarray(marked)[:, k]):
                ax.add_patch(
                    Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
                )
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_layers))
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="share of tokens (%)", format=PercentFormatter(1.0, decimals=0))
    fig.suptitle(title or f"Expert load (uniform = {1 / num_experts:.1%})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _annotate(ax, shares: np.ndarray, vmax: float) -> None:
    """Write each cell's share in percent, dark on light cells; skipped when cells get too small."""
    if shares.size > 512:
        return
    for (row, col), share in np.ndenumerate(shares):
        colour = "black" if share > 0.6 * vmax else "white"
        ax.text(col, row, f"{100 * share:.0f}", ha="center", va="center", fontsize=7, color=colour)


def plot_confusion_matrix(matrix: list[list[int]], names: list[str], path: Path) -> Path:
    """Counts per (true, predicted) class pair, as a heat map."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no global backend
    from sklearn.metrics import ConfusionMatrixDisplay

    size = min(3.0 + 0.6 * len(names), 20.0)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=names).plot(
        ax=ax,
        cmap="Blues",
        values_format="d",
        colorbar=True,
        xticks_rotation=45 if len(names) > 4 else "horizontal",
    )
    ax.set_title("Confusion matrix (rows: true class)")
    fig.savefig(path, dpi=100)
    return path


def plot_reliability(confidence: np.ndarray, correct: np.ndarray, path: Path, ece: float, what: str) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and how many fall in each bin."""
    from matplotlib.figure import Figure

    bins = reliability_bins(confidence, correct)
    centers = (np.arange(N_BINS) + 0.5) / N_BINS
    accuracy = np.array([acc for acc, _, _ in bins])
    counts = np.array([count for _, _, count in bins])
    fig = Figure(figsize=(5.5, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers, np.nan_to_num(accuracy), width=1 / N_BINS, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability ({what}); ECE {ece:.3f}, {N_BINS} bins")
    top.legend(loc="upper left")
    bottom.bar(centers, counts, width=1 / N_BINS, edgecolor="black", color="grey")
    bottom.set_xlabel(f"confidence ({what})")
    bottom.set_ylabel("examples")
    bottom.set_xlim(0, 1)
    fig.savefig(path, dpi=100)
    return path
