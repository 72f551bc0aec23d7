"""Preemption: a scheduler's signal ends the run at the next optimizer step, with a checkpoint and one line.

Schedulers warn a job before they kill it: SLURM sends SIGTERM (then SIGKILL after its `KillWait`), or SIGUSR1
ahead of the time limit with `--signal=USR1@SECONDS`; torchrun (under `accelerate launch`) forwards the
signals it handles to every process of its node. On the first such signal every process finishes the
optimizer step it is in, the Trainer writes an ordinary checkpoint (`control.should_save`), and the run ends
with `PREEMPTED_EXIT` and one line naming the checkpoint and the command that resumes it. The processes agree
on the step to stop at (one all-reduce per optimizer step), so a signal that reaches one process only stops
all of them there. Signals that arrive while the checkpoint is written are noted and otherwise ignored, so the
checkpoint is never left half-written by them; a SIGKILL that comes before the save ends leaves an incomplete
checkpoint, which `runs.last_complete_checkpoint` skips.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

PREEMPTED_EXIT = 75
"""Exit status of a run stopped by a preemption signal after its checkpoint was written (EX_TEMPFAIL: try
again; the same command with `--resume_from_checkpoint true` continues)."""

SIGNALS_VARIABLE = "JETMOE_FT_PREEMPT_SIGNALS"
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """Training stopped on a preemption signal; `checkpoint` holds everything needed to resume."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"{signal_name}: stopped after step {step}; the checkpoint is {checkpoint}; resume with the same "
            "command and --resume_from_checkpoint true."
        )


def preemption_signals() -> list[signal.Signals]:
    """The signals that preempt a run: `JETMOE_FT_PREEMPT_SIGNALS` (comma-separated names), else SIGTERM and
    SIGUSR1."""
    from ..errors import RecipeError

    names = os.environ.get(SIGNALS_VARIABLE, ",".join(DEFAULT_SIGNALS))
    chosen = []
    for name in filter(None, (part.strip().upper() for part in names.split(","))):
        name = name if name.startswith("SIG") else f"SIG{name}"
        number = getattr(signal, name, None)
        if not isinstance(number, signal.Signals) or number in (
            signal.SIGKILL,
            signal.SIGSTOP,
            signal.SIGINT,
        ):
            raise RecipeError(
                f"{SIGNALS_VARIABLE}: {name} cannot preempt a run; use names such as SIGTERM,SIGUSR1 (SIGINT is "
                "Ctrl-C, exit 130)."
            )
        chosen.append(number)
    return chosen


class Preemption:
    """The signal handlers and what they saw. One per process (`PREEMPTION`)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.saving = False
        self._previous: dict[signal.Signals, object] = {}

    @property
    def signal_number(self) -> int:
        """The first preemption signal this process got, 0 if none."""
        return int(getattr(signal, self.signal_name)) if self.signal_name else 0

    def install(self) -> None:
        """Handle the preemption signals in this process (main thread only; elsewhere it does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self.uninstall()
        self.signal_name = None
        self.saving = False
        for number in preemption_signals():
            self._previous[number] = signal.signal(number, self._on_signal)

    def uninstall(self) -> None:
        """Give the signals back their earlier handlers."""
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def ignore(self) -> None:
        """The run is over and this process is exiting: the preemption signals change nothing any more."""
        for number in self._previous or preemption_signals():
            signal.signal(number, signal.SIG_IGN)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            print(
                f"{name}: stopping after this optimizer step with a checkpoint.", file=sys.stderr, flush=True
            )
        else:
            state = "the checkpoint is being written" if self.saving else "already stopping"
            print(f"{name} again: {state}; waiting for it to finish.", file=sys.stderr, flush=True)


PREEMPTION = Preemption()


class PreemptionCallback(TrainerCallback):
    """At each optimizer step's end: if any process got a preemption signal, save a checkpoint and stop."""

    def __init__(self, preemption: Preemption = PREEMPTION):
        self.preemption = preemption
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            return control
        number = _largest_over_processes(self.preemption.signal_number)
        if number:
            self.stopped_at = state.global_step
            self.signal_name = signal.Signals(number).name
            self.preemption.saving = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at is not None and dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its part (its RNG state) before anyone says "written"
        return control

    def stopped(self, output_dir: str | os.PathLike) -> Preempted | None:
        """After `trainer.train()`: what to raise when training stopped on a preemption signal."""
        if self.stopped_at is None:
            return None
        self.preemption.saving = False
        return Preempted(
            self.signal_name, self.stopped_at, Path(output_dir) / f"checkpoint-{self.stopped_at}"
        )


def _largest_over_processes(number: int) -> int:
    """The largest of every process's `number` (one all-reduce when several run)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return number
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([number], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
