"""Routing drift: how differently two JetMoE models (a fine-tune and its start) route the same tokens.

Per layer and router kind (MoA, MoE), from both models' router logits on identical tokens:

- `topk_kept`: share of tokens whose top-k expert *set* is the same in both;
- `kl`: mean over tokens of KL(start || tuned) between the two full softmax distributions over experts;
- `load_change`: each expert's share of the top-k selections, tuned minus start.

`eval-gen` measures it on the prompts plus the baseline's answers; `RoutingDriftProbe` measures it during
training on a fixed probe batch against the model the run started from (see its docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..modeling.routing import KINDS, LOG_PREFIX, find_routers

RouterKey = tuple[int, str]


@torch.no_grad()
def collect_router_logits(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[RouterKey, torch.Tensor]:
    """`{(layer, kind): [tokens, E] float32 logits on the CPU}` of every router over `batches` (each with
    `input_ids` and optionally `attention_mask`; padding tokens are left out). The model runs in eval mode
    without gradients, so training hooks (router loss, routing health) see nothing; its mode is restored."""
    routers = find_routers(model)
    captured: dict[RouterKey, list[torch.Tensor]] = {(layer, kind): [] for layer, kind, _ in routers}
    current: dict[RouterKey, torch.Tensor] = {}

    def hook_for(key: RouterKey):
        def hook(module, args, decision):
            current[key] = decision.logits.detach().reshape(-1, decision.logits.shape[-1]).float()

        return hook

    handles = [router.register_forward_hook(hook_for((layer, kind))) for layer, kind, router in routers]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            model(
                input_ids=input_ids, attention_mask=None if mask is None else mask.to(device), use_cache=False
            )
            keep = None if mask is None else mask.reshape(-1).bool()
            for key, logits in current.items():
                captured[key].append((logits if keep is None else logits[keep.to(logits.device)]).cpu())
            current.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: torch.cat(parts) for key, parts in captured.items()}


@dataclass
class RoutingDrift:
    """Drift per layer and kind: `topk_kept` and `kl` [L, 2], expert loads `load_start`, `load_tuned` [L, 2, E]."""

    topk_kept: np.ndarray
    kl: np.ndarray
    load_start: np.ndarray
    load_tuned: np.ndarray
    tokens: int

    @property
    def load_change(self) -> np.ndarray:
        return self.load_tuned - self.load_start

    def log_values(self) -> dict[str, float]:
        """`routing/layer{i}.{moa,moe}.topk_kept` and `.kl`, for a trainer log."""
        values = {}
        for layer in range(self.topk_kept.shape[0]):
            for k, kind in enumerate(KINDS):
                values[f"{LOG_PREFIX}layer{layer}.{kind}.topk_kept"] = float(self.topk_kept[layer, k])
                values[f"{LOG_PREFIX}layer{layer}.{kind}.kl"] = float(self.kl[layer, k])
        return values

    def summary(self) -> dict[str, float]:
        """Means over layers per kind: `{moa,moe}_topk_kept`, `{moa,moe}_kl`, `{moa,moe}_load_change_max`."""
        values = {}
        for k, kind in enumerate(KINDS):
            values[f"{kind}_topk_kept"] = float(self.topk_kept[:, k].mean())
            values[f"{kind}_kl"] = float(self.kl[:, k].mean())
            values[f"{kind}_load_change_max"] = float(np.abs(self.load_change[:, k]).max())
        return values

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: `d["layers"][i]["moe"]["load_change"]` per expert."""
        layers = [
            {
                kind: {
                    "topk_kept": float(self.topk_kept[layer, k]),
                    "kl": float(self.kl[layer, k]),
                    "load_start": self.load_start[layer, k].tolist(),
                    "load_tuned": self.load_tuned[layer, k].tolist(),
                    "load_change": self.load_change[layer, k].tolist(),
                }
                for k, kind in enumerate(KINDS)
            }
            for layer in range(self.topk_kept.shape[0])
        ]
        return {"tokens": self.tokens, "summary": self.summary(), "layers": layers}


def _load(top: torch.Tensor, num_experts: int) -> np.ndarray:
    counts = torch.bincount(top.reshape(-1), minlength=num_experts).double()
    return (counts / counts.sum().clamp(min=1)).numpy()


def routing_drift(
    start: dict[RouterKey, torch.Tensor], tuned: dict[RouterKey, torch.Tensor], top_k: int
) -> RoutingDrift:
    """Drift between router logits of the start model and the tuned one on the same tokens."""
    if start.keys() != tuned.keys():
        raise ValueError("The two models have different routers.")
    num_layers = max(layer for layer, _ in start) + 1
    num_experts = next(iter(start.values())).shape[-1]
    kept, kl = np.zeros((num_layers, len(KINDS))), np.zeros((num_layers, len(KINDS)))
    load_start = np.zeros((num_layers, len(KINDS), num_experts))
    load_tuned = np.zeros_like(load_start)
    tokens = 0
    for (layer, kind), before in start.items():
        after = tuned[(layer, kind)]
        if before.shape != after.shape:
            raise ValueError(
                f"Router logits of layer {layer} {kind} cover different tokens: {before.shape} vs {after.shape}."
            )
        k = KINDS.index(kind)
        top_before = before.topk(top_k, dim=-1).indices.sort(-1).values
        top_after = after.topk(top_k, dim=-1).indices.sort(-1).values
        kept[layer, k] = (top_before == top_after).all(-1).double().mean().item()
        log_p, log_q = torch.log_softmax(before.double(), -1), torch.log_softmax(after.double(), -1)
        kl[layer, k] = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0).mean().item()
        load_start[layer, k] = _load(top_before, num_experts)
        load_tuned[layer, k] = _load(top_after, num_experts)
        tokens = before.shape[0]
    return RoutingDrift(kept, kl, load_start, load_tuned, tokens)


def plot_drift(drift: RoutingDrift, path: str | Path, title: str | None = None) -> Path:
    """Heat-map of each expert's load change (tuned - start, percentage points), MoA and MoE panels,
    layers x experts; each row is labelled with its top-k kept share and KL."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no global backend

    change = 100 * drift.load_change
    num_layers, _, num_experts = change.shape
    vmax = max(float(np.abs(change).max()), 0.5)
    size = (min(4.0 + 1.6 * num_experts, 28.0), min(2.4 + 0.8 * num_layers, 18.0))
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, 2)
    for k, (ax, name) in enumerate(zip(axes, ("MoA (attention experts)", "MoE (MLP experts)"), strict=True)):
        image = ax.imshow(change[:, k], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        if change[:, k].size <= 512:
            for (row, col), value in np.ndenumerate(change[:, k]):
                colour = "white" if abs(value) > 0.6 * vmax else "black"
                ax.text(col, row, f"{value:+.1f}", ha="center", va="center", fontsize=7, color=colour)
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(
            range(num_layers),
            [
                f"layer {i}\nkept {drift.topk_kept[i, k]:.2f}, KL {drift.kl[i, k]:.3f}"
                for i in range(num_layers)
            ],
            fontsize=8,
        )
    fig.colorbar(image, ax=list(axes), label="load change (points of top-k share)")
    fig.suptitle(title or f"Routing drift on {drift.tokens:,} tokens (red: more load after tuning)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def pad_token_ids(token_ids: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask` for token id lists."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def probe_token_ids(dataset, count: int = 8, max_length: int = 128) -> list[list[int]]:
    """Token ids of the first `count` rows of a tokenized training set (`input_ids`, or a preference row's
    `prompt_input_ids` + `chosen_input_ids`), each cut to `max_length`: a fixed probe batch."""
    columns = set(dataset.column_names)
    rows = [dataset[i] for i in range(min(count, len(dataset)))]
    if "input_ids" in columns:
        ids = [row["input_ids"] for row in rows]
    elif {"prompt_input_ids", "chosen_input_ids"} <= columns:
        ids = [row["prompt_input_ids"] + row["chosen_input_ids"] for row in rows]
    else:
        raise ValueError(f"No token ids to probe with: the data has {', '.join(sorted(columns))}.")
    ids = [list(row)[:max_length] for row in ids if len(row)]
    if not ids:
        raise ValueError("No token ids to probe with: the first rows are empty.")
    return ids


def _start_model(model: nn.Module):
    """The start model's pass: a PEFT model with its adapters disabled, else the model as it is."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


class RoutingDriftProbe:
    """Routing drift against the start model on a fixed probe batch, cheap enough for every logging step.

    Built with the model the run starts from: it runs the probe once and keeps the start's router logits (for
    a PEFT model with its adapters disabled, i.e. the frozen base). `values(model)` runs the probe through the
    current model (one forward, eval mode, no gradients) and returns `routing/layer{i}.{moa,moe}.topk_kept`
    and `.kl`. Under FSDP / ZeRO-3 the forward gathers weights: call it on every rank.
    """

    def __init__(self, model: nn.Module, token_ids: list[list[int]], pad_id: int = 0):
        self.batch = pad_token_ids(token_ids, pad_id)
        self.top_k = find_routers(model)[0][2].top_k
        with _start_model(model):
            self.start = collect_router_logits(model, [self.batch])

    def drift(self, model: nn.Module) -> RoutingDrift:
        return routing_drift(self.start, collect_router_logits(model, [self.batch]), self.top_k)

    def values(self, model: nn.Module) -> dict[str, float]:
        return self.drift(model).log_values()


__all__ = [
    "RoutingDrift",
    "RoutingDriftProbe",
    "collect_router_logits",
    "pad_token_ids",
    "plot_drift",
    "probe_token_ids",
    "routing_drift",
]
