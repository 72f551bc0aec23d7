"""Preference alignment of JetMoE (DPO and TRL's other pairwise losses) from a YAML recipe with TRL's `DPOTrainer`.

jetmoe-ft dpo --config recipes/tiny/dpo.yaml [--key value ...]
accelerate launch -m jetmoe_ft.dpo --config recipes/tiny/dpo.yaml

The reference policy is the starting model: the adapter disabled with LoRA, else a frozen copy or precomputed
log-probabilities (`jetmoe_ft.training.reference`).
"""

from __future__ import annotations

import sys

from trl import DPOConfig, DPOTrainer

from .adapters.adapt import adapt_model
from .config import parse_recipe
from .data import check_preferences, load_recipe_datasets
from .evaluation.preference_report import preference_lines
from .loading import check_recipe_model, check_tokenizer, load_recipe_model, load_recipe_tokenizer
from .training.reference import StartingModelReference, record_stacked_base, reference_kind, reference_model
from .training.runs import (
    finish_run,
    make_trainer,
    memory_metrics,
    prepare_processes,
    run_command,
    start_run,
    train_with_evaluations,
)
from .training.trainers import JetMoeTrainerMixin


class JetMoeDPOTrainer(StartingModelReference, JetMoeTrainerMixin, DPOTrainer):
    """TRL's `DPOTrainer` with the JetMoE trainer layer, and a LoRA reference that is the base model with the
    adapter disabled (no copy of a fresh adapter)."""


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

    trainer = make_trainer(JetMoeDPOTrainer, recipe, model, data, tokenizer, ref_model=reference)
    metrics = train_with_evaluations(trainer, run)
    metrics |= {"reference": reference_kind(trainer), **memory_metrics(trainer)}
    finish_run(
        trainer,
        recipe,
        tokenizer,
        metrics,
        preference_lines(metrics, "rewards/accuracies", "rewards/margins"),
    )
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.dpo`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
