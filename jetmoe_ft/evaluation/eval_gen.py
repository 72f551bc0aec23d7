"""Is the fine-tune better than where it started: generations side by side with a baseline, paired intervals.

jetmoe-ft eval-gen --model DIR [--baseline base | --baseline DIR] [--reward_model RM] [--config R.yaml | ...]

Prompts are the held-out split of the run's own `DIR/recipe.yaml` (same split and seed: SFT conversations
without their last assistant turn, DPO pairs' prompts; that turn, or the chosen answer, is the reference),
plus the embedded instruction prompts (`jetmoe_ft.evaluation.rewards`). The baseline is the model the run started from
(for an adapter, its base with the adapter disabled) or any model directory. Both answer the same prompts
(greedy unless `--do_sample`); every headline number is fine-tuned vs baseline with a paired-bootstrap 95%
interval of the difference: loss of the reference answers, reward and win rate (`--reward_model`),
instruction following (strict, loose), answer statistics. Routing drift compares both models' routers on the
prompts plus the baseline's answers (`jetmoe_ft.training.drift`). `--lm_eval_tasks` adds lm-evaluation-harness tasks.

Writes `metrics.json`, `generations.jsonl`, `report.md`, `routing_drift.png` and `rewards.png` into
`--output_dir` (default `DIR/eval-gen`), and prints the table.

Long (over 400 lines) because the command's stages (prompts, baseline, generation, the five measurements,
outputs) read top to bottom in one file; generation, checks, drift and the report live in their own modules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RecipeError, read_recipe_file
from ..data.held_out import eval_source, load_eval_split
from ..loading import TINY_NAMES, is_adapter_dir, load_tokenizer_named, load_trained_model, resolve_pad_token
from ..modeling import JetMoeConfig, JetMoeForCausalLM
from ..training.drift import collect_router_logits, pad_token_ids, routing_drift
from ..training.runs import run_command
from . import eval_gen_report as report_files
from .eval_cls import load_head, reward_head_config, score_batches
from .generation import (
    ANSWER_STATS,
    Answer,
    CompiledDecoding,
    Prompt,
    answer_nll,
    generate_answers,
    prompt_token_ids,
    reference_token_ids,
)
from .metrics import CONFIDENCE, bootstrap_intervals, paired_bootstrap
from .rewards import INSTRUCTION_PROMPTS, check_answer

# ---------------------------------------------------------------------------------------------
# what to compare, checked before any weights load


def check_language_model(path: Path) -> None:
    """`--model` must be a causal LM directory (full or adapter), not a classification head."""
    if not path.is_dir():
        raise RecipeError(f"--model: no such directory {path}.")
    architectures = []
    if (path / "config.json").is_file():
        architectures = JetMoeConfig.from_pretrained(path).architectures or []
    elif not is_adapter_dir(path):
        raise RecipeError(
            f"--model: {path} holds neither a model (config.json) nor an adapter (adapter_config.json)."
        )
    if any(name.endswith("SequenceClassification") for name in architectures):
        raise RecipeError(
            f"--model: {path} is a classification head ({architectures[0]}); eval-gen compares language models. "
            "Evaluate heads with `jetmoe-ft eval-cls`, or pass a reward head as --reward_model."
        )


def context_length(path: str | Path, seed: int = 0) -> int:
    """The model's `max_position_embeddings`, read from its config (an adapter's: its base's)."""
    if str(path) in TINY_NAMES:
        from ..assets import TINY_CONFIG

        return int(TINY_CONFIG["max_position_embeddings"])
    path = Path(path)
    if (path / "config.json").is_file():
        return int(JetMoeConfig.from_pretrained(path).max_position_embeddings)
    if is_adapter_dir(path):
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return context_length(base)
    raise RecipeError(f"--baseline: {path} holds neither a model (config.json) nor an adapter.")


def baseline_name(args, run_values: dict[str, Any]) -> str:
    """What the baseline is: `adapter-disabled`, a tiny-model name, or a directory."""
    if args.baseline != "base":
        if not Path(args.baseline).is_dir():
            raise RecipeError(f"--baseline: no such directory {args.baseline}.")
        return args.baseline
    if is_adapter_dir(args.model):
        return "adapter-disabled"
    start = run_values.get("model_name_or_path")
    if not start:
        raise RecipeError(
            f"--baseline base: {args.model} has no recipe.yaml naming its start model; pass --baseline DIR."
        )
    if start in TINY_NAMES:
        return str(start)
    if not Path(start).expanduser().is_dir():
        raise RecipeError(
            f"--baseline base: the run started from {start}, which is not a directory here; pass --baseline DIR."
        )
    return str(start)


# ---------------------------------------------------------------------------------------------
# prompts


def _content(turns) -> str:
    return turns[-1]["content"] if isinstance(turns, list) else str(turns)


def prompt_rows(dataset) -> list[tuple[Prompt, str]]:
    """(prompt, reference answer) of every usable row: conversations cut before their last assistant turn,
    prompt + completion, or a preference pair's prompt and chosen answer."""
    from trl.data_utils import maybe_extract_prompt

    columns = set(dataset.column_names)
    rows = []
    for row in dataset:
        if "messages" in columns:
            turns = row["messages"]
            last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=0)
            if last > 0:
                rows.append((turns[:last], turns[last]["content"]))
        elif {"chosen", "rejected"} <= columns:
            row = maybe_extract_prompt(row) if "prompt" not in columns else row
            rows.append((row["prompt"], _content(row["chosen"])))
        elif {"prompt", "completion"} <= columns:
            rows.append((row["prompt"], _content(row["completion"])))
        else:
            raise RecipeError(
                "eval-gen needs prompts: `messages`, `prompt` + `completion`, or preference pairs; plain `text` has none."
            )
    if not rows:
        raise RecipeError(
            "No prompt to answer: no held-out conversation has an assistant turn after a user turn."
        )
    return rows


def load_prompts(args) -> tuple[Any, list[tuple[Prompt, str]]]:
    """The data source and its (prompt, reference) rows: SFT-style data, else preference pairs."""
    source = eval_source(args)
    try:
        dataset = load_eval_split(source, "sft", args.max_samples)
    except RecipeError as sft_error:
        try:
            dataset = load_eval_split(source, "dpo", args.max_samples)
        except RecipeError:
            raise sft_error from None
    return source, prompt_rows(dataset)


# ---------------------------------------------------------------------------------------------
# the two sides


@dataclass
class Side:
    """A model to generate with; the baseline of an adapter is the same model with the adapter disabled."""

    name: str
    model: Any
    adapter_disabled: bool = False

    def active(self):
        return self.model.disable_adapter() if self.adapter_disabled else contextlib.nullcontext()


def load_sides(args, baseline: str, seed: int, device) -> tuple[Side, Side]:
    tuned = load_trained_model(args.model, JetMoeForCausalLM).eval().to(device)
    if baseline == "adapter-disabled":
        return Side("baseline", tuned, adapter_disabled=True), Side("fine-tuned", tuned)
    if baseline in TINY_NAMES:
        from ..assets import build_tiny_model

        base = build_tiny_model(seed)
    else:
        base = load_trained_model(baseline, JetMoeForCausalLM, merge=is_adapter_dir(baseline))
    return Side("baseline", base.eval().to(device)), Side("fine-tuned", tuned)


def rewards_of(
    model, tokenizer, prompts: list[Prompt], groups: list[list[Answer]], args, device
) -> np.ndarray:
    """[prompts, samples] reward of each answer: the reward head on prompt + answer (chat template or text)."""
    encoded = []
    for prompt, answers in zip(prompts, groups, strict=True):
        for answer in answers:
            if isinstance(prompt, str):
                ids = tokenizer(prompt + answer.text + tokenizer.eos_token)["input_ids"]
            else:
                messages = [*prompt, {"role": "assistant", "content": answer.text}]
                ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            encoded.append(ids[: model.config.max_position_embeddings])
    scores = score_batches(model, tokenizer, encoded, args.batch_size, device, "Scoring answers")[:, 0]
    return scores.reshape(len(prompts), -1)


# ---------------------------------------------------------------------------------------------
# the comparison


def compare(base_values, tuned_values, statistic, args, better: str) -> dict[str, Any]:
    result = paired_bootstrap(base_values, tuned_values, statistic, args.bootstrap, args.seed)
    return {
        "baseline": result["first"],
        "fine_tuned": result["second"],
        "difference": result["difference"],
        "ci95": result["ci95"],
        "better": better,
        "n": len(base_values),
    }


def _nll_statistic(rows) -> float:
    rows = np.asarray(rows)
    return float(rows[:, 0].sum() / max(rows[:, 1].sum(), 1))


def _checks_statistic(key: str, level: str):
    def statistic(groups) -> float:
        values = []
        for samples in groups:
            for checks in samples:
                values.extend(checks[key] if level == "instruction" else [all(checks[key])])
        return float(np.mean(values))

    return statistic


def instruction_metrics(base_checks, tuned_checks, args) -> dict[str, Any]:
    return {
        f"instructions_{level}_{key}": compare(
            base_checks, tuned_checks, _checks_statistic(key, level), args, "higher"
        )
        for level in ("prompt", "instruction")
        for key in ("strict", "loose")
    }


def reward_metrics(base: np.ndarray, tuned: np.ndarray, args) -> dict[str, Any]:
    base_mean, tuned_mean = base.mean(1), tuned.mean(1)
    wins = np.where(tuned_mean > base_mean, 1.0, np.where(tuned_mean == base_mean, 0.5, 0.0))
    interval = bootstrap_intervals(
        lambda idx: {"win": float(wins[idx].mean())}, len(wins), args.bootstrap, args.seed
    )
    return {
        "reward_mean": compare(base_mean, tuned_mean, np.mean, args, "higher"),
        "win_rate": {
            "value": float(wins.mean()),
            "ci95": interval["win"],
            "n": len(wins),
            "ties": int((wins == 0.5).sum()),
        },
    }


def drift_of(base: Side, tuned: Side, prompt_ids: list[list[int]], groups: list[list[Answer]], args):
    """Routing drift on the prompts plus the baseline's (first) answers; None when the models differ in shape."""
    rows = [ids + answers[0].token_ids for ids, answers in zip(prompt_ids, groups, strict=True)]
    batches = [pad_token_ids(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    logits = {}
    for side in (base, tuned):
        with side.active():
            logits[side.name] = collect_router_logits(side.model, batches)
    top_k = tuned.model.config.num_experts_per_tok
    try:
        return routing_drift(logits["baseline"], logits["fine-tuned"], top_k)
    except ValueError as error:
        print(f"No routing drift: {error}")
        return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jetmoe-ft eval-gen", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", required=True, help="A directory written by a training run (model or adapter).")
    add("--baseline", default="base", help="`base` (the run's start model; default) or a model directory.")
    add("--reward_model", help="A reward head from `jetmoe-ft cls` (num_labels: 1) to score the answers.")
    add("--config", help="A recipe whose held-out data to use (default: the run's recipe.yaml).")
    add("--dataset_name", help="Prompts from this data instead: embedded name, local file or hub id.")
    add("--dataset_config", help="Configuration name of --dataset_name.")
    add("--split", help="Split to use (default: the recipe's test split, or `test`).")
    add("--max_samples", type=int, default=64, help="At most this many held-out prompts (default 64).")
    add("--no_instructions", action="store_true", help="Leave out the embedded instruction prompts.")
    add("--max_new_tokens", type=int, default=48)
    add("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    add("--num_samples", type=int, default=1, help="Answers per prompt (with --do_sample).")
    add("--temperature", type=float, default=1.0)
    add("--batch_size", type=int, default=16)
    add("--compile", action="store_true", help="Decode with a static cache and a compiled forward.")
    add("--drop_long_prompts", action="store_true", help="Leave out prompts that do not fit the context.")
    add("--lm_eval_tasks", help="Comma-separated lm-evaluation-harness tasks to run on both models.")
    add("--lm_eval_include_path", help="A folder of local lm-eval task definitions.")
    add("--lm_eval_limit", type=int, help="At most this many documents per lm-eval task.")
    add("--output_dir", help="Where to write the results (default: MODEL/eval-gen).")
    add("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the intervals.")
    add("--seed", type=int, default=0, help="Seed of sampling and of the bootstrap.")
    add("--device", help="cpu, cuda, ... (default: cuda when available).")
    args = parser.parse_args(argv)
    if args.config and args.dataset_name:
        parser.error("give --config or --dataset_name, not both")
    if args.num_samples < 1 or (args.num_samples > 1 and not args.do_sample):
        parser.error("--num_samples: at least 1, and more than 1 only with --do_sample")
    if args.bootstrap < 1 or args.max_new_tokens < 1:
        parser.error("--bootstrap and --max_new_tokens: at least 1")
    return args


def fit_context(prompts: list[Prompt], ids: list[list[int]], limit: int, args) -> list[int]:
    """Indices of prompts that fit `limit` tokens with `max_new_tokens` to spare; others are a one-line error."""
    fits = [i for i, row in enumerate(ids) if len(row) + args.max_new_tokens <= limit]
    if len(fits) < len(ids) and not args.drop_long_prompts:
        longest = max(len(row) for row in ids)
        raise RecipeError(
            f"{len(ids) - len(fits)} of {len(ids)} prompts do not fit the context ({limit} tokens) with "
            f"--max_new_tokens {args.max_new_tokens} (longest {longest} tokens): pass --drop_long_prompts or lower --max_new_tokens."
        )
    return fits


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compare a fine-tuned model with its baseline; returns the report written to `metrics.json`."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    model_dir = Path(args.model).expanduser()
    check_language_model(model_dir)
    run_recipe = model_dir / "recipe.yaml"
    run_values = read_recipe_file(run_recipe) if run_recipe.is_file() else {}
    source, rows = load_prompts(args)
    baseline = baseline_name(args, run_values)
    reward_config = reward_head_config(args.reward_model, "--reward_model") if args.reward_model else None
    tasks = None
    if args.lm_eval_tasks:
        from .lm_eval_model import check_tasks

        tasks = check_tasks(args.lm_eval_tasks.split(","), args.lm_eval_include_path)
    tokenizer = load_tokenizer_named(str(model_dir), field="--model")
    resolve_pad_token(tokenizer)
    if not tokenizer.chat_template:
        raise RecipeError(f"--model: the tokenizer in {model_dir} has no chat template.")
    limit = context_length(model_dir)
    if baseline != "adapter-disabled":
        limit = min(limit, context_length(baseline))
    ids = [prompt_token_ids(tokenizer, prompt) for prompt, _ in rows]
    keep = fit_context([p for p, _ in rows], ids, limit, args)
    rows, ids = [rows[i] for i in keep], [ids[i] for i in keep]
    instructions = [] if args.no_instructions else list(INSTRUCTION_PROMPTS)
    instruction_ids = [
        prompt_token_ids(tokenizer, [{"role": "user", "content": p.prompt}]) for p in instructions
    ]

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base, tuned = load_sides(args, baseline, int(run_values.get("model_seed", 0)), device)
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        do_sample=args.do_sample,
        temperature=args.temperature,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    answers, instruction_answers, checks, nll = {}, {}, {}, {}
    references = [reference_token_ids(tokenizer, p, ref, limit) for p, ref in rows]
    for side in (base, tuned):
        with side.active():
            decoding = CompiledDecoding(side.model) if args.compile else None
            answers[side.name] = generate_answers(
                side.model,
                tokenizer,
                ids + instruction_ids,
                desc=f"Answers ({side.name})",
                decoding=decoding,
                **sampling,
            )
            nll[side.name] = answer_nll(side.model, references, tokenizer.pad_token_id, args.batch_size)
        answers[side.name], instruction_answers[side.name] = (
            answers[side.name][: len(ids)],
            answers[side.name][len(ids) :],
        )
        checks[side.name] = [
            [check_answer(item, answer.text) for answer in group]
            for item, group in zip(instructions, instruction_answers[side.name], strict=True)
        ]

    metrics = {"reference_nll": compare(nll["baseline"], nll["fine-tuned"], _nll_statistic, args, "lower")}
    rewards = {}
    if reward_config is not None:
        reward_model, reward_tokenizer = load_head(args.reward_model, reward_config)
        reward_model.to(device)
        prompts = [p for p, _ in rows]
        rewards = {
            name: rewards_of(reward_model, reward_tokenizer, prompts, answers[name], args, device)
            for name in answers
        }
        metrics.update(reward_metrics(rewards["baseline"], rewards["fine-tuned"], args))
        del reward_model
    if instructions:
        metrics.update(instruction_metrics(checks["baseline"], checks["fine-tuned"], args))
    for name, statistic in ANSWER_STATS.items():
        better = {
            "distinct_1": "higher",
            "distinct_2": "higher",
            "answer_tokens": "",
            "answer_words": "",
        }.get(name, "lower")
        metrics[name] = compare(answers["baseline"], answers["fine-tuned"], statistic, args, better)
    drift = drift_of(base, tuned, ids, answers["baseline"], args)
    lm_eval_results = None
    if tasks:
        from .lm_eval_model import run_tasks

        lm_eval_results = {}
        for side in (base, tuned):
            with side.active():
                lm_eval_results[side.name] = run_tasks(side.model, tokenizer, tasks, args)

    report = {
        "model": str(args.model),
        "baseline": "the same adapter, disabled" if baseline == "adapter-disabled" else baseline,
        "reward_model": args.reward_model,
        "data": source.description,
        "num_prompts": len(rows),
        "num_instruction_prompts": len(instructions),
        "generation": {k: v for k, v in sampling.items() if k != "batch_size"},
        "metrics": metrics,
        "routing_drift": drift.to_dict() if drift is not None else None,
        "lm_eval": lm_eval_results,
        "bootstrap": {
            "resamples": args.bootstrap,
            "confidence": CONFIDENCE,
            "seed": args.seed,
            "paired": True,
        },
    }
    output_dir = Path(args.output_dir or model_dir / "eval-gen")
    generations = report_files.generation_rows(
        rows, instructions, answers, instruction_answers, checks, rewards
    )
    report_files.write_outputs(report, generations, drift, rewards, output_dir)
    print("\n" + report_files.format_table(report))
    print(f"\nWrote metrics.json, generations.jsonl, report.md and plots to {output_dir}")
    return report


def cli(argv: list[str] | None = None) -> int:
    """`jetmoe-ft eval-gen`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
