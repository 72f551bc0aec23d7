"""GRPO on the tiny recipe: routing replay on and off, and eager against compiled decoding.

Run from the repository root after `make sft && make rm` (this is `make bench-grpo`):

    .venv/bin/python bench/bench_grpo.py                      # both parts, ~35 min on 2 idle cores
    .venv/bin/python bench/bench_grpo.py --parts replay --seeds 0
    .venv/bin/python bench/bench_grpo.py --sft DIR --rm DIR --max_steps 20   # a dry run

Part `replay`: recipes/tiny/grpo.yaml (the `make sft` model, the `make rm` reward model + length + no repeated
3-grams) in bf16 weights and bf16 autocast (`--dtype bfloat16 --bf16 true --use_cpu true`) with one generation
batch serving 4 optimizer steps (`--steps_per_generation 4`, so the later steps train on rollouts of weights
that have moved since, and TRL computes the old policy's log-probs), with `routing_replay` none and rollout, for
each seed. Per run, over its logged steps: `routing/rollout_match` (and per kind) -- the experts the training
forward used against the rollout's --, `routing/rollout_free_match` (with replay: the routers' own top-k),
`rollout/logprob_gap` (mean |log pi_train - log pi_rollout| over trained tokens) and `rollout/logprob_gap.old`
(the old policy's log-probs: the rollout's weights, so only kernels, batch shapes and routing differ), and the
held-out greedy reward before and after training (87 prompts).

Part `timing`: the shipped recipe unchanged (fp32, what `make grpo` runs) with `compile_generation` false and
true: the wall clock of the whole process, the training time, and `rollout/generation_seconds` (one generation
batch per optimizer step here), the mean over the logged steps and the first logged step's (which includes
compiling) apart.

Every run is its own process (`python -m jetmoe_ft.grpo`), the arms interleaved seed by seed. Timings only mean
something on an otherwise idle machine: each record carries the load average and `other_procs_cpu_cores`, the
cores other processes kept busy while it ran (from /proc/stat, less the run's own CPU time). Records go to
bench/results/grpo/grpo.jsonl, the tables to bench/results/grpo/grpo.md (and stdout); the runs themselves to
`--work_dir` (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "grpo.yaml"
REPLAY_ARMS = ("none", "rollout")
LOGGED = (
    "routing/rollout_match",
    "routing/rollout_match.moa",
    "routing/rollout_match.moe",
    "routing/rollout_free_match",
    "rollout/logprob_gap",
    "rollout/logprob_gap.old",
    "rollout/generation_seconds",
)


def busy_cpu_seconds() -> float:
    """CPU seconds all processes spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_grpo(output_dir: Path, overrides: list[str], log_path: Path) -> dict:
    """One `python -m jetmoe_ft.grpo` run; its wall clock, load and the values it logged."""
    command = [
        sys.executable,
        "-m",
        "jetmoe_ft.grpo",
        "--config",
        str(RECIPE),
        "--output_dir",
        str(output_dir),
    ]
    command += ["--report_to", "none", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    busy, own, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    other = (busy_cpu_seconds() - busy - (children_cpu_seconds() - own)) / wall
    record = {
        "command": " ".join(command),
        "returncode": result.returncode,
        "wall_s": round(wall, 1),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        "other_procs_cpu_cores": round(max(other, 0.0), 2),
        "cpu_cores": os.cpu_count(),
    }
    if result.returncode != 0:
        record["error"] = log_path.read_text()[-2000:]
        return record
    metrics = json.loads((output_dir / "metrics.json").read_text())
    record.update(
        {
            key: metrics.get(key)
            for key in ("eval_before_reward/mean", "eval_after_reward/mean", "train_runtime")
        }
    )
    record["eval_reward/change"] = metrics.get("eval_reward/change")
    logs = [entry for entry in last_log_history(output_dir) if "loss" in entry]
    record["logged_steps"] = len(logs)
    for key in LOGGED:
        values = [entry[key] for entry in logs if key in entry]
        if values:
            record[key] = statistics.fmean(values)
            record[f"{key}/first"] = values[0]
            record[f"{key}/min"] = min(values)
    return record


def last_log_history(output_dir: Path) -> list[dict]:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


def reward_funcs(rm: Path) -> str:
    """The recipe's rewards with the reward model at `rm`."""
    return f"[{rm}, {{length_in_range: {{low: 4, high: 20}}}}, {{no_repeated_ngrams: {{n: 3}}}}]"


def common(args) -> list[str]:
    steps = (
        ["--max_steps", str(args.max_steps), "--save_steps", str(args.max_steps)] if args.max_steps else []
    )
    return ["--model_name_or_path", str(args.sft), "--reward_funcs", reward_funcs(args.rm), *steps]


def replay_part(args, out: Path) -> list[dict]:
    records = []
    for seed in args.seeds:
        for arm in REPLAY_ARMS if seed % 2 == 0 else REPLAY_ARMS[::-1]:
            name = f"replay-{arm}-seed{seed}"
            overrides = [*common(args), "--seed", str(seed), "--routing_replay", arm]
            overrides += [
                "--dtype",
                "bfloat16",
                "--bf16",
                "true",
                "--use_cpu",
                "true",
                "--steps_per_generation",
                "4",
            ]
            record = {"part": "replay", "arm": arm, "seed": seed}
            record.update(run_grpo(out / name, overrides, out / f"{name}.log"))
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def timing_part(args, out: Path) -> list[dict]:
    records = []
    for compiled in (False, True):
        name = f"timing-{'compiled' if compiled else 'eager'}"
        overrides = [*common(args), "--compile_generation", str(compiled).lower()]
        record = {"part": "timing", "arm": "compiled" if compiled else "eager"}
        record.update(run_grpo(out / name, overrides, out / f"{name}.log"))
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


def _mean_sd(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(records: list[dict]) -> str:
    lines = []
    replay = [r for r in records if r["part"] == "replay" and r["returncode"] == 0]
    if replay:
        lines += [
            "| routing_replay | seeds | rollout_match (moa / moe) | free top-k match | log-prob gap | log-prob gap, "
            "old policy | held-out reward before → after | wall s |",
            "|---|---:|---|---:|---:|---:|---|---:|",
        ]
        for arm in REPLAY_ARMS:
            runs = [r for r in replay if r["arm"] == arm]
            if not runs:
                continue

            def column(key, digits=4, runs=runs):
                return _mean_sd([r.get(key) for r in runs], digits)

            match = (
                f"{column('routing/rollout_match')} ({column('routing/rollout_match.moa')} / "
                f"{column('routing/rollout_match.moe')})"
            )
            free = column("routing/rollout_free_match") if arm == "rollout" else "= rollout_match"
            reward = f"{column('eval_before_reward/mean', 3)} → {column('eval_after_reward/mean', 3)}"
            lines.append(
                f"| {arm} | {len(runs)} | {match} | {free} | {column('rollout/logprob_gap')} | "
                f"{column('rollout/logprob_gap.old')} | {reward} | {column('wall_s', 0)} |"
            )
        lines += [
            "",
            "Per run:",
            "",
            "| run | match | free match | gap | gap, old | reward after | other cores |",
        ]
        lines += ["|---|---:|---:|---:|---:|---:|---:|"]
        for r in replay:
            free = r.get("routing/rollout_free_match")
            lines.append(
                f"| {r['arm']} seed {r['seed']} | {r.get('routing/rollout_match', float('nan')):.4f} | "
                f"{'–' if free is None else f'{free:.4f}'} | {r.get('rollout/logprob_gap', float('nan')):.4f} | "
                f"{r.get('rollout/logprob_gap.old', float('nan')):.4f} | {r.get('eval_after_reward/mean', float('nan')):.3f} | "
                f"{r['other_procs_cpu_cores']:.2f} |"
            )
    timing = [r for r in records if r["part"] == "timing" and r["returncode"] == 0]
    if timing:
        lines += [
            "",
            "| decoding | whole run s | training s | generation s / step (mean) | first step | "
            "other cores | load avg |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in timing:
            lines.append(
                f"| {r['arm']} | {r['wall_s']:.0f} | {r.get('train_runtime', 0):.0f} | "
                f"{r.get('rollout/generation_seconds', float('nan')):.2f} | "
                f"{r.get('rollout/generation_seconds/first', float('nan')):.2f} | {r['other_procs_cpu_cores']:.2f} | "
                f"{r['loadavg_before']:.1f} |"
            )
    failed = [r for r in records if r["returncode"] != 0]
    for r in failed:
        lines.append(f"\nFAILED {r['part']} {r['arm']}: {r.get('error', '')[-400:]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sft", type=Path, default=ROOT / "outputs" / "tiny-sft", help="The `make sft` model."
    )
    parser.add_argument(
        "--rm", type=Path, default=ROOT / "outputs" / "tiny-rm", help="The `make rm` reward model."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["replay", "timing"], choices=["replay", "timing"])
    parser.add_argument("--max_steps", type=int, help="Fewer steps than the recipe's 100 (a dry run).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grpo")
    parser.add_argument(
        "--work_dir", type=Path, help="Where the runs' outputs and logs go (default: a new temporary folder)."
    )
    args = parser.parse_args(argv)
    for path, make in ((args.sft, "make sft"), (args.rm, "make rm")):
        if not (path / "config.json").is_file():
            print(f"error: no model in {path}: run `{make}` first (or pass --sft / --rm).", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    runs.mkdir(parents=True, exist_ok=True)
    print(f"Runs and their logs: {runs}", flush=True)
    records = []
    if "replay" in args.parts:
        records += replay_part(args, runs)
    if "timing" in args.parts:
        records += timing_part(args, runs)
    with (args.out / "grpo.jsonl").open("a") as jsonl:
        for record in records:
            jsonl.write(json.dumps(record) + "\n")
    summary = tables(records)
    (args.out / "grpo.md").write_text(summary)
    print(summary)
    return 0 if all(r["returncode"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
