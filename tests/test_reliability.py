"""A failed run never looks like a success; runs don't mix; same seed, same run; errors are one line."""

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

from jetmoe_ft.cls import cli as cls_cli
from jetmoe_ft.dpo import cli as dpo_cli
from jetmoe_ft.sft import cli as sft_cli
from jetmoe_ft.training.provenance import LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
SHORT = ["--max_train_samples", "16", "--max_eval_samples", "4", "--per_device_train_batch_size", "2"]
SHORT += ["--max_length", "48", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none"]


def _sft(output_dir, *extra, recipe="sft.yaml"):
    return sft_cli(["--config", str(TINY / recipe), "--output_dir", str(output_dir), *SHORT, *extra])


def test_a_diverging_run_stops_with_exit_3_and_writes_no_model(tmp_path, capsys):
    status = _sft(tmp_path, "--learning_rate", "1e6", "--warmup_steps", "0", "--max_steps", "6")
    assert status == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and "no final model" in err and "Traceback" not in err
    assert not (tmp_path / "model.safetensors").exists()
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert "stopped" in record and record["stopped_at_step"] >= 1


def test_non_finite_steps_can_be_skipped_a_bounded_number_of_times(tmp_path, capsys):
    # fp32 overflow from the first step on: each step is skipped until the budget is spent
    status = _sft(
        tmp_path,
        "--learning_rate",
        "1e6",
        "--warmup_steps",
        "0",
        "--max_steps",
        "6",
        "--nonfinite_skip_steps",
        "2",
    )
    out = capsys.readouterr()
    assert status == 3
    assert "step skipped (2 of 2)" in out.out


def test_same_seed_same_weights(tmp_path):
    for recipe in ("sft.yaml", "sft_lora.yaml"):
        weights = []
        for run in ("a", "b"):
            assert _sft(tmp_path / f"{recipe}-{run}", "--max_steps", "2", recipe=recipe) == 0
            name = "adapter_model.safetensors" if "lora" in recipe else "model.safetensors"
            weights.append(load_file(tmp_path / f"{recipe}-{run}" / name))
        assert weights[0].keys() == weights[1].keys()
        for key in weights[0]:
            assert torch.equal(weights[0][key], weights[1][key]), (recipe, key)


def test_same_seed_same_classifier_and_dpo(tmp_path):
    common = [
        "--max_train_samples",
        "8",
        "--max_eval_samples",
        "4",
        "--max_steps",
        "2",
        "--save_strategy",
        "no",
    ]
    common += [
        "--report_to",
        "none",
        "--model_name_or_path",
        "jetmoe-ft/tiny",
        "--per_device_train_batch_size",
        "2",
    ]
    for name, cli, recipe in (("cls", cls_cli, "cls.yaml"), ("dpo", dpo_cli, "dpo.yaml")):
        weights = []
        for run in ("a", "b"):
            output_dir = tmp_path / f"{name}-{run}"
            extra = ["--max_length", "48"]
            assert (
                cli(["--config", str(TINY / recipe), "--output_dir", str(output_dir), *common, *extra]) == 0
            )
            weights.append(load_file(output_dir / "model.safetensors"))
        for key in weights[0]:
            assert torch.equal(weights[0][key], weights[1][key]), (name, key)


def test_runs_do_not_mix_in_one_output_dir(tmp_path, capsys):
    assert _sft(tmp_path, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2") == 0
    # a fresh run there would rotate the other run's checkpoints away
    assert _sft(tmp_path, "--max_steps", "2", "--learning_rate", "1e-4") == 2
    assert "holds checkpoints of another run" in capsys.readouterr().err
    # resuming with another recipe would give the old run's weights under the new recipe's name
    assert (
        _sft(tmp_path, "--max_steps", "4", "--learning_rate", "1e-4", "--resume_from_checkpoint", "true") == 2
    )
    err = capsys.readouterr().err
    assert "written by another recipe" in err and "learning_rate" in err
    # the same recipe resumes; forcing is explicit
    assert _sft(tmp_path, "--max_steps", "3", "--resume_from_checkpoint", "true") == 0
    assert (
        _sft(tmp_path, "--max_steps", "2", "--learning_rate", "1e-4", "--overwrite_output_dir", "true") == 0
    )


def test_a_second_run_on_a_busy_output_dir_stops_at_once(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        result = subprocess.run(
            [sys.executable, "-m", "jetmoe_ft.cli", "sft", "--config", str(TINY / "sft.yaml")]
            + ["--output_dir", str(tmp_path), *SHORT, "--max_steps", "1"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"another run (pid {sleeper.pid})" in result.stderr
    # the holder is gone: its stale lock is taken over
    assert _sft(tmp_path, "--max_steps", "1") == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--freeze_router", "yes"], "invalid choice: 'yes'"),
        (["--output_dir", "/proc/version"], "is a file"),
    ],
)
def test_bad_values_are_one_line(tmp_path, capsys, args, words):
    status = sft_cli(["--config", str(TINY / "sft.yaml"), "--output_dir", str(tmp_path / "o"), *SHORT, *args])
    err = capsys.readouterr().err
    assert status == 2 and words in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB file system (tmpfs; needs root, as CI and these machines have): too small for the tiny model."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_says_so_with_the_path(small_disk, capsys):
    status = _sft(small_disk / "run", "--max_steps", "1")
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "no space left on the disk of" in err and str(small_disk) in err


def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_resume(tmp_path):
    command = [sys.executable, "-m", "jetmoe_ft.cli", "sft", "--config", str(TINY / "sft.yaml")]
    command += ["--output_dir", str(tmp_path), *SHORT, "--max_steps", "200", "--save_strategy", "steps"]
    command += ["--save_steps", "1"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("checkpoint-*/trainer_state.json")) and time.monotonic() < deadline:
            time.sleep(0.5)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130 and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and lines[0].startswith("interrupted: the last checkpoint is"), err[-2000:]
    assert "--resume_from_checkpoint true" in lines[0]
    assert not (tmp_path / "model.safetensors").exists()
