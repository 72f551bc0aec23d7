"""Preference alignment of JetMoE (DPO and TRL's other pairwise losses) from a YAML recipe with TRL's `DPOTrainer`.

jetmoe-ft dpo --config recipes/tiny/dpo.yaml [--key value ...]
accelerate launch -m jetmoe_ft.dpo --config recipes/tiny/dpo.yaml

The reference policy is the starting model: the adapter disabled with LoRA, else a frozen copy or precomputed
log-probabilities (`jetmoe_ft.reference`).
"""

from __future__ import annotations

import math
import sys

import numpy as np
from trl import DPOConfig, DPOTrainer

from .adapt import adapt_model
from .compat import precompute_ref_logps
from .config import parse_recipe
from .data import check_preferences, load_recipe_datasets
from .loading import check_recipe_model, check_tokenizer, load_recipe_model, load_recipe_tokenizer
from .reference import (
    drop_fresh_reference_adapter,
    record_stacked_base,
    reference_kind,
    reference_model,
    trainable_flags,
)
from .runs import (
    finish_run,
    memory_metrics,
    prepare_processes,
    run_command,
    start_run,
    train_with_evaluations,
)
from .trainers import JetMoeTrainerMixin


class JetMoeDPOTrainer(JetMoeTrainerMixin, DPOTrainer):
    """TRL's `DPOTrainer` with the JetMoE trainer layer, and a LoRA reference that is the base model with the
    adapter disabled (no copy of a fresh adapter)."""

    def __init__(self, model, *args, **kwargs):
        trainable = trainable_flags(model)
        super().__init__(model, *args, **kwargs)
        drop_fresh_reference_adapter(self.model, trainable)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its __init__, after adding its fused heads: the reference must see ours.
        self.install_lm_heads()
        return precompute_ref_logps(JetMoeDPOTrainer, self, dataset, name, batch_size)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run one DPO recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_recipe(DPOConfig, argv)
    check_recipe_model(recipe)  # against the model's config.json, before data or weights load
    args = recipe.training

    data = load_recipe_datasets(recipe.data, "dpo", seed=args.seed)
    tokenizer = load_recipe_tokenizer(recipe)
    data = check_preferences(data, tokenizer, args)
    check_tokenizer(tokenizer, data["train"], args.max_length, args.pad_token)
    run = start_run(recipe, data)
    model = load_recipe_model(recipe)
    reference = reference_model(recipe, model)
    model = adapt_model(recipe, model, train_dataset=data["train"], tokenizer=tokenizer)
    record_stacked_base(model, recipe)

    trainer = JetMoeDPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("test"),
        processing_class=tokenizer,
    )
    metrics = train_with_evaluations(trainer, run)
    metrics.update(
        {
            "reference": reference_kind(trainer),
            **memory_metrics(trainer),
        }
    )
    finish_run(
        trainer,
        recipe,
        tokenizer,
        metrics,
        preference_lines(metrics, "rewards/accuracies", "rewards/margins"),
    )
    return metrics


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


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.dpo`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
