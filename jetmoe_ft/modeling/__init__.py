"""Stage 1, the model: our JetMoE, checkpoint-compatible with transformers' JetMoe, with fast expert dispatch
(`experts`), the chunked LM head and its loss (`lm_head`, `lm_head_loss`), and the router statistics every later
stage reads (`routing`).

Imports: torch, transformers and the package's shared modules (`compat`) only; no other stage."""

from .configuration_jetmoe import JetMoeConfig
from .modeling_jetmoe import (
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    JetMoePreTrainedModel,
    jetmoe_router_loss,
)

__all__ = [
    "JetMoeConfig",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
    "jetmoe_router_loss",
]
