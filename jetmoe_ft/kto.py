"""Unpaired preference alignment of JetMoE (KTO) from a YAML recipe with TRL's `KTOTrainer`.

jetmoe-ft kto --config recipes/tiny/kto.yaml [--key value ...]
accelerate launch -m jetmoe_ft.kto --config recipes/tiny/kto.yaml

Data: `prompt` / `completion` / `label` (desirable or not), or preference pairs, unpaired (`jetmoe_ft.data.unpaired`).
The reference policy is the starting model, as in DPO (`jetmoe_ft.training.reference`): the adapter disabled with LoRA, else
a frozen copy or precomputed log-probabilities. Before and after training, the held-out pairwise accuracy of KTO's
implicit reward, beta x (policy - reference) log-probability of a completion, compares the desirable and the
undesirable completion of each held-out pair (`eval_{before,after}_pairs/*` in `metrics.json`).
"""

from __future__ import annotations

import sys

import torch
from trl import KTOConfig, KTOTrainer

from .adapters.adapt import adapt_model
from .compat import kto_prepare_dataset
from .config import parse_recipe
from .data import load_recipe_datasets
from .data.unpaired import check_unpaired, check_unpaired_formats, held_out_pairs, is_paired
from .distributed import is_main_process
from .evaluation.preference_report import pair_metrics, preference_lines
from .loading import (
    check_recipe_model,
    check_tokenizer,
    load_recipe_model,
    load_recipe_tokenizer,
    resolve_pad_token,
)
from .training.reference import StartingModelReference, record_stacked_base, reference_kind, reference_model
from .training.runs import (
    finish_run,
    make_trainer,
    memory_metrics,
    prepare_processes,
    run_command,
    start_run,
    train_with_evaluations,
)
from .training.trainers import JetMoeTrainerMixin


class JetMoeKTOTrainer(StartingModelReference, JetMoeTrainerMixin, KTOTrainer):
    """TRL's `KTOTrainer` with the JetMoE trainer layer, a LoRA reference that is the base model with the adapter
    disabled, KL completions paired within the global batch, and the held-out pairwise accuracy in `evaluate`."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preparation; over several processes, the KL completions of the training rows are rotated within
        each global batch (TRL rotates within each process's batch), so the KL estimate, averaged over the
        processes, is the one a single process computes on the whole batch."""
        dataset = kto_prepare_dataset(JetMoeKTOTrainer, self, dataset, processing_class, args, dataset_name)
        if dataset_name != "train" or not self.calculate_KL or args.world_size == 1:
            return dataset

        def rotate(batch):
            return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

        # Sequential sampling: process r takes per-device batch k * world_size + r of global batch k.
        global_batch = args.per_device_train_batch_size * args.world_size
        return dataset.map(rotate, batched=True, batch_size=global_batch, desc="Pairing KL completions")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """TRL's held-out KTO loss and metrics, plus the pairwise accuracy of the implicit reward
        (`{prefix}_pairs/accuracy`, `_accuracy_se`, `_margin`, `_count`)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and self.eval_dataset is not None:
            rewards = self.held_out_rewards()
            pairs = held_out_pairs(self.eval_dataset)
            metrics.update(
                pair_metrics([rewards[good] - rewards[bad] for good, bad in pairs], metric_key_prefix)
            )
        return metrics

    def held_out_rewards(self) -> torch.Tensor:
        """KTO's implicit reward of each held-out row, in `eval_dataset` order: beta x (policy - reference)
        log-probability of the completion, from the trainer's own forwards (reference as in training)."""
        model, reference = self.model, self.ref_model or self.model
        training = model.training
        model.eval()
        rewards = []
        with torch.no_grad():
            for batch in self.get_eval_dataloader():
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                policy = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=labels,
                    fused_lm_head=True,
                ).log_probs.sum(-1)
                if "ref_logps" in batch:
                    ref = batch["ref_logps"].to(policy.device)
                else:
                    ref = self.compute_ref_log_probs(reference, batch)[0]
                rewards.append(
                    self.accelerator.gather_for_metrics(self.beta * (policy.float() - ref.float()))
                )
        model.train(training)
        return torch.cat(rewards).cpu()


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run one KTO recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_recipe(KTOConfig, argv)
    args = recipe.training
    check_recipe_model(recipe)  # against the model's config.json, before data or weights load

    data = load_recipe_datasets(recipe.data, "kto", seed=args.seed)
    check_unpaired_formats(data)
    tokenizer = load_recipe_tokenizer(recipe)
    resolve_pad_token(tokenizer)  # its own, else eos, else unk (KTO / ORPO configs have no `pad_token`)
    check_tokenizer(tokenizer, _as_pairs_for_check(data["train"]), args.max_length)
    data = check_unpaired(data, tokenizer, args, seed=args.seed)
    run = start_run(recipe, data)
    model = load_recipe_model(recipe)
    reference = reference_model(recipe, model)
    model = adapt_model(recipe, model, train_dataset=_as_pairs_for_check(data["train"]), tokenizer=tokenizer)
    record_stacked_base(model, recipe)

    trainer = make_trainer(JetMoeKTOTrainer, recipe, model, data, tokenizer, ref_model=reference)
    if is_main_process():
        print(f"KTO: reference {reference_kind(trainer)} (the starting model); {_balance(data['train'])}.")
    metrics = train_with_evaluations(trainer, run)
    metrics |= {"reference": reference_kind(trainer), **memory_metrics(trainer)}
    lines = preference_lines(metrics, "pairs/accuracy", "pairs/margin", "pairs/accuracy_se", _what(metrics))
    finish_run(trainer, recipe, tokenizer, metrics, lines)
    return metrics


def _as_pairs_for_check(dataset):
    """The checks written for pairs (tokenizer, expert scoring) read `chosen` as the answer: a view that names
    the completion so (desirable or not)."""
    if is_paired(dataset) or "completion" not in dataset.column_names:
        return dataset
    return dataset.rename_column("completion", "chosen")


def _balance(dataset) -> str:
    desirable = sum(dataset["label"])
    return f"{desirable} desirable and {len(dataset) - desirable} undesirable training examples"


def _what(metrics: dict) -> str:
    count = metrics.get("eval_after_pairs/count")
    pairs = f"{count} pairs, " if count else ""
    return f"pairwise accuracy of the implicit reward ({pairs}beta x log-ratio)"


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.kto`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
