"""Online RL of JetMoE (GRPO) from a YAML recipe with TRL's `GRPOTrainer`: reward heads, checkable rewards, yours.

jetmoe-ft grpo --config recipes/tiny/grpo.yaml [--key value ...]
accelerate launch -m jetmoe_ft.grpo --config recipes/tiny/grpo.yaml

Completions come from our model's own `generate` (KV cache; vLLM has no JetMoE). Rewards: `jetmoe_ft.evaluation.reward_funcs`.
The reference (`beta > 0`) is the adapter disabled with LoRA, else a frozen copy. Each step logs `aux_loss` and
`routing/rollout_match` (`jetmoe_ft.training.rollout_routing`); before and after training the greedy answers to the held-out
prompts are scored with the recipe's rewards (mean, 95% bootstrap intervals, the paired change).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer

from .adapters.adapt import adapt_model
from .compat import grpo_generate_and_score, grpo_generate_single_turn, grpo_reference
from .config import YamlValue, parse_recipe, recipe_key
from .data import load_recipe_datasets
from .data.prompts import to_prompts
from .evaluation.generation import generate_answers, prompt_token_ids
from .evaluation.metrics import bootstrap_intervals, paired_bootstrap
from .evaluation.reward_funcs import build_reward_funcs, parse_reward_funcs
from .loading import check_tokenizer, load_recipe_model, load_recipe_tokenizer, resolve_pad_token
from .training.reference import (
    drop_fresh_reference_adapter,
    record_stacked_base,
    reference_model,
    trainable_flags,
)
from .training.rollout_routing import RolloutRouting
from .training.runs import finish_run, prepare_processes, run_command, start_run, train_with_evaluations
from .training.trainers import JetMoeTrainerMixin


@dataclass
class GrpoArguments:
    """GRPO's own recipe keys (every `GRPOConfig` field is one too: `num_generations`, `beta`, `reward_weights`...)."""

    reward_funcs: YamlValue = recipe_key(
        None,
        "Rewards: built-in names (with arguments as `name: {arg: value}`), reward-model directories "
        "(`jetmoe-ft cls`, num_labels: 1), or module:function.",
    )
    reward_model_fallback: str | None = recipe_key(
        None, "Built-in reward used instead of a reward-model directory that does not exist (null: error)."
    )


class JetMoeGRPOTrainer(JetMoeTrainerMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` with the JetMoE trainer layer, a reference handed over (TRL would load one from the
    policy's path), and the generation-time routing compared with the training forward's."""

    def __init__(self, model, *args, ref_model=None, **kwargs):
        trainable = trainable_flags(model)
        with grpo_reference(ref_model):
            super().__init__(model, *args, **kwargs)
        drop_fresh_reference_adapter(self.model, trainable)
        self.rollout_routing = RolloutRouting(self.accelerator.unwrap_model(self.model))

    def _generate_single_turn(self, *args, **kwargs):
        with self.rollout_routing.generation():
            return grpo_generate_single_turn(JetMoeGRPOTrainer, self, *args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        output = grpo_generate_and_score(JetMoeGRPOTrainer, self, inputs)
        choices = self.rollout_routing.take_generation(output["completion_ids"].shape[1])
        if choices is not None and not self.tools and len(choices) == len(output["completion_ids"]):
            output["rollout_experts"] = choices  # shuffled and split with the batch it describes
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.rollout_routing.training_forward():
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        width = inputs["prompt_ids"].shape[1]
        self.rollout_routing.compare(inputs.get("rollout_experts"), width, inputs["completion_mask"])
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            device = self.accelerator.device
            logs.update(
                self.rollout_routing.take_log_values(lambda t: self.accelerator.reduce(t.to(device), "sum"))
            )
        super().log(logs, start_time)


def held_out_rewards(trainer, dataset, reward_funcs, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Greedy answers to every held-out prompt (shared out over processes), scored by each reward function:
    ([prompts, functions] rewards, [prompts] weighted total as GRPO sums it)."""
    args, accelerator = trainer.args, trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    with accelerator.split_between_processes(list(range(len(dataset)))) as mine:
        part = dataset.select(mine)
        prompts = part["prompt"]
        ids = [prompt_token_ids(tokenizer, prompt) for prompt in prompts]
        answers = generate_answers(
            model,
            tokenizer,
            ids,
            args.max_completion_length,
            args.per_device_eval_batch_size,
            desc="Greedy answers",
        )
        answers = [group[0] for group in answers]
        completions = [
            [{"role": "assistant", "content": a.text}] if isinstance(p, list) else a.text
            for p, a in zip(prompts, answers, strict=True)
        ]
        columns = {key: part[key] for key in part.column_names if key != "prompt"}
        scores = [
            f(
                prompts=prompts,
                completions=completions,
                completion_ids=[a.token_ids for a in answers],
                trainer_state=trainer.state,
                log_extra=lambda *a, **k: None,
                log_metric=lambda *a, **k: None,
                **columns,
            )
            for f in reward_funcs
        ]
        rows = [list(row) for row in zip(*scores, strict=True)] if prompts else []
    rewards = np.asarray(gather_object(rows), dtype=float).reshape(len(dataset), len(reward_funcs))
    weights = np.asarray(args.reward_weights or [1.0] * len(reward_funcs), dtype=float)
    return rewards, np.nansum(rewards * weights, axis=1)


def reward_metrics(when: str, rewards: np.ndarray, total: np.ndarray, names: list[str]) -> dict:
    """`eval_{when}_reward/mean` with its 95% bootstrap interval, and each reward function's mean."""
    interval = bootstrap_intervals(lambda index: {"mean": float(total[index].mean())}, len(total))["mean"]
    metrics = {f"eval_{when}_reward/mean": float(total.mean()), f"eval_{when}_reward/ci95": interval}
    for index, name in enumerate(names):
        metrics[f"eval_{when}_rewards/{name}/mean"] = float(np.nanmean(rewards[:, index]))
    return metrics


def reward_lines(metrics: dict, count: int) -> list[str]:
    def shown(when: str) -> str:
        low, high = metrics[f"eval_{when}_reward/ci95"]
        return f"{metrics[f'eval_{when}_reward/mean']:.3f} [{low:.3f}, {high:.3f}]"

    if "eval_after_reward/mean" not in metrics:
        return []
    if "eval_before_reward/mean" not in metrics:
        return [
            f"Held-out mean reward of greedy answers ({count} prompts): {shown('after')} after (95% interval)."
        ]
    low, high = metrics["eval_reward/change_ci95"]
    return [
        f"Held-out mean reward of greedy answers ({count} prompts): {shown('before')} before -> {shown('after')} "
        f"after; change {metrics['eval_reward/change']:+.3f} [{low:+.3f}, {high:+.3f}] (95% bootstrap intervals)."
    ]


def main(argv: list[str] | None = None) -> dict:
    """Run one GRPO recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_recipe(GRPOConfig, argv, task_cls=GrpoArguments)
    args, task = recipe.training, recipe.task
    specs = parse_reward_funcs(task.reward_funcs, task.reward_model_fallback)

    data = to_prompts(load_recipe_datasets(recipe.data, "grpo", seed=args.seed))
    tokenizer = load_recipe_tokenizer(recipe)
    resolve_pad_token(tokenizer)
    check_tokenizer(tokenizer, data["train"], None)
    run = start_run(recipe, data)
    model = load_recipe_model(recipe)
    reference = reference_model(recipe, model) if args.beta else None
    conversational = isinstance(data["train"][0]["prompt"], list)
    selection_rows = data["train"].rename_column("prompt", "messages") if conversational else data["train"]
    model = adapt_model(recipe, model, train_dataset=selection_rows, tokenizer=tokenizer)
    record_stacked_base(model, recipe)
    reward_funcs = build_reward_funcs(specs, [tokenizer.eos_token_id], args.device)
    print(
        "Rewards: "
        + ", ".join(f"{s.name} ({s.kind})" for s in specs)
        + f"; weights {args.reward_weights or 1}."
    )

    trainer = JetMoeGRPOTrainer(
        model=model,
        ref_model=reference,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("test") if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
    )
    names, held_out, metrics = [s.name for s in specs], data.get("test"), {}
    if held_out is not None and run.resume_from is None:
        before, before_total = held_out_rewards(trainer, held_out, reward_funcs, tokenizer)
        metrics.update(reward_metrics("before", before, before_total, names))
    metrics.update(train_with_evaluations(trainer, run))
    if held_out is not None:
        after, after_total = held_out_rewards(trainer, held_out, reward_funcs, tokenizer)
        metrics.update(reward_metrics("after", after, after_total, names))
        if "eval_before_reward/mean" in metrics:
            change = paired_bootstrap(before_total, after_total)
            metrics.update(
                {"eval_reward/change": change["difference"], "eval_reward/change_ci95": change["ci95"]}
            )
        metrics["eval_reward/prompts"] = len(held_out)
    lines = reward_lines(metrics, len(held_out) if held_out is not None else 0)
    finish_run(trainer, recipe, tokenizer, metrics, lines)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.grpo`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
