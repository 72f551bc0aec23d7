"""Preference alignment of JetMoE (DPO and TRL's other pairwise losses) from a YAML recipe with TRL's `DPOTrainer`.

jetmoe-ft dpo --config recipes/tiny/dpo.yaml [--key value ...]
accelerate launch -m jetmoe_ft.dpo --config recipes/tiny/dpo.yaml

The reference policy is the starting model, held in one of three ways:
- LoRA (`lora_targets:` or `use_peft: true`): the same weights with the adapter disabled; no second copy.
- full weights: a frozen copy made once from the loaded model, or none at all with
  `precompute_ref_log_probs: true` (reference log-probabilities computed before training).
A start from an SFT adapter directory is merged into its base on load (`jetmoe_ft.loading`), so the
reference is the SFT model and a new DPO adapter, if any, is stacked on the merged weights.
"""

from __future__ import annotations

import copy
import functools
import resource
import sys
import warnings
from collections import Counter
from contextlib import contextmanager

import torch
from datasets import Dataset, DatasetDict
from peft import PeftModel
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt
from trl.trainer.utils import FusedCausalLMOutput

from .adapt import adapt_model
from .config import Recipe, RecipeError, parse_recipe
from .loading import check_tokenizer, is_adapter_dir, load_recipe_model, load_recipe_tokenizer
from .modeling.modeling_jetmoe import router_loss_for
from .recipe_data import load_recipe_datasets
from .runs import (
    finish_run,
    prepare_processes,
    resume_checkpoint,
    run_command,
    train_with_evaluations,
    trained_line,
)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class JetMoeDPOTrainer(DPOTrainer):
    """`DPOTrainer` whose policy loss carries the JetMoE router loss, with a LoRA reference that is the
    base model with the adapter disabled.

    TRL's fused LM head adds Mixtral's load-balancing loss, not the one JetMoE was trained with (switch +
    z-loss over every MoA and MoE router); `jetmoe_lm_head` makes `aux_loss` JetMoE's, from the policy's
    own router logits. The reference forward never asks for router logits, so it adds nothing. As in SFT,
    the router loss is part of the training loss only: the evaluation loss is the preference loss alone.
    """

    full_logits: bool | None = None
    """Log-probabilities from plain logits (True) or TRL's chunked kernel (False); None: plain logits on CPU."""

    def __init__(self, model, *args, **kwargs):
        trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
        self._metric_key_prefix = "eval"
        self._lm_heads_installed = False
        super().__init__(model, *args, **kwargs)
        self.router_loss_enabled = self.aux_loss_enabled
        self._install_lm_heads()
        if isinstance(self.model, PeftModel):
            self._reference_is_base_model(trainable)

    def _install_lm_heads(self) -> None:
        """`jetmoe_lm_head` on the policy and the reference, once, after TRL has added its fused heads."""
        if self._lm_heads_installed:
            return
        causal_lm = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        jetmoe_lm_head(causal_lm, self.full_logits, with_log_sum_sq_probs=self.use_weighting)
        if self.ref_model is not None:
            jetmoe_lm_head(self.accelerator.unwrap_model(self.ref_model), self.full_logits, reference=True)
        self._lm_heads_installed = True

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its __init__, after adding its fused heads: the reference must see ours.
        self._install_lm_heads()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _reference_is_base_model(self, trainable: dict[str, bool]) -> None:
        """Drop the `ref` adapter TRL copies from a model handed over already wrapped by PEFT.

        A fresh adapter (every LoRA B zero, as `adapt_model` makes it; routers and heads trained whole start
        as the base's) leaves the model unchanged, so the base with adapters disabled is exactly the starting
        policy, without a second copy of the adapter and of the modules it trains whole. A trained adapter
        keeps TRL's copy as its reference. PEFT re-marks trainable parameters when it adds an adapter: the
        choices of `adapt_model` (`trainable`, by name) are restored.
        """
        if "ref" not in self.model.peft_config or not _adapter_is_fresh(self.model):
            return
        self.model.delete_adapter("ref")
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(trainable.get(name, False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL adds the router loss whenever it is enabled; only training steps should carry it.
        self.aux_loss_enabled = self.router_loss_enabled and self.model.training
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._metric_key_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._metric_key_prefix = "eval"

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL names its evaluation metrics `eval_*` whatever the prefix: give them `evaluate`'s.
        metrics = self._metrics["eval"]
        if not self.model.training and self._metric_key_prefix != "eval" and metrics:
            prefix = self._metric_key_prefix
            logs.update({f"{prefix}_{key}": sum(values) / len(values) for key, values in metrics.items()})
            metrics.clear()
        super().log(logs, start_time)


def _adapter_is_fresh(model: PeftModel, adapter: str = "default") -> bool:
    """Whether the adapter is still the identity: every LoRA B factor zero."""
    factors = [p for name, p in model.named_parameters() if ".lora_B." in name and f".{adapter}." in name]
    return bool(factors) and all(not factor.any() for factor in factors)


def jetmoe_lm_head(
    causal_lm: torch.nn.Module,
    full_logits: bool | None = None,
    with_log_sum_sq_probs: bool = False,
    reference: bool = False,
) -> None:
    """Wrap the forward that TRL's fused LM head installed on `causal_lm` (TRL calls it with `fused_lm_head=True`).

    - `aux_loss` is the JetMoE router loss when router logits are asked for (the policy's training forward).
    - With `full_logits` (default: on CPU) the log-probabilities come from plain logits of the scored
      positions: TRL's chunked kernel has no fast CPU path (measured: a tiny DPO step took about 3x as long).
      `reference`: `causal_lm` is a separate reference model, whose passes need log-probabilities only.
    - A forward without gradients in training mode is a reference pass (PEFT: adapter disabled); it runs in
      evaluation mode, like a separate reference model, so the routing statistics (which count training-mode
      router calls) describe the policy alone.
    """
    fused_forward = causal_lm.forward
    backbone = causal_lm.base_model

    def scored(reference_pass: bool, *args, **kwargs):
        if full_logits or (full_logits is None and causal_lm.lm_head.weight.device.type == "cpu"):
            statistics = not reference_pass
            return _head_from_logits(
                causal_lm, *args, statistics=statistics, with_log_sum_sq_probs=with_log_sum_sq_probs, **kwargs
            )
        if not kwargs.get("output_router_logits"):
            return fused_forward(*args, fused_lm_head=True, **kwargs)
        router_logits = []
        handle = backbone.register_forward_hook(
            lambda module, _, output: router_logits.append(output.router_logits)
        )
        try:
            outputs = fused_forward(*args, fused_lm_head=True, **kwargs)
        finally:
            handle.remove()
        outputs.aux_loss = router_loss_for(causal_lm.config, router_logits[-1], kwargs.get("attention_mask"))
        return outputs

    @functools.wraps(fused_forward)
    def forward(*args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, **kwargs)
        if causal_lm.training and not torch.is_grad_enabled():
            with _evaluation_mode(causal_lm):
                return scored(True, *args, **kwargs)
        return scored(reference, *args, **kwargs)

    causal_lm.forward = forward


def _head_from_logits(
    causal_lm,
    *args,
    labels: torch.Tensor,
    statistics: bool = True,
    with_log_sum_sq_probs: bool = False,
    **kwargs,
) -> FusedCausalLMOutput:
    """What TRL's fused LM head returns, from the logits of the scored positions only (label not -100).

    The prompt positions get no logits, as in TRL's kernel on GPU. `statistics` (entropy, mean logit,
    top-1) are for logging; a reference pass needs only the log-probabilities.
    """
    kwargs["use_cache"] = False
    output_router_logits = bool(kwargs.pop("output_router_logits", False))
    outputs = causal_lm.base_model(*args, output_router_logits=output_router_logits, **kwargs)
    targets = labels[:, 1:]
    mask = targets != -100
    logits = causal_lm.lm_head(outputs.last_hidden_state[:, :-1][mask]).float()
    log_softmax = logits.log_softmax(-1)
    scored = log_softmax.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)

    def per_token(values: torch.Tensor) -> torch.Tensor:
        # `masked_scatter` keeps the result connected to the model even when nothing is scored.
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    entropy = mean_logits = is_top1 = log_sum_sq_probs = None
    if statistics:
        with torch.no_grad():
            entropy = per_token(-(log_softmax.exp() * log_softmax).sum(-1))
            mean_logits = per_token(logits.mean(-1))
            is_top1 = per_token((logits.argmax(-1) == targets[mask]).float()).bool()
            if with_log_sum_sq_probs:
                log_sum_sq_probs = per_token(torch.logsumexp(2 * log_softmax, dim=-1))
    aux_loss = None
    if output_router_logits:
        aux_loss = router_loss_for(causal_lm.config, outputs.router_logits, kwargs.get("attention_mask"))
    return FusedCausalLMOutput(
        loss=-scored.sum() / mask.sum().clamp(min=1),
        log_probs=per_token(scored),
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
        aux_loss=aux_loss,
    )


@contextmanager
def _evaluation_mode(module: torch.nn.Module):
    module.eval()
    try:
        yield
    finally:
        module.train()


# ---------------------------------------------------------------------------------------------
# Preference data


def check_preferences(data: DatasetDict, tokenizer, args: DPOConfig) -> DatasetDict:
    """Each split in TRL's preference format, with pairs DPO cannot learn from dropped (and counted).

    Columns: `chosen` + `rejected`, with `prompt` or implicit in the conversations (extracted here, as TRL
    would); all three text, or all three conversations. Dropped with a warning: pairs with an empty answer,
    pairs whose answers are equal, and (with `truncation_mode: keep_start`) prompts of `max_length` tokens or
    more, which TRL would drop silently. A split with nothing left is a `RecipeError`.
    """
    return DatasetDict(
        {split: _clean_split(dataset, split, tokenizer, args) for split, dataset in data.items()}
    )


def _clean_split(dataset: Dataset, split: str, tokenizer, args: DPOConfig) -> Dataset:
    conversational = _check_formats(dataset, split)
    if "prompt" not in dataset.column_names:
        dataset = dataset.map(
            extract_prompt, num_proc=args.dataset_num_proc, desc=f"Extracting {split} prompts"
        )
    problems = [
        _pair_problem(row["chosen"], row["rejected"])
        for row in dataset.select_columns(["chosen", "rejected"])
    ]
    if args.max_length is not None and args.truncation_mode == "keep_start":
        lengths = _prompt_lengths(dataset, tokenizer, conversational)
        problems = [
            problem or (f"a prompt of {args.max_length}+ tokens" if length >= args.max_length else None)
            for problem, length in zip(problems, lengths, strict=True)
        ]
    counts = Counter(problem for problem in problems if problem)
    if not counts:
        return dataset
    if sum(counts.values()) == len(dataset):
        raise RecipeError(
            f"{_problem_field(counts)}: every {split} pair has {_describe(counts)}; {_fix(counts)}."
        )
    warnings.warn(
        f"Dropped {sum(counts.values())} of {len(dataset)} {split} pairs: {_describe(counts)}.", stacklevel=2
    )
    return dataset.select([index for index, problem in enumerate(problems) if problem is None])


def _check_formats(dataset: Dataset, split: str) -> bool:
    """Whether the pairs are conversations; mixed text / conversation columns are a `RecipeError`."""
    first = dataset[0]
    kinds = {column: isinstance(first[column], list) for column in PAIR_COLUMNS if column in first}
    if len(set(kinds.values())) > 1:
        texts = [column for column, is_chat in kinds.items() if not is_chat]
        chats = [column for column, is_chat in kinds.items() if is_chat]
        hint = (
            " (the prompt is already in the conversations: keep only them with `columns: [chosen, rejected]`)"
            if texts == ["prompt"]
            else ""
        )
        raise RecipeError(
            f"{', '.join(texts)}: text, but {', '.join(chats)} {'is' if len(chats) == 1 else 'are'} conversations "
            f"in the {split} split; use one format for prompt, chosen and rejected{hint}."
        )
    return kinds["chosen"]


def _pair_problem(chosen, rejected) -> str | None:
    if _is_empty(chosen) or _is_empty(rejected):
        return "an empty chosen or rejected answer"
    if chosen == rejected:
        return "chosen == rejected"
    return None


def _is_empty(answer) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    return not answer or all(not str(message.get("content") or "").strip() for message in answer)


def _prompt_lengths(dataset: Dataset, tokenizer, conversational: bool, chunk: int = 1024) -> list[int]:
    """Prompt tokens as TRL counts them: the chat template with the generation prompt, or the plain text."""
    prompts, lengths = dataset["prompt"], []
    # Plain batches rather than `Dataset.map`, which would hash the tokenizer to fingerprint the result.
    for start in range(0, len(prompts), chunk):
        batch = prompts[start : start + chunk]
        if conversational:
            encoded = tokenizer.apply_chat_template(
                batch, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        else:
            encoded = tokenizer(batch)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return lengths


def _describe(counts: Counter) -> str:
    return ", ".join(f"{count} with {problem}" for problem, count in counts.most_common())


def _problem_field(counts: Counter) -> str:
    return "max_length" if any("prompt" in problem for problem in counts) else "chosen/rejected"


def _fix(counts: Counter) -> str:
    if any("prompt" in problem for problem in counts):
        return "raise `max_length` or shorten the prompts"
    return "check that `chosen` and `rejected` hold different, non-empty answers"


# ---------------------------------------------------------------------------------------------
# Models


def uses_lora(recipe: Recipe) -> bool:
    """Whether `adapt_model` will wrap the model in a LoRA adapter."""
    return bool(recipe.adapters.lora_targets) or recipe.model.use_peft


def record_stacked_base(model: torch.nn.Module, recipe: Recipe) -> None:
    """A LoRA adapter trained on a merged start adapter names that adapter's directory as its base.

    PEFT would record the start adapter's own base, and loading the DPO adapter onto it would silently
    drop the SFT adapter; naming the directory keeps the chain (base, SFT adapter merged, DPO adapter).
    """
    if isinstance(model, PeftModel) and is_adapter_dir(recipe.model.model_name_or_path):
        model.peft_config["default"].base_model_name_or_path = str(recipe.model.model_name_or_path)


def reference_model(recipe: Recipe, model: torch.nn.Module) -> torch.nn.Module | None:
    """A frozen copy of the starting model for full-weight DPO; None when TRL needs none (LoRA: adapter
    disabled; `precompute_ref_log_probs`). Without it, TRL would reload the reference from the model's
    load path, which an in-memory JetMoE does not have."""
    if uses_lora(recipe) or recipe.training.precompute_ref_log_probs:
        return None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def reference_kind(trainer: DPOTrainer) -> str:
    """How the trainer gets reference log-probabilities, in words."""
    if trainer.precompute_ref_logps:
        return "precomputed"
    if trainer.ref_model is not None:
        return "frozen copy"
    return "adapter copy" if "ref" in trainer.model.peft_config else "adapter disabled"


def weights_mb(*models: torch.nn.Module | None) -> float:
    """Memory held by the parameters and buffers of `models`, each storage counted once, in MiB."""
    seen, total = set(), 0
    for model in models:
        if model is None:
            continue
        for tensor in [*model.parameters(), *model.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total / 2**20


def peak_memory_mb() -> float:
    """Peak memory of this process so far: GPU memory allocated on CUDA, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


# ---------------------------------------------------------------------------------------------
# The loop


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run one DPO recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_recipe(DPOConfig, argv)
    args = recipe.training

    data = load_recipe_datasets(recipe.data, "dpo", seed=args.seed)
    tokenizer = load_recipe_tokenizer(recipe)
    check_tokenizer(tokenizer, data["train"], args.max_length, args.pad_token)
    data = check_preferences(data, tokenizer, args)
    resume_from = resume_checkpoint(args)
    model = load_recipe_model(recipe)
    reference = reference_model(recipe, model)
    model = adapt_model(recipe, model, train_dataset=data["train"], tokenizer=tokenizer)
    record_stacked_base(model, recipe)

    trainer = make_trainer(model, reference, args, data, tokenizer)
    train_metrics, before, after = train_with_evaluations(trainer, resume_from)
    metrics = {
        **train_metrics,
        **before,
        **after,
        "reference": reference_kind(trainer),
        "memory/weights_mb": weights_mb(trainer.model, trainer.ref_model),
        "memory/peak_mb": peak_memory_mb(),
    }
    finish_run(trainer, recipe, tokenizer, metrics, headline(trainer, metrics, before, after))
    return metrics


def make_trainer(model, reference, args: DPOConfig, data: DatasetDict, tokenizer) -> JetMoeDPOTrainer:
    """The trainer for a recipe's adapted model, its reference (or None) and checked data."""
    return JetMoeDPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("test"),
        processing_class=tokenizer,
    )


def headline(trainer, metrics: dict, before: dict, after: dict) -> list[str]:
    """What to print at the end: steps and time, held-out reward accuracy and margin before -> after."""
    lines = [
        trained_line(trainer, metrics)[:-1] + f"; reference: {metrics['reference']}; weights held "
        f"{metrics['memory/weights_mb']:.0f} MiB, peak {metrics['memory/peak_mb']:.0f} MiB."
    ]
    if after:
        accuracy, margin = (f"eval_{{}}_rewards/{name}" for name in ("accuracies", "margins"))
        was = {
            key: f"{before[key.format('before')]:.3f} before -> " if before else ""
            for key in (accuracy, margin)
        }
        note = " (before training the policy is the reference: every reward is 0, a tie, counted wrong)"
        lines.append(
            f"Held-out reward accuracy: {was[accuracy]}{after[accuracy.format('after')]:.3f} after; mean margin "
            f"{was[margin]}{after[margin.format('after')]:.3f} after{note if before else ''}."
        )
    return lines


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.dpo`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
