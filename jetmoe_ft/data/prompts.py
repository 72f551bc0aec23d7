"""Prompt sets for online RL (GRPO): the prompts a policy answers while it trains and on held-out data.

A row gives its prompt as a `prompt` column (text, or a conversation of messages), or as a conversation
(`messages`) whose prompt is every turn before its last assistant turn (`chatterbot`: the question and any earlier
turns). Other columns are kept: GRPO hands them to every reward function as keyword arguments. A split without a
single prompt is a one-line `RecipeError`, raised before a model loads.
"""

from __future__ import annotations

from datasets import Dataset, DatasetDict

from ..config import RecipeError
from .sources import check_columns


def conversation_prompt(messages: list[dict]) -> list[dict] | None:
    """The turns before the last assistant turn, when a user turn is among them; else None."""
    last = max((i for i, turn in enumerate(messages) if turn["role"] == "assistant"), default=-1)
    prompt = messages[:last]
    return prompt if any(turn["role"] == "user" for turn in prompt) else None


def to_prompts(data: DatasetDict) -> DatasetDict:
    """Every split as rows with a `prompt` column; conversations become their prompt (rows without one dropped)."""
    prompts = DatasetDict()
    for split, dataset in data.items():
        check_columns(dataset, "grpo", f"the {split} split")
        if "prompt" not in dataset.column_names:
            dataset = _prompts_of_conversations(dataset)
        dataset = dataset.filter(_has_prompt)
        if len(dataset) == 0:
            raise RecipeError(
                f"the {split} split has no prompt: every `prompt` is empty, or no conversation has a user turn "
                "before an assistant turn."
            )
        prompts[split] = dataset
    return prompts


def _prompts_of_conversations(dataset: Dataset) -> Dataset:
    dataset = dataset.map(lambda row: {"prompt": conversation_prompt(row["messages"]) or []})
    return dataset.remove_columns("messages")


def _has_prompt(row: dict) -> bool:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return bool(prompt) and any(str(turn.get("content") or "").strip() for turn in prompt)
