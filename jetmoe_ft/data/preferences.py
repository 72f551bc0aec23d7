"""Preference pairs in TRL's format, with pairs no preference loss can learn from dropped (and counted)."""

from __future__ import annotations

import warnings
from collections import Counter

from datasets import Dataset, DatasetDict
from trl.data_utils import extract_prompt

from ..config import RecipeError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def check_preferences(data: DatasetDict, tokenizer, args) -> DatasetDict:
    """Each split in TRL's preference format, with pairs DPO cannot learn from dropped (and counted).

    Columns: `chosen` + `rejected`, with `prompt` or implicit in the conversations (extracted here, as TRL
    would); all three text, or all three conversations. Dropped with a warning: pairs with an empty answer,
    pairs whose answers are equal, and (with `truncation_mode: keep_start`) prompts of `max_length` tokens or
    more, which TRL would drop silently. A split with nothing left is a `RecipeError`.
    """
    return DatasetDict(
        {split: _clean_split(dataset, split, tokenizer, args) for split, dataset in data.items()}
    )


def _clean_split(dataset: Dataset, split: str, tokenizer, args) -> Dataset:
    conversational = _check_formats(dataset, split)
    if "prompt" not in dataset.column_names:
        dataset = dataset.map(
            extract_prompt, num_proc=args.dataset_num_proc, desc=f"Extracting {split} prompts"
        )
    problems = [
        _pair_problem(row["chosen"], row["rejected"])
        for row in dataset.select_columns(["chosen", "rejected"])
    ]
    if args.max_length is not None and args.truncation_mode == "keep_start":
        lengths = _prompt_lengths(dataset, tokenizer, conversational)
        problems = [
            problem or (f"a prompt of {args.max_length}+ tokens" if length >= args.max_length else None)
            for problem, length in zip(problems, lengths, strict=True)
        ]
    counts = Counter(problem for problem in problems if problem)
    if not counts:
        return dataset
    if sum(counts.values()) == len(dataset):
        raise RecipeError(
            f"{_problem_field(counts)}: every {split} pair has {_describe(counts)}; {_fix(counts)}."
        )
    warnings.warn(
        f"Dropped {sum(counts.values())} of {len(dataset)} {split} pairs: {_describe(counts)}.", stacklevel=2
    )
    return dataset.select([index for index, problem in enumerate(problems) if problem is None])


def _check_formats(dataset: Dataset, split: str) -> bool:
    """Whether the pairs are conversations; mixed text / conversation columns are a `RecipeError`."""
    first = dataset[0]
    kinds = {column: isinstance(first[column], list) for column in PAIR_COLUMNS if column in first}
    if len(set(kinds.values())) > 1:
        texts = [column for column, is_chat in kinds.items() if not is_chat]
        chats = [column for column, is_chat in kinds.items() if is_chat]
        hint = (
            " (the prompt is already in the conversations: keep only them with `columns: [chosen, rejected]`)"
            if texts == ["prompt"]
            else ""
        )
        raise RecipeError(
            f"{', '.join(texts)}: text, but {', '.join(chats)} {'is' if len(chats) == 1 else 'are'} conversations "
            f"in the {split} split; use one format for prompt, chosen and rejected{hint}."
        )
    return kinds["chosen"]


def _pair_problem(chosen, rejected) -> str | None:
    if _is_empty(chosen) or _is_empty(rejected):
        return "an empty chosen or rejected answer"
    if chosen == rejected:
        return "chosen == rejected"
    return None


def _is_empty(answer) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    return not answer or all(not str(message.get("content") or "").strip() for message in answer)


def _prompt_lengths(dataset: Dataset, tokenizer, conversational: bool, chunk: int = 1024) -> list[int]:
    """Prompt tokens as TRL counts them: the chat template with the generation prompt, or the plain text."""
    prompts, lengths = dataset["prompt"], []
    # Plain batches rather than `Dataset.map`, which would hash the tokenizer to fingerprint the result.
    for start in range(0, len(prompts), chunk):
        batch = prompts[start : start + chunk]
        if conversational:
            encoded = tokenizer.apply_chat_template(
                batch, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        else:
            encoded = tokenizer(batch)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return lengths


def _describe(counts: Counter) -> str:
    return ", ".join(f"{count} with {problem}" for problem, count in counts.most_common())


def _problem_field(counts: Counter) -> str:
    return "max_length" if any("prompt" in problem for problem in counts) else "chosen/rejected"


def _fix(counts: Counter) -> str:
    if any("prompt" in problem for problem in counts):
        return "raise `max_length` or shorten the prompts"
    return "check that `chosen` and `rejected` hold different, non-empty answers"
