"""Does the policy route a completion the same way when it generates it and when it trains on it?

Online RL samples completions with cached decoding, then trains on them with one full forward over prompt +
completion. For an MoE policy the two may pick different experts for the same token (other kernels, batch shapes,
precision, or weights that moved in between), and then the training gradient is not that of the policy that
sampled. `RolloutRouting` records each router's top-k experts for every completion token while `generate` runs
(the forward that reads the token, with the cache), records them again in the training forward, and counts the
(token, router) pairs whose top-k sets are equal: `routing/rollout_match` (all routers) and
`routing/rollout_match.moa` / `.moe` (per router kind, `jetmoe_ft.modeling.routing.KINDS`), 1.0 when they always agree.

The last completion token is never read by a generation forward, so it is not compared.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..compat import in_backward
from ..modeling import JetMoeModel
from ..modeling.routing import KINDS, LOG_PREFIX, find_routers

UNSET = -1
"""Expert index of a completion position without a generation-time record."""


class RolloutRouting:
    """Top-k expert choices of every router of `model` at generation time and in training forwards."""

    def __init__(self, model: nn.Module):
        routers = find_routers(model)
        self.routers = [module for _, _, module in routers]
        self.kind_of_router = torch.tensor([KINDS.index(kind) for _, kind, _ in routers])
        self.backbones = [module for module in model.modules() if isinstance(module, JetMoeModel)]
        self.matched = torch.zeros(len(KINDS), dtype=torch.float64)
        self.compared = torch.zeros(len(KINDS), dtype=torch.float64)
        self._steps: list[list[torch.Tensor]] | None = None
        self._forward: list[torch.Tensor | None] | None = None
        self._shape: tuple[int, int] | None = None

    # -- recording -------------------------------------------------------------------------------------------

    @contextmanager
    def _hooks(self, on_choices, wanted):
        """Call `on_choices(router_index, topk [B, T, k])` for every router call of a forward `wanted()` accepts."""
        handles = []

        def remember_shape(module, args, kwargs):
            tokens = (
                kwargs.get("input_ids")
                if kwargs.get("input_ids") is not None
                else kwargs.get("inputs_embeds")
            )
            if tokens is None and args:
                tokens = args[0]
            self._shape = tuple(tokens.shape[:2]) if tokens is not None and wanted(module) else None

        def router_hook(index):
            def hook(module, args, decision):
                if self._shape is None or in_backward():
                    return
                choices = decision.logits.topk(module.top_k, dim=-1).indices.sort(-1).values
                on_choices(index, choices.reshape(*self._shape, module.top_k))

            return hook

        for backbone in self.backbones:
            handles.append(backbone.register_forward_pre_hook(remember_shape, with_kwargs=True))
        for index, router in enumerate(self.routers):
            handles.append(router.register_forward_hook(router_hook(index)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._shape = None

    @contextmanager
    def generation(self):
        """Record while `generate` runs with a cache: the first forward reads the prompt, forward s (s >= 1) reads
        completion token s - 1."""
        self._steps = [[] for _ in self.routers]
        with self._hooks(
            lambda index, choices: self._steps[index].append(choices[:, -1]), lambda module: True
        ):
            yield

    def take_generation(self, width: int) -> torch.Tensor | None:
        """[B, routers, width, k] generation-time choices of completion tokens 0 .. width - 1 (`UNSET` where no
        forward read the token); None when nothing was recorded. Forgets the record."""
        steps, self._steps = self._steps, None
        if not steps or len(steps[0]) < 2:
            return None
        per_router = torch.stack([torch.stack(calls[1 : width + 1], dim=1) for calls in steps], dim=1)
        batch, routers, length, k = per_router.shape
        choices = torch.full((batch, routers, width, k), UNSET, dtype=torch.int16)
        choices[:, :, :length] = per_router.to(torch.int16).cpu()
        return choices

    @contextmanager
    def training_forward(self):
        """Record the choices of the forwards that train (training mode, gradients on) inside the block."""
        self._forward = [None] * len(self.routers)

        def wanted(module):
            return module.training and torch.is_grad_enabled()

        def keep(index, choices):
            self._forward[index] = choices

        with self._hooks(keep, wanted):
            yield

    # -- comparing -------------------------------------------------------------------------------------------

    def compare(self, rollout: torch.Tensor | None, prompt_width: int, completion_mask: torch.Tensor) -> None:
        """Count the completion tokens whose training-forward top-k (recorded by `training_forward`, input =
        prompt [B, prompt_width] + completion) equals the generation-time one (`rollout`, from
        `take_generation`)."""
        forward, self._forward = self._forward, None
        if rollout is None or not forward or any(choices is None for choices in forward):
            return
        width = rollout.shape[2]
        training = torch.stack([c[:, prompt_width : prompt_width + width] for c in forward], dim=1).cpu()
        rollout = rollout.to(training.dtype).cpu()
        valid = (rollout[..., 0] != UNSET) & completion_mask[:, None, :width].bool().cpu()
        equal = (training == rollout).all(-1) & valid
        for kind in range(len(KINDS)):
            routers = self.kind_of_router == kind
            self.matched[kind] += equal[:, routers].sum().double()
            self.compared[kind] += valid[:, routers].sum().double()

    def take_log_values(self, reduce=None) -> dict[str, float]:
        """`routing/rollout_match` (and per kind) since the last call; `reduce` sums a tensor over processes."""
        counts = torch.cat([self.matched, self.compared])
        self.matched.zero_()
        self.compared.zero_()
        if reduce is not None:
            counts = reduce(counts)
        matched, compared = counts.double().cpu().split(len(KINDS))
        if compared.sum() == 0:
            return {}
        values = {f"{LOG_PREFIX}rollout_match": float(matched.sum() / compared.sum())}
        for kind, name in enumerate(KINDS):
            if compared[kind] > 0:
                values[f"{LOG_PREFIX}rollout_match.{name}"] = float(matched[kind] / compared[kind])
        return values
