"""Peak memory and speed of a training step with the chunked LM-head loss against the full logits.

Run from the repository root:

    .venv/bin/python bench/bench_memory.py            # medium config, 4x1024 and 4x2048, fp32
    .venv/bin/python bench/bench_memory.py --quick    # 2x256 and 2x512, one timed step: a dry run
    .venv/bin/python bench/bench_memory.py --shapes 4x1024 --steps 3 --chunk-size 2048

One training step = forward, backward, AdamW step of our `JetMoeForCausalLM` on bench_model.py's "medium"
config (hidden 512, 8 layers, 8 experts top-2, vocabulary 32,000), random tokens as inputs and labels, no
router loss. "full" is the model's own loss (`model(input_ids, labels=...)`: `[tokens, vocab]` fp32 logits,
transformers' `ForCausalLMLoss`); "chunked" is `jetmoe_ft.modeling.lm_head_loss.causal_lm_loss` on
`model.model(...)`'s hidden states and `lm_head.weight`. Each is run with and without gradient checkpointing.

Every case runs in a fresh subprocess (bench_model.py's RSS helpers): `peak_rss_mb` is the process's peak
resident set size after the model is built (warm-up steps included, so AdamW's state counts), and
`step_rss_growth_mb` the largest rise of the peak RSS within one timed step (reset through
/proc/self/clear_refs). `step_s` is the median wall time of the timed steps, `step_cpu_s` their median CPU
time (less sensitive to other processes), and `other_procs_cpu_cores` the cores other processes kept busy
meanwhile: above ~0.25 the speed ratios are noise. Targets (issue 14): peak(checkpointing + chunked) ≤ 0.5 ×
peak(no checkpointing, full), and chunked steps ≥ 0.95 × the speed of full ones.

One JSON line per case on stdout; all lines to bench/results/memory.jsonl, a Markdown table to
bench/results/memory.md (and stderr).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM  # noqa: E402
from jetmoe_ft.modeling.lm_head_loss import DEFAULT_CHUNK_SIZE, causal_lm_loss  # noqa: E402

SIZE = "medium"
SHAPES = ((4, 1024), (4, 2048))
QUICK_SHAPES = ((2, 256), (2, 512))
# full first and last: an ABBA order, so a drift in machine load does not favour one head.
VARIANTS = (("full", False), ("chunked", False), ("chunked", True), ("full", True))


def build_step(spec: dict):
    """The model, optimizer and batch of one case; returns its training step (returning the loss)."""
    bm.configure_process()
    config = JetMoeConfig(**bm.MODEL_SIZES[SIZE], use_cache=False, attn_implementation="sdpa")
    model = JetMoeForCausalLM(config).train()
    if spec["ckpt"]:
        bm.enable_checkpointing(model)
    optimizer = bm.make_optimizer(model)
    batch = bm.token_batch(SIZE, (spec["batch"], spec["seq"]))
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")

    def step() -> float:
        with torch.autocast(**autocast):
            if spec["head"] == "full":
                loss = model(input_ids=batch, labels=batch).loss
            else:
                hidden = model.model(input_ids=batch).last_hidden_state
                loss = causal_lm_loss(hidden, model.lm_head.weight, batch, chunk_size=spec["chunk_size"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(spec: dict) -> dict:
    """In a fresh process: build, warm up, then time each step and measure its peak RSS."""
    step = build_step(spec)
    bm.release_free_memory()
    model_rss = bm.current_rss_mb()
    bm.reset_peak_rss()
    first_loss = [step() for _ in range(spec["warmup"])][0]
    overall_peak = bm.peak_rss_mb()
    times, cpu_times, growths = [], [], []
    busy, own, wall = bm._machine_busy_seconds(), own_cpu_s(), time.perf_counter()
    for _ in range(spec["steps"]):
        bm.release_free_memory()
        before = bm.current_rss_mb()
        bm.reset_peak_rss()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peak = bm.peak_rss_mb()
        growths.append(peak - before)
        overall_peak = max(overall_peak, peak)
    busy_end, own_end, wall = bm._machine_busy_seconds(), own_cpu_s(), time.perf_counter() - wall
    other = None if busy is None or busy_end is None else max(0.0, (busy_end - busy - (own_end - own)) / wall)
    tokens = spec["batch"] * spec["seq"]
    return {
        "peak_rss_mb": round(overall_peak, 1),
        "step_rss_growth_mb": round(max(growths), 1),
        "model_rss_mb": round(model_rss, 1),
        "step_s": round(statistics.median(times), 3),
        "step_cpu_s": round(statistics.median(cpu_times), 3),
        "tokens_per_s": round(tokens / statistics.median(times), 1),
        "first_loss": round(first_loss, 5),
        "other_procs_cpu_cores": None if other is None else round(other, 2),
    }


def run_case(spec: dict, timeout_s: float = 1800) -> dict:
    """`worker(spec)` in a fresh subprocess of this file; its record, or the error it hit."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s}s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"exited {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def case_name(spec: dict) -> str:
    return f"{SIZE}-{spec['batch']}x{spec['seq']}-{spec['dtype']}-{spec['head']}{'-ckpt' if spec['ckpt'] else ''}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def ratios(records: list[dict]) -> list[dict]:
    """Per shape: peak(ckpt + chunked) / peak(no ckpt, full), and chunked / full speed with and without ckpt."""
    rows = []
    for shape in dict.fromkeys((r["batch"], r["seq"]) for r in records):
        cases = {(r["head"], r["ckpt"]): r for r in records if (r["batch"], r["seq"]) == shape}
        peak = {key: case["peak_rss_mb"] for key, case in cases.items()}
        wall = {key: case["step_s"] for key, case in cases.items()}
        cpu = {key: case["step_cpu_s"] for key, case in cases.items()}
        full, chunked, full_ckpt, chunked_ckpt = (
            ("full", False),
            ("chunked", False),
            ("full", True),
            ("chunked", True),
        )
        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "peak_ckpt_chunked_vs_full": _ratio(peak.get(chunked_ckpt), peak.get(full)),
                "peak_ckpt_full_vs_full": _ratio(peak.get(full_ckpt), peak.get(full)),
                "peak_chunked_vs_full": _ratio(peak.get(chunked), peak.get(full)),
                "speed_chunked_vs_full": _ratio(wall.get(full), wall.get(chunked)),
                "speed_chunked_vs_full_ckpt": _ratio(wall.get(full_ckpt), wall.get(chunked_ckpt)),
                "cpu_speed_chunked_vs_full": _ratio(cpu.get(full), cpu.get(chunked)),
                "cpu_speed_chunked_vs_full_ckpt": _ratio(cpu.get(full_ckpt), cpu.get(chunked_ckpt)),
            }
        )
    return rows


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def markdown(records: list[dict], env: dict, args) -> str:
    """The per-case table and the ratio table with the issue's targets."""
    lines = [
        f"## LM-head memory bench ({time.strftime('%Y-%m-%d')}, torch {env['torch']}, {env['cpu_count']} CPUs "
        f"{env['cpu_capability']}, {args.dtype}, chunk {args.chunk_size})",
        "",
        "| case | peak RSS MiB (+step) | step s (median) | CPU s | tokens/s | first loss | other cores |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['peak_rss_mb']:,.0f} (+{r['step_rss_growth_mb']:,.0f}) | {r['step_s']:.2f} "
            f"| {r['step_cpu_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['first_loss']:.4f} "
            f"| {fmt(r['other_procs_cpu_cores'])} |"
        )
    lines += [
        "",
        "| shape | peak ckpt+chunked / no-ckpt full (≤ 0.5) | peak ckpt+full / no-ckpt full "
        "| peak chunked / full | speed chunked / full (≥ 0.95) | same, with ckpt | CPU-time speed, no ckpt / ckpt |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ratios([r for r in records if "error" not in r]):
        lines.append(
            f"| {row['shape']} | {fmt(row['peak_ckpt_chunked_vs_full'], suffix='×')} | {fmt(row['peak_ckpt_full_vs_full'], suffix='×')} "
            f"| {fmt(row['peak_chunked_vs_full'], suffix='×')} "
            f"| {fmt(row['speed_chunked_vs_full'], suffix='×')} | {fmt(row['speed_chunked_vs_full_ckpt'], suffix='×')} "
            f"| {fmt(row['cpu_speed_chunked_vs_full'], suffix='×')} / {fmt(row['cpu_speed_chunked_vs_full_ckpt'], suffix='×')} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2x256 and 2x512, one timed step: a dry run")
    parser.add_argument("--shapes", help="comma-separated BxT, e.g. 4x1024,4x2048")
    parser.add_argument("--steps", type=int, help="timed steps per case (default 2, --quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (AdamW state, allocator)")
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, fp32 weights"
    )
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens per LM-head chunk")
    parser.add_argument("--variants", help="comma-separated subset of full,chunked,chunked-ckpt,full-ckpt")
    parser.add_argument("--results", default="memory", help="bench/results/NAME.jsonl and NAME.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shapes:
        args.shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    else:
        args.shapes = QUICK_SHAPES if args.quick else SHAPES
    args.steps = args.steps or (1 if args.quick else 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    bm.configure_process()
    env = bm.environment()
    results = bm.RESULTS_DIR / args.results
    results.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with open(f"{results}.jsonl", "w") as jsonl:
        for batch, seq in args.shapes:
            for head, ckpt in VARIANTS:
                if args.variants and f"{head}{'-ckpt' if ckpt else ''}" not in args.variants.split(","):
                    continue
                spec = dict(batch=batch, seq=seq, head=head, ckpt=ckpt, dtype=args.dtype)
                spec |= dict(chunk_size=args.chunk_size, warmup=args.warmup, steps=args.steps)
                bm.log(f"{case_name(spec)} in a fresh subprocess")
                record = {"case": case_name(spec), **spec, **run_case(spec), **env}
                records.append(record)
                print(json.dumps(record), flush=True)
                jsonl.write(json.dumps(record) + "\n")
        for row in ratios([r for r in records if "error" not in r]):
            print(json.dumps({"case": f"ratios-{row['shape']}", **row}), flush=True)
            jsonl.write(json.dumps({"case": f"ratios-{row['shape']}", **row}) + "\n")
    summary = markdown(records, env, args)
    Path(f"{results}.md").write_text(summary)
    print(summary, file=sys.stderr)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
