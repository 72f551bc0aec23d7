"""What a run trains: expert-aware LoRA (PEFT), experts chosen from the data, frozen routers.

`adapt_model(recipe, model, ...)` is the one step between loading a model and building a trainer. It
returns a `PeftModel` when the recipe asks for LoRA (`lora_targets:` or `use_peft: true`), else the
model itself with the recipe's freezing applied, and prints what is trained, by parameter group.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from ..config import Recipe, RecipeError
from ..distributed import is_main_process
from ..modeling.modeling_jetmoe import JetMoeParallelExperts
from ..modeling.routing import KINDS, router_of
from .freezing import freeze_routers, frozen_router_names, restrict_expert_updates
from .lora import TARGET_SUFFIXES, WHOLE_MODULES, ExpertLoraLayer, register_expert_lora
from .selection import ExpertSelection, experts_per_router, sample_texts, select_experts

DEFAULT_LORA_TARGETS = ("moa_experts", "moe_experts", "kv_proj")
ROUTER_LOSS_WHEN_FROZEN = (
    "Frozen routers ({which}): the router loss no longer trains them; it still reaches the trainable "
    "layers below each router through the hidden states. Set `aux_loss_coef: 0` to leave it out."
)


def adapt_model(
    recipe: Recipe,
    model: nn.Module,
    train_dataset: Dataset | None = None,
    tokenizer=None,
    task_type: str = "CAUSAL_LM",
) -> nn.Module:
    """Apply the recipe's LoRA / expert / router choices to `model`; returns the model to train."""
    adapters, training = recipe.adapters, recipe.training
    use_lora = recipe.uses_lora
    check_adapter_choices(recipe, use_lora)
    frozen = "none" if "router" in (adapters.lora_targets or ()) else adapters.frozen_routers(use_lora)

    selection = None
    if "auto" in (adapters.lora_experts, adapters.finetune_experts):
        if train_dataset is None or tokenizer is None:
            raise RecipeError(
                "lora_experts / finetune_experts `auto` needs the training data to score experts."
            )
        texts = sample_texts(train_dataset, tokenizer, adapters.expert_selection_samples, seed=training.seed)
        max_length = getattr(training, "max_length", None) or 512
        selection = select_experts(
            model, texts, tokenizer, adapters.expert_score, adapters.expert_top_p, max_length
        )
        if is_main_process():
            selection.save(training.output_dir)
        print(_selection_summary(selection))

    num_layers, num_experts = model.config.num_hidden_layers, model.config.num_local_experts
    if getattr(model, "is_loaded_in_4bit", False):
        # QLoRA: 16-bit leftovers (norms, routers, head) in fp32 for stable updates, input grads for checkpointing
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training.gradient_checkpointing
        )
    if use_lora:
        experts = experts_per_router(
            adapters.lora_experts, num_layers, num_experts, selection, "lora_experts"
        )
        model = apply_expert_lora(model, recipe, experts, task_type, frozen)
    else:
        if adapters.finetune_experts is not None:
            experts = experts_per_router(
                adapters.finetune_experts, num_layers, num_experts, selection, "finetune_experts"
            )
            for router, module in _expert_modules(model):
                restrict_expert_updates(module, experts[router])
        freeze_routers(model, frozen)

    if frozen != "none":
        print(ROUTER_LOSS_WHEN_FROZEN.format(which=frozen))
    print(trainable_parameter_table(model))
    return model


def check_adapter_choices(recipe: Recipe, use_lora: bool) -> None:
    """Contradictions between fields, caught before any model work."""
    adapters = recipe.adapters
    if use_lora and adapters.finetune_experts is not None:
        raise RecipeError(
            "finetune_experts: full fine-tuning of chosen experts cannot be combined with LoRA."
        )
    if not use_lora and adapters.lora_experts not in ("all", None):
        raise RecipeError(
            "lora_experts: set `lora_targets:` (e.g. [moe_experts]) to train LoRA on chosen experts."
        )
    if adapters.finetune_experts is not None and recipe.training.weight_decay > 0:
        raise RecipeError(
            "finetune_experts: set `weight_decay: 0`; decoupled weight decay would move the experts kept frozen."
        )
    if "router" in (adapters.lora_targets or []) and adapters.freeze_router not in (None, "none"):
        raise RecipeError(
            f"lora_targets: `router` contradicts `freeze_router: {adapters.freeze_router}` (frozen routers get no "
            "adapters); drop one."
        )


def lora_config_for(
    model: nn.Module, recipe: Recipe, experts: dict, task_type: str, frozen: str = "all"
) -> LoraConfig:
    """The PEFT `LoraConfig` of a recipe: TRL's LoRA fields, targets resolved to module names; routers that
    are neither frozen nor adapted train whole (`modules_to_save`)."""
    model_args, adapters = recipe.model, recipe.adapters
    names = list(adapters.lora_targets or ())
    raw_targets = model_args.lora_target_modules or []
    raw_targets = [raw_targets] if isinstance(raw_targets, str) else list(raw_targets)  # TRL unpacks one name
    if "all-linear" in raw_targets:
        raise RecipeError(
            "lora_target_modules: `all-linear` reaches only kv_proj and the routers of JetMoE, not its experts; "
            "use `lora_targets: [moa_experts, moe_experts, kv_proj]`."
        )
    if not names and not raw_targets:
        names = list(DEFAULT_LORA_TARGETS)
    if "router" in names:
        print("lora_targets: `router` adapts the routers; routing can drift from what the experts learned.")
    targets = sorted(name for name in _module_names(model) if _is_target(name, names, experts)) + list(
        model_args.lora_target_modules or []
    )
    modules_to_save = [WHOLE_MODULES[name] for name in names if name in WHOLE_MODULES]
    modules_to_save += list(model_args.lora_modules_to_save or [])
    if "router" not in names:
        frozen_names = set(frozen_router_names(model, frozen))
        modules_to_save += [name for name in frozen_router_names(model, "all") if name not in frozen_names]
    if task_type == "SEQ_CLS" and "score" not in modules_to_save:
        modules_to_save.append("score")  # a classification head is new: train it whole and save it
    _check_raw_targets(model, raw_targets)
    if not targets:
        raise RecipeError("lora_targets / lora_experts: no module left to adapt; choose at least one expert.")
    # TRL's LoRA fields, also when `lora_targets` alone turned LoRA on
    kwargs = {
        "r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_dropout": model_args.lora_dropout,
        "use_rslora": model_args.use_rslora,
        "use_dora": model_args.use_dora,
    }
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    config = LoraConfig(
        task_type=task_type,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        # a trained tied head stays tied to the input embeddings (one copy, saved once)
        ensure_weight_tying=tied and bool({"lm_head", "embed_tokens"} & set(modules_to_save)),
        **kwargs,
    )
    return register_expert_lora(config)


def apply_expert_lora(
    model: nn.Module, recipe: Recipe, experts: dict, task_type: str, frozen: str = "all"
) -> PeftModel:
    """Wrap `model` with expert-aware LoRA; each expert layer adapts only its router's chosen experts."""
    config = lora_config_for(model, recipe, experts, task_type, frozen)
    peft_model = get_peft_model(model, config)
    for name, layer in peft_model.named_modules():
        if isinstance(layer, ExpertLoraLayer):
            router = router_of(name)
            chosen = experts[router]
            layer.set_trained_experts(chosen if len(chosen) < layer.num_experts else None)
    return peft_model


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


def _is_target(name: str, target_names: list[str], experts: dict) -> bool:
    for target in target_names:
        for suffix in TARGET_SUFFIXES.get(target, ()):
            if name.endswith("." + suffix) and re.search(r"(?:^|\.)layers\.\d+\.", name):
                if target in ("moa_experts", "moe_experts"):
                    return bool(experts[router_of(name)])
                return True
    return False


def _check_raw_targets(model: nn.Module, raw_targets: list[str]) -> None:
    """`lora_target_modules` names that match no module fail with the recipe names to use instead."""
    names = _module_names(model)
    for target in raw_targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise RecipeError(
                f"lora_target_modules: no module named `{target}` in JetMoE; use `lora_targets:` with "
                f"{', '.join(list(TARGET_SUFFIXES) + list(WHOLE_MODULES))}."
            )


def _expert_modules(model: nn.Module) -> list[tuple[tuple[int, str], JetMoeParallelExperts]]:
    """Every expert projection with its router (layer, kind); two per router."""
    return [
        (router_of(name), module)
        for name, module in model.named_modules()
        if isinstance(module, JetMoeParallelExperts) and router_of(name) is not None
    ]


GROUPS = ("MoA experts", "MoE experts", "kv_proj", "routers", "heads", "other")


def parameter_group(name: str) -> str:
    """Which table row a parameter (base or adapter) belongs to, from its name."""
    if ".router." in name:
        return "routers"
    if "self_attention.experts." in name:
        return "MoA experts"
    if re.search(r"\.mlp\.(input|output)_linear", name):
        return "MoE experts"
    if "kv_proj" in name:
        return "kv_proj"
    if any(head in name for head in ("lm_head", "score", "embed_tokens")):
        return "heads"
    return "other"


def trainable_parameter_table(model: nn.Module) -> str:
    """Trainable / total parameters by group; masked experts (subset LoRA, `finetune_experts`) not counted."""
    trainable, total = defaultdict(int), defaultdict(int)
    fractions = _trained_fractions(model)
    for name, module in model.named_modules():
        if hasattr(module, "weight_4bit"):  # 4-bit experts hold their weights in a buffer, two per byte
            total[parameter_group(name + ".weight")] += 2 * module.weight_4bit.numel()
    for name, parameter in model.named_parameters():
        group = parameter_group(name)
        total[group] += parameter.numel() * (2 if parameter.dtype == torch.uint8 else 1)
        if parameter.requires_grad:
            trainable[group] += round(parameter.numel() * fractions.get(name, 1.0))
    lines = [f"{'group':<12} {'trainable':>14} {'total':>14} {'share':>8}"]
    for group in GROUPS:
        if total[group]:
            share = trainable[group] / total[group]
            lines.append(f"{group:<12} {trainable[group]:>14,} {total[group]:>14,} {share:>8.2%}")
    all_trainable, all_total = sum(trainable.values()), sum(total.values())
    lines.append(f"{'all':<12} {all_trainable:>14,} {all_total:>14,} {all_trainable / all_total:>8.2%}")
    return "Trainable parameters:\n" + "\n".join(lines)


def _trained_fractions(model: nn.Module) -> dict[str, float]:
    """Share of each expert-shaped parameter that actually trains."""
    fractions = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertLoraLayer):
            for adapter in module.lora_A:
                share = len(module.trained_experts(adapter)) / module.num_experts
                for factor in ("lora_A", "lora_B"):
                    fractions[f"{module_name}.{factor}.{adapter}.weight"] = share
        elif isinstance(module, JetMoeParallelExperts) and hasattr(module, "trained_experts"):
            fractions[f"{module_name}.weight"] = len(module.trained_experts) / module.num_experts
    return fractions


def _selection_summary(selection: ExpertSelection) -> str:
    counts = {
        kind: [len(selection.experts[(layer, kind)]) for layer in range(selection.shares.shape[0])]
        for kind in KINDS
    }
    return (
        f"Experts picked from {selection.tokens:,} tokens ({selection.score} score, top_p {selection.top_p}): "
        + "; ".join(f"{kind.upper()} per layer {counts[kind]}" for kind in KINDS)
    )
