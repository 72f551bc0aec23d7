"""What the policy did while it sampled a completion, and whether its training forwards do the same.

Online RL samples completions with cached decoding, then trains on them with one full forward over prompt +
completion. For an MoE policy the two may pick different experts for the same token (other kernels, batch shapes,
precision, or weights that moved in between), and then the training gradient is not that of the policy that
sampled. While `generate` runs, `RolloutRouting` records from the outputs of every forward of the causal LM (its
own hooks, outside a compiled forward, so compiled decoding records too):

- every router's top-k experts at every position of the training forward's input, prompt + completion
  (`torch.cat([prompt_ids, completion_ids], 1)`, the prompt left-padded to the width `generate` saw): the prefill
  reads the prompt, decode step s reads completion token s - 1; the last generated token is never read, so it
  has no record (`UNSET`);
- each sampled token's log-probability under the sampling distribution (the logits over the temperature, as TRL
  scores tokens; top-p / top-k truncation left out, as TRL's own log-probs leave it out).

In the training forwards it counts, over the completion tokens that are trained on, the (token, router) pairs
whose experts equal the rollout's: `routing/rollout_match` (and `.moa` / `.moe`, per router kind, `KINDS`), 1.0
when they always agree. With routing replay (`jetmoe_ft.training.routing_replay`) the experts used are the rollout's, and
`routing/rollout_free_match` counts the routers' own top-k instead: what the replay overrode, and the choice the
router loss and routing health count. `rollout/logprob_gap` is the mean |log pi_train - log pi_rollout| over
those tokens, and `rollout/logprob_gap.old` the same for the old policy's log-probs when TRL computes them
(`num_iterations > 1`, or more generation steps than accumulation steps): the rollout's own weights, so only
kernels, precision and routing differ.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..compat import in_backward
from ..modeling import JetMoeForCausalLM
from ..modeling.routing import KINDS, LOG_PREFIX, find_routers

UNSET = -1
"""Expert index of a position without a generation-time record."""


def routers_in_output_order(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """Every router of `model` as (layer, kind, module) in the order of the model's `router_logits`: layer by
    layer, MoA then MoE."""
    return sorted(find_routers(model), key=lambda router: (router[0], KINDS.index(router[1])))


class RolloutRouting:
    """Experts of every router and log-prob of every token at generation time, compared in training forwards."""

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        routers = routers_in_output_order(model)
        self.routers = [module for _, _, module in routers]
        self.kind_of_router = torch.tensor([KINDS.index(kind) for _, kind, _ in routers])
        self.causal_lms = [module for module in model.modules() if isinstance(module, JetMoeForCausalLM)]
        self.temperature = temperature
        self.matched = torch.zeros(2, len(KINDS), dtype=torch.float64)  # (used, free) x kind
        self.compared = torch.zeros(len(KINDS), dtype=torch.float64)
        self.gaps = torch.zeros(2, 3, dtype=torch.float64)  # (training, old) x (sum |gap|, tokens, max)
        self._record: dict | None = None
        self._forward: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None

    # -- at generation time ----------------------------------------------------------------------------------

    @contextmanager
    def generation(self):
        """Record while `generate` runs with a cache: one prefill over the prompts, then one token per forward."""
        record = {"experts": [[] for _ in self.routers], "log_probs": [], "last": None}
        self._record = record

        def ask_for_router_logits(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if record["last"] is not None and ids is not None:  # the token sampled from the last forward
                record["log_probs"].append(record["last"].gather(-1, ids[:, -1:].to(record["last"].device)))
            return args, {**kwargs, "output_router_logits": True}

        def keep(module, args, output):
            batch = output.logits.shape[0]
            for calls, router, logits in zip(
                record["experts"], self.routers, output.router_logits, strict=True
            ):
                experts = logits.topk(router.top_k, dim=-1).indices.to(torch.int16)
                calls.append(experts.view(batch, -1, router.top_k))
            record["last"] = torch.log_softmax(output.logits[:, -1].float() / self.temperature, dim=-1)

        handles = []
        for causal_lm in self.causal_lms:
            handles.append(causal_lm.register_forward_pre_hook(ask_for_router_logits, with_kwargs=True))
            handles.append(causal_lm.register_forward_hook(keep))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def take_generation(self, completion_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor] | None:
        """The record of the last `generation()`, for completions `completion_ids` (TRL's, cut after eos):
        `rollout_experts` [B, routers, prompt width + C, k] int16 and `rollout_log_probs` [B, C] float32, C the
        number of generated tokens. None when the record is not one prefill and one forward per token over these
        rows. Forgets the record."""
        record, self._record = self._record, None
        if not record or not record["experts"][0]:
            return None
        prefill, *steps = record["experts"][0]
        width = len(steps) + 1
        if prefill.shape[0] != len(completion_ids) or any(step.shape[1] != 1 for step in steps):
            return None
        if max((len(ids) for ids in completion_ids), default=0) > width:
            return None
        experts = torch.stack([torch.cat(calls, dim=1) for calls in record["experts"]], dim=1)
        experts = torch.cat([experts, experts.new_full((*experts.shape[:2], 1, experts.shape[-1]), UNSET)], 2)
        last = torch.tensor([ids[width - 1] if len(ids) == width else pad_id for ids in completion_ids])
        log_probs = [*record["log_probs"], record["last"].gather(-1, last[:, None].to(record["last"].device))]
        return {
            "rollout_experts": experts,
            "rollout_log_probs": torch.cat(log_probs, dim=1),
            "rollout_prompt_width": prefill.shape[1],
        }

    # -- in training forwards --------------------------------------------------------------------------------

    @contextmanager
    def training_forward(self):
        """Record the experts used and the routers' own top-k in the forwards that train inside the block
        (training mode, gradients on; not a forward replayed by gradient checkpointing)."""
        self._forward = [None] * len(self.routers)

        def hook(index):
            def keep(module, args, decision):
                if module.training and torch.is_grad_enabled() and not in_backward():
                    free = decision.logits.topk(module.top_k, dim=-1).indices
                    self._forward[index] = (decision.experts, free)

            return keep

        handles = [router.register_forward_hook(hook(index)) for index, router in enumerate(self.routers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def compare(self, inputs: dict) -> None:
        """Count the trained completion tokens whose experts in the training forward (recorded by
        `training_forward` over `prompt_ids` + `completion_ids` of `inputs`) equal the rollout's
        (`rollout_experts` of `inputs`)."""
        forward, self._forward = self._forward, None
        rollout = inputs.get("rollout_experts")
        if rollout is None or not forward or any(choices is None for choices in forward):
            return
        batch, prompt_width = inputs["prompt_ids"].shape
        completion = slice(prompt_width, prompt_width + inputs["completion_ids"].shape[1])
        rollout = rollout[:, :, completion].long().sort(-1).values
        valid = (rollout[..., 0] != UNSET) & _trained(inputs)[:, None, :].to(rollout.device)
        for which in range(2):  # the experts used, the routers' own top-k
            training = torch.stack(
                [choices[which].view(batch, -1, rollout.shape[-1]) for choices in forward], 1
            )
            training = training[:, :, completion].sort(-1).values.to(rollout.device)
            equal = (training == rollout).all(-1) & valid
            for kind in range(len(KINDS)):
                routers = (self.kind_of_router == kind).to(rollout.device)
                self.matched[which, kind] += equal[:, routers].sum().double().cpu()
                if which == 0:
                    self.compared[kind] += valid[:, routers].sum().double().cpu()

    def compare_log_probs(self, inputs: dict, training: torch.Tensor) -> None:
        """Add the gaps between the rollout's token log-probs and the training forward's (`training` [B, C]) and,
        when `inputs` has them, the old policy's."""
        rollout = inputs.get("rollout_log_probs")
        if rollout is None:
            return
        trained = _trained(inputs)
        rollout = rollout[:, : trained.shape[1]].to(training.device)
        for row, scored in enumerate((training, inputs.get("old_per_token_logps"))):
            if scored is None:
                continue
            gap = (scored.detach().float() - rollout).abs()[trained.to(training.device)].double().cpu()
            if gap.numel():
                self.gaps[row, 0] += gap.sum()
                self.gaps[row, 1] += gap.numel()
                self.gaps[row, 2] = torch.maximum(self.gaps[row, 2], gap.max())

    def take_log_values(self, gather=None, replayed: bool = False) -> dict[str, float]:
        """The match and gap values since the last call. `gather(tensor)` stacks a tensor of every process (counts
        are summed, the largest gaps maxed); with `replayed`, the routers' own top-k are reported too."""
        sums = torch.cat([self.matched.reshape(-1), self.compared, self.gaps[:, :2].reshape(-1)])
        largest = self.gaps[:, 2].clone()
        self.matched.zero_()
        self.compared.zero_()
        self.gaps.zero_()
        if gather is not None:
            sums, largest = gather(sums).sum(0), gather(largest).amax(0)
        kinds = len(KINDS)
        matched, compared, gaps = sums.double().cpu().split([2 * kinds, kinds, 4])
        matched, gaps, largest = matched.view(2, kinds), gaps.view(2, 2), largest.double().cpu()
        values: dict[str, float] = {}
        names = [f"{LOG_PREFIX}rollout_match"] + ([f"{LOG_PREFIX}rollout_free_match"] if replayed else [])
        for which, name in enumerate(names):
            if compared.sum() > 0:
                values[name] = float(matched[which].sum() / compared.sum())
            for kind, kind_name in enumerate(KINDS):
                if compared[kind] > 0:
                    values[f"{name}.{kind_name}"] = float(matched[which, kind] / compared[kind])
        for row, suffix in enumerate(("", ".old")):
            if gaps[row, 1] > 0:
                values[f"rollout/logprob_gap{suffix}"] = float(gaps[row, 0] / gaps[row, 1])
                values[f"rollout/logprob_gap_max{suffix}"] = float(largest[row])
        return values


def _trained(inputs: dict) -> torch.Tensor:
    """[B, C] bool: the completion tokens the loss reads (`completion_mask`, times `tool_mask` when present)."""
    mask = inputs["completion_mask"].bool()
    return mask & inputs["tool_mask"].bool() if "tool_mask" in inputs else mask
