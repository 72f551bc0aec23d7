"""Router statistics: which experts each MoA / MoE router picks, and how sure it is.

`RoutingStats` sums, per router (layer x {moa, moe}), the top-k selections per expert, the full-softmax
probability mass per expert, the router entropy and the tokens seen. `attach_routing_hooks` fills it from
forward hooks on every `JetMoeTopKGating`, so any forward pass (training, evaluation, a pass over a data
set to select experts ESFT-style) can be measured; `plot_expert_load` draws a [L, 2, E] load as a heat-map.
The training callback that logs these values is `jetmoe_ft.training.routing_health`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..compat import in_backward
from .modeling_jetmoe import JetMoeTopKGating

KINDS = ("moa", "moe")
"""Router kinds, in the order of the second axis of every `[L, 2, ...]` tensor."""
LOG_PREFIX = "routing/"

_ROUTER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attention|mlp)\.")
_KIND_OF_BLOCK = {"self_attention": "moa", "mlp": "moe"}


class RoutingStats:
    """Running sums of router decisions for `num_layers` layers of `num_experts` experts each."""

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.reset()

    @classmethod
    def for_model(cls, model: nn.Module) -> RoutingStats:
        """Empty statistics shaped for the routers of `model`."""
        routers = find_routers(model)
        num_experts = _common_num_experts(routers)
        return cls(max(layer for layer, _, _ in routers) + 1, num_experts)

    def reset(self) -> None:
        """Forget everything seen so far (keeps the device)."""
        device = getattr(self, "selections", torch.empty(0)).device
        shape = (self.num_layers, len(KINDS))
        self.selections = torch.zeros(*shape, self.num_experts, dtype=torch.float64, device=device)
        self.prob_sum = torch.zeros(*shape, self.num_experts, dtype=torch.float64, device=device)
        self.entropy_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(shape, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(
        self,
        layer: int,
        kind: str,
        logits: torch.Tensor,
        top_k: int,
        token_mask: torch.Tensor | None = None,
    ) -> None:
        """Add one router call: `logits` [N, E]; `token_mask` (N elements, 1 = real token) drops padding."""
        logits = logits.detach().reshape(-1, logits.shape[-1]).float()
        if logits.shape[-1] != self.num_experts:
            raise ValueError(f"logits have {logits.shape[-1]} experts, the statistics {self.num_experts}.")
        self._to(logits.device)
        weight = _token_weight(logits, token_mask)
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs).nan_to_num().sum(-1)  # 0 * log 0 = 0 for -inf logits
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        index = (layer, KINDS.index(kind))
        self.selections[index].scatter_add_(0, chosen, weight.repeat_interleave(top_k))
        self.prob_sum[index] += weight @ probs.double()
        self.entropy_sum[index] += weight @ entropy.double()
        self.tokens[index] += weight.sum()

    def expert_load(self) -> torch.Tensor:
        """[L, 2, E] share of each router's top-k selections per expert; rows sum to 1 (0 when no tokens)."""
        total = self.selections.sum(-1, keepdim=True)
        return (self.selections / total.clamp(min=1)).float().cpu()

    def mean_gate(self) -> torch.Tensor:
        """[L, 2, E] mean full-softmax probability of each expert over the tokens seen."""
        return (self.prob_sum / self.tokens[..., None].clamp(min=1)).float().cpu()

    def entropy(self, normalized: bool = True) -> torch.Tensor:
        """[L, 2] mean entropy of each router's full softmax over the E experts.

        Normalised by log(E) (default): 1 = uniform over all experts, 0 = all mass on one expert.
        With `normalized=False`, in nats.
        """
        mean = self.entropy_sum / self.tokens.clamp(min=1)
        if normalized:
            mean = mean / math.log(self.num_experts) if self.num_experts > 1 else torch.zeros_like(mean)
        return mean.float().cpu()

    def add_(self, other: RoutingStats) -> RoutingStats:
        """Add the sums of `other` (same shape) into these."""
        self._to(other.selections.device)
        for mine, theirs in zip(self._tensors(), other._tensors(), strict=True):
            mine += theirs
        return self

    def all_reduce_(self) -> RoutingStats:
        """Sum over all processes; a collective, so every rank must call it. No-op without a process group."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        tensors = self._tensors()
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        reduced = flat.to(_collective_device(flat))
        dist.all_reduce(reduced)
        for tensor, part in zip(tensors, reduced.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(part.view_as(tensor))
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: `d["layers"][i]["moa"]["load"]` is the expert load of layer i's MoA router."""
        load, gate, entropy = self.expert_load(), self.mean_gate(), self.entropy()
        selections, tokens = self.selections.cpu(), self.tokens.cpu()
        layers = [
            {
                kind: {
                    "tokens": int(tokens[layer, k]),
                    "selections": [int(v) for v in selections[layer, k].tolist()],
                    "load": load[layer, k].tolist(),
                    "mean_gate": gate[layer, k].tolist(),
                    "entropy": float(entropy[layer, k]),
                }
                for k, kind in enumerate(KINDS)
            }
            for layer in range(self.num_layers)
        ]
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "layers": layers}

    def log_values(self, per_expert: bool = True) -> dict[str, float]:
        """Flat scalars for a trainer log: `routing/layer{i}.{kind}.entropy`, `.load_max`, `.load_min`,
        and with `per_expert` one `.load.e{j}` per expert."""
        load, entropy = self.expert_load(), self.entropy()
        values = {}
        for layer in range(self.num_layers):
            for k, kind in enumerate(KINDS):
                name = f"{LOG_PREFIX}layer{layer}.{kind}"
                values[f"{name}.entropy"] = float(entropy[layer, k])
                values[f"{name}.load_max"] = float(load[layer, k].max())
                values[f"{name}.load_min"] = float(load[layer, k].min())
                if per_expert:
                    for expert, share in enumerate(load[layer, k].tolist()):
                        values[f"{name}.load.e{expert}"] = share
        return values

    def _tensors(self) -> list[torch.Tensor]:
        return [self.selections, self.prob_sum, self.entropy_sum, self.tokens]

    def _to(self, device: torch.device) -> None:
        # The sums live where the logits are, so updating never waits for the device. MPS has no float64.
        device = torch.device("cpu") if device.type == "mps" else device
        if self.selections.device != device:
            self.selections, self.prob_sum, self.entropy_sum, self.tokens = (
                tensor.to(device) for tensor in self._tensors()
            )


def _token_weight(logits: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """[N] float64 weight of each token: 1, or the mask (0 = padding)."""
    if token_mask is None:
        return torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device)
    if token_mask.numel() != logits.shape[0]:
        raise ValueError(f"token_mask has {token_mask.numel()} elements for {logits.shape[0]} tokens.")
    return token_mask.reshape(-1).to(device=logits.device, dtype=torch.float64)


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """Where `all_reduce` can take this tensor: NCCL-like backends need accelerator memory."""
    if tensor.device.type == "cpu" and "gloo" not in dist.get_backend():
        return torch.accelerator.current_accelerator()
    return tensor.device


def router_of(name: str) -> tuple[int, str] | None:
    """(layer, "moa" | "moe") of a module inside a MoA or MoE block, from its name; None outside them."""
    match = _ROUTER_NAME.search(name)
    return (int(match.group(1)), _KIND_OF_BLOCK[match.group(2)]) if match else None


def find_routers(model: nn.Module) -> list[tuple[int, str, JetMoeTopKGating]]:
    """Every `JetMoeTopKGating` in `model` as (layer, "moa" | "moe", module), at any nesting (PEFT too)."""
    routers = []
    for name, module in model.named_modules():
        if isinstance(module, JetMoeTopKGating):
            router = router_of(name)
            if router is None:
                raise ValueError(
                    f"Cannot tell the layer of router {name!r}: expected `layers.<i>.mlp|self_attention.`"
                )
            routers.append((*router, module))
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no JetMoeTopKGating router: use a jetmoe_ft JetMoE model."
        )
    return routers


def _common_num_experts(routers: list[tuple[int, str, JetMoeTopKGating]]) -> int:
    counts = {module.num_experts for _, _, module in routers}
    if len(counts) != 1:
        raise ValueError(f"Routers disagree on the number of experts: {sorted(counts)}.")
    return counts.pop()


def _mask_for(attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """The [B, T] padding mask entries of the N router tokens, or None (count every token)."""
    if attention_mask is None or attention_mask.ndim != 2:
        return None
    batch = attention_mask.shape[0]
    if attention_mask.numel() == num_tokens:
        return attention_mask
    # With a cache the mask also covers past tokens; the router sees only the new ones.
    if num_tokens % batch == 0 and num_tokens // batch < attention_mask.shape[1]:
        return attention_mask[:, -(num_tokens // batch) :]
    return None


@dataclass
class RoutingHooks:
    """The hooks that feed `stats`; `remove()` them (or use as a context manager) when done."""

    stats: RoutingStats
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    attention_mask: torch.Tensor | None = None
    with_gradients: bool | None = None
    """Whether the model's current forward started with gradients on (inside a reentrant checkpointed layer
    they are off even in a training forward); None outside a forward of the model."""

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.attention_mask = None

    def __enter__(self) -> RoutingHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_routing_hooks(model: nn.Module, stats: RoutingStats, training_only: bool = False) -> RoutingHooks:
    """Feed `stats` from every router of `model` on each forward pass.

    The top-level model's `attention_mask` keyword drops padding tokens; without one (packed or
    padding-free batches) every token counts. Forwards replayed by gradient checkpointing during
    backward are skipped, so each token counts once. With `training_only`, only training forwards count:
    routers in training mode in a forward of `model` started with gradients on (not a trainer's evaluation
    passes, nor GRPO's generation or a reference pass, which run without gradients).
    """
    routers = find_routers(model)
    num_layers = max(layer for layer, _, _ in routers) + 1
    if num_layers > stats.num_layers or _common_num_experts(routers) != stats.num_experts:
        raise ValueError(
            f"stats are [{stats.num_layers} layers, {stats.num_experts} experts]: use RoutingStats.for_model(model)."
        )
    hooks = RoutingHooks(stats)

    def remember_mask(module, args, kwargs):
        hooks.attention_mask = kwargs.get("attention_mask")
        hooks.with_gradients = torch.is_grad_enabled()

    def forget_mask(module, args, output):
        hooks.attention_mask = None
        hooks.with_gradients = None

    hooks.handles.append(model.register_forward_pre_hook(remember_mask, with_kwargs=True))
    hooks.handles.append(model.register_forward_hook(forget_mask, always_call=True))
    for layer, kind, router in routers:
        hooks.handles.append(router.register_forward_hook(_router_hook(hooks, layer, kind, training_only)))
    return hooks


def _router_hook(hooks: RoutingHooks, layer: int, kind: str, training_only: bool):
    def hook(module: JetMoeTopKGating, args, decision) -> None:
        with_gradients = torch.is_grad_enabled() if hooks.with_gradients is None else hooks.with_gradients
        if in_backward() or (training_only and not (module.training and with_gradients)):
            return
        logits = decision.logits
        hooks.stats.update(
            layer, kind, logits, module.top_k, _mask_for(hooks.attention_mask, logits.shape[0])
        )

    return hook


def plot_expert_load(
    load: torch.Tensor | np.ndarray,
    path: str | Path,
    title: str | None = None,
    marked: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """Heat-map of a [L, 2, E] expert load (share of tokens): MoA and MoE panels, layers x experts.
    Cells where the boolean [L, 2, E] `marked` is true get a red frame."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no global backend
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter

    load = np.asarray(load.detach().cpu() if isinstance(load, torch.Tensor) else load, dtype=float)
    num_layers, _, num_experts = load.shape
    vmax = max(float(load.max()), 1e-9)
    size = (min(2.0 + 1.1 * num_experts, 24.0), min(1.2 + 0.45 * num_layers, 16.0))
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for k, (ax, name) in enumerate(zip(axes, ("MoA (attention experts)", "MoE (MLP experts)"), strict=True)):
        image = ax.imshow(load[:, k], cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        _annotate(ax, load[:, k], vmax)
        if marked is not None:
            for row, col in np.argwhere(np.asarray(marked)[:, k]):
                ax.add_patch(
                    Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
                )
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_layers))
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="share of tokens (%)", format=PercentFormatter(1.0, decimals=0))
    fig.suptitle(title or f"Expert load (uniform = {1 / num_experts:.1%})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _annotate(ax, shares: np.ndarray, vmax: float) -> None:
    """Write each cell's share in percent, dark on light cells; skipped when cells get too small."""
    if shares.size > 512:
        return
    for (row, col), share in np.ndenumerate(shares):
        colour = "black" if share > 0.6 * vmax else "white"
        ax.text(col, row, f"{100 * share:.0f}", ha="center", va="center", fontsize=7, color=colour)


__all__ = [
    "KINDS",
    "RoutingHooks",
    "RoutingStats",
    "attach_routing_hooks",
    "find_routers",
]
