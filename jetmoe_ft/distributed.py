"""What JetMoE needs from a multi-process launch: ZeRO-3 leaf modules, a whole final export, honest CPU runs.

The launch itself is accelerate's (`configs/*.yaml`); these functions are called by the loader and the
training loops so that every loop behaves the same under DDP, FSDP2 and DeepSpeed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from .compat import is_accelerate_prepared, unmark_accelerate_prepared
from .config import RecipeError
from .modeling.modeling_jetmoe import JetMoeAttention, JetMoeMoE

# ZeRO-3 gathers a leaf module's parameters, its children's included, when the leaf is *called*; so the
# leaves must be modules that run through `__call__`. `JetMoeMoA` is not: the attention calls its
# `map` and `reduce` methods, so as a leaf its hooks never fire and its gradients are never reduced
# (on 2 ranks: "RuntimeError: unknown parameter type" in ZeRO-3's `zero_grad` after the first step).
# `JetMoeAttention`, which owns the MoA experts and calls them, takes its place.
ZERO3_LEAF_CLASSES: tuple[type[nn.Module], ...] = (JetMoeAttention, JetMoeMoE)

GPU_ONLY_LAUNCHES = {
    "ACCELERATE_USE_FSDP": "FSDP (configs/fsdp2.yaml)",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed (configs/zero2.yaml, configs/zero3.yaml)",
}


def declare_zero3_leaf_modules(model: nn.Module) -> list[str]:
    """Under DeepSpeed ZeRO-3, make every MoA attention and MoE block a ZeRO-3 leaf; returns their names.

    A leaf's parameters are gathered in one piece when it is entered, whichever experts the rank's tokens
    pick, and ZeRO-3 no longer traces the order of the expert calls inside it: the cure for the MoE
    hangs of DeepSpeed #4808 / TRL #1268. Outside ZeRO-3 this does nothing.
    """
    if not is_deepspeed_zero3_enabled():
        return []
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, list(ZERO3_LEAF_CLASSES))
    return [name for name, module in model.named_modules() if getattr(module, "_z3_leaf", False)]


def check_launch(cuda_available: bool | None = None) -> None:
    """Refuse an FSDP or DeepSpeed launch on a machine without a GPU, before anything loads.

    accelerate 1.15 turns FSDP and DeepSpeed on for GPU process groups only: on CPU ranks it drops the
    plugin and each run would silently be plain DDP (or one process training alone).
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available:
        return
    for variable, what in GPU_ONLY_LAUNCHES.items():
        if os.environ.get(variable, "false").lower() == "true":
            raise RecipeError(
                f"{what} needs GPUs: accelerate runs it on GPU ranks only. On CPU launch with "
                "`--config_file configs/cpu_ddp.yaml` (DDP)."
            )


def let_training_wrap_the_model(trainer) -> bool:
    """After `trainer.evaluate()` and before `trainer.train()`: let training wrap the model in DDP again.

    An evaluation before training prepares the bare model for evaluation only, and accelerate marks it as
    prepared; `train()` then skips the DDP wrapper and every rank trains on its own gradients (measured on
    2 CPU ranks: the ranks' gradients differed and rank 0 saved a model trained on its half of the data).
    FSDP and DeepSpeed prepare the model fully for evaluation and are left alone. Returns whether it acted.
    """
    model = trainer.model
    distributed = trainer.accelerator.num_processes > 1
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if not distributed or sharded or trainer.model_wrapped is not model:
        return False
    if not is_accelerate_prepared(model):
        return False
    unmark_accelerate_prepared(model)
    return True


def prepare_final_save(trainer) -> bool:
    """Make `trainer.save_model()` write a whole model or adapter under FSDP with sharded checkpoints.

    transformers saves nothing in `save_model` while FSDP's state-dict type is `SHARDED_STATE_DICT`
    (the one `configs/fsdp2.yaml` uses for fast, resumable checkpoints), so the final export switches
    to a full state dict, gathered on rank 0. Returns whether it switched.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    if "FULL_STATE_DICT" in str(plugin.state_dict_type):
        return False
    plugin.set_state_dict_type("FULL_STATE_DICT")
    return True


def is_main_process() -> bool:
    """Whether this is the process that writes shared files and prints summaries (global rank 0).

    Read from the launcher's `RANK`, so it holds before any process group or trainer exists."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------
# A lost process: when one rank of a multi-process run dies (killed, crashed), the others stop at once with one
# line naming it and the checkpoint to resume from (exit status 4), instead of a gloo/NCCL traceback, a silent
# SIGTERM from the launcher, or a wait in the next collective for the process group's timeout.

LOST_PROCESS_EXIT = 4
"""Exit status of a rank that stopped because another process of its run is gone."""

RANKS_DIR = ".jetmoe-ft.ranks"
POLL_SECONDS = 0.5


class ProcessWatch:
    """Each rank publishes `output_dir/.jetmoe-ft.ranks/rank-N.json` (pid, host, process start time) and watches
    the other ranks' files on its host from a daemon thread. A peer counts once it has been seen alive (a file
    left by an earlier run names a dead process and is never counted); it is lost when its process is gone while
    its file is still there (a rank that ends normally or with a handled error removes its file first).

    On a loss the watch prints the one line and ends this process with `LOST_PROCESS_EXIT`: from the thread when
    the main thread is stuck in a collective, from `run_command` when the collective failed first (gloo: "Connection
    reset by peer"), from the SIGTERM handler when the launcher tears the survivors down first.
    """

    def __init__(self, output_dir: str | os.PathLike, resume_hint: Callable[[], str]):
        import psutil

        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.folder = Path(output_dir) / RANKS_DIR
        self.resume_hint = resume_hint
        self.host = socket.gethostname()
        self.me = {"pid": os.getpid(), "host": self.host, "created": psutil.Process().create_time()}
        self.seen: dict[int, dict] = {}  # peers seen alive: rank -> their record
        self.lost: tuple[int, int] | None = None  # (rank, pid)
        self._reported = threading.Lock()
        self._stop = threading.Event()
        self.folder.mkdir(parents=True, exist_ok=True)
        own = self.folder / f"rank-{self.rank}.json"
        partial = own.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(self.me) + "\n")
        os.replace(partial, own)  # peers never read half a file
        self.file = own
        self._thread = threading.Thread(target=self._watch, name="jetmoe-ft-process-watch", daemon=True)

    def start(self) -> ProcessWatch:
        self._thread.start()
        return self

    def check(self) -> tuple[int, int] | None:
        """Look at every peer once; the lost one as (rank, pid), or None."""
        if self.lost is not None:
            return self.lost
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            record = _read_json(self.folder / f"rank-{rank}.json")
            if record is None or record.get("host") != self.host:
                continue  # gone cleanly, not written yet, or on another machine (bounded by `ddp_timeout`)
            alive = _same_process_alive(record)
            if alive:
                self.seen[rank] = record
            elif self.seen.get(rank) == record:
                self.lost = (rank, int(record["pid"]))
                return self.lost
        return None

    def line(self) -> str:
        rank, pid = self.lost
        return f"error: process rank {rank} (pid {pid}) of this run is gone (killed or crashed); {self.resume_hint()}"

    def report(self) -> bool:
        """Print the line once (whichever of the thread, the handler and `run_command` comes first); whether a
        peer is lost."""
        if self.check() is None:
            return False
        if self._reported.acquire(blocking=False):
            print(self.line(), file=sys.stderr, flush=True)
        return True

    def stop(self) -> None:
        """This rank ends normally (or with a handled error): stop watching and take its file away."""
        self._stop.set()
        _remove_if_mine(self.file, self.me)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            if self.report():
                os._exit(LOST_PROCESS_EXIT)  # the main thread may be blocked in a collective for good


_WATCH: list[ProcessWatch] = []


def watch_processes(output_dir: str | os.PathLike, resume_hint: Callable[[], str]) -> ProcessWatch | None:
    """In a run of several processes (`WORLD_SIZE` > 1): start this rank's `ProcessWatch` and a SIGTERM handler
    that names a lost peer before the launcher's teardown ends this process. Call from the main thread."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    stop_watching()
    watch = ProcessWatch(output_dir, resume_hint).start()
    _WATCH[:] = [watch]
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            if watch.report():
                os._exit(LOST_PROCESS_EXIT)
            if callable(previous):
                previous(signum, frame)
                return
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)
    return watch


def report_lost_process() -> bool:
    """After an error in a multi-process run: if another process of the run is gone, print the one line and
    return True (the error was its consequence)."""
    return bool(_WATCH) and _WATCH[0].report()


def stop_watching() -> None:
    """This rank is ending normally or with a handled error (its peers must not report it as lost)."""
    while _WATCH:
        _WATCH.pop().stop()


def _same_process_alive(record: dict) -> bool:
    import psutil

    try:
        process = psutil.Process(int(record["pid"]))
        same = abs(process.create_time() - float(record["created"])) < 1e-3
        return same and process.status() != psutil.STATUS_ZOMBIE  # killed, not yet reaped by its launcher
    except (psutil.NoSuchProcess, psutil.ZombieProcess, KeyError, TypeError, ValueError):
        return False
    except psutil.AccessDenied:
        return True


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _remove_if_mine(path: Path, me: dict) -> None:
    if _read_json(path) == me:
        path.unlink(missing_ok=True)
