"""What every training loop does around its trainer: threads, resuming, before/after evaluation, outputs."""

import errno
import json
import math
import os
import re
import resource
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import Recipe, RecipeError
from ..distributed import (
    LOST_PROCESS_EXIT,
    check_launch,
    check_nodes_share,
    is_main_process,
    prepare_final_save,
    report_lost_process,
    stop_watching,
    watch_processes,
)
from .model_card import write_model_card
from .preemption import PREEMPTED_EXIT, PREEMPTION, Preempted, PreemptionCallback
from .provenance import RunFingerprintCallback, claim_output_dir, run_fingerprint
from .trackers import TRACKER_RUNS, name_the_run
from .trainers import NonFiniteTrainingError

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def prepare_processes() -> int:
    """Before the training arguments exist: on a machine without a GPU, every launched process becomes a
    CPU rank (gloo) with its share of the cores. Returns the threads per process.

    `accelerate launch` starts several local processes only for GPU-type configs; with `use_cpu` in a
    config file it does not pass `ACCELERATE_USE_CPU` on, and each process would train alone. Several
    processes with all threads each crawl (docs/scale-out.md). FSDP and
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
    return {key: value for key, value in metrics.items() if isinstance(value, int | float)}


_ACTIVE_OUTPUT_DIR: list[str] = []
"""The output directory of the run in progress, for the message of an interrupted run."""


@dataclass
class RunStart:
    """What `start_run` settled before any model loads."""

    resume_from: str | None
    fingerprint: dict[str, Any]


def start_run(recipe: Recipe, data) -> RunStart:
    """Before any model loads: seed everything, find the checkpoint to resume, and claim `output_dir` for this
    run (lock, provenance; `jetmoe_ft.training.provenance`)."""
    set_seed(recipe.training.seed)  # the model, its heads, adapters and the expert selection start from here
    check_nodes_share(recipe.training.output_dir, recipe.training.save_on_each_node)
    resume_from = resume_checkpoint(recipe.training)
    fingerprint = run_fingerprint(recipe, data)
    claim_output_dir(recipe, fingerprint, resume_from)
    name_the_run(recipe.training, recipe, fingerprint)  # the trackers' run: recipe@fingerprint
    _ACTIVE_OUTPUT_DIR[:] = [recipe.training.output_dir]
    PREEMPTION.install()  # before the watch: its SIGTERM handler passes other SIGTERMs on to this one
    # several processes: a lost one stops the others (one line, exit 4)
    watch_processes(recipe.training.output_dir, _resume_hint)
    return RunStart(resume_from, fingerprint)


def train_with_evaluations(trainer, run: RunStart) -> dict[str, Any]:
    """Held-out evaluation before (fresh runs only), training, held-out evaluation after; all their metrics."""
    trainer.add_callback(RunFingerprintCallback(run.fingerprint))
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    TRACKER_RUNS.open(trainer.args, run.fingerprint, resumed=run.resume_from is not None)
    before = evaluate(trainer, "before") if run.resume_from is None else {}
    train_metrics = trainer.train(resume_from_checkpoint=run.resume_from).metrics
    if (stopped := preemption.stopped(trainer.args.output_dir)) is not None:
        raise stopped
    after = evaluate(trainer, "after")
    return {**train_metrics, **before, **after}


def make_trainer(trainer_cls: type, recipe: Recipe, model, data, tokenizer, **kwargs):
    """The loop's trainer over the recipe's splits: `train`, and `test` for evaluation when there is one."""
    return trainer_cls(
        model=model,
        args=recipe.training,
        train_dataset=data["train"],
        eval_dataset=data.get("test"),
        processing_class=tokenizer,
        **kwargs,
    )


def before_after(metrics: dict[str, Any], name: str) -> str | None:
    """`B before -> A after` of the held-out `name` (`eval_before_*`, `eval_after_*` in `metrics`), `A after` when
    nothing was evaluated before training; None when nothing was evaluated after."""
    if f"eval_after_{name}" not in metrics:
        return None
    before = f"{metrics[f'eval_before_{name}']:.3f} before -> " if f"eval_before_{name}" in metrics else ""
    return f"{before}{metrics[f'eval_after_{name}']:.3f} after"


def trained_line(trainer, metrics: dict[str, Any]) -> str:
    """`Trained N steps in T s on P processes (device).`"""
    processes = trainer.accelerator.num_processes
    return (
        f"Trained {trainer.state.global_step} steps in {metrics.get('train_runtime', 0):.0f} s "
        f"on {processes} process{'es' if processes > 1 else ''} ({trainer.accelerator.device.type})."
    )


def finish_run(trainer, recipe: Recipe, tokenizer, metrics: dict[str, Any], headline: list[str]) -> Path:
    """Save the final model, tokenizer, effective recipe and `metrics.json`; print the trained line, the loop's
    `headline` lines and where the outputs are."""
    output_dir = Path(trainer.args.output_dir)
    prepare_final_save(trainer)  # FSDP's sharded checkpoints: the export is still one whole model
    trainer.save_model(str(output_dir))
    if is_main_process():
        tokenizer.save_pretrained(str(output_dir))
        recipe.save(output_dir)
        write_model_card(output_dir, recipe, metrics)  # replaces the libraries' template README.md
        clean = {key: None if _is_non_finite(value) else value for key, value in metrics.items()}
        (output_dir / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        TRACKER_RUNS.log_outputs(output_dir)
        print("\n" + "\n".join([trained_line(trainer, metrics), *headline, f"Outputs: {output_dir}"]))
    TRACKER_RUNS.close()
    return output_dir


def finish_head_run(trainer, recipe: Recipe, tokenizer, metrics: dict[str, Any], headline: list[str]) -> Path:
    """`finish_run` of a classifier or reward head, plus the base config beside a LoRA adapter (`num_labels`,
    `id2label`, `pad_token_id`) and the command that evaluates it."""
    output_dir = finish_run(trainer, recipe, tokenizer, metrics, headline)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_main_process():
        if hasattr(model, "peft_config"):
            model.get_base_model().config.save_pretrained(output_dir)
        print(f"Full evaluation: jetmoe-ft eval-cls --model {output_dir}")
    return output_dir


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def memory_metrics(trainer) -> dict[str, float]:
    """`memory/weights_mb` (the policy and its reference model, if any) and `memory/peak_mb` of this process."""
    return {
        "memory/weights_mb": weights_mb(trainer.model, getattr(trainer, "ref_model", None)),
        "memory/peak_mb": peak_memory_mb(),
    }


def weights_mb(*models: torch.nn.Module | None) -> float:
    """Memory held by the parameters and buffers of `models`, each storage counted once, in MiB."""
    seen, total = set(), 0
    for model in models:
        if model is None:
            continue
        for tensor in [*model.parameters(), *model.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total / 2**20


def peak_memory_mb() -> float:
    """Peak memory of this process so far: GPU memory allocated on CUDA, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def run_command(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a loop's `main` as a command, each ending one line on stderr, not a traceback: a user mistake
    (exit 2), a non-finite loss or gradient (exit 3), another process of a multi-process run gone (exit 4, with
    where to resume; `distributed.ProcessWatch`), Ctrl-C (exit 130, with where to resume)."""
    try:
        main(argv)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return _ended(2)
    except NonFiniteTrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return _ended(3)
    except Preempted as stopped:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per node
            print(f"preempted: {stopped}", file=sys.stderr, flush=True)
        return _ended(PREEMPTED_EXIT)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_resume_hint()}", file=sys.stderr)
        return _ended(130)
    except SystemExit as stop:  # `--help` printed the recipe keys
        return _ended(stop.code if isinstance(stop.code, int) else 0)
    except Exception as error:
        if report_lost_process(error):  # e.g. gloo's "Connection reset by peer" in the next collective
            return LOST_PROCESS_EXIT
        if _disk_full(error):
            print(f"error: {_disk_full(error)}", file=sys.stderr)
            return _ended(2)
        raise  # a crash of this process: its peers report it as gone
    return _ended(0)


def _disk_full(error: BaseException) -> str | None:
    """The one line for a write that failed on a full disk, else None.

    Python's writes say ENOSPC, safetensors' say "No space left on device" in its own error type; torch's
    checkpoint writer only says "unexpected pos", so a failed torch write counts when the output directory's
    disk is (nearly) full."""
    output_dir = Path(_ACTIVE_OUTPUT_DIR[0] if _ACTIVE_OUTPUT_DIR else ".")
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)
    if (
        not full
        and isinstance(error, RuntimeError)
        and "unexpected pos" in str(error)
        and output_dir.exists()
    ):
        full = shutil.disk_usage(output_dir).free < 2**26
    if not full:
        return None
    where = getattr(error, "filename", None) or output_dir
    return f"no space left on the disk of {where}; free some space or choose another output_dir ({_resume_hint()})"


def _ended(status: int) -> int:
    """This process ends on purpose: its peers must not report it as lost."""
    stop_watching()
    if status == PREEMPTED_EXIT and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PREEMPTION.ignore()  # the launcher's teardown, once one process is out, finds the others exiting
    else:
        PREEMPTION.uninstall()
    TRACKER_RUNS.close(status)
    return status


def _resume_hint() -> str:
    if not _ACTIVE_OUTPUT_DIR:
        return "nothing was trained yet."
    output_dir = _ACTIVE_OUTPUT_DIR[0]
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        return f"no checkpoint in {output_dir} yet; the run starts over."
    return f"the last checkpoint is {checkpoint}; resume with the same command and --resume_from_checkpoint true."
