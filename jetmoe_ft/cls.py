"""Sequence classification and reward models: `JetMoeForSequenceClassification` trained from a recipe.

jetmoe-ft cls --config recipes/tiny/cls.yaml [--key value ...]
accelerate launch -m jetmoe_ft.cls --config recipes/tiny/cls.yaml

Two modes, chosen by the recipe's `num_labels`:
- classification (unset: taken from the data, or >= 2): `text` / `label` rows, cross-entropy, a
  transformers `Trainer`; label names come from the data (a `ClassLabel`, or the set of string labels)
  and are saved as `id2label` / `label2id` in the model's config;
- reward model (`num_labels: 1`): `chosen` / `rejected` pairs, Bradley-Terry loss, TRL's `RewardTrainer`.

Both go through the JetMoE trainer layer (router loss in the training loss, routing health), train the
`score` head whole (also under LoRA, where it is in `modules_to_save` and saved with the adapter), and give
the model a pad token id so batches of several rows find each row's last token.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import DatasetDict
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
from trl import RewardConfig, RewardTrainer

from .adapt import adapt_model
from .config import RecipeError, parse_recipe
from .data import load_cls_data, load_recipe_datasets, tokenize_texts
from .distributed import is_main_process
from .loading import check_recipe_model, load_recipe_model, load_recipe_tokenizer, resolve_pad_token
from .metrics import majority_scores, training_accuracy
from .modeling import JetMoeForSequenceClassification
from .recipe_values import value_before_parsing
from .runs import finish_run, prepare_processes, run_command, start_run, train_with_evaluations
from .trainers import JetMoeTrainerMixin


@dataclass
class RewardArguments:
    """Recipe keys of a reward model run (`num_labels: 1`); `max_length` is `RewardConfig`'s."""

    num_labels: int | None = field(
        default=None,
        metadata={
            "help": "Classes of the head; unset: taken from the data. 1 trains a reward model "
            "(Bradley-Terry on `chosen` / `rejected` pairs)."
        },
    )


@dataclass
class ClsArguments(RewardArguments):
    """Recipe keys of a classification run."""

    max_length: int = field(default=512, metadata={"help": "Truncate texts to this many tokens."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text to classify."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label."})
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Pad token when the tokenizer has none (default: its eos, then unk token)."},
    )

    def __post_init__(self):
        if self.num_labels is not None and self.num_labels < 1:
            raise RecipeError(f"num_labels: expected 1 (reward model) or at least 2, got {self.num_labels}.")


def is_reward_recipe(argv: list[str]) -> bool:
    """Whether `--config R.yaml [--num_labels N]` asks for a reward model (`num_labels: 1`); read before parsing,
    because the mode decides the training arguments class."""
    return str(value_before_parsing(argv, "num_labels")).strip() == "1"


def parse_cls_recipe(argv: list[str]):
    """The recipe of either mode: `TrainingArguments` + `ClsArguments`, or `RewardConfig` + `RewardArguments`."""
    if is_reward_recipe(argv):
        return parse_recipe(RewardConfig, argv, task_cls=RewardArguments)
    return parse_recipe(TrainingArguments, argv, task_cls=ClsArguments)


class JetMoeClassificationTrainer(JetMoeTrainerMixin, Trainer):
    """transformers' `Trainer` (cross-entropy) with the JetMoE trainer layer.

    The model's cross-entropy is a per-batch mean: the Trainer must divide it by the accumulation steps rather
    than hand `num_items_in_batch` to a loss that ignores it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False


class JetMoeRewardTrainer(JetMoeTrainerMixin, RewardTrainer):
    """TRL's `RewardTrainer` (Bradley-Terry on chosen / rejected pairs) with the JetMoE trainer layer."""


def train_classifier(recipe) -> dict[str, Any]:
    """Classification mode: cross-entropy on `text` / `label` data."""
    args, task = recipe.training, recipe.task
    data, names = load_cls_data(recipe, args.seed)
    tokenizer = load_recipe_tokenizer(recipe)
    resolve_pad_token(tokenizer, task.pad_token)
    run = start_run(recipe, data)
    model = load_recipe_model(
        recipe,
        JetMoeForSequenceClassification,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        pad_token_id=tokenizer.pad_token_id,
    )
    model = adapt_model(recipe, model, train_dataset=data["train"], tokenizer=tokenizer, task_type="SEQ_CLS")
    tokenized = DatasetDict(
        {split: tokenize_texts(ds, tokenizer, task.max_length) for split, ds in data.items()}
    )

    trainer = JetMoeClassificationTrainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("test"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=training_accuracy,
    )
    metrics = {**train_with_evaluations(trainer, run), "num_labels": len(names)}
    lines = []
    if "test" in data:
        labels = np.asarray(data["test"]["label"])
        metrics["eval_majority_accuracy"] = majority_scores(labels, len(names))["accuracy"]
        if "eval_after_accuracy" in metrics:
            was = (
                f"{metrics['eval_before_accuracy']:.3f} before -> "
                if "eval_before_accuracy" in metrics
                else ""
            )
            lines.append(
                f"Held-out accuracy ({len(data['test'])} texts, {len(names)} classes): {was}"
                f"{metrics['eval_after_accuracy']:.3f} after; majority class {metrics['eval_majority_accuracy']:.3f}."
            )
    finish_head_run(trainer, recipe, tokenizer, metrics, lines)
    return metrics


def train_reward_model(recipe) -> dict[str, Any]:
    """Reward mode: Bradley-Terry on `chosen` / `rejected` pairs."""
    args = recipe.training
    data = load_recipe_datasets(recipe.data, "rm", seed=args.seed)
    tokenizer = load_recipe_tokenizer(recipe)
    resolve_pad_token(tokenizer, args.pad_token)
    run = start_run(recipe, data)
    model = load_recipe_model(
        recipe, JetMoeForSequenceClassification, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model = adapt_model(recipe, model, train_dataset=data["train"], tokenizer=tokenizer, task_type="SEQ_CLS")

    trainer = JetMoeRewardTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("test"),
        processing_class=tokenizer,
    )
    metrics = train_with_evaluations(trainer, run)
    lines = []
    if "eval_after_accuracy" in metrics:
        was = f"{metrics['eval_before_accuracy']:.3f} before -> " if "eval_before_accuracy" in metrics else ""
        lines.append(
            f"Held-out pairwise accuracy (chosen scored above rejected): {was}{metrics['eval_after_accuracy']:.3f} "
            f"after (chance 0.5); mean margin {metrics['eval_after_margin']:.3f}."
        )
    finish_head_run(trainer, recipe, tokenizer, metrics, lines)
    return metrics


def finish_head_run(trainer, recipe, tokenizer, metrics: dict[str, Any], lines: list[str]) -> None:
    """`finish_run`, plus the base config beside a LoRA adapter (`num_labels`, `id2label`, `pad_token_id`)."""
    output_dir = finish_run(trainer, recipe, tokenizer, metrics, lines)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config") and is_main_process():
        model.get_base_model().config.save_pretrained(output_dir)
    print(f"Full evaluation: jetmoe-ft eval-cls --model {output_dir}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one classification or reward-model recipe; returns the final metrics."""
    prepare_processes()
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = parse_cls_recipe(argv)
    check_recipe_model(recipe)  # against the model's config.json, before data or weights load
    if isinstance(recipe.training, RewardConfig):
        return train_reward_model(recipe)
    return train_classifier(recipe)


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.cls`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
