"""Preemption: a scheduler's signal makes a run finish its optimizer step, write a checkpoint and end with exit 75
and one line; the same command with `--resume_from_checkpoint true` continues bit-identically.

The 2-process case (SIGTERM to one process of an `accelerate launch` run) is in `tests/test_multinode.py`, where
its resumed run is compared with the two-node run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jetmoe_ft.errors import RecipeError
from jetmoe_ft.sft import cli as sft_cli
from jetmoe_ft.training.preemption import PREEMPTED_EXIT, SIGNALS_VARIABLE, preemption_signals
from jetmoe_ft.training.runs import last_complete_checkpoint

from .test_lost_rank import _wait

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
# plain SGD (no optimizer state: quick checkpoints), a constant rate, a log every step
RUN = ["--config", str(ROOT / "recipes" / "tiny" / "sft.yaml"), "--max_train_samples", "32"]
RUN += ["--max_eval_samples", "4", "--per_device_train_batch_size", "2", "--max_length", "48"]
RUN += ["--optim", "sgd", "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--warmup_steps", "0"]
RUN += ["--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", "2", "--report_to", "none"]
RUN += ["--seed", "7"]


def test_preemption_signals_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(SIGNALS_VARIABLE, raising=False)
    assert preemption_signals() == [signal.SIGTERM, signal.SIGUSR1]
    monkeypatch.setenv(SIGNALS_VARIABLE, "usr2, SIGTERM")
    assert preemption_signals() == [signal.SIGUSR2, signal.SIGTERM]
    for wrong in ("SIGKILL", "SIGINT", "SIGNOPE"):
        monkeypatch.setenv(SIGNALS_VARIABLE, wrong)
        with pytest.raises(RecipeError, match=SIGNALS_VARIABLE):
            preemption_signals()


def _history(checkpoint: Path) -> list[tuple[int, float, float]]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]


def test_a_preempted_run_checkpoints_says_how_to_resume_and_resumes_bit_identically(tmp_path, capsys):
    output_dir = tmp_path / "preempted"
    command = [sys.executable, "-m", "jetmoe_ft.cli", "sft", *RUN, "--output_dir", str(output_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (output_dir / "checkpoint-2" / "trainer_state.json").is_file():
            assert run.poll() is None, run.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        run.send_signal(signal.SIGUSR1)  # SLURM's early warning (--signal=USR1@SECONDS)
        # a second signal (SIGTERM, the scheduler's next) as soon as the new checkpoint's folder appears
        while run.poll() is None and not [
            p for p in output_dir.glob("checkpoint-*") if p.name != "checkpoint-2"
        ]:
            time.sleep(0.005)
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
        status, _, err = _wait(run, 120)
    finally:
        if run.poll() is None:
            run.kill()
    assert status == PREEMPTED_EXIT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1, err[-3000:]
    checkpoint = last_complete_checkpoint(output_dir)
    step = int(checkpoint.name.split("-")[1])
    assert 2 < step < STEPS
    assert lines[0] == (
        f"preempted: SIGUSR1: stopped after step {step}; the checkpoint is {checkpoint}; resume with the same "
        "command and --resume_from_checkpoint true."
    )
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert not (output_dir / "model.safetensors").exists()  # no final model from a stopped run

    # the same command resumes; a requeued job whose recipe says `resume_from_checkpoint: true` starts fresh when
    # there is no checkpoint yet: the uninterrupted run below
    # one thread, as the signalled process had (OMP_NUM_THREADS=1): another thread count sums in another order
    fresh = tmp_path / "uninterrupted"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert sft_cli([*RUN, "--output_dir", str(output_dir), "--resume_from_checkpoint", "true"]) == 0
        assert sft_cli([*RUN, "--output_dir", str(fresh), "--resume_from_checkpoint", "true"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert f"No complete checkpoint in {fresh}: starting from the beginning." in capsys.readouterr().out

    assert _history(output_dir / f"checkpoint-{STEPS}") == _history(fresh / f"checkpoint-{STEPS}")
    resumed, uninterrupted = (
        load_file(output_dir / "model.safetensors"),
        load_file(fresh / "model.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
