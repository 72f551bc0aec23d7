"""jetmoe-ft: fine-tuning and alignment recipes for JetMoE."""

from .modeling import (
    JetMoeConfig,
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    JetMoePreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "JetMoeConfig",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
]
