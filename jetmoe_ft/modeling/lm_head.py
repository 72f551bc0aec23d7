"""The LM head every TRL loop scores tokens with: our answer to TRL's `fused_lm_head=True` calls.

TRL 1.16's SFT, DPO, KTO and GRPO trainers add a fused LM head to the model (`trl.trainer.utils.add_fused_lm_head`)
and call `model(..., labels=labels, fused_lm_head=True)` for per-token log-probabilities. Its kernel has no fast CPU
path (docs/dpo.md) and adds Mixtral's load-balancing loss, not JetMoE's. `install_lm_head` wraps that forward so
those calls run the backbone once and score only the positions whose label is not -100 with our chunked head
(`jetmoe_ft.modeling.lm_head_loss`: no `[tokens, vocab]` tensor is kept; `chunked_lm_head: false` builds the logits),
returning what TRL's head returns (`FusedCausalLMOutput`, without `aux_loss`: the router loss is added by the
trainer layer, `jetmoe_ft.training.trainers`). Calls without `fused_lm_head` (generation, plain forwards) are unchanged.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from trl.trainer.utils import FusedCausalLMOutput

from .lm_head_loss import DEFAULT_CHUNK_SIZE, TokenScores, score_tokens


def install_lm_head(
    causal_lm: nn.Module,
    reference: bool = False,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    same_gradient_per_token: bool = False,
) -> None:
    """Answer `fused_lm_head=True` calls on `causal_lm` (a `JetMoeForCausalLM`, after TRL added its head) here.

    `reference`: `causal_lm` is a separate frozen reference model, whose passes need log-probabilities only.
    `temperature` divides the logits, as TRL's head does for GRPO's sampling temperature. `chunk_size`: tokens per
    chunk of the chunked head (`jetmoe_ft.modeling.lm_head_loss`), None for plain logits of the scored positions.
    `same_gradient_per_token`: the loop's loss is a mean over tokens (SFT), so the chunked head computes its
    gradients in the forward. A pass without gradients in training mode is a reference pass of the policy (PEFT:
    adapter disabled); it runs in evaluation mode, like a separate reference model, so routing statistics
    describe the policy alone.
    """
    wrapped_forward = causal_lm.forward
    options = dict(
        temperature=temperature, chunk_size=chunk_size, same_gradient_per_token=same_gradient_per_token
    )

    @functools.wraps(wrapped_forward)
    def forward(*args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return wrapped_forward(*args, **kwargs)
        if causal_lm.training and not torch.is_grad_enabled():
            with _evaluation_mode(causal_lm):
                return score_labels(causal_lm, *args, statistics=False, **options, **kwargs)
        return score_labels(causal_lm, *args, statistics=not reference, **options, **kwargs)

    causal_lm.forward = forward


def score_labels(
    causal_lm: nn.Module,
    *args,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    statistics: bool = True,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    same_gradient_per_token: bool = False,
    **kwargs,
) -> FusedCausalLMOutput:
    """Next-token log-probabilities of the labels (and, with `statistics`, entropy, mean logit, top-1 and
    log-sum of squared probabilities for TRL's metrics), scoring only the positions whose label is not -100.

    `shift_labels` (already shifted, as TRL passes under context parallelism) are scored without shifting."""
    kwargs["use_cache"] = False
    kwargs.pop("output_router_logits", None)  # the trainer layer records the router loss itself
    hidden_states = causal_lm.base_model(*args, **kwargs).last_hidden_state
    if shift_labels is None:
        hidden_states, targets = hidden_states[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    head = causal_lm.lm_head
    if chunk_size is not None and isinstance(head, nn.Linear) and _whole(head.weight):
        scores = score_tokens(
            hidden_states, head.weight, targets, chunk_size, head.bias, temperature, statistics,
            same_gradient_per_token,
        )  # fmt: skip
    else:  # plain logits, e.g. for an LM head under LoRA (not a plain Linear)
        scores = _scores_from_logits(head, hidden_states, targets, temperature, statistics)
    mask = targets != -100
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-scores.log_probs.sum() / denominator,
        log_probs=scores.log_probs,
        entropy=scores.entropy,
        log_sum_sq_probs=scores.log_sum_sq_probs,
        mean_logits=scores.mean_logits,
        is_top1=None if scores.is_top1 is None else scores.is_top1.bool(),
        label_mask=mask,
    )


def _whole(weight: torch.Tensor) -> bool:
    """Whether this process holds the whole head weight (not an FSDP2 / ZeRO-3 shard, which only the head's own
    forward gathers)."""
    return type(weight).__name__ != "DTensor" and not hasattr(weight, "ds_id") and weight.dim() == 2


def _scores_from_logits(head, hidden_states, targets, temperature: float, statistics: bool) -> TokenScores:
    """The same scores from the logits of the scored positions, built whole."""
    mask = targets != -100
    hidden_states = hidden_states[mask]
    if not torch.is_autocast_enabled(hidden_states.device.type):
        # QLoRA: TRL keeps a trained head in bf16 while the norms before it stay fp32
        parameters = list(head.parameters())
        trained = [p for p in parameters if p.requires_grad] or parameters
        hidden_states = hidden_states.to(trained[0].dtype)
    logits = head(hidden_states).float() / temperature
    log_softmax = logits.log_softmax(-1)
    scored = log_softmax.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)

    def per_token(values: torch.Tensor) -> torch.Tensor:
        # `masked_scatter` keeps the result connected to the model even when nothing is scored.
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    log_probs = per_token(scored)  # with gradient: outside the no_grad block below
    if not statistics:
        return TokenScores(log_probs)
    with torch.no_grad():
        return TokenScores(
            log_probs,
            entropy=per_token(-(log_softmax.exp() * log_softmax).sum(-1)),
            is_top1=per_token(logits.argmax(-1) == targets[mask]),
            mean_logits=per_token(logits.mean(-1)),
            log_sum_sq_probs=per_token(torch.logsumexp(2 * log_softmax, dim=-1)),
        )


@contextmanager
def _evaluation_mode(module: nn.Module):
    module.eval()
    try:
        yield
    finally:
        module.train()
