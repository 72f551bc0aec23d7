"""The merged model in transformers' own format: `config.json` written by transformers' `JetMoeConfig`, safetensors
(sharded with an index past `max_shard_size`), tied embeddings only where they are equal, `generation_config.json`
with the tokenizer's bos / eos / pad, the tokenizer and its chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import GenerationConfig

from ..config import RecipeError

LEFT_OUT = {
    "moe_backend": "how the expert matmuls run (loop / grouped_mm): the same numbers up to rounding",
    "expert_row_multiple": "padding of each expert's rows to a multiple: the padded rows are dropped, results equal",
    "router_z_loss_coef": "a training loss weight (jetmoe-ft's router z-loss); nothing at inference",
    "router_loss_ignore_padding": "which tokens jetmoe-ft's router loss counts while training; nothing at inference",
    "quantization": "a marker of a 4-bit training model; the export holds the dequantized merge",
}
"""Fields of our config.json that transformers' `JetMoeConfig` does not have, and why leaving them out changes no
output of the exported model."""


def transformers_config(model: nn.Module) -> tuple[transformers.JetMoeConfig, dict[str, Any]]:
    """transformers' own `JetMoeConfig` with our config's values; returns it and the fields left out."""
    ours = model.config.to_dict()
    known = set(transformers.JetMoeConfig().to_dict()) | set(transformers.PreTrainedConfig().to_dict())
    left_out = {key: ours.pop(key) for key in list(ours) if key not in known}
    unexplained = sorted(set(left_out) - set(LEFT_OUT))
    if unexplained:
        raise RecipeError(
            f"--model: config.json field {unexplained[0]} has no meaning in transformers' JetMoeConfig and the export "
            "cannot show that leaving it out changes nothing; remove it from the run's config.json."
        )
    for key in ("num_attention_heads", "transformers_version", "model_type"):
        ours.pop(key, None)
    ours["architectures"] = [type(model).__name__]
    config = transformers.JetMoeConfig(**ours)
    return config, {key: {"value": value, "why": LEFT_OUT[key]} for key, value in left_out.items()}


def tie_embeddings(model: nn.Module) -> bool:
    """Keep `tie_word_embeddings` only where the head is the embedding (equal values); else save both."""
    if not getattr(model.config, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return False
    embedding = model.get_input_embeddings().weight
    if model.lm_head.weight is embedding or torch.equal(model.lm_head.weight, embedding):
        return True
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return False


def write_model(
    model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype, max_shard_size: str
) -> dict[str, Any]:
    """Write `model` (ours, merged) in `dtype` with its tokenizer into `folder`; returns what export.json records."""
    model = model.to(dtype)
    tied = tie_embeddings(model)
    config, left_out = transformers_config(model)
    config.tie_word_embeddings = tied
    config.dtype = str(dtype).removeprefix("torch.")
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    (folder / "config.json").unlink()
    config.save_pretrained(str(folder))  # transformers' own class writes it: no field of ours
    tokenizer.save_pretrained(str(folder))
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(str(folder))
    shards = sorted(p.name for p in folder.glob("model*.safetensors"))
    return {
        "tied_embeddings": tied,
        "shards": len(shards),
        "index": (folder / "model.safetensors.index.json").is_file(),
        "config_fields_left_out": left_out,
    }
