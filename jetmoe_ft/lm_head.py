"""The LM head every TRL loop scores tokens with: our answer to TRL's `fused_lm_head=True` calls.

TRL 1.16's SFT, DPO, KTO and GRPO trainers add a fused LM head to the model (`trl.trainer.utils.add_fused_lm_head`)
and call `model(..., labels=labels, fused_lm_head=True)` for per-token log-probabilities. Its kernel has no fast CPU
path (docs/dpo.md) and adds Mixtral's load-balancing loss, not JetMoE's. `install_lm_head`
wraps that forward so those calls run the backbone once and score only the positions whose label is not -100,
returning what TRL's head returns (`FusedCausalLMOutput`, without `aux_loss`: the router loss is added by the
trainer layer, `jetmoe_ft.trainers`). Calls without `fused_lm_head` (generation, plain forwards) are unchanged.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from trl.trainer.utils import FusedCausalLMOutput


def install_lm_head(causal_lm: nn.Module, reference: bool = False, temperature: float = 1.0) -> None:
    """Answer `fused_lm_head=True` calls on `causal_lm` (a `JetMoeForCausalLM`, after TRL added its head) here.

    `reference`: `causal_lm` is a separate frozen reference model, whose passes need log-probabilities only.
    `temperature` divides the logits, as TRL's head does for GRPO's sampling temperature.
    A pass without gradients in training mode is a reference pass of the policy (PEFT: adapter disabled); it
    runs in evaluation mode, like a separate reference model, so routing statistics describe the policy alone.
    """
    wrapped_forward = causal_lm.forward

    @functools.wraps(wrapped_forward)
    def forward(*args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return wrapped_forward(*args, **kwargs)
        if causal_lm.training and not torch.is_grad_enabled():
            with _evaluation_mode(causal_lm):
                return score_tokens(causal_lm, *args, statistics=False, temperature=temperature, **kwargs)
        return score_tokens(causal_lm, *args, statistics=not reference, temperature=temperature, **kwargs)

    causal_lm.forward = forward


def score_tokens(
    causal_lm: nn.Module,
    *args,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    statistics: bool = True,
    temperature: float = 1.0,
    **kwargs,
) -> FusedCausalLMOutput:
    """Next-token log-probabilities of the labels (and, with `statistics`, entropy, mean logit, top-1 and
    log-sum of squared probabilities for TRL's metrics), from the logits of the scored positions only.

    `shift_labels` (already shifted, as TRL passes under context parallelism) are scored without shifting."""
    kwargs["use_cache"] = False
    kwargs.pop("output_router_logits", None)  # the trainer layer records the router loss itself
    hidden_states = causal_lm.base_model(*args, **kwargs).last_hidden_state
    if shift_labels is None:
        hidden_states, targets = hidden_states[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    mask = targets != -100
    logits = causal_lm.lm_head(hidden_states[mask]).float() / temperature
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
            log_sum_sq_probs = per_token(torch.logsumexp(2 * log_softmax, dim=-1))
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-scored.sum() / denominator,
        log_probs=per_token(scored),
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
    )


@contextmanager
def _evaluation_mode(module: nn.Module):
    module.eval()
    try:
        yield
    finally:
        module.train()
