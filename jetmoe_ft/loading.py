"""Tokenizer and model for a recipe: the embedded tiny default, a local directory, or a hub id."""

import importlib.util
import os
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .assets import EMBEDDED_TOKENIZER, TINY_MODEL, build_tiny_model, load_tokenizer
from .config import Recipe, RecipeError
from .distributed import declare_zero3_leaf_modules
from .lora import register_expert_lora
from .modeling import JetMoeConfig, JetMoeForCausalLM, JetMoePreTrainedModel
from .quantization import QUANT_TYPES, quantize_model_4bit

TINY_NAMES = (TINY_MODEL, "tiny")
EMBEDDED_TOKENIZER_NAMES = (EMBEDDED_TOKENIZER, "embedded")


def model_path(recipe: Recipe) -> str:
    """The recipe's `model_name_or_path`, with a clear error when it is missing."""
    path = recipe.model.model_name_or_path
    if not path:
        raise RecipeError(
            f"model_name_or_path: missing; use `{TINY_MODEL}` for the embedded tiny model or a path."
        )
    if path not in TINY_NAMES and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise RecipeError(f"model_name_or_path: no such directory {path}.")
    return path


def load_recipe_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer a recipe names (`tokenizer_name_or_path`, else the model's own; embedded for tiny)."""
    name = recipe.jetmoe.tokenizer_name_or_path or model_path(recipe)
    if name in EMBEDDED_TOKENIZER_NAMES or name in TINY_NAMES:
        return load_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name, revision=recipe.model.model_revision)
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"tokenizer_name_or_path: cannot load a tokenizer from {name} ({str(error).splitlines()[0][:200]})."
        ) from None


def check_tokenizer(
    tokenizer: PreTrainedTokenizerBase, dataset: Dataset, max_length: int | None, pad_token=None
):
    """Chat template for conversational data, a pad token, and a `max_length` that fits some example."""
    conversational = any(column in dataset.column_names for column in ("messages", "chosen", "prompt")) and (
        isinstance(dataset[0].get("messages", dataset[0].get("chosen", dataset[0].get("prompt"))), list)
    )
    if conversational and not tokenizer.chat_template:
        raise RecipeError(
            "The tokenizer has no chat template but the data is conversational: set `chat_template_path:` "
            "(a Jinja file or a tokenizer directory) or use a tokenizer that has one."
        )
    if tokenizer.pad_token is None and pad_token is None:
        raise RecipeError("The tokenizer has no pad token: set `pad_token:` (e.g. its unk or eos token).")
    if max_length is not None:
        sample = dataset.select(range(min(200, len(dataset))))
        lengths = [len(ids) for ids in _token_ids(tokenizer, sample, conversational)]
        if min(lengths) > max_length:
            raise RecipeError(
                f"max_length: {max_length} is shorter than every example checked (shortest {min(lengths)} tokens, "
                f"median {sorted(lengths)[len(lengths) // 2]}); raise it."
            )


def _token_ids(tokenizer, sample: Dataset, conversational: bool):
    for row in sample:
        if conversational and "messages" in row:
            yield tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        elif conversational:
            messages = (row.get("prompt") or []) + row["chosen"]
            yield tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        else:
            text = row.get("text") or (row.get("prompt", "") + row.get("completion", ""))
            yield tokenizer(text)["input_ids"]


def load_recipe_model(recipe: Recipe, cls: type[JetMoePreTrainedModel] = JetMoeForCausalLM, **config_kwargs):
    """Our JetMoE model for a recipe, with the recipe's JetMoE fields, dtype and attention applied."""
    path = model_path(recipe)
    check_quantization(recipe)
    overrides = {**recipe.jetmoe.model_config_overrides(), **config_kwargs}
    dtype = _torch_dtype(recipe.model.dtype)
    if recipe.model.load_in_4bit:
        dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        model = _load_model(recipe, path, cls, dtype, overrides)
        model = quantize_model_4bit(
            model.to(dtype),
            quant_type=recipe.model.bnb_4bit_quant_type,
            double_quant=recipe.model.use_bnb_nested_quant,
            compute_dtype=dtype,
            device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu",
        )
    else:
        model = _load_model(recipe, path, cls, dtype, overrides)
    declare_zero3_leaf_modules(model)
    return model


def _load_model(recipe: Recipe, path: str, cls, dtype, overrides: dict):
    attn_implementation = recipe.model.attn_implementation
    if attn_implementation:
        overrides["attn_implementation"] = attn_implementation
    if is_adapter_dir(path):
        # An adapter (e.g. the output of a LoRA SFT run) starts the next run merged into its base.
        model = load_trained_model(path, cls, merge=True, **overrides)
        model.name_or_path = path  # an adapter trained on top records this adapter as its base
        return model.to(dtype) if dtype is not None else model
    if path in TINY_NAMES:
        model = build_tiny_model(recipe.jetmoe.model_seed, cls, **overrides)
        return model.to(dtype) if dtype is not None else model
    overrides.pop("attn_implementation", None)
    try:
        config = JetMoeConfig.from_pretrained(path, revision=recipe.model.model_revision, **overrides)
    except OSError as error:
        raise RecipeError(
            f"model_name_or_path: cannot load {path} ({str(error).splitlines()[0][:200]})."
        ) from None
    if config.model_type != "jetmoe":
        raise RecipeError(f"model_name_or_path: {path} is a {config.model_type} model, not JetMoE.")
    return cls.from_pretrained(
        path,
        config=config,
        revision=recipe.model.model_revision,
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=attn_implementation,
    )


def check_quantization(recipe: Recipe) -> None:
    """QLoRA needs 4 bits, LoRA and bitsandbytes; said before anything loads."""
    if recipe.model.load_in_8bit:
        raise RecipeError(
            "load_in_8bit: JetMoE is quantized in 4 bits only; use `load_in_4bit: true` (QLoRA)."
        )
    if not recipe.model.load_in_4bit:
        return
    if not (recipe.adapters.lora_targets or recipe.model.use_peft):
        raise RecipeError(
            "load_in_4bit: 4-bit weights are frozen; train LoRA on them with `lora_targets:` (e.g. [moa_experts, "
            "moe_experts, kv_proj])."
        )
    if recipe.model.bnb_4bit_quant_type not in QUANT_TYPES:
        raise RecipeError(
            f"bnb_4bit_quant_type: expected one of {', '.join(QUANT_TYPES)}, got {recipe.model.bnb_4bit_quant_type!r}."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            "load_in_4bit: bitsandbytes is not installed; `pip install bitsandbytes` (CPU or GPU)."
        )


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    return getattr(torch, name)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a PEFT adapter directory (has `adapter_config.json`)."""
    return Path(path).expanduser().joinpath("adapter_config.json").is_file()


def load_trained_model(
    path: str | Path,
    cls: type[JetMoePreTrainedModel] = JetMoeForCausalLM,
    merge: bool = False,
    **config_kwargs,
):
    """A trained model directory: full weights, or a PEFT adapter on its base (our expert LoRA registered).

    An adapter on `jetmoe-ft/tiny` rebuilds the tiny base from the `model_seed` of the run's `recipe.yaml`.
    With `merge`, the adapter is merged and a plain JetMoE model returned.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise RecipeError(f"model: no such directory {path}.")
    if not is_adapter_dir(path):
        if not (path / "config.json").is_file():
            raise RecipeError(
                f"model: {path} holds neither a model (config.json) nor an adapter (adapter_config.json)."
            )
        return cls.from_pretrained(path, **config_kwargs)
    config = register_expert_lora(PeftConfig.from_pretrained(str(path)))
    if cls.__name__.endswith("SequenceClassification") and not adapter_has_head(path):
        raise RecipeError(
            f"model: the adapter in {path} has no classification head (`score`); train it with `score` in "
            "`modules_to_save` (jetmoe-ft cls does this) or evaluate a full model directory."
        )
    base_name = config.base_model_name_or_path
    if base_name in TINY_NAMES:
        model = build_tiny_model(_recipe_seed(path), cls, **config_kwargs)
    elif is_adapter_dir(base_name):  # an adapter trained on a merged adapter (e.g. LoRA DPO on LoRA SFT)
        model = load_trained_model(base_name, cls, merge=True, **config_kwargs)
    else:
        model = cls.from_pretrained(base_name, **config_kwargs)
    model = PeftModel.from_pretrained(model, str(path), config=config)
    return model.merge_and_unload() if merge else model


def adapter_has_head(path: Path) -> bool:
    """Whether a classification adapter directory saved its head (`score`, PEFT `modules_to_save`)."""
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return False
    with safe_open(str(weights), framework="pt") as handle:
        return any(".score." in f".{key}" for key in handle.keys())


def _recipe_seed(path: Path) -> int:
    """`model_seed` of the run that wrote `path` (its `recipe.yaml`, or its parent's for a checkpoint)."""
    for folder in (path, path.parent):
        recipe = folder / "recipe.yaml"
        if recipe.is_file():
            return int((yaml.safe_load(recipe.read_text()) or {}).get("model_seed", 0))
    return 0
