"""What `eval-gen` writes: `metrics.json`, `generations.jsonl`, `report.md`, `routing_drift.png`, `rewards.png`,
and the printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..modeling.routing import KINDS
from ..training.drift import RoutingDrift, plot_drift

TITLES = {
    "reference_nll": "reference answer loss (nats/token)",
    "reward_mean": "mean reward",
    "instructions_prompt_strict": "instructions: prompt-level strict",
    "instructions_prompt_loose": "instructions: prompt-level loose",
    "instructions_instruction_strict": "instructions: instruction-level strict",
    "instructions_instruction_loose": "instructions: instruction-level loose",
    "answer_tokens": "answer length (tokens)",
    "answer_words": "answer length (words)",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "repeated_3grams": "repeated 3-grams (share)",
    "hit_max_new_tokens": "hit max_new_tokens (share)",
    "empty": "empty answers (share)",
}
SAMPLES = 12


def verdict(entry: dict[str, Any]) -> str:
    """`better` / `worse` when the interval of the difference excludes 0, else `no clear change`."""
    low, high = entry["ci95"]
    if np.isnan(low):
        return "n/a"
    if not entry.get("better") or low <= 0 <= high:
        return "no clear change" if entry.get("better") else ""
    up = low > 0
    return "better" if up == (entry["better"] == "higher") else "worse"


def headline_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, baseline, fine-tuned, difference [95% CI], verdict) per headline metric."""
    rows = []
    for key, title in TITLES.items():
        entry = report["metrics"].get(key)
        if entry is None:
            continue
        low, high = entry["ci95"]
        rows.append(
            (
                title,
                f"{entry['baseline']:.3f}",
                f"{entry['fine_tuned']:.3f}",
                f"{entry['difference']:+.3f} [{low:+.3f}, {high:+.3f}]",
                verdict(entry),
            )
        )
    win = report["metrics"].get("win_rate")
    if win is not None:
        rows.append(
            (
                "win rate, fine-tuned over baseline",
                "",
                f"{win['value']:.3f}",
                f"[{win['ci95'][0]:.3f}, {win['ci95'][1]:.3f}]",
                f"{win['ties']} ties",
            )
        )
    return rows


def format_table(report: dict[str, Any]) -> str:
    """The headline as aligned plain text, plus the routing drift summary."""
    lines = [
        f"{report['model']} vs {report['baseline']} on {report['data']}: {report['num_prompts']} prompts"
        f" + {report['num_instruction_prompts']} instruction prompts",
        f"{'metric':<40}{'baseline':>10}{'fine-tuned':>12}  {'difference [95% CI]':<28}",
    ]
    for title, base, tuned, diff, mark in headline_rows(report):
        lines.append(f"{title:<40}{base:>10}{tuned:>12}  {diff:<28}{mark}")
    drift = report.get("routing_drift")
    if drift:
        s = drift["summary"]
        lines.append(
            f"routing drift ({drift['tokens']} tokens): top-k kept MoA {s['moa_topk_kept']:.3f} MoE {s['moe_topk_kept']:.3f}, "
            f"KL MoA {s['moa_kl']:.4f} MoE {s['moe_kl']:.4f}, largest load change "
            f"{100 * max(s['moa_load_change_max'], s['moe_load_change_max']):.1f} points"
        )
    return "\n".join(lines)


def generation_rows(
    rows, instructions, answers, instruction_answers, checks, rewards
) -> list[dict[str, Any]]:
    """One JSON row per prompt: prompt, reference, both answers (all samples when several), rewards, checks."""
    out = []
    for i, (prompt, reference) in enumerate(rows):
        row = {"source": "held-out", "prompt": prompt, "reference": reference}
        for side, key in (("baseline", "baseline_"), ("fine-tuned", "")):
            group = answers[side][i]
            row[f"{key}answer"] = group[0].text
            row[f"{key}finished"] = group[0].finished
            if len(group) > 1:
                row[f"{key}samples"] = [answer.text for answer in group]
            if rewards:
                row[f"{key}reward"] = float(rewards[side][i].mean())
        out.append(row)
    for i, item in enumerate(instructions):
        row = {
            "source": "instructions",
            "prompt": item.prompt,
            "instructions": [{"name": check.name, **check.kwargs} for check in item.checks],
        }
        for side, key in (("baseline", "baseline_"), ("fine-tuned", "")):
            row[f"{key}answer"] = instruction_answers[side][i][0].text
            row[f"{key}checks"] = checks[side][i][0]
        out.append(row)
    return out


def _cell(text: Any) -> str:
    text = text if isinstance(text, str) else json.dumps(text)
    text = " ".join(text.split())
    return (text[:300] + " …" if len(text) > 300 else text).replace("|", "\\|") or "*(empty)*"


def _prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else " / ".join(f"{t['role']}: {t['content']}" for t in prompt)


def markdown(report: dict[str, Any], generations: list[dict[str, Any]], has_rewards: bool) -> str:
    """`report.md`: what was compared, the headline table, routing drift per layer, a dozen samples."""
    gen = report["generation"]
    decoding = "greedy" if not gen["do_sample"] else f"sampling at temperature {gen['temperature']}"
    lines = [
        f"# eval-gen: {report['model']} vs {report['baseline']}",
        "",
        f"- prompts: {report['num_prompts']} held-out from {report['data']}, plus {report['num_instruction_prompts']} "
        "embedded instruction prompts",
        f"- decoding: {decoding}, {gen['num_samples']} answer(s) per prompt, at most {gen['max_new_tokens']} new tokens",
        f"- intervals: paired bootstrap, {report['bootstrap']['resamples']} resamples of the prompts, 95%",
        f"- reward model: {report['reward_model'] or 'none (pass --reward_model)'}",
        "",
        "| metric | baseline | fine-tuned | difference [95% CI] | verdict |",
        "|---|---:|---:|---|---|",
        *(f"| {' | '.join(row)} |" for row in headline_rows(report)),
    ]
    drift = report.get("routing_drift")
    if drift:
        lines += [
            "",
            f"## Routing drift ({drift['tokens']} tokens: prompts + baseline answers)",
            "",
            "| layer | MoA top-k kept | MoA KL | MoE top-k kept | MoE KL |",
            "|---:|---:|---:|---:|---:|",
        ]
        for i, layer in enumerate(drift["layers"]):
            cells = " | ".join(f"{layer[k]['topk_kept']:.3f} | {layer[k]['kl']:.4f}" for k in KINDS)
            lines.append(f"| {i} | {cells} |")
        lines += ["", "![routing drift](routing_drift.png)"]
    if has_rewards:
        lines += ["", "![rewards](rewards.png)"]
    held = [row for row in generations if row["source"] == "held-out"]
    checked = [row for row in generations if row["source"] == "instructions"]
    picks = held[: SAMPLES - min(4, len(checked))]
    picks += checked[: SAMPLES - len(picks)]
    lines += ["", f"## {len(picks)} samples side by side", ""]
    for n, row in enumerate(picks, 1):
        lines += [
            f"**{n}. {_cell(_prompt_text(row['prompt']))}**",
            "",
            "| | answer | score |",
            "|---|---|---|",
        ]
        if row["source"] == "held-out":
            lines.append(f"| reference | {_cell(row['reference'])} | |")
        for label, key in (("baseline", "baseline_"), ("fine-tuned", "")):
            if row["source"] == "held-out":
                score = f"reward {row[key + 'reward']:.2f}" if has_rewards else ""
            else:
                strict = row[key + "checks"]["strict"]
                score = f"{sum(strict)}/{len(strict)} instructions followed"
            lines.append(f"| {label} | {_cell(row[key + 'answer'])} | {score} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_rewards(base: np.ndarray, tuned: np.ndarray, path: Path, win_rate: float) -> Path:
    """Paired reward distributions: both histograms, and fine-tuned against baseline per prompt."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    bins = np.histogram_bin_edges(np.concatenate([base, tuned]), bins=20)
    left.hist(base, bins=bins, alpha=0.6, label=f"baseline (mean {base.mean():.2f})")
    left.hist(tuned, bins=bins, alpha=0.6, label=f"fine-tuned (mean {tuned.mean():.2f})")
    left.set_xlabel("reward")
    left.set_ylabel("answers")
    left.legend()
    left.set_title("Reward of the answers")
    right.scatter(base, tuned, s=14, alpha=0.7)
    low, high = float(min(base.min(), tuned.min())), float(max(base.max(), tuned.max()))
    right.plot([low, high], [low, high], linestyle="--", color="grey", label="equal")
    right.set_xlabel("baseline reward")
    right.set_ylabel("fine-tuned reward")
    right.set_title(f"Same prompt, both answers (above the line: fine-tuned wins; {win_rate:.0%})")
    right.legend(loc="upper left")
    fig.savefig(path, dpi=100)
    return path


def write_outputs(report, generations, drift: RoutingDrift | None, rewards: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    with (output_dir / "generations.jsonl").open("w") as handle:
        for row in generations:
            handle.write(json.dumps(row) + "\n")
    (output_dir / "report.md").write_text(markdown(report, generations, bool(rewards)))
    if drift is not None:
        plot_drift(
            drift,
            output_dir / "routing_drift.png",
            f"Routing drift: {report['model']} vs {report['baseline']}",
        )
    if rewards:
        win = report["metrics"]["win_rate"]["value"]
        plot_rewards(
            rewards["baseline"].mean(1), rewards["fine-tuned"].mean(1), output_dir / "rewards.png", win
        )
