"""What the preference loops (DPO, KTO, ORPO / SimPO) report at the end of a run: the reference and memory, and
the held-out pairwise accuracy and margin of the method's implicit reward, before -> after."""

from __future__ import annotations

import math

import numpy as np


def preference_lines(
    metrics: dict,
    accuracy: str,
    margin: str,
    standard_error: str | None = None,
    what: str = "reward accuracy",
) -> list[str]:
    """Reference and memory, then the held-out pairwise accuracy (with its standard error when `standard_error`
    names one) and mean margin, before -> after. `what` names the accuracy in the line."""
    lines = [
        f"Reference: {metrics.get('reference', 'none')}; weights held {metrics['memory/weights_mb']:.0f} MiB, "
        f"peak {metrics['memory/peak_mb']:.0f} MiB."
    ]
    if f"eval_after_{accuracy}" not in metrics:
        return lines

    def value(when: str, name: str) -> str:
        error = metrics.get(f"eval_{when}_{standard_error}") if standard_error and name == accuracy else None
        shown = f"{metrics[f'eval_{when}_{name}']:.3f}"
        return f"{shown} ± {error:.3f}" if error is not None else shown

    was = {
        name: f"{value('before', name)} before -> " if f"eval_before_{name}" in metrics else ""
        for name in (accuracy, margin)
    }
    note = ""
    if f"eval_before_{accuracy}" in metrics and metrics.get("reference", "none") != "none":
        if metrics.get(f"eval_before_{margin}") == 0.0:
            note = " (before training the policy is the reference: every reward is 0, a tie, counted wrong)"
    lines.append(
        f"Held-out {what}: {was[accuracy]}{value('after', accuracy)} after; mean margin "
        f"{was[margin]}{value('after', margin)} after{note}."
    )
    return lines


def pair_metrics(margins, prefix: str) -> dict[str, float]:
    """Pairwise accuracy (chosen strictly above rejected: a tie counts wrong), its standard error, the mean
    margin and the number of held-out pairs, as `{prefix}_pairs/...` (`eval_before`, `eval_after`)."""
    margins = np.asarray(margins, dtype=float)
    if not len(margins):
        return {}
    accuracy = float((margins > 0).mean())
    return {
        f"{prefix}_pairs/accuracy": accuracy,
        f"{prefix}_pairs/accuracy_se": math.sqrt(accuracy * (1 - accuracy) / len(margins)),
        f"{prefix}_pairs/margin": float(margins.mean()),
        f"{prefix}_pairs/count": len(margins),
    }
