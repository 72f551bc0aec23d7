"""A lost process: kill -9 one of 2 CPU ranks mid-run; the other stops at once with one line naming it (exit 4),
and the same command with `--resume_from_checkpoint true` finishes the run.

The two ranks are started here as plain processes with the environment `accelerate launch` / torchrun gives them
(RANK, WORLD_SIZE, MASTER_ADDR, ...): no launcher tears the survivor down, so what is checked is the survivor's
own behaviour, its stderr and its exit status.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from jetmoe_ft.distributed import LOST_PROCESS_EXIT, RANKS_DIR

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
STOP_BOUND_S = 60  # measured: ~1 s (the survivor's next collective fails, or the watch sees the pid gone)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_ranks(output_dir: Path, *extra: str) -> list[subprocess.Popen]:
    command = [sys.executable, "-m", "jetmoe_ft.sft", "--config", str(ROOT / "recipes" / "tiny" / "sft.yaml")]
    command += ["--max_train_samples", "16", "--max_length", "48", "--per_device_train_batch_size", "2"]
    command += [
        "--max_steps",
        str(STEPS),
        "--save_steps",
        "2",
        "--save_total_limit",
        "2",
        "--logging_steps",
        "50",
    ]
    command += ["--output_dir", str(output_dir), *extra]
    port = str(_free_port())
    ranks = []
    for rank in range(2):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
        env |= {"MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        env |= {"RANK": str(rank), "LOCAL_RANK": str(rank)}
        ranks.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return ranks


def _wait(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{err[-3000:]}") from None
    return process.returncode, out, err


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    return [path for path in output_dir.glob("checkpoint-*") if (path / "trainer_state.json").is_file()]


def test_a_killed_rank_stops_the_other_with_one_line_and_the_run_resumes(tmp_path):
    output_dir = tmp_path / "run"
    survivor, victim = _start_ranks(output_dir)
    try:
        deadline = time.monotonic() + 240
        while not _complete_checkpoints(output_dir):
            assert survivor.poll() is None and victim.poll() is None, (
                "a rank ended before the first checkpoint"
            )
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.1)
        victim_pid = victim.pid
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        status, _, err = _wait(survivor, STOP_BOUND_S)
        stopped_after = time.monotonic() - killed_at
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert status == LOST_PROCESS_EXIT, err[-3000:]
    assert stopped_after < STOP_BOUND_S
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(
        f"error: process rank 1 (pid {victim_pid}) of this run is gone (killed or crashed); "
    )
    assert "the last checkpoint is " in lines[0] and "--resume_from_checkpoint true" in lines[0]
    assert "Traceback" not in err, err[-3000:]
    named = Path(lines[0].split("the last checkpoint is ")[1].split(";")[0])
    assert named.parent == output_dir and (named / "trainer_state.json").is_file()
    # the killed rank's file stays behind (it names a dead process); the resumed run must not take it for a loss
    assert (output_dir / RANKS_DIR / "rank-1.json").is_file()

    # the same command resumes from the last checkpoint to the end: the provenance check passes (same recipe), and
    # a fresh start in a folder holding checkpoints would be refused (exit 2)
    resumed = _start_ranks(output_dir, "--resume_from_checkpoint", "true")
    results = [_wait(process, 300) for process in resumed]
    for status, _, err in results:
        assert status == 0, err[-3000:]
    assert "on 2 processes (cpu)" in results[0][1] and "starting from the beginning" not in results[0][1]
    assert (output_dir / "model.safetensors").is_file()
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    fingerprint = json.loads((output_dir / "run.json").read_text())["sha"]
    assert json.loads((output_dir / f"checkpoint-{STEPS}" / "run.json").read_text())["sha"] == fingerprint
    # ranks that end normally take their files away, the killed rank's stale file included (overwritten)
    assert not list((output_dir / RANKS_DIR).glob("rank-*.json"))
    print(f"survivor stopped {stopped_after:.1f} s after the kill: {lines[0]}")
