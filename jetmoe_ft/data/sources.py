"""The data a recipe names: embedded sets, local files, hub ids; mixtures; splits; column checks.

A source is resolved in this order: an embedded data set (`jetmoe_ft.data.embedded.EMBEDDED_DATASETS`), a
local file or folder (json, jsonl, csv, parquet, or a `save_to_disk` folder), then a hub id. A mixture
entry's `weight` is the share of that source's rows to use (0.5 = half, 2 = every row twice), as in
alignment-handbook's `dataset_mixer`. Every problem is a `RecipeError` raised before a model loads.
"""

import math
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, concatenate_datasets

from ..config import DataArguments, RecipeError
from .checks import check_file, check_rows, scan_file
from .embedded import EMBEDDED_DATASETS, load_embedded

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Columns each kind of training needs: any one of the alternatives.
TASK_COLUMNS = {
    "sft": ({"messages"}, {"text"}, {"prompt", "completion"}),
    "dpo": ({"chosen", "rejected"},),
    "cls": ({"text", "label"},),
    "rm": ({"chosen", "rejected"},),
    "kto": ({"prompt", "completion", "label"}, {"chosen", "rejected"}),
    "orpo": ({"chosen", "rejected"},),
    "simpo": ({"chosen", "rejected"},),
    "grpo": ({"prompt"}, {"messages"}),
}
TASK_HINTS = {
    "sft": "`messages` (conversations), `text` (plain text), or `prompt` + `completion`",
    "dpo": "`chosen` + `rejected` (and `prompt`, unless it is implicit in the conversations)",
    "cls": "`text` + `label`",
    "rm": "`chosen` + `rejected` (and `prompt`, unless it is implicit in the conversations)",
    "kto": "`prompt` + `completion` + `label` (true: desirable, false: undesirable), or pairs `chosen` + `rejected` "
    "(and `prompt`, unless it is implicit in the conversations)",
    "orpo": "`chosen` + `rejected` (and `prompt`, unless it is implicit in the conversations)",
    "simpo": "`chosen` + `rejected` (and `prompt`, unless it is implicit in the conversations)",
    "grpo": "`prompt` (text or a conversation) or `messages` (conversations: the prompt is every turn before the "
    "last assistant turn)",
}


def load_recipe_datasets(
    args: DataArguments, task: str, seed: int = 0, text_field: str = "text", label_field: str = "label"
) -> DatasetDict:
    """`train` (and `test` when there is held-out data) for a recipe's data fields, checked for `task`.

    `text_field` / `label_field` name the text and label columns (sft: text; cls: both)."""
    if args.datasets:
        splits = _load_mixture(args, seed, task)
    else:
        splits = _load_source(args.dataset_name, args.dataset_config, args, seed, task=task)
    splits = _carve_test_split(splits, args, seed)
    for split, limit in (("train", args.max_train_samples), ("test", args.max_eval_samples)):
        if split in splits and limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    for split, dataset in splits.items():
        if len(dataset) == 0:
            raise RecipeError(
                f"The {split} split of the recipe's data is empty: check `dataset_name`/`datasets`."
            )
        check_columns(dataset, task, f"{_describe_source(args)} ({split})", text_field, label_field)
    return splits


def check_columns(
    dataset: Dataset, task: str, where: str, text_field: str = "text", label_field: str = "label"
) -> None:
    """Fail with the columns the data has when it lacks those that `task` needs."""
    columns = set(dataset.column_names)
    renamed = {"text": text_field, "label": label_field} if task in ("sft", "cls") else {}
    alternatives = [{renamed.get(column, column) for column in option} for option in TASK_COLUMNS[task]]
    if not any(option <= columns for option in alternatives):
        hint = TASK_HINTS[task]
        for column, name in renamed.items():
            hint = hint.replace(f"`{column}`", f"`{name}`")
        raise RecipeError(
            f"{where}: {task} needs {hint}; the data has {', '.join(sorted(columns)) or 'no columns'}. "
            "Rename columns in the data, or pick them with `columns:` in a `datasets:` entry."
        )


def _describe_source(args: DataArguments) -> str:
    if args.dataset_name is not None:
        return f"dataset_name {args.dataset_name}"
    return "datasets " + " + ".join(str(entry["path"]) for entry in args.datasets)


def _load_source(
    path: str,
    name: str | None,
    args: DataArguments,
    seed: int,
    split: str | None = None,
    task: str | None = None,
    **file_kwargs,
) -> DatasetDict:
    """One source as a DatasetDict with `train` (and `test` when it has one), its rows checked for `task`
    (`checks.check_rows`, row numbers as in the source). `file_kwargs`: `data_files` / `data_dir`, passed to
    `datasets.load_dataset`."""
    train_split = split or args.dataset_train_split
    if path in EMBEDDED_DATASETS:
        loaded = load_embedded(path, seed=seed)
    else:
        loaded = _load_files_or_hub(path, name, {k: v for k, v in file_kwargs.items() if v is not None})
    if train_split not in loaded:
        raise RecipeError(
            f"{path}: no split `{train_split}`; it has {', '.join(loaded)} (set `dataset_train_split`)."
        )
    splits = DatasetDict(train=loaded[train_split])
    if args.dataset_test_split in loaded and args.dataset_test_split != train_split:
        splits["test"] = loaded[args.dataset_test_split]
    if task is not None:
        for split_name, dataset in splits.items():
            check_rows(dataset, task, f"{path} ({split_name})")
    return splits


def _load_files_or_hub(path: str, name: str | None, file_kwargs: dict) -> DatasetDict:
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.suffix in FILE_BUILDERS
    if local.exists() and not file_kwargs:
        return _load_local(local)
    if looks_local and not local.exists():
        raise RecipeError(f"{path}: no such file or folder.")
    try:
        loaded = datasets.load_dataset(path, name, **file_kwargs)
    except Exception as error:  # the hub client raises many kinds; the message matters, not the type
        embedded = ", ".join(sorted(EMBEDDED_DATASETS))
        raise RecipeError(
            f"{path}: not an embedded data set ({embedded}), not a local path, and loading it from the hub "
            f"failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})."
        ) from None
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)


def _load_local(path: Path) -> DatasetDict:
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    if path.is_dir() and (path / "dataset_info.json").exists():
        return DatasetDict(train=datasets.load_from_disk(str(path)))
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise RecipeError(f"{path}: unsupported file type; use one of {', '.join(FILE_BUILDERS)}.")
        if builder != "parquet":
            check_file(path)
        try:
            return datasets.load_dataset(builder, data_files=str(path))
        except Exception as error:  # the builders raise many kinds; find the line, else say what it said
            if builder != "parquet":
                scan_file(path)
            cause = error.__cause__ or error
            raise RecipeError(
                f"{path}: cannot read it as {builder} ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0][:200] if str(cause) else 'no detail'})."
            ) from None
    return datasets.load_dataset(str(path))


def _load_mixture(args: DataArguments, seed: int, task: str | None = None) -> DatasetDict:
    trains, tests = [], []
    for index, entry in enumerate(args.datasets):
        source = _load_source(
            entry["path"],
            entry.get("name"),
            args,
            seed,
            entry.get("split"),
            task,
            data_files=entry.get("data_files"),
            data_dir=entry.get("data_dir"),
        )
        columns = entry.get("columns")
        for split in source:
            missing = set(columns or []) - set(source[split].column_names)
            if missing:
                raise RecipeError(
                    f"datasets[{index}] ({entry['path']}): no column {', '.join(sorted(missing))}; "
                    f"it has {', '.join(source[split].column_names)}."
                )
            if columns:
                source[split] = source[split].select_columns(columns)
        trains.append(_take_share(source["train"], entry.get("weight", 1.0), seed))
        if "test" in source:
            tests.append(source["test"])
    mixed = DatasetDict(train=_concatenate(trains, "train").shuffle(seed=seed))
    if tests:
        mixed["test"] = _concatenate(tests, "test")
    return mixed


def _take_share(dataset: Dataset, weight: float, seed: int) -> Dataset:
    """`weight` times the rows of `dataset`: whole copies, then a seeded sample for the fraction."""
    whole, fraction = divmod(weight, 1.0)
    parts = [dataset] * int(whole)
    extra = math.floor(fraction * len(dataset))
    if extra:
        parts.append(dataset.shuffle(seed=seed).select(range(extra)))
    if not parts:
        raise RecipeError(
            f"A mixture weight of {weight} takes no rows from a data set of {len(dataset)} rows."
        )
    return concatenate_datasets(parts)


def _concatenate(parts: list[Dataset], split: str) -> Dataset:
    try:
        return concatenate_datasets(parts)
    except ValueError as error:
        raise RecipeError(
            f"The {split} splits of the `datasets:` mixture have different columns or types ({error}); "
            "pick the same columns with `columns:` in each entry."
        ) from None


def _carve_test_split(splits: DatasetDict, args: DataArguments, seed: int) -> DatasetDict:
    """Hold out `test_split_size` of the training rows when the sources have no test split."""
    if "test" in splits or args.test_split_size is None:
        return splits
    held_out = splits["train"].train_test_split(test_size=args.test_split_size, seed=seed)
    return DatasetDict(train=held_out["train"], test=held_out["test"])
