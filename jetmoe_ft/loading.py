"""Tokenizer and model for a recipe: the embedded tiny default, a local directory, or a hub id.

Long (over 400 lines) because every way a model gets loaded — a recipe's start, a trained directory, an
adapter on its base, a head — goes through the same strict checks (config before weights, missing or unexpected
tensors refused), and they are kept beside the loaders that rely on them.
"""

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from peft import PeftConfig, PeftModel
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .adapters.adapt import check_adapter_choices
from .adapters.lora import register_expert_lora
from .adapters.quantization import QUANT_TYPES, quantize_model_4bit
from .adapters.selection import experts_per_router
from .assets import EMBEDDED_TOKENIZER, TINY_MODEL, build_tiny_model, load_tokenizer, tiny_config
from .config import Recipe, RecipeError
from .distributed import declare_zero3_leaf_modules
from .modeling import JetMoeConfig, JetMoeForCausalLM, JetMoePreTrainedModel

TINY_NAMES = (TINY_MODEL, "tiny")
EMBEDDED_TOKENIZER_NAMES = (EMBEDDED_TOKENIZER, "embedded")


def model_path(recipe: Recipe) -> str:
    """The recipe's `model_name_or_path`, with a clear error when it is missing."""
    path = recipe.model.model_name_or_path
    if not path:
        raise RecipeError(
            f"model_name_or_path: missing; use `{TINY_MODEL}` for the embedded tiny model or a path."
        )
    if path not in TINY_NAMES and not Path(path).expanduser().exists() and _looks_local(path):
        raise RecipeError(f"model_name_or_path: no such directory {path}.")
    return path


def _looks_local(path: str) -> bool:
    """Whether a name that is not on disk was meant as a directory (not a hub id `org/name`): a path-like start,
    more than one `/`, or no hub to ask (`HF_HUB_OFFLINE`)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return offline or path.startswith((".", "/", "~")) or path.count("/") != 1


def load_recipe_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer a recipe names (`tokenizer_name_or_path`, else the model's own; embedded for tiny)."""
    name = recipe.jetmoe.tokenizer_name_or_path or model_path(recipe)
    return load_tokenizer_named(name, recipe.model.model_revision)


def load_tokenizer_named(
    name: str, revision: str | None = None, field: str = "tokenizer_name_or_path"
) -> PreTrainedTokenizerBase:
    """A tokenizer by name: the embedded one for `jetmoe-ft/tiny` / `jetmoe-ft/embedded`, else a directory or
    hub id; a failure is one line naming `field`."""
    if name in EMBEDDED_TOKENIZER_NAMES or name in TINY_NAMES:
        return load_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"{field}: cannot load a tokenizer from {name} ({str(error).splitlines()[0][:200]})."
        ) from None


def resolve_pad_token(tokenizer: PreTrainedTokenizerBase, pad_token: str | None = None) -> None:
    """Give the tokenizer a pad token: the recipe's, its own, else eos, else unk.

    The model reads each row's last real token through the attention mask, so any token pads safely;
    `pad_token_id` also goes into the model config (transformers #34055: a pad token on the tokenizer
    alone leaves `config.pad_token_id` unset and batches of several rows fail).
    """
    choice = pad_token or tokenizer.pad_token or tokenizer.eos_token or tokenizer.unk_token
    if choice is None:
        raise RecipeError("The tokenizer has no pad, eos or unk token: set `pad_token:`.")
    if choice not in tokenizer.get_vocab():
        raise RecipeError(f"pad_token: {choice!r} is not in the tokenizer's vocabulary.")
    tokenizer.pad_token = choice


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
    config = read_model_config(recipe, **overrides)
    return strict_from_pretrained(
        cls,
        path,
        config=config,
        allow_partial=recipe.jetmoe.allow_partial_load,
        new_head=True,
        revision=recipe.model.model_revision,
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=attn_implementation,
    )


def read_model_config(recipe: Recipe, **overrides) -> JetMoeConfig:
    """The config of the model a recipe starts from, read without any weights (`config.json`, the tiny config,
    or an adapter's base), with the recipe's JetMoE overrides: checks against it run before anything loads."""
    path = model_path(recipe)
    overrides = {**recipe.jetmoe.model_config_overrides(), **overrides}
    overrides.pop("attn_implementation", None)
    if path in TINY_NAMES:
        return tiny_config(**overrides)
    if is_adapter_dir(path):
        base = register_expert_lora(PeftConfig.from_pretrained(path)).base_model_name_or_path
        if base in TINY_NAMES:
            return tiny_config(**overrides)
        return read_config_file(base, "model_name_or_path", **overrides)
    return read_config_file(path, "model_name_or_path", recipe.model.model_revision, **overrides)


def read_config_file(path: str | Path, field: str, revision: str | None = None, **overrides) -> JetMoeConfig:
    """`JetMoeConfig` of a model directory or hub id; every problem is one line naming `field`."""
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise RecipeError(
            f"{field}: {path} has no config.json (a model directory written by save_pretrained has one); "
            "copy the model's config.json there."
        )
    try:
        config = JetMoeConfig.from_pretrained(str(path), revision=revision, **overrides)
    except OSError as error:
        raise RecipeError(f"{field}: cannot load {path} ({_first_line(error)}).") from None
    except Exception as error:  # a malformed config.json or a value the model cannot mean: strict validation
        raise RecipeError(f"{field}: {path}/config.json: {_first_line(error, last=True)}") from None
    if config.model_type != "jetmoe":
        raise RecipeError(f"{field}: {path} is a {config.model_type} model, not JetMoE.")
    return config


def _first_line(error: BaseException, last: bool = False) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return (lines[-1] if last else lines[0])[:300]


NEW_HEAD_KEYS = ("score.",)
"""Tensors a run may start without: a classification head, new when starting from a language model."""
OTHER_HEAD_KEYS = ("lm_head.", "score.")
"""Tensors a run may leave out: the head of another task (a language model's `lm_head` for a classifier)."""


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_load_report():
    """transformers logs its own load report; strict loading reports problems itself, in one line. (A filter, not
    a level: transformers reads the level of its logger to decide what else to check.)"""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_drop_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_drop_load_report)


def strict_from_pretrained(
    cls,
    path: str | Path,
    allow_partial: bool = False,
    new_head: bool = False,
    field: str = "model_name_or_path",
    **kwargs,
):
    """`cls.from_pretrained(path)` that refuses, in one line, weights that do not fit the model: tensors missing
    (which transformers would initialise at random), unexpected, of another shape, or an unreadable file.

    Allowed: tied weights; with `new_head`, a classification head absent from a language model's checkpoint and
    that model's `lm_head`. `allow_partial` (`allow_partial_load: true`) accepts missing and unexpected tensors
    knowingly (still reported in one line)."""
    try:
        with _quiet_load_report():
            model, info = cls.from_pretrained(
                str(path), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as error:
        raise RecipeError(
            f"{field}: cannot read the weights in {path} ({type(error).__name__}: {_first_line(error)}); "
            "the files are damaged or incomplete: copy or save the model again."
        ) from None
    mismatched = sorted(
        f"{key} {tuple(saved)} vs {tuple(wanted)}" for key, saved, wanted in info["mismatched_keys"]
    )
    if mismatched:
        raise RecipeError(
            f"{field}: {len(mismatched)} tensors in {path} have another shape than its config.json gives "
            f"({_first_few(mismatched)}); config.json and the weights belong to different models."
        )
    missing = sorted(key for key in info["missing_keys"] if not (new_head and key.startswith(NEW_HEAD_KEYS)))
    unexpected = sorted(
        key for key in info["unexpected_keys"] if not (new_head and key.startswith(OTHER_HEAD_KEYS))
    )
    problems = [
        f"{len(keys)} {kind} tensors ({_first_few(keys)})"
        for kind, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    if problems and not allow_partial:
        raise RecipeError(
            f"{field}: the weights in {path} do not match the model: {'; '.join(problems)}. Missing tensors would "
            "start random; use the complete checkpoint, or set `allow_partial_load: true` to accept this knowingly."
        )
    if problems:
        print(f"allow_partial_load: loading {path} with {'; '.join(problems)} (missing ones start random).")
    return model


def _first_few(keys: list[str], count: int = 3) -> str:
    more = f", and {len(keys) - count} more" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more


def check_recipe_model(recipe: Recipe) -> JetMoeConfig:
    """Right after parsing, before data or weights load: the recipe against the model's `config.json` (expert and
    layer indices, `max_length` vs `max_position_embeddings`), its LoRA / expert choices and its quantization.
    Returns the config read."""
    check_quantization(recipe)
    check_adapter_choices(recipe, recipe.uses_lora)
    config = read_model_config(recipe)
    layers, experts = config.num_hidden_layers, config.num_local_experts
    for key in ("lora_experts", "finetune_experts"):
        choice = getattr(recipe.adapters, key)
        if choice not in (None, "all", "auto"):
            experts_per_router(choice, layers, experts, None, key)
    max_length = getattr(recipe.training, "max_length", None) or getattr(recipe.task, "max_length", None)
    if max_length is not None and max_length > config.max_position_embeddings:
        raise RecipeError(
            f"max_length: {max_length} is above the model's max_position_embeddings ({config.max_position_embeddings}"
            f", {model_path(recipe)}); positions past it were never trained: lower `max_length`."
        )
    return config


def check_quantization(recipe: Recipe) -> None:
    """QLoRA needs 4 bits, LoRA and bitsandbytes; said before anything loads."""
    if recipe.model.load_in_8bit:
        raise RecipeError(
            "load_in_8bit: JetMoE is quantized in 4 bits only; use `load_in_4bit: true` (QLoRA)."
        )
    if not recipe.model.load_in_4bit:
        return
    if not recipe.uses_lora:
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
        read_config_file(path, "model")
        _check_head(path, cls)
        return strict_from_pretrained(cls, path, field="model", **config_kwargs)
    config = register_expert_lora(PeftConfig.from_pretrained(str(path)))
    if cls.__name__.endswith("SequenceClassification") and not adapter_has_head(path):
        raise RecipeError(
            f"model: the adapter in {path} has no classification head (`score`); train it with `score` in "
            "`modules_to_save` (jetmoe-ft cls does this) or evaluate a full model directory."
        )
    if cls.__name__.endswith("CausalLM") and adapter_has_head(path):
        raise RecipeError(
            f"model: the adapter in {path} is a classifier's (a `score` head); chat and generation need a model "
            "trained with sft/dpo; evaluate a classifier with `jetmoe-ft eval-cls`."
        )
    base_name = config.base_model_name_or_path
    if base_name in TINY_NAMES:
        model = build_tiny_model(_recipe_seed(path), cls, **config_kwargs)
    elif is_adapter_dir(base_name):  # an adapter trained on a merged adapter (e.g. LoRA DPO on LoRA SFT)
        model = load_trained_model(base_name, cls, merge=True, **config_kwargs)
    else:
        read_config_file(base_name, "base_model_name_or_path (adapter_config.json)")
        model = strict_from_pretrained(
            cls,
            base_name,
            new_head=True,
            field="base_model_name_or_path (adapter_config.json)",
            **config_kwargs,
        )
    model = PeftModel.from_pretrained(model, str(path), config=config)
    return model.merge_and_unload() if merge else model


def _check_head(path: Path, cls) -> None:
    """A classifier needs its trained head in the directory; a language model is not read from a classifier."""
    keys = _weight_keys(path)
    if keys is None:
        return
    has_head = any(key.startswith("score.") for key in keys)
    if cls.__name__.endswith("SequenceClassification") and not has_head:
        raise RecipeError(
            f"model: {path} has no classification head (`score`): it is a language model, and its head would be "
            "random; train a classifier with `jetmoe-ft cls` and evaluate its output directory."
        )
    if cls.__name__.endswith("CausalLM") and has_head:
        raise RecipeError(
            f"model: {path} is a classifier (a `score` head, no language-model head); chat and generation need a "
            "model trained with sft/dpo; evaluate a classifier with `jetmoe-ft eval-cls`."
        )


def _weight_keys(path: Path) -> list[str] | None:
    """Tensor names of a directory's safetensors files (None when it has none to read)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    keys = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys.extend(handle.keys())
        except (SafetensorError, OSError) as error:
            raise RecipeError(
                f"model: cannot read the weights in {file} ({_first_line(error)}); the file is damaged or "
                "incomplete: copy or save the model again."
            ) from None
    return keys


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
