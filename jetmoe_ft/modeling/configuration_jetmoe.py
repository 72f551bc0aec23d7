# Copyright 2026 The jetmoe-ft Authors, JetMoe AI and The HuggingFace Inc. team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""JetMoE configuration: the fields of transformers' `JetMoeConfig`, plus a few of ours."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

MOE_BACKENDS = ("auto", "loop", "grouped_mm")

# --- Field names of the official JetMoE code (myshell-ai/JetMoE `JetMoEConfig`) -------------------------------
OFFICIAL_NAMES = {
    "ffn_hidden_size": "intermediate_size",
    "moe_num_experts": "num_local_experts",
    "moe_top_k": "num_experts_per_tok",
}
"""Official name -> ours, for fields that mean the same. `kv_channels` and `activation_function` share names;
`glu` and `bias` must be true (the only architecture both codes build); `rope_theta` is transformers' BC key."""


def map_official_names(config, kwargs: dict) -> None:
    """Move the official code's field names in `kwargs` onto `config`'s fields, in place; a `ValueError` naming
    the field when a value cannot mean the same here (or disagrees with our own name for it)."""
    defaults = type(config).__dataclass_fields__
    for official, ours in OFFICIAL_NAMES.items():
        if official not in kwargs:
            continue
        value, current = kwargs.pop(official), getattr(config, ours)
        if current != defaults[ours].default and current != value:
            raise ValueError(f"{official}={value} (official name) disagrees with {ours}={current}; keep one.")
        setattr(config, ours, value)
    for flag in ("glu", "bias"):
        if kwargs.pop(flag, True) is not True:
            raise ValueError(
                f"{flag}=false: JetMoE here has GLU experts with biases only (official default true)."
            )
    heads = kwargs.pop("num_attention_heads", None)
    if heads is not None and heads != config.num_key_value_heads * config.num_experts_per_tok:
        raise ValueError(
            f"num_attention_heads={heads} is not num_key_value_heads x top-k experts "
            f"({config.num_key_value_heads} x {config.num_experts_per_tok}); JetMoE derives it, remove it."
        )


# -------------------------------------------------------------------------------------------------------------


@strict
class JetMoeConfig(PreTrainedConfig):
    r"""
    Configuration of a JetMoE model: every block has a Mixture of Attention heads (MoA: routed per-expert
    query/output projections, one shared `kv_proj`) and a Mixture of MLP experts (MoE).

    The fields, names and defaults are those of transformers' `JetMoeConfig`, so a `config.json` written by
    either class loads into the other. Ours adds:

    moe_backend (`str`, defaults to `"auto"`):
        How the expert matmuls run: `"loop"` (one matmul per expert, the reference), `"grouped_mm"`
        (`torch._grouped_mm`, one call for all experts) or `"auto"` (the fastest available).
    expert_row_multiple (`int`, *optional*):
        Pad every expert's group of rows to a multiple of this, so matmul shapes repeat from step to step
        (oneDNN re-plans bf16 matmuls on every new shape). `None` picks 64 for bf16/fp16 on CPU, 1 otherwise.
    router_z_loss_coef (`float`, defaults to 0.1):
        Weight of the router z-loss inside the JetMoE router loss (`switch + router_z_loss_coef * z`).
    router_loss_ignore_padding (`bool`, defaults to `False`):
        Leave padding tokens (attention mask 0) out of the router loss statistics. The original JetMoE
        training counted them.

    Aliases read by other libraries: `num_experts` is `num_local_experts`, `router_aux_loss_coef` is
    `aux_loss_coef` (TRL reads and writes it), `head_dim` is `kv_channels`.
    """

    model_type = "jetmoe"
    attribute_map = {
        "head_dim": "kv_channels",
        "num_experts": "num_local_experts",
        "router_aux_loss_coef": "aux_loss_coef",
    }

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 12
    num_key_value_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 5632
    max_position_embeddings: int = 4096
    activation_function: str = "silu"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    aux_loss_coef: float = 0.01
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.01
    attention_dropout: float | int = 0.0

    moe_backend: str = "auto"
    expert_row_multiple: int | None = None
    router_z_loss_coef: float = 0.1
    router_loss_ignore_padding: bool = False

    def __post_init__(self, **kwargs):
        map_official_names(self, kwargs)  # configs written by the official JetMoE code
        # Every token gets one group of `num_key_value_heads` query heads from each of its k attention experts.
        self.num_attention_heads = self.num_key_value_heads * self.num_experts_per_tok
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: reject settings the model cannot run with."""
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                f"({self.num_local_experts})."
            )
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend={self.moe_backend!r} is not one of {', '.join(MOE_BACKENDS)}.")
        if self.expert_row_multiple is not None and self.expert_row_multiple < 1:
            raise ValueError(f"expert_row_multiple must be >= 1 or null, got {self.expert_row_multiple}.")


__all__ = ["JetMoeConfig", "MOE_BACKENDS"]
