"""The model card (`README.md`) of a run's output: what it started from, the recipe, the data, the held-out figures
and the routing plot; it replaces the template the libraries write (which names no base model)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from ..config import Recipe

LOOPS = {
    "SFTConfig": "sft",
    "DPOConfig": "dpo",
    "KTOConfig": "kto",
    "ORPOConfig": "orpo",
    "CPOConfig": "orpo",
    "GRPOConfig": "grpo",
    "RewardConfig": "cls",
    "TrainingArguments": "cls",
}
HEADLINE_KEYS = ("loss", "accuracy", "macro_f1", "rewards/accuracies", "rewards/margins", "margin")


def write_model_card(output_dir: str | Path, recipe: Recipe, metrics: dict[str, Any]) -> Path:
    """Write `output_dir/README.md` for a finished run and return its path."""
    output_dir = Path(output_dir)
    base = recipe.model.model_name_or_path or "unknown"
    loop = LOOPS.get(type(recipe.training).__name__, type(recipe.training).__name__)
    adapter = (output_dir / "adapter_config.json").is_file()
    data = _data_names(recipe)
    front = {
        "base_model": base,
        "library_name": "peft" if adapter else "transformers",
        "tags": ["jetmoe", "jetmoe-ft", loop, *(["lora"] if adapter else [])],
        "datasets": data,
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {output_dir.name}",
        "",
        f"A {'LoRA adapter on' if adapter else 'fine-tuned version of'} `{base}`, trained with `jetmoe-ft {loop}` "
        f"on {', '.join(f'`{name}`' for name in data)}.",
        "",
        "## Recipe",
        "",
        f"From `{recipe.path or 'the command line'}` with its overrides; the effective recipe is `recipe.yaml` "
        f"beside this file. Rerun: `jetmoe-ft {loop} --config {output_dir / 'recipe.yaml'}`.",
        "",
        *_recipe_table(recipe),
        "",
        "## Held-out results",
        "",
        *_results(metrics),
    ]
    if (output_dir / "routing_load.png").is_file():
        lines += [
            "",
            "## Routing",
            "",
            "Expert load over the training tokens:",
            "",
            "![routing](routing_load.png)",
        ]
    lines += [
        "",
        "## Use",
        "",
        f"`jetmoe-ft chat --model {output_dir}`"
        if loop not in ("cls",)
        else f"`jetmoe-ft eval-cls --model {output_dir}`",
        "",
    ]
    target = output_dir / "README.md"
    target.write_text("\n".join(lines))
    return target


def _data_names(recipe: Recipe) -> list[str]:
    if recipe.data.dataset_name:
        return [str(recipe.data.dataset_name)]
    return [str(entry["path"]) for entry in recipe.data.datasets or []]


def _recipe_table(recipe: Recipe) -> list[str]:
    keys = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "max_length")
    keys += ("lora_targets", "lora_r", "freeze_router", "aux_loss_coef", "seed")
    rows = ["| key | value |", "| --- | --- |"]
    for key in keys:
        if key in recipe.values:
            rows.append(f"| {key} | {recipe.values[key]} |")
    return rows


def _results(metrics: dict[str, Any]) -> list[str]:
    rows = ["| metric | before | after |", "| --- | --- | --- |"]
    for key in HEADLINE_KEYS:
        after = metrics.get(f"eval_after_{key}")
        if not _is_number(after):
            continue
        before = metrics.get(f"eval_before_{key}")
        rows.append(
            f"| {key} | {before:.4f} | {after:.4f} |" if _is_number(before) else f"| {key} | | {after:.4f} |"
        )
    if len(rows) == 2:
        return ["No held-out data in this run (set `test_split_size` or `dataset_test_split`)."]
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
