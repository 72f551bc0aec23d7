"""A chunked LM-head loss: hidden states × `lm_head` a chunk of tokens at a time, never `[tokens, vocab]`.

The model's own path (`JetMoeForCausalLM.forward` + transformers' `ForCausalLMLoss`) builds the logits in the
compute dtype, upcasts them to fp32 and keeps them, their log-softmax and their gradient for the backward:
three `[tokens, vocab]` fp32 tensors that gradient checkpointing cannot touch. Here each chunk's logits are
computed the same way (matmul in the compute dtype, then fp32), reduced to what is needed (target
log-probability, logsumexp, optional metrics) and dropped; the backward recomputes them chunk by chunk.
Only the hidden states, the weight, the targets and one logsumexp per token are kept.

Ignored positions (label -100) are dropped before the head, so prompt and padding tokens cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
# Tokens per chunk: [chunk, vocab] fp32 is 128 MiB at a 32,000 vocabulary. Measured on CPU (docs/performance.md).
DEFAULT_CHUNK_SIZE = 1024


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float = 1.0
) -> torch.Tensor:
    """fp32 logits of one chunk, the matmul in the inputs' dtype like `lm_head(hidden).float()`, / temperature."""
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    logits = logits.float()
    return logits if temperature == 1.0 else logits.div_(temperature)


class _Gradients:
    """grad_hidden, grad_weight, grad_bias of a sum over rows, accumulated chunk by chunk from d(loss)/d(logits)."""

    def __init__(self, hidden, weight, bias, needs: tuple[bool, bool, bool]):
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        # Summed over chunks in fp32, so a bf16 weight's gradient is rounded once, as in the unchunked matmul.
        self.weight_sum = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        self.bias_sum = torch.zeros_like(bias, dtype=torch.float32) if needs[2] else None

    def add(self, rows: slice, chunk: torch.Tensor, weight: torch.Tensor, grad_logits: torch.Tensor) -> None:
        grad_logits = grad_logits.to(chunk.dtype)
        if self.hidden is not None:
            torch.mm(grad_logits, weight, out=self.hidden[rows])
        if self.weight_sum is not None:
            if self.weight_sum.dtype == grad_logits.dtype:
                self.weight_sum.addmm_(grad_logits.T, chunk)
            else:
                self.weight_sum += grad_logits.T @ chunk
        if self.bias_sum is not None:
            self.bias_sum += grad_logits.sum(dim=0)

    def result(self) -> tuple:
        grad_weight = None if self.weight_sum is None else self.weight_sum.to(self.weight_dtype)
        grad_bias = None if self.bias_sum is None else self.bias_sum.to(self.bias_dtype)
        return self.hidden, grad_weight, grad_bias


def _grad_logits(
    probs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, grad: torch.Tensor | None = None
) -> torch.Tensor:
    """grad * d log p_target / d (logits before the temperature) = grad * (onehot(target) - softmax) / T,
    [rows, 1] upstream, in place of `probs`."""
    if grad is None:
        grad = probs.new_ones(len(targets), 1)
    if temperature != 1.0:
        grad = grad / temperature
    return probs.mul_(-grad).scatter_add_(1, targets[:, None], grad.expand(-1, 1).contiguous())


class _ChunkedLMHead(torch.autograd.Function):
    """log p(target) of `(hidden @ weight.T (+ bias)) / temperature` per row, chunk by chunk; every target valid.

    Returns (the log-probs [N] fp32, or their sum when `reduce_sum`; then, only `with_metrics` and without
    gradient: correct [N] bool, entropy [N], mean logit [N], log sum of squared probabilities [N]).

    With `precompute` (gradients wanted), the forward also computes the gradients for a unit upstream gradient
    on every row while it has the logits (as Liger's fused linear cross-entropy does). When the upstream
    gradient is the same for every row — a summed or averaged loss, like SFT's — the backward only scales them:
    no second pass through the head. Otherwise (per-sequence sums, as in DPO) it recomputes each chunk's logits.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, chunk_size: int, with_metrics: bool, reduce_sum: bool,
        temperature: float, precompute: bool,
    ):  # fmt: skip
        num_rows = hidden.shape[0]
        logps = hidden.new_empty(num_rows, dtype=torch.float32)
        logsumexp = hidden.new_empty(num_rows, dtype=torch.float32)
        metric_rows = num_rows if with_metrics else 0
        correct = torch.empty(metric_rows, dtype=torch.bool, device=hidden.device)
        entropy, mean_logits, log_sum_sq = (
            hidden.new_empty(metric_rows, dtype=torch.float32) for _ in range(3)
        )
        needs = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
        gradients = _Gradients(hidden, weight, bias, needs) if precompute and any(needs) else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, num_rows, chunk_size):
                rows = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[rows], weight, bias, temperature)
                lse = logsumexp[rows] = torch.logsumexp(logits, dim=-1)
                logps[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse
                if with_metrics:
                    correct[rows] = logits.argmax(dim=-1) == targets[rows]
                    mean_logits[rows] = logits.mean(dim=-1)
                if not (with_metrics or gradients is not None):
                    continue
                log_probs = logits.sub_(lse[:, None])
                if with_metrics:
                    log_sum_sq[rows] = torch.logsumexp(2 * log_probs, dim=-1)
                probs = log_probs.exp() if with_metrics else log_probs.exp_()
                if with_metrics:
                    entropy[rows] = -(probs * log_probs).sum(dim=-1)
                if gradients is not None:
                    gradients.add(rows, hidden[rows], weight, _grad_logits(probs, targets[rows], temperature))
        ctx.mark_non_differentiable(correct, entropy, mean_logits, log_sum_sq)
        ctx.reduce_sum = reduce_sum
        ctx.gradients = gradients
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        if not reduce_sum:
            ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        return (logps.sum() if reduce_sum else logps), correct, entropy, mean_logits, log_sum_sq

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps, *_metric_grads):
        rest = (None,) * 6
        uniform = ctx.reduce_sum or bool((grad_logps == grad_logps[:1]).all())
        if ctx.gradients is not None and uniform:
            grads, ctx.gradients = ctx.gradients.result(), None
            scale = grad_logps.reshape(-1)[:1]
            return *(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads), *rest
        if ctx.reduce_sum:
            raise RuntimeError("the chunked LM-head loss computed its gradients once; backward runs once")
        ctx.gradients = None
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        gradients = _Gradients(hidden, weight, bias, ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                chunk = hidden[rows]
                logits = _chunk_logits(chunk, weight, bias, ctx.temperature)
                probs = torch.exp_(logits.sub_(logsumexp[rows, None]))
                grad_logits = _grad_logits(probs, targets[rows], ctx.temperature, grad_logps[rows, None])
                gradients.add(rows, chunk, weight, grad_logits)
        return *gradients.result(), *rest


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `lm_head(hidden)` runs in: autocast's when it is on, else the inputs' common dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _valid_rows_logps(
    hidden, weight, targets, chunk_size, bias, with_metrics, reduce_sum, temperature=1.0, precompute=None
):
    """The head on the rows whose target is not ignored: (valid mask, log-probs or their sum, correct, entropy,
    mean logit, log sum of squared probabilities)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    valid = targets != IGNORE_INDEX
    dtype = _compute_dtype(hidden, weight)
    # The casts sit outside the Function, so autograd brings the gradients back to each input's own dtype.
    outputs = _ChunkedLMHead.apply(
        hidden[valid].to(dtype),
        weight.to(dtype),
        None if bias is None else bias.to(dtype),
        targets[valid],
        chunk_size,
        with_metrics,
        reduce_sum,
        temperature,
        torch.is_grad_enabled() and (reduce_sum if precompute is None else precompute),
    )
    return valid, *outputs


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    metrics: bool = False,
) -> LMHeadLoss:
    """transformers' `ForCausalLMLoss` on `hidden @ weight.T (+ bias)` without the `[tokens, vocab]` logits.

    `hidden` [B, T, H] is the model's last hidden state, `labels` [B, T] (-100 ignored) are shifted inside
    (position t predicts label t + 1) unless `shift_labels` [B, T] are given. The loss is the summed token
    cross-entropy / `num_items_in_batch` when given, else its mean over the scored tokens (NaN when there are
    none, as in transformers). With `metrics`, also the token accuracy and entropy counts (see `LMHeadLoss`).
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    valid, logp_sum, correct, entropy, *_ = _valid_rows_logps(
        hidden, weight, shift_labels, chunk_size, bias, metrics, reduce_sum=True
    )
    num_tokens = valid.sum()
    denominator = num_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    loss = -logp_sum / denominator.to(logp_sum.device)
    if not metrics:
        return LMHeadLoss(loss, num_tokens)
    return LMHeadLoss(loss, num_tokens, correct.sum(), entropy.sum())


@dataclass
class LMHeadLoss:
    """The next-token loss and, when asked for, TRL SFT's token metrics from the same chunks (no gradient).

    `num_tokens` counts the scored (non-ignored) tokens; `correct` those whose argmax is the target;
    `entropy_sum` sums their predictive entropies. The metrics are None unless `metrics=True`.
    """

    loss: torch.Tensor
    num_tokens: torch.Tensor
    correct: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None


@dataclass
class TokenScores:
    """Per-token results of the LM head for TRL's fused-head outputs, each shaped like the targets (0 where
    ignored): `log_probs` with gradient; the statistics without (None unless asked for)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


def score_tokens(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    statistics: bool = True,
    same_gradient_per_token: bool = False,
) -> TokenScores:
    """Log-probabilities of `targets` under `(hidden @ weight.T (+ bias)) / temperature` and, with `statistics`,
    the entropy, top-1 hit, mean logit and log-sum of squared probabilities of each token, from the same chunks.

    `hidden` [..., H] are already aligned with `targets` [...]. `same_gradient_per_token`: the caller's loss
    gives every token the same upstream gradient (SFT's mean loss), so the forward computes the gradients while
    it has the logits and the backward only scales them; otherwise the backward recomputes each chunk (it also
    falls back to that when the gradients turn out not to be uniform).
    """
    valid, *outputs = _valid_rows_logps(
        hidden, weight, targets, chunk_size, bias, statistics, False, temperature, same_gradient_per_token
    )

    def per_token(values: torch.Tensor) -> torch.Tensor:
        # `masked_scatter` keeps the result connected to the model even when nothing is scored.
        return values.new_zeros(valid.shape).masked_scatter(valid, values).view(targets.shape)

    log_probs = per_token(outputs[0])
    if not statistics:
        return TokenScores(log_probs)
    correct, entropy, mean_logits, log_sum_sq = outputs[1:]
    return TokenScores(
        log_probs, per_token(entropy), per_token(correct), per_token(mean_logits), per_token(log_sum_sq)
    )
