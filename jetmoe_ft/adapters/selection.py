"""Experts picked from the user's data (ESFT, arXiv 2407.01906), and recipe expert choices per router.

The base model reads a sample of the training data; every MoA and MoE router's experts are scored by
average gate score (mean full-softmax probability) or token-selection ratio (share of top-k picks), and
per router the fewest experts whose cumulative share of the score reaches `top_p` are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from ..config import RecipeError
from ..modeling.routing import KINDS, RoutingStats, attach_routing_hooks, plot_expert_load

Router = tuple[int, str]
"""(layer, "moa" | "moe")."""


@dataclass
class ExpertSelection:
    """Per router (layer, kind) the chosen experts, with the [L, 2, E] score shares they were chosen from."""

    experts: dict[Router, list[int]]
    shares: torch.Tensor
    score: str
    top_p: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: `layers[i][kind]` = {"experts": [...], "shares": [...]}."""
        layers = [
            {
                kind: {
                    "experts": self.experts[(layer, kind)],
                    "shares": [round(v, 6) for v in self.shares[layer, k].tolist()],
                }
                for k, kind in enumerate(KINDS)
            }
            for layer in range(self.shares.shape[0])
        ]
        return {"score": self.score, "top_p": self.top_p, "tokens": self.tokens, "layers": layers}

    def save(self, output_dir: str | Path) -> tuple[Path, Path]:
        """Write `expert_selection.json` and the heat-map `expert_selection.png` (chosen experts framed)."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        json_path = output_dir / "expert_selection.json"
        json_path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        chosen = torch.zeros_like(self.shares, dtype=torch.bool)
        for (layer, kind), experts in self.experts.items():
            chosen[layer, KINDS.index(kind), experts] = True
        title = (
            f"Expert selection: {'average gate score' if self.score == 'gate' else 'token-selection ratio'} "
            f"share, top_p {self.top_p} (chosen experts framed)"
        )
        png_path = plot_expert_load(
            self.shares, output_dir / "expert_selection.png", title=title, marked=chosen
        )
        return json_path, png_path


def keep_top_p(shares: torch.Tensor, top_p: float) -> list[int]:
    """The fewest experts (highest share first) whose shares sum to at least `top_p`, in index order."""
    order = torch.argsort(shares, descending=True, stable=True)
    cumulative = shares[order].cumsum(0)
    count = int((cumulative < top_p - 1e-9).sum()) + 1
    return sorted(order[: min(count, shares.numel())].tolist())


@torch.no_grad()
def select_experts(
    model: nn.Module,
    texts: list[str],
    tokenizer,
    score: str = "gate",
    top_p: float = 0.5,
    max_length: int = 512,
    batch_size: int = 8,
) -> ExpertSelection:
    """Score every router's experts on `texts` with `model` and keep, per router, the top-`top_p` experts."""
    stats = RoutingStats.for_model(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with attach_routing_hooks(model, stats):
        for start in tqdm(range(0, len(texts), batch_size), desc="Scoring experts", leave=False):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    model.train(was_training)
    scores = stats.mean_gate() if score == "gate" else stats.expert_load()
    shares = scores / scores.sum(-1, keepdim=True).clamp(min=1e-12)
    experts = {
        (layer, kind): keep_top_p(shares[layer, k], top_p)
        for layer in range(shares.shape[0])
        for k, kind in enumerate(KINDS)
    }
    return ExpertSelection(experts, shares, score, top_p, int(stats.tokens[0, 0]))


def sample_texts(dataset: Dataset, tokenizer, count: int, seed: int = 0) -> list[str]:
    """Up to `count` rows of a training set as model input text: chats through the chat template,
    preference pairs as prompt + chosen answer, plain `text` / `prompt`+`completion` as they are."""
    if len(dataset) == 0:
        raise RecipeError("lora_experts / finetune_experts `auto`: the training data is empty.")
    rows = dataset.shuffle(seed=seed).select(range(min(count, len(dataset))))
    return [_row_text(row, tokenizer) for row in rows]


def _row_text(row: dict[str, Any], tokenizer) -> str:
    if isinstance(row.get("messages"), list):
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if "chosen" in row:
        prompt, chosen = row.get("prompt") or [], row["chosen"]
        if isinstance(chosen, list):
            return tokenizer.apply_chat_template(list(prompt) + chosen, tokenize=False)
        return f"{prompt or ''}{chosen}"
    if "text" in row:
        return str(row["text"])
    if "prompt" in row:
        return f"{row['prompt']}{row.get('completion', '')}"
    raise RecipeError(
        f"lora_experts / finetune_experts `auto`: cannot read text from columns {sorted(row)}; "
        "expected messages, prompt/chosen, text or prompt/completion."
    )


def experts_per_router(
    choice: Any, num_layers: int, num_experts: int, selection: ExpertSelection | None, field: str
) -> dict[Router, list[int]]:
    """A recipe's expert choice (`all`, `auto`, a list, or a mapping layer -> list) for every router.

    A mapping leaves the layers it does not name without trained experts.
    """
    if choice in (None, "all"):
        return {(layer, kind): list(range(num_experts)) for layer in range(num_layers) for kind in KINDS}
    if choice == "auto":
        assert selection is not None
        return dict(selection.experts)
    per_layer = choice if isinstance(choice, dict) else dict.fromkeys(range(num_layers), choice)
    for layer, experts in per_layer.items():
        if layer >= num_layers:
            raise RecipeError(
                f"{field}: layer {layer} does not exist (the model has layers 0..{num_layers - 1})."
            )
        bad = [e for e in experts if e >= num_experts]
        if bad:
            raise RecipeError(
                f"{field}: expert {bad[0]} does not exist (the model has experts 0..{num_experts - 1})."
            )
    return {
        (layer, kind): sorted(set(per_layer.get(layer, []))) for layer in range(num_layers) for kind in KINDS
    }
