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
"""JetMoE: Mixture of Attention heads (MoA) and Mixture of MLP experts (MoE) in every block.

Checkpoint-compatible with transformers' JetMoe (same state-dict names, `[E, out, in]` experts), with
sorted expert dispatch (`experts.py`), gradient checkpointing, eager/SDPA/flash-attention through
transformers' attention interface, exact packed sequences, and the original JetMoE router loss.

Long (over 400 lines) because, like transformers' model files, it reads top to bottom in one place: norm,
rotary embedding, experts and routers, MoA and MoE blocks, attention, decoder layer, the models and heads.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_jetmoe import JetMoeConfig
from .experts import (
    Routing,
    compute_dtype,
    default_row_multiple,
    few_rows,
    resolve_backend,
    route_rows,
    rows_to_slots,
    slot_rows,
    sort_by_expert,
    token_rows,
)

logger = logging.get_logger(__name__)


class JetMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class JetMoeRotaryEmbedding(nn.Module):
    def __init__(self, config: JetMoeConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: JetMoeConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """Inverse frequencies of the original RoPE over the `kv_channels` head dimension."""
        base = config.rope_parameters["rope_theta"]
        dim = config.kv_channels
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """RoPE on query and key states of shape [batch, heads, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention that also returns its weights, computed in transformers' head order (slot-major: head
    (slot, h) attends with kv head h), so the weights returned are the very tensor the output comes from and
    `.retain_grad()` on them works. The output goes back to our kv-head-major order."""
    kv_heads, top_k = module.num_key_value_heads, module.top_k
    query = query.unflatten(1, (kv_heads, top_k)).transpose(1, 2).flatten(1, 2)
    key, value = key.repeat(1, top_k, 1, 1), value.repeat(1, top_k, 1, 1)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = (
        torch.matmul(attn_weights, value).unflatten(1, (top_k, kv_heads)).transpose(1, 2).flatten(1, 2)
    )
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class JetMoeParallelExperts(nn.Module):
    """E linear maps without bias, stored as one `[E, out, in]` weight, applied to expert-sorted rows."""

    def __init__(self, num_experts: int, input_size: int, output_size: int, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, output_size, input_size))
        self.num_experts = num_experts
        self.input_size = input_size
        self.output_size = output_size
        self.backend = backend

    def forward(self, rows: torch.Tensor, routing: Routing) -> torch.Tensor:
        expert_linear = resolve_backend(self.backend, self.weight, compute_dtype(rows), routing)
        return expert_linear(rows, self.weight, routing)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in={self.input_size}, out={self.output_size}, backend={self.backend}"


@dataclass
class RouterDecision:
    """What one router decided for N tokens."""

    logits: torch.Tensor  # [N, E] fp32
    gates: torch.Tensor  # [N, k] softmax over the chosen experts' logits, in the activation dtype
    routing: Routing
    experts: torch.Tensor  # [N, k] the experts each token goes to


class JetMoeTopKGating(nn.Module):
    """Top-k router: fp32 logits, top-k on the logits, softmax over the k chosen logits only.

    With the `auto` backend, few (token, slot) pairs stay unsorted (`route_rows`: decoding), many are
    grouped by expert (`sort_by_expert`); any other backend always groups them.

    `imposed_experts` ([N, k] expert indices, -1 = the router's own choice), when set, replaces the top-k for
    the N tokens of the next forwards (routing replay, `jetmoe_ft.training.routing_replay`); the gates are
    still the softmax of the current logits over the imposed experts, so the router keeps its gradient.
    """

    def __init__(
        self,
        input_size: int,
        num_experts: int,
        top_k: int,
        row_multiple: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.num_experts = num_experts
        self.input_size = input_size
        self.top_k = top_k
        self.row_multiple = row_multiple
        self.backend = backend
        self.layer = nn.Linear(input_size, num_experts, bias=False)
        self.imposed_experts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> RouterDecision:
        logits = self.layer(hidden_states).float()
        top_k_logits, top_k_indices = logits.topk(self.top_k, dim=-1)
        if self.imposed_experts is not None:
            top_k_indices = self._impose(top_k_indices)
            top_k_logits = logits.gather(-1, top_k_indices)
        gates = torch.softmax(top_k_logits, dim=-1).type_as(hidden_states)
        num_slots = top_k_indices.numel()
        if self.backend == "auto" and few_rows(num_slots, self.num_experts):
            routing = route_rows(top_k_indices, self.num_experts)
            return RouterDecision(logits, gates, routing, top_k_indices)
        row_multiple = self.row_multiple or default_row_multiple(
            hidden_states.device, compute_dtype(hidden_states), num_slots, self.num_experts
        )
        routing = sort_by_expert(top_k_indices, self.num_experts, row_multiple)
        return RouterDecision(logits, gates, routing, top_k_indices)

    def _impose(self, own: torch.Tensor) -> torch.Tensor:
        """The imposed experts, the router's own top-k where a token has none (-1)."""
        imposed = self.imposed_experts
        if imposed.shape != own.shape:
            raise ValueError(
                f"Routing replay: {tuple(imposed.shape)} imposed experts for a router forward of "
                f"{tuple(own.shape)} (tokens, top-k): the replayed batch is not this forward's."
            )
        imposed = imposed.to(own.device, own.dtype)
        return torch.where(imposed >= 0, imposed, own)


def _combine(rows_out: torch.Tensor, decision: RouterDecision) -> torch.Tensor:
    """Gate-weighted sum of each token's k expert outputs: [M, D] sorted rows -> [N, D]."""
    per_slot = rows_to_slots(rows_out, decision.routing).view(*decision.gates.shape, -1)
    return (per_slot * decision.gates.to(per_slot.dtype).unsqueeze(-1)).sum(1)


class JetMoeMoE(nn.Module):
    """Mixture of MLP experts: GLU experts `act(first half) * second half`, plus a shared output bias."""

    def __init__(self, config: JetMoeConfig):
        super().__init__()
        self.input_size = config.hidden_size
        self.hidden_size = config.intermediate_size
        self.activation = ACT2FN[config.activation_function]
        self.bias = nn.Parameter(torch.empty(self.input_size))
        num_experts, backend = config.num_local_experts, config.moe_backend
        self.input_linear = JetMoeParallelExperts(num_experts, self.input_size, self.hidden_size * 2, backend)
        self.output_linear = JetMoeParallelExperts(num_experts, self.hidden_size, self.input_size, backend)
        self.router = JetMoeTopKGating(
            self.input_size, num_experts, config.num_experts_per_tok, config.expert_row_multiple, backend
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, self.input_size)
        decision = self.router(tokens)
        routing = decision.routing
        gate_up = self.input_linear(token_rows(tokens, routing), routing)
        gate, up = gate_up.chunk(2, dim=-1)
        rows_out = self.output_linear(self.activation(gate) * up, routing)
        output = _combine(rows_out, decision).to(hidden_states.dtype) + self.bias
        return output.view(input_shape), decision.logits


class JetMoeMoA(nn.Module):
    """Mixture of attention experts: per-expert query (`input_linear`) and output (`output_linear`) maps."""

    def __init__(self, config: JetMoeConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.input_size = config.hidden_size
        self.hidden_size = config.kv_channels * config.num_key_value_heads
        self.top_k = config.num_experts_per_tok
        self.bias = nn.Parameter(torch.empty(self.input_size))
        backend = config.moe_backend
        self.input_linear = JetMoeParallelExperts(
            self.num_experts, self.input_size, self.hidden_size, backend
        )
        self.output_linear = JetMoeParallelExperts(
            self.num_experts, self.hidden_size, self.input_size, backend
        )
        self.router = JetMoeTopKGating(
            self.input_size, self.num_experts, self.top_k, config.expert_row_multiple, backend
        )

    def map(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, RouterDecision]:
        """Queries of each token's k experts: [b, t, hidden] -> [b, t, k, kv_heads * kv_channels]."""
        batch, seq_len, _ = hidden_states.shape
        tokens = hidden_states.reshape(-1, self.input_size)
        decision = self.router(tokens)
        routing = decision.routing
        rows_out = self.input_linear(token_rows(tokens, routing), routing)
        queries = rows_to_slots(rows_out, routing).view(batch, seq_len, self.top_k, self.hidden_size)
        return queries, decision

    def reduce(self, attn_output: torch.Tensor, decision: RouterDecision) -> torch.Tensor:
        """Each expert's output projection, gate-weighted: [b, t, k, kv_heads * kv_channels] -> [b, t, hidden]."""
        batch, seq_len = attn_output.shape[:2]
        slots = attn_output.reshape(-1, self.hidden_size)
        rows_out = self.output_linear(slot_rows(slots, decision.routing), decision.routing)
        output = _combine(rows_out, decision).to(attn_output.dtype) + self.bias
        return output.view(batch, seq_len, self.input_size)


class JetMoeAttention(nn.Module):
    """MoA self-attention: k routed query groups per token share one key/value projection (`kv_proj`)."""

    def __init__(self, config: JetMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.top_k = config.num_experts_per_tok
        self.num_key_value_heads = config.num_key_value_heads
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # Query heads are laid out kv-head-major below, so each kv head serves `top_k` consecutive query heads:
        # grouped-query attention, with no tiled copy of the keys and values.
        self.num_key_value_groups = self.top_k
        self.experts = JetMoeMoA(config)
        self.kv_proj = nn.Linear(
            config.hidden_size, 2 * config.kv_channels * config.num_key_value_heads, bias=False
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns the output, the attention weights (eager attention only) and the MoA router logits."""
        batch, seq_len, _ = hidden_states.shape
        kv_heads, top_k, head_dim = self.num_key_value_heads, self.top_k, self.head_dim

        queries, decision = self.experts.map(hidden_states)
        # [b, t, k, kv_heads, d] -> [b, kv_heads * k, t, d]: query head (h, slot) attends with kv head h.
        query_states = queries.view(batch, seq_len, top_k, kv_heads, head_dim).permute(0, 3, 2, 1, 4)
        query_states = query_states.reshape(batch, kv_heads * top_k, seq_len, head_dim)
        key_states, value_states = self.kv_proj(hidden_states).chunk(2, dim=-1)
        key_states = key_states.view(batch, seq_len, kv_heads, head_dim).transpose(1, 2)
        value_states = value_states.view(batch, seq_len, kv_heads, head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        # [b, t, kv_heads * k, d] -> [b, t, k, kv_heads * d], the layout of each attention expert's input.
        attn_output = attn_output.reshape(batch, seq_len, kv_heads, top_k, head_dim).transpose(2, 3)
        attn_output = attn_output.reshape(batch, seq_len, top_k, kv_heads * head_dim)
        return self.experts.reduce(attn_output, decision), attn_weights, decision.logits


class JetMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: JetMoeConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.mlp = JetMoeMoE(config)
        # JetMoE's block norms use the default eps; only the final norm reads `rms_norm_eps`.
        self.input_layernorm = JetMoeRMSNorm(config.hidden_size)
        self.post_attention_layernorm = JetMoeRMSNorm(config.hidden_size)
        self.self_attention = JetMoeAttention(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the new hidden states and the MoA and MoE router logits."""
        residual = hidden_states
        hidden_states, _, attention_router_logits = self.self_attention(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states, mlp_router_logits = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states, attention_router_logits, mlp_router_logits


class JetMoePreTrainedModel(PreTrainedModel):
    config_class = JetMoeConfig
    config: JetMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["JetMoeDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # the auto and grouped_mm dispatch have no host sync under torch.compile
    # Hidden states and attention weights are recorded by forward hooks (transformers' `capture_outputs`).
    # Router logits are returned by the layers instead: the hooks read a ContextVar that dynamo cannot trace
    # inside a separately compiled decoder layer, and training asks for router logits on every step.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(JetMoeDecoderLayer, index=0),
        "attentions": OutputRecorder(JetMoeAttention, index=1),
    }

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, JetMoeParallelExperts):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, JetMoeMoA | JetMoeMoE):
            init.zeros_(module.bias)
        elif isinstance(module, JetMoeRotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            if module.rope_type == "default":
                init.copy_(module.inv_freq, inv_freq)
                init.copy_(module.original_inv_freq, inv_freq)


def position_ids_from_cu_seq_lens(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """[0, 3, 5] -> [[0, 1, 2, 0, 1]]: positions restarting at every packed sequence."""
    cu_seq_lens = cu_seq_lens.long()
    total = int(cu_seq_lens[-1])
    starts = torch.repeat_interleave(cu_seq_lens[:-1], cu_seq_lens.diff(), output_size=total)
    return (torch.arange(total, device=cu_seq_lens.device) - starts).unsqueeze(0)


class JetMoeModel(JetMoePreTrainedModel):
    def __init__(self, config: JetMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [JetMoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = JetMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = JetMoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        """`output_hidden_states` (a flag, or the indices of the hidden states to keep), `output_attentions`
        and `return_dict` are read by `capture_outputs` (config values by default)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        if output_router_logits is None:
            output_router_logits = config.output_router_logits
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # the replayed forward would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=config)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None and kwargs.get("cu_seq_lens_q") is not None:
            position_ids = position_ids_from_cu_seq_lens(kwargs["cu_seq_lens_q"]).to(inputs_embeds.device)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            )
            position_ids = position_ids.unsqueeze(0)

        # An empty cache changes no mask size, but it hides packed sequences (restarting position ids) from
        # the mask builder, letting them attend to each other. Build the mask without it then.
        fresh_cache = isinstance(cache, DynamicCache) and cache.get_seq_length() == 0
        causal_mask = create_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None if fresh_cache and attention_mask is None else cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        router_logits = ()
        for decoder_layer in self.layers:
            hidden_states, attention_router_logits, mlp_router_logits = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                use_cache=use_cache,
                position_ids=position_ids,
                **kwargs,
            )
            router_logits += (attention_router_logits, mlp_router_logits)
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            router_logits=router_logits if output_router_logits else None,
        )


def jetmoe_router_loss(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    z_loss_coef: float = 0.1,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The router loss JetMoE was trained with, summed over routers (myshell-ai/JetMoE `utils/gate.py`).

    Per router with logits [N, E]: `E * sum_e normalize1(sum_tokens softmax(logits))_e *
    normalize1(top-k counts)_e + z_loss_coef * mean_tokens(logsumexp(logits)^2)`. `token_mask` [N] (1 = real
    token) leaves padding out of the statistics; without it every token counts, as in the original.
    """
    total = 0.0
    for logits in router_logits:
        logits = logits.float()
        num_tokens, num_experts = logits.shape
        weight = logits.new_ones(num_tokens) if token_mask is None else token_mask.reshape(-1).to(logits)
        probs = torch.softmax(logits, dim=-1)
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        counts = logits.new_zeros(num_experts).scatter_add_(0, chosen, weight.repeat_interleave(top_k))
        prob_mass = (probs * weight[:, None]).sum(0)
        switch_loss = (
            num_experts * (F.normalize(prob_mass, p=1, dim=0) * F.normalize(counts, p=1, dim=0)).sum()
        )
        z_loss = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / weight.sum().clamp(min=1)
        total = total + switch_loss + z_loss_coef * z_loss
    return total


def router_loss_for(config: JetMoeConfig, router_logits, attention_mask) -> torch.Tensor:
    """The model's router loss for these router logits (padding left out when the config says so)."""
    token_mask = None
    if config.router_loss_ignore_padding and attention_mask is not None and attention_mask.ndim == 2:
        # With a cache, the mask covers past tokens too; the router logits only the new ones.
        new_tokens = router_logits[0].shape[0] // attention_mask.shape[0]
        token_mask = attention_mask[:, -new_tokens:]
    return jetmoe_router_loss(
        router_logits, config.num_experts_per_tok, config.router_z_loss_coef, token_mask
    )


def add_router_loss(config: JetMoeConfig, loss, router_logits, attention_mask, output_router_logits):
    """`(loss + aux_loss_coef * aux_loss, aux_loss)` when the head was asked for router logits (its argument, else
    the config), else `(loss, None)`: a trainer that asks the body alone adds the router loss itself, once."""
    if output_router_logits is None:
        output_router_logits = config.output_router_logits
    if not output_router_logits:
        return loss, None
    aux_loss = router_loss_for(config, router_logits, attention_mask)
    if loss is not None:
        loss = loss + config.aux_loss_coef * aux_loss.to(loss.device)
    return loss, aux_loss


class JetMoeForCausalLM(JetMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JetMoeConfig):
        super().__init__(config)
        self.model = JetMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """With labels, `loss = lm_loss + aux_loss_coef * aux_loss` when router logits are requested."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,  # a tuple only at the top, even when `config.return_dict` is False
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        loss, aux_loss = add_router_loss(
            self.config, loss, outputs.router_logits, attention_mask, output_router_logits
        )

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


@dataclass
class MoeSequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class JetMoeForSequenceClassification(JetMoePreTrainedModel):
    """JetMoE with a linear `score` head read at each sequence's last real token."""

    def __init__(self, config: JetMoeConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = JetMoeModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeSequenceClassifierOutputWithPast:
        """Logits at each row's last real token; with labels, the loss plus `aux_loss_coef * aux_loss` when router
        logits are requested."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,  # a tuple only at the top, even when `config.return_dict` is False
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        last_token = self._last_token_index(input_ids, attention_mask, batch_size, logits.device)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config
            )
        loss, aux_loss = add_router_loss(
            self.config, loss, outputs.router_logits, attention_mask, output_router_logits
        )

        return MoeSequenceClassifierOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def _last_token_index(self, input_ids, attention_mask, batch_size, device) -> torch.Tensor | int:
        """Rightmost real token of each row, for left and right padding alike."""
        if attention_mask is not None and attention_mask.ndim == 2:
            real = attention_mask.to(device, torch.int32)
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = (input_ids != self.config.pad_token_id).to(device, torch.int32)
        elif batch_size == 1 or input_ids is None:
            return -1
        else:
            raise ValueError(
                "Cannot find the last token of padded rows: set `pad_token_id` in the config or pass `attention_mask`."
            )
        positions = torch.arange(real.shape[-1], device=device, dtype=torch.int32)
        return (positions * real).argmax(-1)


__all__ = [
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
    "jetmoe_router_loss",
]
