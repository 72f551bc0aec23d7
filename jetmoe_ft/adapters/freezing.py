"""Router and expert freezing: which MoA / MoE router weights and which expert slices may change."""

import torch
from torch import nn

from ..modeling.modeling_jetmoe import JetMoeMoA, JetMoeMoE, JetMoeParallelExperts, JetMoeTopKGating

ROUTER_BLOCKS = {"all": (JetMoeMoA, JetMoeMoE), "moa": (JetMoeMoA,), "moe": (JetMoeMoE,), "none": ()}


def frozen_router_names(model: nn.Module, which: str) -> list[str]:
    """Module names of the routers (`...router.layer`) that `freeze_router: which` keeps frozen."""
    blocks = ROUTER_BLOCKS[which]
    return [
        f"{name}.router.layer"
        for name, module in model.named_modules()
        if isinstance(module, blocks) and isinstance(module.router, JetMoeTopKGating)
    ]


def freeze_routers(model: nn.Module, which: str) -> list[str]:
    """Stop gradients to the routers `which` names (all, moa, moe, none); returns their module names."""
    names = frozen_router_names(model, which)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].weight.requires_grad_(False)
    return names


def restrict_expert_updates(experts: JetMoeParallelExperts, trained: list[int]) -> None:
    """Only the `trained` experts' slices of `experts.weight` get gradients; the others keep their values.

    A gradient hook zeroes the other slices, so Adam's moments stay zero and those slices never move
    (weight decay would still move them: the caller refuses `weight_decay > 0`).
    """
    mask = torch.zeros(experts.num_experts, 1, 1, dtype=experts.weight.dtype, device=experts.weight.device)
    mask[trained] = 1
    experts.weight.register_hook(lambda grad: grad * mask.to(grad.dtype))
    experts.trained_experts = sorted(trained)
