"""What every training loop does around its trainer: threads, resuming, before/after evaluation, outputs."""

import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import Recipe, RecipeError
from .distributed import check_launch, let_training_wrap_the_model, prepare_final_save
from .routing import add_routing_health

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def prepare_processes() -> int:
    """Before the training arguments exist: on a machine without a GPU, every launched process becomes a
    CPU rank (gloo) with its share of the cores. Returns the threads per process.

    `accelerate launch` starts several local processes only for GPU-type configs; with `use_cpu` in a
    config file it does not pass `ACCELERATE_USE_CPU` on, and each process would train alone. Several
    processes with all threads each also crawl (measured: 3.7-7 s vs 0.4 s per SFT step). FSDP and
    DeepSpeed launches without a GPU are refused here (`distributed.check_launch`).
    """
    check_launch()
    if torch.cuda.is_available():
        return torch.get_num_threads()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if local_processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    return torch.get_num_threads()


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` whose `trainer_state.json` (written last by the Trainer) reads back whole.

    A run killed while saving leaves a newer, incomplete checkpoint; it is skipped.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        (
            (int(m.group(1)), path)
            for path in folder.iterdir()
            if (m := _CHECKPOINT.match(path.name)) and path.is_dir()
        ),
        reverse=True,
    )
    for _, path in steps:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            print(f"Skipping incomplete checkpoint {path} (no readable trainer_state.json).")
            continue
        return path
    return None


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """`resume_from_checkpoint`: a path as given, or `true` for the last complete checkpoint in output_dir."""
    value = args.resume_from_checkpoint
    if value in (None, False, "false", "False", ""):
        return None
    if value in (True, "true", "True"):
        checkpoint = last_complete_checkpoint(args.output_dir)
        if checkpoint is None:
            print(f"No complete checkpoint in {args.output_dir}: starting from the beginning.")
        return str(checkpoint) if checkpoint else None
    if not Path(value).is_dir():
        raise RecipeError(f"resume_from_checkpoint: no checkpoint directory {value}.")
    return str(value)


def evaluate(trainer, when: str) -> dict[str, float]:
    """`trainer.evaluate()` under a prefix (`before`, `after`); empty when there is no held-out data."""
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate(metric_key_prefix=f"eval_{when}")
    let_training_wrap_the_model(trainer)
    return {key: value for key, value in metrics.items() if isinstance(value, int | float)}


def train_with_evaluations(trainer, resume_from: str | None) -> tuple[dict, dict, dict]:
    """Routing health on, held-out evaluation before (fresh runs only) and after training.

    Returns (train metrics, before, after)."""
    add_routing_health(trainer)
    before = evaluate(trainer, "before") if resume_from is None else {}
    train_metrics = trainer.train(resume_from_checkpoint=resume_from).metrics
    after = evaluate(trainer, "after")
    return train_metrics, before, after


def trained_line(trainer, train_metrics: dict[str, Any]) -> str:
    """`Trained N steps in T s on P processes (device).`"""
    processes = trainer.accelerator.num_processes
    return (
        f"Trained {trainer.state.global_step} steps in {train_metrics.get('train_runtime', 0):.0f} s "
        f"on {processes} process{'es' if processes > 1 else ''} ({trainer.accelerator.device.type})."
    )


def finish_run(trainer, recipe: Recipe, tokenizer, metrics: dict[str, Any], headline: list[str]) -> Path:
    """Save the final model, tokenizer, effective recipe and `metrics.json`; print a short summary."""
    output_dir = Path(trainer.args.output_dir)
    prepare_final_save(trainer)  # FSDP's sharded checkpoints: the export is still one whole model
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
        recipe.save(output_dir)
        clean = {key: value for key, value in metrics.items() if not _is_nan(value)}
        (output_dir / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        print("\n" + "\n".join(headline + [f"Outputs: {output_dir}"]))
    return output_dir


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def run_command(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a loop's `main` as a command: user mistakes are one line on stderr (exit 2), not a traceback."""
    try:
        main(argv)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
