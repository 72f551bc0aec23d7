"""Expert-aware LoRA: a PEFT custom module for JetMoE's experts, and recipe target names -> PEFT targets.

JetMoE's experts are one `[E, out, in]` parameter per projection (`JetMoeParallelExperts`), not
`nn.Linear`s, so ordinary LoRA targeting cannot reach them and PEFT's `target_parameters` builds the full
delta of every expert on every forward. `ExpertLoraLayer` keeps per-expert factors `A [E, r, in]`,
`B [E, out, r]` and adds `B_e A_e x` inside the expert-sorted dispatch, with the layer's own backend:
each row meets only the factors of the expert it is routed to, and no `[E, out, in]` delta exists
outside `merge`. Training only some experts masks the others' `B` (initialised to zero) in the forward,
so their update stays exactly zero and a saved adapter loads with no extra information.

PEFT does not store custom modules in `adapter_config.json`: `register_expert_lora(config)` must run on
a loaded `LoraConfig` before `PeftModel.from_pretrained` (`jetmoe_ft.loading` does it).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from ..compat import register_custom_lora_module
from ..modeling.experts import Routing, compute_dtype, grouped_mm_supported, resolve_backend
from ..modeling.modeling_jetmoe import JetMoeParallelExperts

MOA_EXPERTS = ("self_attention.experts.input_linear", "self_attention.experts.output_linear")
MOE_EXPERTS = ("mlp.input_linear", "mlp.output_linear")
TARGET_SUFFIXES = {
    "moa_experts": MOA_EXPERTS,
    "moe_experts": MOE_EXPERTS,
    "kv_proj": ("self_attention.kv_proj",),
    "router": ("self_attention.experts.router.layer", "mlp.router.layer"),
}
"""Adapter targets by recipe name, as suffixes of module names inside `model.layers.N.`."""
WHOLE_MODULES = {"lm_head": "lm_head", "embed_tokens": "embed_tokens", "score": "score"}
"""Recipe names trained whole (PEFT `modules_to_save`)."""


class ExpertFactor(nn.Module):
    """One LoRA factor for every expert: `weight` [E, rows, cols]."""

    def __init__(self, num_experts: int, rows: int, cols: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, rows, cols))

    def extra_repr(self) -> str:
        return "experts={}, rows={}, cols={}".format(*self.weight.shape)


class ExpertLoraLayer(nn.Module, LoraLayer):
    """LoRA on `JetMoeParallelExperts`: `y_r = W_e x_r + s · B_e A_e dropout(x_r)` for each row r of expert e."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_expert_mask")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        for option in ("use_dora", "lora_bias", "fan_in_fan_out"):
            if getattr(config, option, False):
                raise ValueError(f"Expert LoRA does not support `{option}`.")
        self.lora_expert_mask: dict[str, torch.Tensor] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        experts = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        self.num_experts = experts.num_experts
        return experts.input_size, experts.output_size

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any
    ) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.lora_bias[adapter_name] = False
        self.use_dora[adapter_name] = False
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout.update(nn.ModuleDict({adapter_name: dropout}))
        self.lora_A[adapter_name] = ExpertFactor(self.num_experts, r, self.in_features)
        self.lora_B[adapter_name] = ExpertFactor(self.num_experts, self.out_features, r)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self.lora_expert_mask[adapter_name] = torch.ones(self.num_experts, 1, 1)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Any) -> None:
        """A: Kaiming-uniform per expert (as PEFT's default) or Gaussian; B: zero, so the adapter starts as a no-op."""
        if init_lora_weights is False:
            return
        weight_a = self.lora_A[adapter_name].weight
        if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(weight_a, std=1 / self.r[adapter_name])
        elif init_lora_weights is True:
            for expert in range(self.num_experts):
                nn.init.kaiming_uniform_(weight_a.data[expert], a=math.sqrt(5))
        else:
            raise ValueError(
                f"Expert LoRA supports init_lora_weights true, false or gaussian, not {init_lora_weights!r}."
            )
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def set_trained_experts(self, experts: list[int] | None, adapter_name: str = "default") -> None:
        """Adapt only `experts` (None: all). The others' B is masked to zero in the forward and in `merge`."""
        mask = torch.zeros(self.num_experts, 1, 1)
        mask[list(range(self.num_experts)) if experts is None else experts] = 1
        self.lora_expert_mask[adapter_name] = mask

    def trained_experts(self, adapter_name: str = "default") -> list[int]:
        """The experts this adapter changes."""
        return self.lora_expert_mask[adapter_name].flatten().nonzero().flatten().tolist()

    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight_a = self.lora_A[adapter].weight
        weight_b = self.lora_B[adapter].weight
        mask = self.lora_expert_mask[adapter]
        if not bool(mask.all()):
            weight_b = weight_b * mask.to(weight_b.device, weight_b.dtype)
        return weight_a, weight_b

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`[E, out, in]` = scaling · B_e @ A_e; only for merging."""
        weight_a, weight_b = self._factors(adapter)
        delta = torch.bmm(weight_b.float(), weight_a.float()) * self.scaling[adapter]
        return delta.to(weight_a.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        base = self.get_base_layer()
        if base.weight.dtype == torch.uint8:
            raise ValueError(
                "Cannot merge into 4-bit experts: load the base model in 16 bits, load the adapter on it, then merge."
            )
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = base.weight.data + self.get_delta_weight(adapter).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                )
            base.weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)

    def forward(self, rows: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("Expert LoRA does not support mixed adapter batches (`adapter_names`).")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(rows, routing)
        result = self.base_layer(rows, routing)
        if self.merged:
            return result
        backend = self.get_base_layer().backend
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            weight_a, weight_b = self._factors(adapter)
            x = self.lora_dropout[adapter](rows).to(weight_a.dtype)
            dtype = compute_dtype(x)
            # scaling on the [M, r] low-rank rows and an in-place add: no extra pass over the [M, out] output
            low_rank = (
                _factor_linear(backend, weight_a, dtype, routing)(x, weight_a, routing)
                * self.scaling[adapter]
            )
            update = _factor_linear(backend, weight_b, dtype, routing)(low_rank, weight_b, routing)
            result = result.add_(update.to(result.dtype))
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _factor_linear(backend: str, factor: torch.Tensor, dtype: torch.dtype, routing: Routing):
    """The layer's backend for a LoRA factor and this call's routing (unsorted rows: the rows backend), or
    the loop where a small rank breaks grouped_mm's alignment."""
    if backend == "grouped_mm" and not grouped_mm_supported(factor, dtype):
        backend = "loop"
    return resolve_backend(backend, factor, dtype, routing)


def register_expert_lora(config: LoraConfig) -> LoraConfig:
    """Let `config` put `ExpertLoraLayer` on every targeted `JetMoeParallelExperts` (PEFT does not save this)."""
    register_custom_lora_module(config, {JetMoeParallelExperts: ExpertLoraLayer})
    return config


def expert_lora_layers(model: nn.Module) -> dict[str, ExpertLoraLayer]:
    """Every expert LoRA layer of `model`, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ExpertLoraLayer)}
