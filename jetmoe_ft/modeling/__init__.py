"""Our JetMoE: checkpoint-compatible with transformers' JetMoe, with fast expert dispatch."""

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
