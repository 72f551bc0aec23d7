"""Sequence classification: `JetMoeForSequenceClassification` trained from a recipe with transformers' `Trainer`.

jetmoe-ft cls --config recipes/tiny/cls.yaml [--key value ...]
accelerate launch -m jetmoe_ft.cls --config recipes/tiny/cls.yaml

`text` / `label` rows, cross-entropy; label names come from the data (a `ClassLabel`, or the set of string
labels) and are saved as `id2label` / `label2id` in the model's config. The run goes through the JetMoE trainer
layer (router loss in the training loss, routing health), trains the `score` head whole (also under LoRA, where it
is in `modules_to_save` and saved with the adapter), and gives the model a pad token id so batches of several rows
find each row's last token. Reward models (one output, `chosen` / `rejected` pairs) are `jetmoe_ft.rm`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import DatasetDict
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from .adapters.adapt import adapt_model
from .config import RecipeError, parse_recipe, recipe_key
from .data import load_cls_data, tokenize_texts
from .evaluation.metrics import majority_scores, training_accuracy
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
class ClsArguments:
    """Recipe keys of a classification run."""

    num_labels: int | None = recipe_key(
        None, "Classes of the head; unset: taken from the data (1 is a reward model: `jetmoe-ft rm`)."
    )
    max_length: int = recipe_key(512, "Truncate texts to this many tokens.")
    text_column: str = recipe_key("text", "Column holding the text to classify.")
    label_column: str = recipe_key("label", "Column holding the label.")
    pad_token: str | None = recipe_key(
        None, "Pad token when the tokenizer has none (default: its eos, then unk token)."
    )

    def __post_init__(self):
        if self.num_labels == 1:
            raise RecipeError(
                "num_labels: 1 trains a reward model; run `jetmoe-ft rm` (or `-m jetmoe_ft.rm`) with this recipe."
            )
        if self.num_labels is not None and self.num_labels < 2:
            raise RecipeError(
                f"num_labels: expected at least 2 classes (1 is a reward model), got {self.num_labels}."
            )


class JetMoeClassificationTrainer(JetMoeTrainerMixin, Trainer):
    """transformers' `Trainer` (cross-entropy) with the JetMoE trainer layer.

    The model's cross-entropy is a per-batch mean: the Trainer must divide it by the accumulation steps rather
    than hand `num_items_in_batch` to a loss that ignores it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one classification recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_recipe(TrainingArguments, argv, task_cls=ClsArguments)
    check_recipe_model(recipe)  # against the model's config.json, before data or weights load
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

    trainer = make_trainer(
        JetMoeClassificationTrainer,
        recipe,
        model,
        tokenized,
        tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=training_accuracy,
    )
    metrics = {**train_with_evaluations(trainer, run), "num_labels": len(names)}
    if "test" in data:
        labels = np.asarray(data["test"]["label"])
        metrics["eval_majority_accuracy"] = majority_scores(labels, len(names))["accuracy"]
    finish_head_run(trainer, recipe, tokenizer, metrics, held_out_line(metrics, data, names))
    return metrics


def held_out_line(metrics: dict[str, Any], data, names: list[str]) -> list[str]:
    """`Held-out accuracy (N texts, C classes): B before -> A after; majority class M.`, with held-out data."""
    change = before_after(metrics, "accuracy")
    if change is None:
        return []
    texts, majority = len(data["test"]), metrics["eval_majority_accuracy"]
    return [
        f"Held-out accuracy ({texts} texts, {len(names)} classes): {change}; majority class {majority:.3f}."
    ]


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.cls`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
