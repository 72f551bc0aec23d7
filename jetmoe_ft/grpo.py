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
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer

from .adapters.adapt import adapt_model
from .compat import grpo_generate_and_score, grpo_generate_single_turn, grpo_reference
from .config import YamlValue, parse_recipe, recipe_key
from .data import load_recipe_datasets
from .data.prompts import to_prompts
from .errors import RecipeError
from .evaluation.generation import CompiledDecoding, generate_answers, prompt_token_ids
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
from .training.routing_replay import REPLAY_MODES, RoutingReplay
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
    routing_replay: str = recipe_key(
        "none",
        "rollout: every scoring forward (policy, old policy, reference) sends each token to the MoA and MoE "
        "experts its rollout chose; none: each forward routes by itself.",
        choices=REPLAY_MODES,
    )
    compile_generation: bool = recipe_key(
        False,
        "Decode completions with transformers' static cache and a compiled forward (the prefill stays eager); "
        "falls back to eager decoding with one line when compiling fails.",
    )


GENERATORS_WITHOUT_ROUTING = {
    "use_vllm": "vLLM generates the completions",
    "use_transformers_continuous_batching": "transformers' continuous batching generates the completions",
    "use_transformers_paged": "transformers' paged generation generates the completions",
}


def check_routing_replay(args, task) -> None:
    """Refuse, in one line, a recipe whose completions come from a generation that records no routing to replay."""
    if task.routing_replay != "rollout":
        return
    for key, what in GENERATORS_WITHOUT_ROUTING.items():
        if getattr(args, key, False):
            raise RecipeError(
                f"routing_replay: rollout needs completions from our model's `generate`, which records the routing; "
                f"with `{key}: true` {what}: set {key}: false or routing_replay: none."
            )
    generation = args.generation_kwargs or {}
    if generation.get("use_cache") is False or (generation.get("num_beams") or 1) > 1:
        raise RecipeError(
            "routing_replay: rollout records one cached forward per sampled token; generation_kwargs with "
            "use_cache: false or num_beams > 1 do not decode that way: drop them or set routing_replay: none."
        )


class JetMoeGRPOTrainer(JetMoeTrainerMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` with the JetMoE trainer layer, a reference handed over (TRL would load one from the
    policy's path), the rollout's routing and token log-probs recorded while generating and compared with the
    training forward's (`jetmoe_ft.training.rollout_routing`), and two options:

    - `routing_replay="rollout"`: the policy's training forward, the old policy's and the reference's forwards
      send each token to the experts its rollout chose (`jetmoe_ft.training.routing_replay`);
    - `compile_generation=True`: completions decoded with the static cache and a compiled forward
      (`jetmoe_ft.evaluation.generation.CompiledDecoding`), falling back to eager with one line.
    """

    def __init__(
        self, model, *args, ref_model=None, routing_replay="none", compile_generation=False, **kwargs
    ):
        trainable = trainable_flags(model)
        with grpo_reference(ref_model):
            super().__init__(model, *args, **kwargs)
        drop_fresh_reference_adapter(self.model, trainable)
        policy = self.accelerator.unwrap_model(self.model)
        self.rollout_routing = RolloutRouting(policy, temperature=self.temperature)
        self.routing_replay = RoutingReplay() if routing_replay == "rollout" else None
        if self.routing_replay is not None and (self.tools or self.rollout_func is not None):
            raise RecipeError(
                "routing_replay: rollout replays what `generate` routed, and tool calls or a rollout_func put in "
                "tokens no generation forward read: set routing_replay: none."
            )
        self.decoding = CompiledDecoding(policy) if compile_generation else None
        self._rollout: dict | None = None  # the last generation's record, until it joins the generation batch
        self._replayed: torch.Tensor | None = None  # the experts of the rows the next scoring forwards read
        self._scored: torch.Tensor | None = None  # the training forward's token log-probs
        self._generation_seconds: list[float] = []

    # -- generation: recorded (and decoded compiled) --------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        if self.routing_replay is not None:
            self.routing_replay.release()
        decoding = nullcontext()
        if self.decoding is not None:
            width = max(len(ids) for ids in prompt_ids)
            self.generation_config.update(**self.decoding.generate_kwargs(width, self.max_completion_length))
            decoding = self.decoding.active()
        start = time.perf_counter()
        with self.rollout_routing.generation(), decoding:
            completion_ids, logprobs = grpo_generate_single_turn(
                JetMoeGRPOTrainer, self, prompt_ids, *args, **kwargs
            )
        self._generation_seconds.append(time.perf_counter() - start)
        self._rollout = self.rollout_routing.take_generation(completion_ids, self._tokenizer.pad_token_id)
        if self.routing_replay is not None:
            if self._rollout is None:
                raise RuntimeError("routing_replay: generation recorded no routing for these completions.")
            self._replayed = self._rollout["rollout_experts"]  # for the old policy's and reference's passes
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        self._rollout = None
        try:
            output = grpo_generate_and_score(JetMoeGRPOTrainer, self, inputs)
        finally:
            self._replayed = None
        rollout, self._rollout = self._rollout, None
        if rollout is None or self.tools:
            return output
        prompt_width, width = output["prompt_ids"].shape[1], output["completion_ids"].shape[1]
        if rollout["rollout_prompt_width"] != prompt_width:  # TRL pads prompts the same way both times
            raise RuntimeError(
                f"rollout routing: prompts were {rollout['rollout_prompt_width']} tokens wide when generated, "
                f"{prompt_width} when scored."
            )
        # shuffled and split with the batch they describe
        output["rollout_experts"] = rollout["rollout_experts"][:, :, : prompt_width + width]
        output["rollout_log_probs"] = rollout["rollout_log_probs"][:, :width]
        return output

    # -- the scoring forwards: replay, measure ----------------------------------------------------------------

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs
    ):
        experts = self._replayed
        scoring = super()._get_per_token_logps_and_entropies
        if experts is None:
            result = scoring(model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
        elif torch.is_grad_enabled():
            # The training forward, in one pass; the experts stay imposed until its backward has run, where
            # gradient checkpointing recomputes the layers (`training_step` releases them).
            self.routing_replay.impose(model, experts[:, :, : input_ids.shape[1]])
            result = scoring(model, input_ids, attention_mask, logits_to_keep, None, **kwargs)
        else:  # the old policy's and the reference's log-probs over the whole generation batch, in chunks
            result = self._replayed_chunks(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
            )
        if torch.is_grad_enabled():
            self._scored = result[0].detach()
        return result

    def _replayed_chunks(self, model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs):
        experts = self._replayed[:, :, : input_ids.shape[1]]
        batch_size = batch_size or input_ids.shape[0]
        parts = []
        for start in range(0, input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            with self.routing_replay.imposing(model, experts[rows]):
                parts.append(
                    super()._get_per_token_logps_and_entropies(
                        model, input_ids[rows], attention_mask[rows], logits_to_keep, None, **kwargs
                    )
                )
        logps, entropies, aux_losses = zip(*parts, strict=True)
        return (
            torch.cat(logps),
            None if entropies[0] is None else torch.cat(entropies),
            None if aux_losses[0] is None else torch.stack(aux_losses).mean(),
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            if self.routing_replay is not None:
                self.routing_replay.release()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._replayed = inputs.get("rollout_experts") if self.routing_replay is not None else None
        self._scored = None
        try:
            with self.rollout_routing.training_forward():
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._replayed = None
        self.rollout_routing.compare(inputs)
        if self._scored is not None:
            self.rollout_routing.compare_log_probs(inputs, self._scored)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            device = self.accelerator.device
            logs.update(
                self.rollout_routing.take_log_values(
                    lambda t: self.accelerator.gather(t.to(device)).view(-1, *t.shape),
                    replayed=self.routing_replay is not None,
                )
            )
            if self._generation_seconds:
                logs["rollout/generation_seconds"] = sum(self._generation_seconds) / len(
                    self._generation_seconds
                )
                self._generation_seconds.clear()
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
            decoding=trainer.decoding,
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
    check_routing_replay(args, task)

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
        routing_replay=task.routing_replay,
        compile_generation=task.compile_generation,
    )
    if trainer.routing_replay is not None:
        print(
            "Routing replay: every scoring forward sends each token to the experts its rollout chose (MoA and MoE); "
            "the router loss and routing health count the routers' own top-k (routing/rollout_free_match)."
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
