"""Unpaired preference data for KTO: `prompt` / `completion` / `label` (bool: is the completion desirable?).

Plain text or conversations. A paired set (`chosen` / `rejected`, with `prompt` or implicit in the conversations)
is unpaired here, as TRL documents: chosen -> desirable, rejected -> undesirable, after the pair checks of
`preferences` (pairs DPO could not learn from are dropped the same way). Each split keeps a `pair` column, the
index of the pair its row came from, so the held-out pairwise accuracy compares the two answers of one pair;
natively unpaired rows are paired by prompt instead (`held_out_pairs`).

KTO samples its training rows in order (its KL estimate pairs each prompt with a neighbour's completion), so the
training split is shuffled here, once, with the recipe's seed: a set sorted by label or topic would otherwise
train on one kind of example at a time.

Checked before any model loads, each a one-line `RecipeError`: missing columns (with the columns present),
labels that are not booleans, a training split with only desirable or only undesirable examples, an empty
completion, text and conversations mixed. Prompts of `max_length` tokens or more (TRL would drop them silently)
are counted and dropped with a warning.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

from datasets import Dataset, DatasetDict

from ..config import RecipeError
from .preferences import _check_formats as _check_pair_formats
from .preferences import _is_empty, _prompt_lengths, check_preferences
from .sources import check_columns

UNPAIRED_COLUMNS = ("prompt", "completion", "label")


def is_paired(dataset: Dataset) -> bool:
    return {"chosen", "rejected"} <= set(dataset.column_names)


def check_unpaired_formats(data: DatasetDict) -> None:
    """The checks that need no tokenizer (columns, formats, labels, empty completions), run before the tokenizer's
    own checks read the rows."""
    for split, dataset in data.items():
        check_columns(dataset, "kto", f"the {split} split")
        if is_paired(dataset):
            _check_pair_formats(dataset, split)
        else:
            _check_rows(dataset, split)


def check_unpaired(data: DatasetDict, tokenizer, args, seed: int = 0) -> DatasetDict:
    """Each split as unpaired `prompt` / `completion` / `label` rows with a `pair` column; the training split
    shuffled with `seed`. `args`: KTO's config (`max_length`, `dataset_num_proc`)."""
    checked = {}
    for split, dataset in data.items():
        check_columns(dataset, "kto", f"the {split} split")
        if is_paired(dataset):
            # KTO keeps the start of a sequence, as DPO's `keep_start`: a prompt of max_length tokens has no answer.
            pair_args = SimpleNamespace(
                max_length=args.max_length,
                truncation_mode="keep_start",
                dataset_num_proc=args.dataset_num_proc,
            )
            pairs = check_preferences(DatasetDict({split: dataset}), tokenizer, pair_args)[split]
            dataset = unpair(pairs)
        else:
            dataset = _check_unpaired_split(dataset, split, tokenizer, args, train=split == "train")
        if split == "train":
            _check_both_labels(dataset, split)
            dataset = dataset.shuffle(seed=seed).flatten_indices()
        checked[split] = dataset
    return DatasetDict(checked)


def unpair(pairs: Dataset) -> Dataset:
    """Two rows per pair, next to each other: (prompt, chosen, True) and (prompt, rejected, False), each with
    the pair's index in `pair`. Other columns are dropped."""

    def split_pairs(batch, indices):
        rows = {"prompt": [], "completion": [], "label": [], "pair": []}
        for prompt, chosen, rejected, index in zip(
            batch["prompt"], batch["chosen"], batch["rejected"], indices, strict=True
        ):
            for completion, label in ((chosen, True), (rejected, False)):
                rows["prompt"].append(prompt)
                rows["completion"].append(completion)
                rows["label"].append(label)
                rows["pair"].append(index)
        return rows

    return pairs.map(split_pairs, batched=True, with_indices=True, remove_columns=pairs.column_names)


def _check_unpaired_split(dataset: Dataset, split: str, tokenizer, args, train: bool) -> Dataset:
    dataset = dataset.select_columns([c for c in dataset.column_names if c in (*UNPAIRED_COLUMNS, "pair")])
    conversational = _check_rows(dataset, split)
    if args.max_length is not None:
        lengths = _prompt_lengths(dataset, tokenizer, conversational)
        long = [i for i, length in enumerate(lengths) if length >= args.max_length]
        if len(long) == len(dataset):
            raise RecipeError(
                f"max_length: every {split} prompt has {args.max_length}+ tokens, leaving no room for its "
                "completion; raise `max_length` or shorten the prompts."
            )
        if long:
            warnings.warn(
                f"Dropped {len(long)} of {len(dataset)} {split} examples: a prompt of {args.max_length}+ tokens.",
                stacklevel=3,
            )
            dataset = dataset.select(sorted(set(range(len(dataset))) - set(long)))
    return dataset


def _check_rows(dataset: Dataset, split: str) -> bool:
    """Formats, labels and completions of unpaired rows; whether they are conversations."""
    conversational = _check_formats(dataset, split)
    _check_labels(dataset, split)
    empty = [i for i, completion in enumerate(dataset["completion"]) if _is_empty(completion)]
    if empty:
        raise RecipeError(
            f"completion: {len(empty)} of {len(dataset)} {split} examples have an empty completion (first: row "
            f"{empty[0]}); remove them or give them an answer."
        )
    return conversational


def _check_formats(dataset: Dataset, split: str) -> bool:
    """Whether prompt and completion are conversations; one of each is a `RecipeError`."""
    first = dataset[0]
    prompt_chat, completion_chat = isinstance(first["prompt"], list), isinstance(first["completion"], list)
    if prompt_chat != completion_chat:
        texts, chats = ("prompt", "completion") if completion_chat else ("completion", "prompt")
        raise RecipeError(
            f"{texts}: text, but {chats} is a conversation in the {split} split; use one format for both."
        )
    return prompt_chat


def _check_labels(dataset: Dataset, split: str) -> None:
    for index, label in enumerate(dataset["label"]):
        if not isinstance(label, bool):
            raise RecipeError(
                f"label: expected true or false (is the completion desirable?), got {label!r} "
                f"({type(label).__name__}) in row {index} of the {split} split; write the labels as booleans."
            )


def _check_both_labels(dataset: Dataset, split: str) -> None:
    desirable = sum(dataset["label"])
    if desirable in (0, len(dataset)):
        kind, other = (
            ("desirable (true)", "undesirable (false)")
            if desirable
            else ("undesirable (false)", "desirable (true)")
        )
        raise RecipeError(
            f"label: every {split} example is {kind}; KTO needs {other} examples too (add them, or use SFT for "
            "desirable examples alone)."
        )


def held_out_pairs(dataset: Dataset) -> list[tuple[int, int]]:
    """(desirable row, undesirable row) index pairs to compare: the two rows of each unpaired pair (`pair`
    column), else every desirable x undesirable completion of the same prompt."""
    labels = dataset["label"]
    if "pair" in dataset.column_names:
        keys = dataset["pair"]
    else:
        keys = [json.dumps(prompt, sort_keys=True) for prompt in dataset["prompt"]]
    groups: dict = {}
    for index, (key, label) in enumerate(zip(keys, labels, strict=True)):
        groups.setdefault(key, ([], []))[0 if label else 1].append(index)
    return [(good, bad) for goods, bads in groups.values() for good in goods for bad in bads]
