"""The held-out data of a finished run: the split its own recipe held out, or another named source."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..config import DataArguments, RecipeError, read_recipe_file
from .sources import load_recipe_datasets

DEFAULT_SEED = 42  # TrainingArguments' default: the data seed of a recipe that sets none


@dataclasses.dataclass
class EvalSource:
    """Which data to evaluate on, and how it was described to the user."""

    data: DataArguments
    split: str
    seed: int
    values: dict[str, Any]
    description: str


def eval_source(args: argparse.Namespace) -> EvalSource:
    """The data to evaluate: `--dataset_name/--split`, else `--config`, else the run's own recipe."""
    if args.model and not Path(args.model).expanduser().is_dir():
        raise RecipeError(f"--model: no such directory {args.model}.")
    recipe_path = Path(args.config) if args.config else Path(args.model) / "recipe.yaml"
    values = read_recipe_file(recipe_path) if (args.config or recipe_path.is_file()) else {}
    seed = int(values.get("seed", DEFAULT_SEED))
    if args.dataset_name:
        split = args.split or "test"
        data = DataArguments(
            dataset_name=args.dataset_name,
            dataset_config=args.dataset_config,
            dataset_train_split=split,
            dataset_test_split=split,
        )
        return EvalSource(data, "train", seed, values, f"{args.dataset_name} ({split} split)")
    if not values:
        raise RecipeError(
            f"No data to evaluate on: {args.model} has no recipe.yaml; pass --config R.yaml or "
            "--dataset_name NAME --split SPLIT."
        )
    fields = {f.name for f in dataclasses.fields(DataArguments)} - {"max_train_samples", "max_eval_samples"}
    data = DataArguments(**{key: value for key, value in values.items() if key in fields})
    if args.split:
        data.dataset_test_split = args.split
    if data.dataset_test_split == data.dataset_train_split:
        return EvalSource(data, "train", seed, values, f"{_name(data)} ({data.dataset_train_split} split)")
    return EvalSource(data, "test", seed, values, f"{_name(data)} ({data.dataset_test_split} split)")


def _name(data: DataArguments) -> str:
    return data.dataset_name or " + ".join(str(entry["path"]) for entry in data.datasets)


def load_eval_split(source: EvalSource, task: str, max_samples: int | None) -> Dataset:
    """The evaluation rows, checked for the columns `task` needs."""
    text_column = source.values.get("text_column", "text")
    label_column = source.values.get("label_column", "label")
    source.data.max_eval_samples = max_samples
    if source.split == "train":
        source.data.max_train_samples = max_samples
    splits = load_recipe_datasets(
        source.data, task, seed=source.seed, text_field=text_column, label_field=label_column
    )
    if source.split not in splits:
        raise RecipeError(
            f"{source.description}: the recipe has no held-out split; set `dataset_test_split` or "
            "`test_split_size` in it, or pass --dataset_name NAME --split SPLIT."
        )
    dataset = splits[source.split]
    if task == "cls":
        dataset = dataset.rename_columns(
            {old: new for old, new in ((text_column, "text"), (label_column, "label")) if old != new}
        )
    return dataset
