"""What a run directory holds, read before any weights: a full model, an expert-LoRA adapter, an adapter trained on
another adapter, an adapter over 4-bit experts (QLoRA), a classifier or reward head; and the models the export
compares (the run's own model merged in fp32, the model it started from, QLoRA's 4-bit model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import AutoTokenizer
from trl import ModelConfig

from ..adapters.lora import register_expert_lora
from ..adapters.quantization import JetMoeParallelExperts4bit, quantize_model_4bit
from ..assets import build_tiny_model, tiny_config
from ..config import RecipeError
from ..loading import (
    TINY_NAMES,
    adapter_has_head,
    is_adapter_dir,
    load_trained_model,
    read_config_file,
    strict_from_pretrained,
)
from ..modeling import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification
from ..modeling.modeling_jetmoe import JetMoeParallelExperts
from ..training.model_card import LOOPS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Source:
    """A run directory, as `read_source` found it."""

    path: Path
    kind: str
    """`full`, `adapter`, `stacked_adapter` (an adapter whose base is another adapter) or `qlora`."""
    task: str
    """`causal_lm` or `sequence_classification`."""
    config: JetMoeConfig
    base: str
    """The model the run started from: `model_name_or_path`, or the adapter's `base_model_name_or_path`."""
    recipe: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] | None = None

    @property
    def is_adapter(self) -> bool:
        """An adapter (expert LoRA, stacked or QLoRA), not a full model."""
        return self.adapter_config is not None

    @property
    def model_class(self) -> type:
        return (
            JetMoeForSequenceClassification if self.task == "sequence_classification" else JetMoeForCausalLM
        )

    @property
    def head(self) -> str:
        """`lm`, `classifier` or `reward` (one output)."""
        if self.task != "sequence_classification":
            return "lm"
        return "reward" if self.config.num_labels == 1 else "classifier"

    @property
    def seed(self) -> int:
        """The tiny model's `model_seed` (which random base a tiny run started from)."""
        return int(self.recipe.get("model_seed", 0) or 0)

    @property
    def base_is_tiny(self) -> bool:
        return self.base in TINY_NAMES

    @property
    def hub_base(self) -> str | None:
        """The base as a hub id (the card's `base_model`), or None for a directory or the tiny model."""
        name = self.base
        local = name in TINY_NAMES or Path(name).expanduser().exists() or name.startswith((".", "/", "~"))
        return None if local or name.count("/") != 1 else name

    @property
    def loop(self) -> str:
        """The loop that wrote the run: the tag its model card carries (`jetmoe-ft <loop>`), else by its head."""
        readme = self.path / "README.md"
        if readme.is_file() and (text := readme.read_text()).startswith("---"):
            front = yaml.safe_load(text.split("---")[1]) or {}
            tags = [tag for tag in front.get("tags") or [] if tag in set(LOOPS.values()) | {"rm"}]
            if tags:
                return tags[0]
        return {"reward": "rm", "classifier": "cls"}.get(self.head, "sft")

    @property
    def datasets(self) -> list[str]:
        """The recipe's data sources (the card's `datasets`)."""
        if self.recipe.get("dataset_name"):
            return [str(self.recipe["dataset_name"])]
        return [
            str(entry.get("path")) for entry in self.recipe.get("datasets") or [] if isinstance(entry, dict)
        ]

    def head_kwargs(self) -> dict[str, Any]:
        """What a base gets to carry this run's classification head (nothing for a language model)."""
        if self.task != "sequence_classification":
            return {}
        return {
            "num_labels": self.config.num_labels,
            "id2label": self.config.id2label,
            "label2id": self.config.label2id,
            "pad_token_id": self.config.pad_token_id,
        }


def read_source(model: str | Path) -> Source:
    """The run directory `model` (`--model`): every problem is one line, before any weights load."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise RecipeError(f"--model: no such directory {path}.")
    adapter = is_adapter_dir(path)
    if not adapter and not (path / "config.json").is_file():
        raise RecipeError(
            f"--model: {path} is not a run directory (no config.json or adapter_config.json); give the output_dir "
            "of a jetmoe-ft run."
        )
    recipe_file = next(
        (p / "recipe.yaml" for p in (path, path.parent) if (p / "recipe.yaml").is_file()), None
    )
    if recipe_file is None:
        raise RecipeError(
            f"--model: {path} has no recipe.yaml, so it is not the output of a jetmoe-ft run (the export compares "
            "the run with the model it started from); give a run's output_dir."
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RecipeError(
            f"--model: {path} has no tokenizer (tokenizer.json); save the run's tokenizer there "
            "(`tokenizer.save_pretrained`) and export again."
        )
    recipe = yaml.safe_load(recipe_file.read_text()) or {}
    if adapter:
        adapter_config = json.loads((path / "adapter_config.json").read_text())
        base = adapter_config.get("base_model_name_or_path") or ""
        check_base_exists(base, path)
        task = "sequence_classification" if adapter_config.get("task_type") == "SEQ_CLS" else "causal_lm"
        if task == "sequence_classification" and not adapter_has_head(path):
            raise RecipeError(f"--model: the classifier adapter in {path} has no `score` head saved with it.")
        kind = "qlora" if recipe.get("load_in_4bit") else "adapter"
        if is_adapter_dir(base):
            kind = "stacked_adapter" if kind == "adapter" else kind
        config = _adapter_config(path, base, task)
    else:
        adapter_config = None
        config = read_config_file(path, "--model")
        base = str(recipe.get("model_name_or_path") or "")
        check_base_exists(base, path)
        task = (
            "sequence_classification"
            if any("SequenceClassification" in name for name in config.architectures or [])
            else "causal_lm"
        )
        kind = "full"
    return Source(path, kind, task, config, base, recipe, adapter_config)


def check_base_exists(base: str, path: Path) -> None:
    """The run names the model it started from, and a local one is still there."""
    if not base:
        raise RecipeError(f"--model: {path} does not say which model it started from (model_name_or_path).")
    if base not in TINY_NAMES and not Path(base).expanduser().exists() and Path(base).is_absolute():
        raise RecipeError(
            f"--model: the base {base} of {path} cannot be found; put it back there (the export compares against it)."
        )


def _adapter_config(path: Path, base: str, task: str) -> JetMoeConfig:
    """The model config of an adapter: the `config.json` beside it (a head's), else its base's."""
    if (path / "config.json").is_file():
        return read_config_file(path, "--model")
    if task == "sequence_classification":
        raise RecipeError(f"--model: the classifier adapter in {path} has no config.json giving its classes.")
    if base in TINY_NAMES:
        return tiny_config()
    if is_adapter_dir(base):
        return _adapter_config(
            Path(base),
            json.loads((Path(base) / "adapter_config.json").read_text())["base_model_name_or_path"],
            task,
        )
    return read_config_file(base, f"--model: the base of {path}")


def load_run_tokenizer(source: Source):
    """The run's tokenizer (a pad token set as the loops set it), or one line."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"--model: cannot load the tokenizer in {source.path} ({str(error).splitlines()[0][:200]})."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_run_model(source: Source) -> nn.Module:
    """The run's own model, merged, in fp32, in evaluation mode (QLoRA: merged into the dequantized experts); a
    model with NaN or Inf weights is one line."""
    try:
        if source.kind == "qlora":
            model = merge_adapter(source, dequantized_base(source))
        else:
            model = load_trained_model(source.path, source.model_class, merge=True, **source.head_kwargs())
    except RuntimeError as error:  # PEFT: tensors of the adapter that do not fit the base
        if "size mismatch" in str(error):
            raise RecipeError(
                f"--model: the adapter in {source.path} does not fit its base {source.base} "
                f"({str(error).split('size mismatch for ')[-1].splitlines()[0][:200]}); export it with the base it "
                "was trained on."
            ) from None
        raise
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise RecipeError(
            f"--model: {source.path} holds NaN or Inf weights ({len(bad)} tensors, e.g. {bad[0]}); the run diverged: "
            "export an earlier checkpoint."
        )
    return model.float().eval()


def load_base_model(source: Source, cls: type | None = None) -> nn.Module:
    """The model the run started from, in fp32, in evaluation mode."""
    cls = cls or source.model_class
    kwargs = source.head_kwargs() if cls is JetMoeForSequenceClassification else {}
    if source.base_is_tiny:
        model = build_tiny_model(source.seed, cls, **kwargs)
    elif is_adapter_dir(source.base):
        model = load_trained_model(source.base, cls, merge=True, **kwargs)
    else:
        model = strict_from_pretrained(cls, source.base, new_head=True, field="base", **kwargs)
    return model.float().eval()


def quantization_settings(source: Source) -> dict[str, Any]:
    """The 4-bit settings the QLoRA run trained with (its recipe, else TRL's defaults)."""
    defaults = ModelConfig()
    compute = "bfloat16" if str(source.recipe.get("dtype")) not in ("float16",) else "float16"
    return {
        "quant_type": source.recipe.get("bnb_4bit_quant_type", defaults.bnb_4bit_quant_type),
        "double_quant": bool(source.recipe.get("use_bnb_nested_quant", defaults.use_bnb_nested_quant)),
        "compute_dtype": compute,
    }


def quantized_model(source: Source) -> nn.Module:
    """QLoRA: the 4-bit model with the adapter on it, as the run trained it (for the distance the card reports)."""
    settings = quantization_settings(source)
    dtype = getattr(torch, settings["compute_dtype"])
    base = quantize_model_4bit(
        load_base_model(source).to(dtype),
        quant_type=settings["quant_type"],
        double_quant=settings["double_quant"],
        compute_dtype=dtype,
    )
    config = register_expert_lora(PeftConfig.from_pretrained(str(source.path)))
    return PeftModel.from_pretrained(base, str(source.path), config=config).eval()


def dequantized_base(source: Source) -> nn.Module:
    """QLoRA: the base as the adapter saw it while training: every 4-bit tensor dequantized, the others in the
    compute dtype, all held in fp32."""
    four_bit = quantized_model(source).get_base_model()
    model = load_base_model(source)
    quantized = dict(four_bit.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            other = quantized.get(name)
            if isinstance(other, JetMoeParallelExperts4bit):
                module.weight.copy_(other.dequantize().float())
            elif isinstance(module, nn.Linear) and _is_4bit_linear(other):
                module.weight.copy_(_dequantize_linear(other).float())
        # the rest went through the compute dtype before training (`quantize_model_4bit` casts the model first)
        dtype = getattr(torch, quantization_settings(source)["compute_dtype"])
        for name, parameter in model.named_parameters():
            owner = quantized.get(name.rsplit(".", 1)[0])
            if isinstance(owner, JetMoeParallelExperts | JetMoeParallelExperts4bit) or _is_4bit_linear(owner):
                continue
            parameter.copy_(parameter.to(dtype).float())
    return model


def _is_4bit_linear(module) -> bool:
    return module is not None and hasattr(getattr(module, "weight", None), "quant_state")


def _dequantize_linear(module) -> torch.Tensor:
    import bitsandbytes.functional as functional

    return functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def merge_adapter(source: Source, base: nn.Module) -> nn.Module:
    """`base` with the run's adapter merged into it (PEFT's `merge_and_unload`, our expert LoRA registered)."""
    config = register_expert_lora(PeftConfig.from_pretrained(str(source.path)))
    return PeftModel.from_pretrained(base, str(source.path), config=config).merge_and_unload()
