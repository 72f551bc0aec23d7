"""Our expert-LoRA adapter in stock PEFT's format (`--peft_adapter`): the experts through `target_parameters`, and the
base stock PEFT loads it on (`--base`: a real directory, checked tensor for tensor, or the hub id the run started from).

PEFT's `ParamWrapper` (peft 0.21.2, `peft/tuners/lora/layer.py`) reads a 3-D parameter without `is_transposed` as
`[E, out, in]`, JetMoE's layout, with `lora_A = Linear(in, r·E)` and `lora_B = Linear(r·E, out)`; its
`get_delta_weight` reshapes A to `(E, r, in)` (expert slowest) and B to `(out, r, E)` (expert fastest). Ours are
`A [E, r, in]`, `B [E, out, r]`, so A' = A.reshape(E·r, in) and B' = B.permute(1, 2, 0).reshape(out, r·E). A plain
`B.reshape(out, E·r)` is the expert-major packing that scrambles experts silently (unsloth #6930); check 4 runs the
result on transformers' model and catches it. Dense targets (`kv_proj`) and `modules_to_save` are stock already.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..adapters.lora import MOA_EXPERTS, MOE_EXPERTS
from ..config import RecipeError
from ..loading import TINY_NAMES, is_adapter_dir
from .sources import Source

EXPERT_SUFFIXES = MOA_EXPERTS + MOE_EXPERTS
PACKING = {
    "lora_A": "[E*r, in]: rows e*r .. e*r+r-1 are expert e's A_e (ours [E, r, in] reshaped)",
    "lora_B": "[out, r*E]: column k*E + e is rank k of expert e's B_e (ours [E, out, r] permuted to [out, r, E])",
    "peft": "peft 0.21.2 ParamWrapper, target_parameters, [E, out, in] experts (not is_transposed)",
}


def pack_factor(key: str, value: torch.Tensor) -> torch.Tensor:
    """One of our expert factors in PEFT's packing (other tensors unchanged)."""
    if value.ndim != 3:
        return value
    experts, rows, cols = value.shape
    if ".lora_A." in key:  # [E, r, in] -> [E*r, in]
        return value.reshape(experts * rows, cols).contiguous()
    if ".lora_B." in key:  # [E, out, r] -> [out, r, E] -> [out, r*E]
        return value.permute(1, 2, 0).reshape(rows, cols * experts).contiguous()
    return value


def stock_adapter_config(config: dict, base: str) -> dict:
    """`adapter_config.json` for stock PEFT: expert modules become `target_parameters`; dropout 0 (PEFT's
    `ParamWrapper` has none; dropout is a training-time choice and changes no weight)."""
    modules = list(config.get("target_modules") or [])
    experts = sorted(m for m in modules if m.endswith(EXPERT_SUFFIXES))
    dense = sorted(m for m in modules if m not in experts)
    return {
        **config,
        "base_model_name_or_path": base,
        "target_modules": dense or None,
        "target_parameters": [f"{name}.weight" for name in experts] or None,
        "lora_dropout": 0.0,
        "inference_mode": True,
    }


def write_stock_adapter(adapter_dir: Path, folder: Path, base: str) -> dict:
    """Write our adapter in `adapter_dir` as a stock PEFT adapter into `folder`, its factors in the dtype they were
    trained in (PEFT keeps fp32 adapters in fp32 on a bf16 base); returns the packing record."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    packed = {key: pack_factor(key, value) for key, value in tensors.items()}
    save_file(packed, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(
        json.dumps(stock_adapter_config(config, base), indent=2) + "\n"
    )
    experts = sum(1 for key, value in tensors.items() if value.ndim == 3) // 2
    return {**PACKING, "expert_projections": experts}


def resolve_base(source: Source, base: str | None) -> dict[str, Any]:
    """Where stock PEFT finds the adapter's base: a real directory or hub id, or one line naming `--base`."""
    if not source.is_adapter:
        raise RecipeError(
            f"--peft_adapter: {source.path} is a full model, not an adapter; export it without the flag."
        )
    if source.kind == "qlora":
        raise RecipeError(
            "--peft_adapter: a QLoRA adapter was trained on dequantized 4-bit experts, which no stock base holds "
            "(transformers' bitsandbytes path leaves JetMoE's experts unquantized); use the merged export."
        )
    name = base or source.base
    if base is None and name in TINY_NAMES:
        raise RecipeError(
            f"--base: the adapter's base {name} is built by jetmoe-ft, not a directory or hub id PEFT can load; "
            "pass --base DIR, a saved copy of that base (e.g. `build_tiny_model(seed).save_pretrained(DIR)`)."
        )
    if base is None and is_adapter_dir(name):
        raise RecipeError(
            f"--base: the adapter's base is the adapter {name}, which stock PEFT cannot stack; export that run first "
            f"(`jetmoe-ft export --model {name} --output DIR`) and pass --base DIR."
        )
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise RecipeError(
                f"--base: {name} holds no model (config.json); give the base model's directory."
            )
        return {"name": str(local.absolute()), "local": True}
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise RecipeError(f"--base: no such directory {name}.")
    if name != source.base:
        raise RecipeError(
            f"--base: the hub id {name} is not the base the run started from ({source.base}); the export can only "
            "vouch for that one: pass it, or a local copy as a directory."
        )
    return {"name": name, "local": False}


def verify_base(peft_base: dict[str, Any], base_state: dict[str, torch.Tensor], source: Source) -> None:
    """A `--base` directory must hold the run's base, tensor for tensor (in the directory's dtype). A classifier's
    base may be a language model: its `lm_head` is not the classifier's, and the `score` head the adapter saves."""
    if not peft_base["local"]:
        return
    head = source.task == "sequence_classification"
    folder, seen = Path(peft_base["name"]), set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if head and key.startswith("lm_head."):
                    continue
                tensor = handle.get_tensor(key)
                expected = base_state.get(key)
                if expected is None and key == "lm_head.weight":
                    expected = base_state.get("model.embed_tokens.weight")
                if expected is None or not torch.equal(tensor, expected.to(tensor.dtype)):
                    raise RecipeError(
                        f"--base: {folder} is not the model the adapter was trained on ({key} differs); pass the "
                        "run's base."
                    )
                seen.add(key)
    missing = sorted(key for key in set(base_state) - seen if not (head and key.startswith("score.")))
    if missing:
        raise RecipeError(f"--base: {folder} lacks {len(missing)} tensors of the run's base ({missing[0]}).")
    peft_base["tensors_equal_to_run_base"] = len(seen)
