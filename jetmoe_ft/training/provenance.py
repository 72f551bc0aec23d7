"""Runs don't mix: what a run is (a fingerprint of its recipe and data), one run per `output_dir` at a time.

- `run_fingerprint(recipe, data)`: a hash of the effective recipe, less the keys that do not change what is
  trained (output, resume, logging, saving, evaluation cadence), and of the training data. It is written to
  `output_dir/run.json` at the start and into every checkpoint (`RunFingerprintCallback`).
- `claim_output_dir(...)`: before any model loads, a lock file makes a second concurrent run on the same
  `output_dir` stop at once (a stale lock of a killed run is taken over); resuming a checkpoint written by
  another recipe is refused with the keys that differ, unless `resume_other_recipe: true`; a fresh run in a
  directory holding another run's checkpoints is refused unless `overwrite_output_dir: true`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..config import Recipe, RecipeError
from ..distributed import is_main_process

FINGERPRINT_FILE = "run.json"
LOCK_FILE = ".jetmoe-ft.lock"
LOCK_REFRESH_S = 30.0
LOCK_STALE_S = 120.0
"""A lock written on another machine counts as held while it was touched this recently."""
NOT_WHAT_IS_TRAINED = (
    "output_dir",
    "resume_from_checkpoint",
    "resume_other_recipe",
    "overwrite_output_dir",
    "logging_steps",
    "logging_first_step",
    "logging_dir",
    "report_to",
    "run_name",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "eval_steps",
    "eval_strategy",
    "disable_tqdm",
    "max_steps",
    "num_train_epochs",
    "dataloader_num_workers",
)
"""Recipe keys a resumed run may change: where and how often it writes, and how long it goes on."""


def run_fingerprint(recipe: Recipe, data) -> dict[str, Any]:
    """`{"sha": ..., "recipe": {...}, "data": {...}}` of what this run trains on."""
    values = {key: value for key, value in sorted(recipe.values.items()) if key not in NOT_WHAT_IS_TRAINED}
    data_summary = {split: _data_digest(dataset) for split, dataset in sorted(data.items())}
    text = json.dumps({"recipe": values, "data": data_summary}, sort_keys=True, default=str)
    return {"sha": hashlib.sha256(text.encode()).hexdigest()[:16], "recipe": values, "data": data_summary}


def _data_digest(dataset) -> dict[str, Any]:
    """Rows and a hash of the first and last rows: equal for the same data, split and order."""
    rows = len(dataset)
    sample = [dataset[i] for i in sorted({0, 1, 2, rows // 2, rows - 2, rows - 1}) if 0 <= i < rows]
    digest = hashlib.sha256(json.dumps(sample, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"rows": rows, "sha": digest}


def claim_output_dir(recipe: Recipe, fingerprint: dict[str, Any], resume_from: str | None) -> None:
    """Lock `output_dir` for this run and check that it does not mix with another run (module docstring)."""
    output_dir = Path(recipe.training.output_dir)
    _check_writable(output_dir)
    if is_main_process():
        _take_lock(output_dir)
    options = recipe.jetmoe
    if resume_from is not None:
        earlier = _read_fingerprint(Path(resume_from) / FINGERPRINT_FILE)
        if earlier is None and not options.resume_other_recipe:
            raise RecipeError(
                f"resume_from_checkpoint: {resume_from} has no {FINGERPRINT_FILE}, so which recipe wrote it is "
                "unknown; set `resume_other_recipe: true` to resume it anyway."
            )
        if earlier is not None and earlier["sha"] != fingerprint["sha"] and not options.resume_other_recipe:
            raise RecipeError(
                f"resume_from_checkpoint: {resume_from} was written by another recipe ({_differences(earlier, fingerprint)}); "
                "use another output_dir, or set `resume_other_recipe: true` to resume it anyway."
            )
    elif _checkpoints(output_dir) and not options.overwrite_output_dir:
        earlier = _read_fingerprint(output_dir / FINGERPRINT_FILE)
        same = earlier is not None and earlier["sha"] == fingerprint["sha"]
        hint = "resume it with `--resume_from_checkpoint true`" if same else "choose another output_dir"
        raise RecipeError(
            f"output_dir: {output_dir} holds checkpoints of {'this' if same else 'another'} run "
            f"({', '.join(p.name for p in _checkpoints(output_dir)[:3])}); {hint}, or set "
            "`overwrite_output_dir: true` to start over there."
        )
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1, default=str) + "\n")


class RunFingerprintCallback(TrainerCallback):
    """Writes the run's fingerprint into each checkpoint it saves."""

    def __init__(self, fingerprint: dict[str, Any]):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / FINGERPRINT_FILE).write_text(
                    json.dumps(self.fingerprint, indent=1, default=str) + "\n"
                )


def _differences(earlier: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(
        key
        for key in earlier["recipe"].keys() | now["recipe"].keys()
        if earlier["recipe"].get(key) != now["recipe"].get(key)
    )
    parts = [
        f"{key}: {earlier['recipe'].get(key)!r} then, {now['recipe'].get(key)!r} now" for key in keys[:3]
    ]
    if len(keys) > 3:
        parts.append(f"{len(keys) - 3} more keys")
    if earlier.get("data") != now.get("data"):
        parts.append("different data")
    return "; ".join(parts) or "different data"


def _read_fingerprint(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-"))


def _check_writable(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise RecipeError(f"output_dir: {output_dir} is a file; choose a directory.")
    existing = next((p for p in [output_dir, *output_dir.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise RecipeError(f"output_dir: {existing} is not writable; choose a directory you can write to.")


def _take_lock(output_dir: Path) -> None:
    """Create `output_dir/.jetmoe-ft.lock` for this process; refuse if a live process holds it.

    A holder on this machine is live while its process runs; one on another machine (a shared output_dir on several
    nodes) while it keeps touching the lock (every `LOCK_REFRESH_S`), up to `LOCK_STALE_S` ago; one written by this
    SLURM job before it was requeued never is."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    if os.environ.get("SLURM_JOB_ID"):
        me["slurm_job"] = os.environ["SLURM_JOB_ID"]  # a requeued job's earlier run is over
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(descriptor, (json.dumps(me) + "\n").encode())
        os.close(descriptor)
    except FileExistsError:
        holder = _read_fingerprint(lock)  # a small JSON file, read the same way
        if holder and holder != me and _holder_alive(holder, lock):
            where = "" if holder.get("host") == me["host"] else f" on {holder.get('host')}"
            raise RecipeError(
                f"output_dir: another run (pid {holder['pid']}{where}) is writing to {output_dir}; wait for it to "
                "finish, stop it, or choose another output_dir."
            ) from None
        lock.write_text(json.dumps(me) + "\n")  # stale (a killed run), or this process's own earlier run
    atexit.register(_release_lock, lock, me["pid"])
    _keep_fresh(lock, me)


def _holder_alive(holder: dict, lock: Path) -> bool:
    if holder.get("slurm_job") and holder.get("slurm_job") == os.environ.get("SLURM_JOB_ID"):
        return False  # this job's own run before it was requeued
    if holder.get("host") == socket.gethostname():
        return holder.get("pid") != os.getpid() and _alive(holder["pid"])
    try:
        return time.time() - lock.stat().st_mtime < LOCK_STALE_S
    except OSError:
        return False


def _keep_fresh(lock: Path, me: dict) -> None:
    """Touch the lock every `LOCK_REFRESH_S` while this process holds it (a daemon thread)."""

    def touch():
        while True:
            time.sleep(LOCK_REFRESH_S)
            if _read_fingerprint(lock) != me:
                return
            try:
                os.utime(lock)
            except OSError:
                return

    threading.Thread(target=touch, name="jetmoe-ft-lock", daemon=True).start()


def _release_lock(lock: Path, pid: int) -> None:
    holder = _read_fingerprint(lock)
    if holder and holder.get("pid") == pid:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
