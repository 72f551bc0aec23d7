"""Sequence classification and reward models: `JetMoeForSequenceClassification` trained from a recipe.

jetmoe-ft cls --config recipes/tiny/cls.yaml [--key value ...]
accelerate launch -m jetmoe_ft.cls --config recipes/tiny/cls.yaml

Two modes, chosen by the recipe's `num_labels`:
- classification (unset: taken from the data, or >= 2): `text` / `label` rows, cross-entropy, a
  transformers `Trainer`; label names come from the data (a `ClassLabel`, or the set of string labels)
  and are saved as `id2label` / `label2id` in the model's config;
- reward model (`num_labels: 1`): `chosen` / `rejected` pairs, Bradley-Terry loss, TRL's `RewardTrainer`.

Both add the JetMoE router loss (weight `aux_loss_coef`) to the training loss, train the `score` head
whole (also under LoRA, where it is in `modules_to_save` and saved with the adapter), and give the
model a pad token id so batches of several rows find each row's last token.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, Trainer, TrainingArguments
from trl import RewardConfig, RewardTrainer

from .adapt import adapt_model
from .config import RecipeError, parse_recipe, read_recipe_file
from .loading import load_recipe_model, load_recipe_tokenizer
from .modeling import JetMoeForSequenceClassification
from .recipe_data import load_recipe_datasets
from .runs import (
    finish_run,
    prepare_processes,
    resume_checkpoint,
    run_command,
    train_with_evaluations,
    trained_line,
)


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
    """Whether `--config R.yaml [--num_labels N]` asks for a reward model (`num_labels: 1`).

    Read before parsing, because the mode decides the training arguments class.
    """
    value = None
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        value = read_recipe_file(Path(argv[argv.index("--config") + 1])).get("num_labels")
    for index, token in enumerate(argv):
        if token == "--num_labels" and index + 1 < len(argv):
            value = argv[index + 1]
        elif token.startswith("--num_labels="):
            value = token.split("=", 1)[1]
    return str(value).strip() == "1"


def parse_cls_recipe(argv: list[str]):
    """The recipe of either mode: `TrainingArguments` + `ClsArguments`, or `RewardConfig` + `RewardArguments`."""
    if is_reward_recipe(argv):
        return parse_recipe(RewardConfig, argv, task_cls=RewardArguments)
    return parse_recipe(TrainingArguments, argv, task_cls=ClsArguments)


# ---------------------------------------------------------------------------------------------
# labels


def label_names(train: Dataset, column: str, num_labels: int | None = None) -> list[str]:
    """The class names, in id order: a `ClassLabel`'s names, the sorted string labels, or "0".."n-1"."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        names = sorted({str(value) for value in train[column]})
    elif getattr(feature, "dtype", "").startswith(("int", "uint")):
        values = train[column]
        names = [str(i) for i in range(num_labels or max(values) + 1)]
    else:
        raise RecipeError(
            f"{column}: labels must be class names or integers, got {feature}; "
            "regression heads are not supported (num_labels: 1 trains a reward model on pairs)."
        )
    if num_labels is not None and num_labels != len(names):
        raise RecipeError(
            f"num_labels: {num_labels}, but the training data has {len(names)} classes "
            f"({', '.join(names[:10])}); drop `num_labels:` to take it from the data."
        )
    if len(names) < 2:
        raise RecipeError(f"{column}: the training data has a single class ({names[0]}); need at least 2.")
    return names


def encode_labels(dataset: Dataset, column: str, label2id: dict[str, int], where: str) -> list[int]:
    """Class ids of `dataset[column]` for a head with `label2id`; one clear error for a label it lacks.

    Names (a `ClassLabel`'s or strings) map by name onto a head with named classes; integers map as they
    are, and must lie in 0..num_labels-1.
    """
    feature = dataset.features[column]
    values = dataset[column]
    num_labels = len(label2id)
    if isinstance(feature, ClassLabel) and has_class_names(label2id):
        _check_ids(values, feature.num_classes, where)
        values = [feature.int2str(value) for value in values]
    if values and isinstance(values[0], str):
        unseen = sorted({value for value in values if value not in label2id})
        if unseen:
            more = f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else ""
            raise RecipeError(
                f"{where}: label {unseen[0]!r}{more} is not one of the model's classes ({', '.join(label2id)})."
            )
        return [label2id[value] for value in values]
    _check_ids(values, num_labels, where)
    return list(values)


def has_class_names(label2id: dict[str, int]) -> bool:
    """Whether the classes have names of their own, not the defaults "0".."n-1" or "LABEL_0".."LABEL_n-1"."""
    defaults = ({str(i) for i in range(len(label2id))}, {f"LABEL_{i}" for i in range(len(label2id))})
    return set(label2id) not in defaults


def _check_ids(values: list, num_labels: int, where: str) -> None:
    bad = sorted(
        {value for value in values if not isinstance(value, int) or not 0 <= value < num_labels}, key=str
    )
    if bad:
        raise RecipeError(
            f"{where}: labels must be in 0..{num_labels - 1} (num_labels {num_labels}); found "
            f"{', '.join(map(str, bad[:5]))}. Remove unlabelled rows (-1); more classes need a larger `num_labels`."
        )


def majority_share(labels: list[int]) -> float:
    """Accuracy of always predicting the most frequent label."""
    return Counter(labels).most_common(1)[0][1] / len(labels) if labels else float("nan")


# ---------------------------------------------------------------------------------------------
# data


def resolve_pad_token(tokenizer: PreTrainedTokenizerBase, pad_token: str | None = None) -> None:
    """Give the tokenizer a pad token: the recipe's, its own, else eos, else unk.

    The model reads each row's last real token through the attention mask, so any token pads safely;
    `pad_token_id` also goes into the model config (transformers #34055: a pad token on the tokenizer
    alone leaves `config.pad_token_id` unset and batches of several rows fail).
    """
    choice = pad_token or tokenizer.pad_token or tokenizer.eos_token or tokenizer.unk_token
    if choice is None:
        raise RecipeError("The tokenizer has no pad, eos or unk token: set `pad_token:`.")
    if choice not in tokenizer.get_vocab():
        raise RecipeError(f"pad_token: {choice!r} is not in the tokenizer's vocabulary.")
    tokenizer.pad_token = choice


def load_cls_data(recipe, seed: int) -> tuple[DatasetDict, list[str]]:
    """`text` / `label` splits with integer labels, and the class names; all checks before a model loads."""
    task = recipe.task
    data = load_recipe_datasets(
        recipe.data, "cls", seed=seed, text_field=task.text_column, label_field=task.label_column
    )
    names = label_names(data["train"], task.label_column, task.num_labels)
    label2id = {name: i for i, name in enumerate(names)}
    encoded = DatasetDict()
    for split, dataset in data.items():
        ids = encode_labels(dataset, task.label_column, label2id, f"{split} split")
        texts = [str(text) if text is not None else "" for text in dataset[task.text_column]]
        encoded[split] = Dataset.from_dict({"text": texts, "label": ids})
    return encoded, names


def tokenize_texts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """`input_ids` / `attention_mask` of each text, truncated to `max_length`; other columns but `label` dropped."""
    columns = [name for name in dataset.column_names if name != "label"]
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=columns,
        desc="Tokenizing",
    )


# ---------------------------------------------------------------------------------------------
# trainers


class _RouterLossLogging:
    """Mean JetMoE router loss of the training steps since the last log, added to the logs."""

    def _init_router_loss(self, model) -> None:
        self.aux_loss_coef = float(model.config.aux_loss_coef or 0.0)
        self._aux_losses: list[float] = []
        # The losses here are per-batch means: the Trainer must divide them by the accumulation steps
        # rather than hand `num_items_in_batch` to a model whose loss ignores it.
        self.model_accepts_loss_kwargs = False

    def _record_aux_loss(self, outputs) -> None:
        aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean()
        self._aux_losses.append(aux_loss.item())

    def _add_aux_loss(self, logs: dict[str, float]) -> None:
        if self._aux_losses and "loss" in logs:
            logs["aux_loss"] = sum(self._aux_losses) / len(self._aux_losses)
            self._aux_losses.clear()


class JetMoeClassificationTrainer(_RouterLossLogging, Trainer):
    """`Trainer` whose training loss is cross-entropy plus `aux_loss_coef` times the router loss.

    The model adds the router loss itself when asked for router logits with labels, so it is asked only
    while training: the evaluation loss stays plain cross-entropy, comparable across runs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_router_loss(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with_router_loss = model.training and self.aux_loss_coef > 0
        inputs = {**inputs, "output_router_logits": with_router_loss, "use_cache": False}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if with_router_loss:
            self._record_aux_loss(outputs)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._add_aux_loss(logs)
        super().log(logs, start_time)


class JetMoeRewardTrainer(_RouterLossLogging, RewardTrainer):
    """TRL's `RewardTrainer` (Bradley-Terry) plus `aux_loss_coef` times the router loss while training.

    Without labels the model returns no loss of its own, so the router loss is added here once.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_router_loss(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with_router_loss = model.training and self.aux_loss_coef > 0
        inputs = {**inputs, "output_router_logits": with_router_loss}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if with_router_loss:
            loss = loss + self.aux_loss_coef * outputs.aux_loss.to(loss.device)
            self._record_aux_loss(outputs)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._add_aux_loss(logs)
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """TRL names its pairwise metrics `eval_<name>` whatever the prefix: file them under the prefix."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if metric_key_prefix == "eval":
            return metrics
        renamed = {}
        for key, value in metrics.items():
            if key.startswith("eval_") and not key.startswith(f"{metric_key_prefix}_"):
                key = f"{metric_key_prefix}_{key.removeprefix('eval_')}"
            renamed[key] = value
        return renamed


def accuracy_metrics(prediction) -> dict[str, float]:
    """Held-out accuracy and macro F1 during training (`eval-cls` reports the full set)."""
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predicted = np.asarray(logits).argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


# ---------------------------------------------------------------------------------------------
# the loops


def _save_head_config(trainer, output_dir: Path) -> None:
    """Next to a LoRA adapter, the base model's config: `num_labels`, `id2label`, `pad_token_id`."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config") and trainer.is_world_process_zero():
        model.get_base_model().config.save_pretrained(output_dir)


def train_classifier(recipe) -> dict[str, Any]:
    """Classification mode: `Trainer` with cross-entropy + router loss on `text` / `label` data."""
    args, task = recipe.training, recipe.task
    data, names = load_cls_data(recipe, args.seed)
    tokenizer = load_recipe_tokenizer(recipe)
    resolve_pad_token(tokenizer, task.pad_token)
    resume_from = resume_checkpoint(args)
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
        compute_metrics=accuracy_metrics,
    )
    train_metrics, before, after = train_with_evaluations(trainer, resume_from)
    metrics = {**train_metrics, **before, **after, "num_labels": len(names)}
    headline = [trained_line(trainer, train_metrics)]
    if "test" in data:
        metrics["eval_majority_accuracy"] = majority_share(data["test"]["label"])
        if "eval_after_accuracy" in after:
            was = f"{before['eval_before_accuracy']:.3f} before -> " if before else ""
            headline.append(
                f"Held-out accuracy ({len(data['test'])} texts, {len(names)} classes): {was}"
                f"{after['eval_after_accuracy']:.3f} after; majority class {metrics['eval_majority_accuracy']:.3f}."
            )
    output_dir = finish_run(trainer, recipe, tokenizer, metrics, headline)
    _save_head_config(trainer, output_dir)
    print(f"Full evaluation: jetmoe-ft eval-cls --model {output_dir}")
    return metrics


def train_reward_model(recipe) -> dict[str, Any]:
    """Reward mode: TRL's `RewardTrainer` (Bradley-Terry) + router loss on `chosen` / `rejected` pairs."""
    args = recipe.training
    data = load_recipe_datasets(recipe.data, "rm", seed=args.seed)
    tokenizer = load_recipe_tokenizer(recipe)
    resolve_pad_token(tokenizer, args.pad_token)
    resume_from = resume_checkpoint(args)
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
    train_metrics, before, after = train_with_evaluations(trainer, resume_from)
    metrics = {**train_metrics, **before, **after}
    headline = [trained_line(trainer, train_metrics)]
    if "eval_after_accuracy" in after:
        was = f"{before['eval_before_accuracy']:.3f} before -> " if before else ""
        headline.append(
            f"Held-out pairwise accuracy (chosen scored above rejected): {was}{after['eval_after_accuracy']:.3f} "
            f"after (chance 0.5); mean margin {after['eval_after_margin']:.3f}."
        )
    output_dir = finish_run(trainer, recipe, tokenizer, metrics, headline)
    _save_head_config(trainer, output_dir)
    print(f"Full evaluation: jetmoe-ft eval-cls --model {output_dir}")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one classification or reward-model recipe; returns the final metrics."""
    prepare_processes()
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = parse_cls_recipe(argv)
    if isinstance(recipe.training, RewardConfig):
        return train_reward_model(recipe)
    return train_classifier(recipe)


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.cls`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
