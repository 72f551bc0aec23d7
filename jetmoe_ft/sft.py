"""Supervised fine-tuning of JetMoE from a YAML recipe with TRL's `SFTTrainer`.

jetmoe-ft sft --config recipes/tiny/sft.yaml [--key value ...]
accelerate launch -m jetmoe_ft.sft --config recipes/tiny/sft.yaml
"""

import sys

import torch
from transformers.loss.loss_utils import ForCausalLMLoss
from trl import SFTConfig, SFTTrainer

from .adapt import adapt_model
from .config import parse_recipe
from .loading import check_tokenizer, load_recipe_model, load_recipe_tokenizer
from .recipe_data import load_recipe_datasets
from .runs import (
    finish_run,
    prepare_processes,
    resume_checkpoint,
    run_command,
    train_with_evaluations,
    trained_line,
)


class JetMoeSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose training loss is the next-token loss plus the JetMoE router loss.

    TRL's fused LM head adds Mixtral's load-balancing loss, not the one JetMoE was trained with
    (switch + z-loss over every MoA and MoE router), so the loss is computed here from the model's
    logits and its own `aux_loss`. The evaluation loss is the next-token loss alone, comparable across
    runs; the router loss is logged as `aux_loss`.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False, output_router_logits=self.aux_loss_enabled)
        loss = ForCausalLMLoss(
            outputs.logits, labels, vocab_size=outputs.logits.shape[-1], num_items_in_batch=num_items_in_batch
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and mode == "train":
            loss = loss * self.accelerator.num_processes
        if self.aux_loss_enabled and mode == "train":
            # A per-micro-batch mean: with `num_items_in_batch` the Trainer leaves accumulation to the loss.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        self._log_token_metrics(mode, outputs, labels, inputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _log_token_metrics(self, mode, outputs, labels, inputs) -> None:
        """TRL's SFT metrics (token accuracy, entropy, tokens seen, aux loss) from the full logits."""
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
        mask = targets != -100
        scored = logits[mask].float()
        num_valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
        correct = self.accelerator.gather_for_metrics((scored.argmax(-1) == targets[mask]).sum()).sum()
        log_probs = torch.log_softmax(scored, dim=-1)
        entropy = self.accelerator.gather_for_metrics(-(log_probs.exp() * log_probs).sum()).sum()
        metrics = self._metrics[mode]
        metrics["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        metrics["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:
                tokens = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item()
            )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run one SFT recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_recipe(SFTConfig, argv)
    args = recipe.training

    data = load_recipe_datasets(recipe.data, "sft", seed=args.seed, text_field=args.dataset_text_field)
    tokenizer = load_recipe_tokenizer(recipe)
    check_tokenizer(tokenizer, data["train"], args.max_length, args.pad_token)
    resume_from = resume_checkpoint(args)
    model = adapt_model(recipe, load_recipe_model(recipe), train_dataset=data["train"], tokenizer=tokenizer)

    trainer = JetMoeSFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("test"),
        processing_class=tokenizer,
    )
    train_metrics, before, after = train_with_evaluations(trainer, resume_from)
    metrics = {**train_metrics, **before, **after}

    headline = [trained_line(trainer, train_metrics)]
    if before and after:
        headline.append(
            f"Held-out loss (next token, assistant turns): {before['eval_before_loss']:.3f} before -> "
            f"{after['eval_after_loss']:.3f} after."
        )
    finish_run(trainer, recipe, tokenizer, metrics, headline)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.sft`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
