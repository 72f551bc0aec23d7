"""Whole recipes: `jetmoe-ft sft|dpo` against TRL's own scripts with transformers' `JetMoeForCausalLM`.

Run from the repository root (this is `make bench-recipes`):

    .venv/bin/python bench/bench_recipes.py                 # every case, ~25 min on 2 loaded cores
    .venv/bin/python bench/bench_recipes.py --quick         # 6 SFT / 3 DPO steps: a dry run
    .venv/bin/python bench/bench_recipes.py --cases 'sft-fp32,dpo-*'

Cases: `{sft,dpo}-{fp32,bf16}`. SFT is recipes/tiny/sft.yaml for 60 steps, DPO recipes/tiny/dpo.yaml for 30
steps, both from the random tiny JetMoE (`jetmoe-ft/tiny`, seed 0; DPO therefore starts from the random model
on both sides, not from an SFT output). Each case runs two ways, each in a fresh process of its own:

- "ours": `jetmoe_ft.sft.main` / `jetmoe_ft.dpo.main`, the code behind `jetmoe-ft sft|dpo`, with the recipe and
  `--max_steps N`.
- "theirs": `trl.scripts.sft.main` / `trl.scripts.dpo.main`, the code behind `trl sft|dpo`, parsed by TRL's
  own parser, loading transformers' `JetMoeForCausalLM` from a folder holding the same tiny model
  (`build_tiny_model(0)` + `save_pretrained`) and the embedded tokenizer, and training on the recipe's own
  train/test split written as JSON lines (for DPO after `check_preferences`, so both sides see the same pairs
  in the same order). Every TRL / transformers key of the recipe is passed through unchanged; the JetMoE
  keys have no TRL equivalent except the router-loss coefficient, which a user passes as
  `--router_aux_loss_coef` (the recipe's `aux_loss_coef`). Left at its default TRL trains no router loss at
  all (it looks for `router_aux_loss_coef` in the model config; JetMoe's is `aux_loss_coef`); set, TRL's fused
  LM head crashes on `config.num_experts` (AttributeError: transformers' JetMoeConfig has
  `num_local_experts`), so the model folder's config.json also gets `"num_experts": 8`, a fix a user can
  make. TRL's script builds the evaluation set only when `eval_strategy` is not "no", so theirs gets
  `eval_strategy steps` with an `eval_steps` beyond the run (no evaluation during training) and
  `trainer.evaluate()` after training.

Both sides get the same overrides: `--max_steps`, `--save_strategy no` (no intermediate checkpoints; each saves
its final model after training, outside the timing), `--include_num_input_tokens_seen true` (the
training tokens: every input id, so DPO's count includes the padding to each batch's longest pair, the same
batches on both sides; HfArgumentParser reads this field as a boolean, so `non_padding` cannot be passed), `--use_cpu true`, `--bf16` per case (bf16 = the trainer's CPU autocast; weights fp32).

Measured in each child, around `Trainer.train` (patched in the child to record, nothing else):
training tokens (`state.num_input_tokens_seen`) / `train_runtime` = tokens/s; the peak RSS of
the process when training ends (VmHWM: data, model, reference, training; ours' evaluation before training
included); the router loss each trainer optimised (ours: JetMoE's switch + z loss it logs as `aux_loss`;
theirs: whatever TRL enabled, its logged `aux_loss` = transformers' Mixtral-style balancing loss, or the
crash); the held-out loss (SFT: next-token loss on the assistant turns of held-out conversations; for
theirs TRL's eval loss includes `router_aux_loss_coef · aux_loss`, which is subtracted, both are reported) or
reward accuracy (DPO) after training.

The two sides run one after the other (order alternating from case to case), not both at once; on a machine
others load the timings move, so every record carries `other_procs_cpu_cores` as bench_model.py measures it.
One JSON line per case goes to stdout and bench/results/recipes.jsonl, a Markdown table to
bench/results/recipes.md. Ratios are ours / theirs (tokens/s > 1 and memory < 1: ours better).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package


def _bench_model():
    """bench_model.py's helpers, imported in the parent only (it imports jetmoe_ft, which would add to the peak
    RSS of the "theirs" children)."""
    import bench_model

    return bench_model


def log(message: str) -> None:
    _bench_model().log(message)


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    return _bench_model().fmt(value, digits, suffix)


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far (VmHWM), in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
RECIPES = {"sft": ROOT / "recipes/tiny/sft.yaml", "dpo": ROOT / "recipes/tiny/dpo.yaml"}
STEPS = {"sft": 60, "dpo": 30}
QUICK_STEPS = {"sft": 6, "dpo": 3}
CASES = ("sft-fp32", "dpo-fp32", "sft-bf16", "dpo-bf16")
TARGETS = {"sft": 1.5, "dpo": 1.3}  # tokens/s, ours / theirs
MEMORY_TARGET = 0.8  # peak RSS, ours / theirs
MODEL_SEED = 0
# Recipe keys of ours alone: the model is given as a folder, the data as JSON lines, the router loss below.
OURS_ONLY_KEYS = {
    "model_name_or_path",
    "model_seed",
    "moe_backend",
    "aux_loss_coef",
    "router_z_loss_coef",
    "dataset_name",
    "output_dir",
    "eval_strategy",
    "save_strategy",
    "save_steps",
    "save_total_limit",
}
CHILD_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------------------------ child


_TRAINED: dict = {}  # what the patched `Trainer.train` recorded in this child


def _logged(history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in history if isinstance(entry.get(key), int | float)]


def instrument_trainer(evaluate_after: bool) -> None:
    """Wrap `transformers.Trainer.train` to record its metrics, tokens, peak RSS and router-loss settings, and
    (theirs) run `evaluate()` right after; the training itself is untouched."""
    import transformers

    original = transformers.Trainer.train

    def train(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        history = self.state.log_history
        config = getattr(self.model, "config", None)
        _TRAINED.update(
            train_runtime=output.metrics.get("train_runtime"),
            train_loss=output.metrics.get("train_loss"),
            steps=self.state.global_step,
            tokens=self.state.num_input_tokens_seen,
            peak_rss_mb=peak_rss_mb(),
            trainer=type(self).__name__,
            model_class=f"{type(self.model).__module__}.{type(self.model).__name__}",
            train_rows=len(self.train_dataset) if self.train_dataset is not None else None,
            trl_aux_loss_enabled=getattr(self, "aux_loss_enabled", None),
            trl_router_aux_loss_coef=getattr(self, "router_aux_loss_coef", None),
            config_output_router_logits=getattr(config, "output_router_logits", None),
            config_aux_loss_coef=getattr(config, "aux_loss_coef", None),
            config_router_z_loss_coef=getattr(config, "router_z_loss_coef", None),
            logged_aux_loss=_logged(history, "aux_loss"),
            logged_loss=_logged(history, "loss"),
        )
        if evaluate_after:
            _TRAINED["eval"] = self.evaluate()
        return output

    transformers.Trainer.train = train


def run_child(spec: dict) -> dict:
    """One side of one case in this (fresh) process; returns its record."""
    import torch

    result = {"side": spec["side"], "torch_threads": torch.get_num_threads()}
    started = time.perf_counter()
    try:
        if spec["side"] == "ours":
            instrument_trainer(evaluate_after=False)
            from jetmoe_ft import dpo, sft

            metrics = (sft if spec["loop"] == "sft" else dpo).main(spec["argv"])
            result["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        else:
            instrument_trainer(evaluate_after=True)
            if spec["loop"] == "sft":
                from trl.scripts import sft as script
            else:
                from trl.scripts import dpo as script
            parser = script.make_parser()
            script.main(*parser.parse_args_and_config(spec["argv"], fail_with_unknown_args=True))
            result["metrics"] = {
                k: v for k, v in _TRAINED.pop("eval", {}).items() if isinstance(v, int | float)
            }
    except BaseException as error:  # noqa: BLE001 (a crash is a result: recorded as a user would see it)
        message = str(error).strip().splitlines()
        result["error"] = f"{type(error).__name__}: {message[0] if message else ''}"[:300]
        result["traceback"] = traceback.format_exc()[-3000:]
    result.update(_TRAINED)
    result["end_peak_rss_mb"] = peak_rss_mb()
    result["wall_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------- parent


def recipe_values(loop: str) -> dict:
    return yaml.safe_load(RECIPES[loop].read_text())


def prepare_inputs(folder: Path) -> None:
    """The tiny model + tokenizer (transformers' format) and each loop's train/test split as JSON lines."""
    from trl import DPOConfig, SFTConfig

    from jetmoe_ft.assets import build_tiny_model, load_tokenizer
    from jetmoe_ft.config import parse_recipe
    from jetmoe_ft.data import check_preferences, load_recipe_datasets

    tokenizer = load_tokenizer()
    model = build_tiny_model(MODEL_SEED)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    # The one workaround a user can make: with `router_aux_loss_coef` set, TRL's fused LM head reads
    # `config.num_experts`, which transformers' JetMoeConfig lacks (AttributeError); name it in config.json.
    config_path = folder / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] = config["num_local_experts"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    for loop, config_cls in (("sft", SFTConfig), ("dpo", DPOConfig)):
        recipe = parse_recipe(
            config_cls, ["--config", str(RECIPES[loop]), "--output_dir", str(folder / "unused")]
        )
        data = load_recipe_datasets(recipe.data, loop, seed=recipe.training.seed)
        if loop == "dpo":
            data = check_preferences(data, tokenizer, recipe.training)
        for split, dataset in data.items():
            dataset.to_json(folder / f"{loop}_data" / f"{split}.jsonl")
        log(f"{loop} data: " + ", ".join(f"{split} {len(dataset)} rows" for split, dataset in data.items()))


def common_overrides(steps: int, dtype: str, logging_steps: int) -> list[str]:
    return [
        "--max_steps", str(steps),
        "--save_strategy", "no",
        "--include_num_input_tokens_seen", "true",
        "--use_cpu", "true",
        "--bf16", str(dtype == "bf16").lower(),
        "--logging_steps", str(logging_steps),
        "--report_to", "none",
    ]  # fmt: skip


def ours_argv(loop: str, steps: int, dtype: str, out: Path, logging_steps: int) -> list[str]:
    argv = ["--config", str(RECIPES[loop]), "--output_dir", str(out)]
    if loop == "dpo":
        argv += ["--model_name_or_path", "jetmoe-ft/tiny", "--model_seed", str(MODEL_SEED)]
    return argv + common_overrides(steps, dtype, logging_steps)


def theirs_argv(loop: str, steps: int, dtype: str, out: Path, folder: Path, logging_steps: int) -> list[str]:
    values = recipe_values(loop)
    argv = [
        "--model_name_or_path", str(folder / "model"),
        "--dataset_name", str(folder / f"{loop}_data"),
        "--output_dir", str(out),
        "--eval_strategy", "steps",
        "--eval_steps", str(10**6),
        "--router_aux_loss_coef", str(values.get("aux_loss_coef", 0.0)),
    ]  # fmt: skip
    overridden = {"max_steps", "bf16", "logging_steps", "report_to", "use_cpu"}
    for key, value in values.items():
        if key in OURS_ONLY_KEYS or key in overridden:
            continue
        if isinstance(value, list):
            argv += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        else:
            argv += [f"--{key}", str(value)]
    return argv + common_overrides(steps, dtype, logging_steps)


class _Child:
    """CPU-second bookkeeping of a running child, for ContentionMonitor."""

    def __init__(self):
        self.pid, self.cpu_s = None, 0.0

    def cpu_seconds(self) -> float:
        if self.pid is not None:
            now = _bench_model()._process_cpu_seconds(self.pid)
            if now is not None:
                self.cpu_s = now
        return self.cpu_s


def launch(spec: dict, log_path: Path) -> tuple[dict, float | None]:
    """Run one side in a fresh process; its record and the cores other processes used meanwhile."""
    child = _Child()
    monitor = _bench_model().ContentionMonitor([child])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    with open(log_path, "w") as stderr, tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=ROOT,
        )
        child.pid = process.pid
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while process.poll() is None:
            child.cpu_seconds()
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(0.5)
        child.pid = None
        other = monitor.other_cores()
        stdout.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"side": spec["side"], "error": f"exit {process.returncode}: {tail[0][:300]}"}, other
    result = json.loads(lines[-1])
    if result.get("error", "").startswith("SystemExit"):  # argparse's message is on stderr
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        result["error"] += f" ({tail[0][:300]})"
    return result, other


def side_fields(prefix: str, loop: str, result: dict, other: float | None) -> dict:
    """The record's `{prefix}_*` fields from one side's child result."""
    metrics = result.get("metrics", {})
    tokens, runtime = result.get("tokens"), result.get("train_runtime")
    fields = {
        f"{prefix}_tok_s": tokens / runtime if tokens and runtime else None,
        f"{prefix}_tokens": tokens,
        f"{prefix}_train_runtime_s": runtime,
        f"{prefix}_steps": result.get("steps"),
        f"{prefix}_train_rows": result.get("train_rows"),
        f"{prefix}_peak_rss_mb": result.get("peak_rss_mb"),
        f"{prefix}_train_loss": result.get("train_loss"),
        f"{prefix}_trainer": result.get("trainer"),
        f"{prefix}_model_class": result.get("model_class"),
        f"{prefix}_torch_threads": result.get("torch_threads"),
        f"{prefix}_wall_s": result.get("wall_s"),
        f"{prefix}_other_procs_cpu_cores": other,
        f"{prefix}_logged_aux_loss": result.get("logged_aux_loss"),
        f"{prefix}_logged_loss": result.get("logged_loss"),  # per logging step: where two runs part
        f"{prefix}_trl_aux_loss_enabled": result.get("trl_aux_loss_enabled"),
        f"{prefix}_trl_router_aux_loss_coef": result.get("trl_router_aux_loss_coef"),
        f"{prefix}_config_output_router_logits": result.get("config_output_router_logits"),
        f"{prefix}_config_aux_loss_coef": result.get("config_aux_loss_coef"),
        f"{prefix}_config_router_z_loss_coef": result.get("config_router_z_loss_coef"),
    }
    if "error" in result:
        fields[f"{prefix}_error"] = result["error"]
    eval_key = "eval_after_" if prefix == "ours" else "eval_"
    if loop == "sft":
        loss = metrics.get(f"{eval_key}loss")
        fields[f"{prefix}_eval_loss"] = loss
        aux = metrics.get(f"{eval_key}aux_loss")
        coef = result.get("trl_router_aux_loss_coef") if prefix == "theirs" else None
        if prefix == "theirs" and loss is not None and aux is not None and result.get("trl_aux_loss_enabled"):
            fields["theirs_eval_aux_loss"] = aux
            fields[f"{prefix}_eval_nll"] = loss - (coef or 0.0) * aux
        else:
            fields[f"{prefix}_eval_nll"] = loss
    else:
        fields[f"{prefix}_eval_reward_accuracy"] = metrics.get(f"{eval_key}rewards/accuracies")
        fields[f"{prefix}_eval_reward_margin"] = metrics.get(f"{eval_key}rewards/margins")
        if prefix == "ours":
            fields["ours_reference"] = metrics.get("reference")
    return fields


def run_case(case: str, index: int, steps: int, folder: Path, keep_logs: Path) -> dict:
    loop, dtype = case.split("-")
    logging_steps = min(recipe_values(loop).get("logging_steps", 10), max(1, steps // 2))
    specs = {
        "ours": {"side": "ours", "loop": loop, "argv": ours_argv(loop, steps, dtype, folder / f"ours-{case}", logging_steps)},
        "theirs": {
            "side": "theirs",
            "loop": loop,
            "argv": theirs_argv(loop, steps, dtype, folder / f"theirs-{case}", folder, logging_steps),
        },
    }  # fmt: skip
    order = ("ours", "theirs") if index % 2 == 0 else ("theirs", "ours")
    record = {"case": case, "loop": loop, "dtype": dtype, "max_steps": steps, "order": "/".join(order)}
    others = []
    for side in order:
        log(f"{case}: {side} ...")
        result, other = launch(specs[side], keep_logs / f"{case}-{side}.log")
        others.append(other)
        record.update(side_fields(side, loop, result, other))
        log(
            f"{case}: {side} done: {fmt(record.get(f'{side}_tok_s'))} tok/s, "
            f"peak {fmt(record.get(f'{side}_peak_rss_mb'), 0)} MiB"
            + (f", error: {result['error']}" if "error" in result else "")
        )
    record["other_procs_cpu_cores"] = max((o for o in others if o is not None), default=None)
    ratio = _bench_model().ratio
    record["tok_s_ratio"] = ratio(record.get("ours_tok_s"), record.get("theirs_tok_s"))
    record["peak_rss_ratio"] = ratio(record.get("ours_peak_rss_mb"), record.get("theirs_peak_rss_mb"))
    record["tok_s_target"] = TARGETS[loop]
    record["tokens_equal"] = record.get("ours_tokens") == record.get("theirs_tokens")
    return record


# --------------------------------------------------------------------------------------------- summary


def router_loss_note(record: dict, prefix: str) -> str:
    if record.get(f"{prefix}_error"):
        return "—"
    aux = record.get(f"{prefix}_logged_aux_loss") or []
    last = f", last logged aux_loss {aux[-1]:.3f}" if aux else ", no aux_loss logged"
    if prefix == "ours":
        return (
            f"JetMoE switch + {record.get('ours_config_router_z_loss_coef')}·z, "
            f"coef {record.get('ours_config_aux_loss_coef')}{last}"
        )
    if record.get("theirs_trl_aux_loss_enabled"):
        return f"Mixtral balancing loss × {record.get('theirs_trl_router_aux_loss_coef')} (no z loss){last}"
    return f"none (TRL's aux loss off){last}"


def held_out(record: dict, prefix: str) -> str:
    if record["loop"] == "sft":
        return fmt(record.get(f"{prefix}_eval_nll"), 3)
    return fmt(record.get(f"{prefix}_eval_reward_accuracy"), 3)


def verdicts(record: dict) -> str:
    notes = []
    speed, memory = record.get("tok_s_ratio"), record.get("peak_rss_ratio")
    if speed is not None:
        notes.append(
            f"speed {'met' if speed >= record['tok_s_target'] else 'missed'} (≥ {record['tok_s_target']}×)"
        )
    if memory is not None:
        notes.append(f"memory {'met' if memory <= MEMORY_TARGET else 'missed'} (≤ {MEMORY_TARGET}×)")
    ours, theirs = (
        record.get(f"{p}_eval_nll" if record["loop"] == "sft" else f"{p}_eval_reward_accuracy")
        for p in ("ours", "theirs")
    )
    if ours is not None and theirs is not None:
        better = ours <= theirs if record["loop"] == "sft" else ours >= theirs
        notes.append(f"held-out {'met' if better else 'missed'}")
    for prefix in ("ours", "theirs"):
        if record.get(f"{prefix}_error"):
            notes.append(f"{prefix} failed: {record[f'{prefix}_error']}")
    if not record.get("tokens_equal"):
        notes.append(f"tokens differ ({record.get('ours_tokens')} vs {record.get('theirs_tokens')})")
    other = record.get("other_procs_cpu_cores")
    if other is not None and other > 0.25:
        notes.append(f"noisy: other processes used {other:.1f} cores")
    return "; ".join(notes)


def markdown_summary(records: list[dict], env: dict) -> str:
    lines = [
        f"Whole recipes, {time.strftime('%Y-%m-%d')}, {env['cpu_count']} CPUs visible ({env['cpu_capability']}), "
        f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}. Ours: `jetmoe-ft sft|dpo`; "
        "theirs: `trl sft|dpo` (TRL's script code) with transformers' `JetMoeForCausalLM`; same tiny model "
        "(seed 0), data split, order, seed and hyperparameters, each side in a fresh process. Ratios ours / theirs. "
        "Held-out: SFT next-token loss on held-out assistant turns (lower is better; theirs without its "
        "router term), DPO reward accuracy (higher is better).",
        "",
        "| case | steps | ours tok/s | theirs tok/s | ours/theirs | ours peak RSS MiB | theirs peak RSS MiB "
        "| ours/theirs | ours held-out | theirs held-out | router loss ours | router loss theirs | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['case']} | {r['max_steps']} | {fmt(r.get('ours_tok_s'))} | {fmt(r.get('theirs_tok_s'))} "
            f"| {fmt(r.get('tok_s_ratio'), 2, '×')} | {fmt(r.get('ours_peak_rss_mb'), 0)} "
            f"| {fmt(r.get('theirs_peak_rss_mb'), 0)} | {fmt(r.get('peak_rss_ratio'), 2, '×')} "
            f"| {held_out(r, 'ours')} | {held_out(r, 'theirs')} | {router_loss_note(r, 'ours')} "
            f"| {router_loss_note(r, 'theirs')} | {verdicts(r)} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 SFT / 3 DPO steps: a dry run")
    parser.add_argument("--cases", help=f"comma-separated glob patterns of {', '.join(CASES)}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where recipes.jsonl and .md go")
    parser.add_argument(
        "--append", action="store_true", help="add to recipes.jsonl (the table then shows every line in it)"
    )
    parser.add_argument("--keep", type=Path, help="keep the children's outputs and logs in this folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select_cases(patterns: str | None) -> list[str]:
    if not patterns:
        return list(CASES)
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    selected = [case for case in CASES if any(fnmatch.fnmatch(case, glob) for glob in globs)]
    if not selected:
        raise SystemExit(f"--cases {patterns!r} matches no case; known cases: {', '.join(CASES)}")
    return selected


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child)), default=str), flush=True)
        return 0
    import trl

    cases = select_cases(args.cases)
    env = {
        **_bench_model().environment(),
        "trl": trl.__version__,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
    }
    env["threads"] = None  # each child reports its own
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records, jsonl_path = [], args.out_dir / "recipes.jsonl"
    if args.append and jsonl_path.exists():
        records = [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()]
    with contextlib.ExitStack() as stack:
        folder = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-recipes-")))
        folder.mkdir(parents=True, exist_ok=True)
        prepare_inputs(folder)
        with open(jsonl_path, "a" if args.append else "w") as jsonl:
            for index, case in enumerate(cases):
                steps = (QUICK_STEPS if args.quick else STEPS)[case.split("-")[0]]
                record = _bench_model().rounded({**run_case(case, index, steps, folder, folder), **env})
                record["load_avg_1m"] = round(os.getloadavg()[0], 2)
                line = json.dumps(record)
                print(line, flush=True)
                jsonl.write(line + "\n")
                jsonl.flush()
                records.append(record)
                (args.out_dir / "recipes.md").write_text(markdown_summary(records, env))
    print("\n" + markdown_summary(records, env), file=sys.stderr, flush=True)
    log(f"done in {time.perf_counter() - started:.0f}s; results in {args.out_dir}")
    failed = [r["case"] for r in records if r.get("ours_error")]
    return 1 if failed else 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
