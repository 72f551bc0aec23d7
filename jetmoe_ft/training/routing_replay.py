"""Routing replay: the experts the rollout chose, imposed on the forwards that score it (R3, for MoA and MoE).

`RoutingReplay.impose(model, experts)` sets, on every router of `model`, the experts of a batch recorded at
generation time (`jetmoe_ft.training.rollout_routing`, [B, routers, T, k] in the layout of the forward's input; `UNSET`
positions keep the router's own choice). Each router then sends every token to the imposed experts, with gates
from the softmax of its current logits over them (`JetMoeTopKGating.imposed_experts`), so the router still gets
a gradient. The experts stay imposed until `release()`: a layer that gradient checkpointing recomputes during
backward sees the same experts as its forward did. A forward of another shape while they are imposed is an
error, not a silent mismatch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .rollout_routing import routers_in_output_order

REPLAY_MODES = ("none", "rollout")
"""`routing_replay` values: each forward routes by itself, or by the experts its rollout chose."""


class RoutingReplay:
    """Imposes recorded experts on the routers of one or more models (the policy, a separate reference)."""

    def __init__(self):
        self._routers: dict[int, list[nn.Module]] = {}
        self._imposed: list[nn.Module] = []

    def _routers_of(self, model: nn.Module) -> list[nn.Module]:
        key = id(model)
        if key not in self._routers:
            self._routers[key] = [module for _, _, module in routers_in_output_order(model)]
        return self._routers[key]

    def impose(self, model: nn.Module, experts: torch.Tensor) -> None:
        """Route the next forwards of `model` by `experts` [B, routers, T, k] (B x T = the forward's tokens)."""
        routers = self._routers_of(model)
        if experts.shape[1] != len(routers):
            raise ValueError(
                f"Routing replay: experts for {experts.shape[1]} routers, the model has {len(routers)}."
            )
        self.release()
        batch, _, length, top_k = experts.shape
        device = routers[0].layer.weight.device
        experts = experts.to(device=device, dtype=torch.long)
        for index, router in enumerate(routers):
            router.imposed_experts = experts[:, index].reshape(batch * length, top_k)
            self._imposed.append(router)

    def release(self) -> None:
        """Give every router its own choice back."""
        for router in self._imposed:
            router.imposed_experts = None
        self._imposed.clear()

    @contextmanager
    def imposing(self, model: nn.Module, experts: torch.Tensor | None):
        """`impose` for the block (nothing when `experts` is None), then `release`."""
        if experts is None:
            yield
            return
        self.impose(model, experts)
        try:
            yield
        finally:
            self.release()
