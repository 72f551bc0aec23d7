"""The pictures evaluations leave: confusion matrices, reliability diagrams (the expert-load heat-map is
`jetmoe_ft.modeling.routing.plot_expert_load`).

Each function draws on a bare matplotlib `Figure` (rendered with Agg; no pyplot, no global backend) and writes
one PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import N_BINS, reliability_bins


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
