"""Reward models: `JetMoeForSequenceClassification` with one output, Bradley-Terry on `chosen` / `rejected` pairs,
trained from a recipe with TRL's `RewardTrainer`.

jetmoe-ft rm --config recipes/tiny/rm.yaml [--key value ...]
accelerate launch -m jetmoe_ft.rm --config recipes/tiny/rm.yaml
(`jetmoe-ft cls` with `num_labels: 1` runs this loop too.)

The run goes through the JetMoE trainer layer (router loss in the training loss, routing health), trains the
`score` head whole (also under LoRA, where it is in `modules_to_save` and saved with the adapter), and gives the
model a pad token id so batches of several rows find each row's last token. The head scores GRPO rollouts
(`reward_funcs`) and eval-gen answers (`--reward_model`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from trl import RewardConfig, RewardTrainer

from .adapters.adapt import adapt_model
from .config import RecipeError, parse_recipe, recipe_key
from .data import load_recipe_datasets
from .loading import check_recipe_model, load_recipe_model, load_recipe_tokenizer, resolve_pad_token
from .modeling import JetMoeForSequenceClassification
from .training.runs import (
    before_after,
    finish_head_run,
    make_trainer,
    prepare_processes,
    run_command,
    start_run,
    train_with_evaluations,
)
from .training.trainers import JetMoeTrainerMixin


@dataclass
class RewardArguments:
    """Recipe keys of a reward model run; `max_length` and `pad_token` are `RewardConfig`'s."""

    num_labels: int | None = recipe_key(
        1, "Outputs of the head: 1, a reward model (Bradley-Terry on `chosen` / `rejected` pairs)."
    )

    def __post_init__(self):
        if self.num_labels not in (None, 1):
            raise RecipeError(
                f"num_labels: {self.num_labels} trains a classifier; run `jetmoe-ft cls` (a reward model has 1)."
            )


class JetMoeRewardTrainer(JetMoeTrainerMixin, RewardTrainer):
    """TRL's `RewardTrainer` (Bradley-Terry on chosen / rejected pairs) with the JetMoE trainer layer."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one reward-model recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_recipe(RewardConfig, argv, task_cls=RewardArguments)
    check_recipe_model(recipe)  # against the model's config.json, before data or weights load
    args = recipe.training

    data = load_recipe_datasets(recipe.data, "rm", seed=args.seed)
    tokenizer = load_recipe_tokenizer(recipe)
    resolve_pad_token(tokenizer, args.pad_token)
    run = start_run(recipe, data)
    model = load_recipe_model(
        recipe, JetMoeForSequenceClassification, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model = adapt_model(recipe, model, train_dataset=data["train"], tokenizer=tokenizer, task_type="SEQ_CLS")

    trainer = make_trainer(JetMoeRewardTrainer, recipe, model, data, tokenizer)
    metrics = train_with_evaluations(trainer, run)
    finish_head_run(trainer, recipe, tokenizer, metrics, held_out_line(metrics))
    return metrics


def held_out_line(metrics: dict[str, Any]) -> list[str]:
    """`Held-out pairwise accuracy (chosen scored above rejected): B before -> A after ...`, with held-out data."""
    change = before_after(metrics, "accuracy")
    if change is None:
        return []
    margin = metrics["eval_after_margin"]
    return [
        f"Held-out pairwise accuracy (chosen scored above rejected): {change} (chance 0.5); mean margin {margin:.3f}."
    ]


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.rm`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
