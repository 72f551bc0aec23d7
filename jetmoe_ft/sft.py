"""Supervised fine-tuning of JetMoE from a YAML recipe with TRL's `SFTTrainer`.

jetmoe-ft sft --config recipes/tiny/sft.yaml [--key value ...]
accelerate launch -m jetmoe_ft.sft --config recipes/tiny/sft.yaml
"""

import sys

from trl import SFTConfig, SFTTrainer

from .adapters.adapt import adapt_model
from .config import parse_recipe
from .data import load_recipe_datasets
from .loading import check_recipe_model, check_tokenizer, load_recipe_model, load_recipe_tokenizer
from .training.runs import (
    before_after,
    finish_run,
    make_trainer,
    prepare_processes,
    run_command,
    start_run,
    train_with_evaluations,
)
from .training.trainers import JetMoeTrainerMixin


class JetMoeSFTTrainer(JetMoeTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` with the JetMoE trainer layer: next-token loss from our LM head, plus the router loss
    while training; the evaluation loss is the next-token loss alone."""

    @property
    def same_gradient_per_token(self) -> bool:
        return self.args.loss_type == "nll"  # DFT weighs each token by its probability


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run one SFT recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_recipe(SFTConfig, argv)
    check_recipe_model(recipe)  # against the model's config.json, before data or weights load
    args = recipe.training

    data = load_recipe_datasets(recipe.data, "sft", seed=args.seed, text_field=args.dataset_text_field)
    tokenizer = load_recipe_tokenizer(recipe)
    check_tokenizer(tokenizer, data["train"], args.max_length, args.pad_token)
    run = start_run(recipe, data)
    model = adapt_model(recipe, load_recipe_model(recipe), train_dataset=data["train"], tokenizer=tokenizer)

    trainer = make_trainer(JetMoeSFTTrainer, recipe, model, data, tokenizer)
    metrics = train_with_evaluations(trainer, run)
    loss = before_after(metrics, "loss")
    finish_run(
        trainer,
        recipe,
        tokenizer,
        metrics,
        [f"Held-out loss (next token, assistant turns): {loss}."] if loss else [],
    )
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.sft`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
