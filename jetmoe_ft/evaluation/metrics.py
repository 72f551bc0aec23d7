"""Evaluation statistics shared by `eval-cls` and `eval-gen`: scikit-learn scores, calibration, majority
baseline, and percentile bootstrap intervals (plain and paired)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

N_BINS = 15
CONFIDENCE = 0.95


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Sum over equal-width confidence bins of (share of examples) x |accuracy - mean confidence|.

    Bins are (lo, hi] as in Guo et al. 2017, with a confidence of exactly 0 in the first bin.
    """
    bins = [(acc, conf, count) for acc, conf, count in reliability_bins(confidence, correct, n_bins) if count]
    total = sum(count for _, _, count in bins)
    return float(sum(count * abs(acc - conf) for acc, conf, count in bins) / total) if total else float("nan")


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS
) -> list[tuple[float, float, int]]:
    """(accuracy, mean confidence, count) of each of `n_bins` equal-width bins; empty bins are (nan, nan, 0)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        chosen = index == b
        count = int(chosen.sum())
        bins.append(
            (float(correct[chosen].mean()), float(confidence[chosen].mean()), count)
            if count
            else (float("nan"), float("nan"), 0)
        )
    return bins


def classification_scores(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, float]:
    """Flat scalar metrics of one set of predictions: `accuracy`, `macro_f1`, `weighted_f1`, `ece`,
    `roc_auc` (two classes), and `precision/<class>`, `recall/<class>`, `f1/<class>`."""
    classes = list(range(len(names)))
    predicted = probs.argmax(-1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, average=None, zero_division=0
    )
    # sklearn's macro / weighted F1 are these means of the per-class F1; one call instead of three keeps
    # the bootstrap fast
    scores = {
        "accuracy": accuracy_score(labels, predicted),
        "macro_f1": f1.mean(),
        "weighted_f1": np.average(f1, weights=support) if support.sum() else 0.0,
        "ece": expected_calibration_error(probs.max(-1), predicted == labels),
    }
    if len(names) == 2:
        scores["roc_auc"] = _binary_auc(labels, probs[:, 1])
    for i, name in enumerate(names):
        scores[f"precision/{name}"] = precision[i]
        scores[f"recall/{name}"] = recall[i]
        scores[f"f1/{name}"] = f1[i]
    return {key: float(value) for key, value in scores.items()}


def _binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC, or nan when only one class is present (a bootstrap resample can draw one class only)."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def majority_scores(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and F1 of always predicting the most frequent label of `labels` (ties: the lowest id)."""
    majority = int(np.bincount(labels, minlength=num_classes).argmax())
    predicted = np.full_like(labels, majority)
    classes = list(range(num_classes))
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(
            f1_score(labels, predicted, labels=classes, average="weighted", zero_division=0)
        ),
    }


def reward_scores(margins: np.ndarray) -> dict[str, float]:
    """Pairwise accuracy (chosen strictly above rejected), mean margin, and the calibration error of the
    Bradley-Terry probability that the pair is ordered as the model says."""
    correct = margins > 0
    confidence = 1.0 / (1.0 + np.exp(-np.abs(margins)))
    return {
        "accuracy": float(correct.mean()),
        "mean_margin": float(margins.mean()),
        "ece": expected_calibration_error(confidence, correct),
    }


def bootstrap_intervals(
    statistic: Callable[[np.ndarray], dict[str, float]],
    size: int,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, list[float]]:
    """Percentile bootstrap: `statistic(indices)` on `resamples` draws of `size` indices with replacement;
    returns [low, high] per key. Draws where a statistic is undefined (nan) are left out of its interval."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for key, value in statistic(rng.integers(0, size, size)).items():
            draws.setdefault(key, []).append(value)
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for key, values in draws.items():
        values = np.asarray(values, dtype=float)
        values = values[~np.isnan(values)]
        intervals[key] = (
            [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
            if len(values)
            else [float("nan")] * 2
        )
    return intervals


def with_intervals(point: dict[str, float], intervals: dict[str, list[float]]) -> dict[str, dict]:
    """`{name: {"value": v, "ci95": [low, high]}}`."""
    return {key: {"value": value, "ci95": intervals.get(key)} for key, value in point.items()}


def paired_bootstrap(
    first: Sequence,
    second: Sequence,
    statistic: Callable[[Sequence], float] = np.mean,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The difference `statistic(second) - statistic(first)` of paired per-example values, with a percentile
    bootstrap interval: each draw resamples the same example indices for both sides, so what the examples
    share cancels. Returns `{"first", "second", "difference", "ci95"}`; nan draws are left out."""
    if len(first) != len(second):
        raise ValueError(f"paired values differ in length: {len(first)} and {len(second)}.")

    def take(values: Sequence, index: np.ndarray):
        return values[index] if isinstance(values, np.ndarray) else [values[i] for i in index]

    size = len(first)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        index = rng.integers(0, size, size)
        draws.append(float(statistic(take(second, index))) - float(statistic(take(first, index))))
    draws = np.asarray(draws)
    draws = draws[~np.isnan(draws)]
    tail = 100 * (1 - confidence) / 2
    low, high = (
        (np.percentile(draws, tail), np.percentile(draws, 100 - tail)) if len(draws) else (np.nan,) * 2
    )
    base, tuned = float(statistic(first)), float(statistic(second))
    return {"first": base, "second": tuned, "difference": tuned - base, "ci95": [float(low), float(high)]}


def training_accuracy(prediction) -> dict[str, float]:
    """Held-out accuracy and macro F1 from a Trainer's `EvalPrediction`, during training (`eval-cls` reports
    the full set)."""
    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predicted = np.asarray(logits).argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }
