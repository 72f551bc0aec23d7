"""The reference policy of the preference loops (DPO, KTO): the starting model, held as cheaply as it can be.

- LoRA: the same weights with the adapter disabled; no second copy.
- full weights: a frozen copy made once from the loaded model, or none at all with
  `precompute_ref_log_probs: true` (reference log-probabilities computed before training).
A start from an SFT adapter directory is merged into its base on load (`jetmoe_ft.loading`), so the reference is
the SFT model and a new adapter, if any, is stacked on the merged weights.
"""

from __future__ import annotations

import copy

import torch
from peft import PeftModel

from ..compat import precompute_ref_logps
from ..config import Recipe
from ..loading import is_adapter_dir


class StartingModelReference:
    """Mixed into a trainer with a reference policy (DPO, KTO), before `JetMoeTrainerMixin`: under LoRA the
    reference is the base model with the adapter disabled (no copy of a fresh adapter), and reference
    log-probabilities precomputed by TRL come from our LM head."""

    def __init__(self, model, *args, **kwargs):
        trainable = trainable_flags(model)
        super().__init__(model, *args, **kwargs)
        drop_fresh_reference_adapter(self.model, trainable)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its __init__, after adding its fused heads: the reference must see ours.
        self.install_lm_heads()
        return precompute_ref_logps(StartingModelReference, self, dataset, name, batch_size)


def reference_model(recipe: Recipe, model: torch.nn.Module) -> torch.nn.Module | None:
    """A frozen copy of the starting model for full-weight training; None when TRL needs none (LoRA: adapter
    disabled; `precompute_ref_log_probs`). Without it, TRL would reload the reference from the model's load
    path, which an in-memory JetMoE does not have."""
    if recipe.uses_lora or getattr(recipe.training, "precompute_ref_log_probs", False):
        return None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def trainable_flags(model: torch.nn.Module) -> dict[str, bool]:
    """Which parameters train, by name: taken before a TRL trainer wraps the model."""
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


def drop_fresh_reference_adapter(model: torch.nn.Module, trainable: dict[str, bool]) -> None:
    """Drop the `ref` adapter TRL copies from a model handed over already wrapped by PEFT, when it is fresh.

    A fresh adapter (every LoRA B zero, as `adapt_model` makes it; routers and heads trained whole start as the
    base's) leaves the model unchanged, so the base with adapters disabled is exactly the starting policy,
    without a second copy of the adapter and of the modules it trains whole. A trained adapter keeps TRL's copy
    as its reference. PEFT re-marks trainable parameters when it adds an adapter: the choices of `adapt_model`
    (`trainable`, by name) are restored.
    """
    if not isinstance(model, PeftModel) or "ref" not in model.peft_config or not _adapter_is_fresh(model):
        return
    model.delete_adapter("ref")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable.get(name, False))


def _adapter_is_fresh(model: PeftModel, adapter: str = "default") -> bool:
    """Whether the adapter is still the identity: every LoRA B factor zero."""
    factors = [p for name, p in model.named_parameters() if ".lora_B." in name and f".{adapter}." in name]
    return bool(factors) and all(not factor.any() for factor in factors)


def reference_kind(trainer) -> str:
    """How the trainer gets reference log-probabilities, in words."""
    if getattr(trainer, "precompute_ref_logps", False):
        return "precomputed"
    if trainer.ref_model is not None:
        return "frozen copy"
    return "adapter copy" if "ref" in trainer.model.peft_config else "adapter disabled"


def record_stacked_base(model: torch.nn.Module, recipe: Recipe) -> None:
    """A LoRA adapter trained on a merged start adapter names that adapter's directory as its base.

    PEFT would record the start adapter's own base, and loading the new adapter onto it would silently drop the
    start adapter; naming the directory keeps the chain (base, SFT adapter merged, new adapter).
    """
    if isinstance(model, PeftModel) and is_adapter_dir(recipe.model.model_name_or_path):
        model.peft_config["default"].base_model_name_or_path = str(recipe.model.model_name_or_path)
