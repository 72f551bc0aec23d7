"""jetmoe-ft: fine-tuning and alignment recipes for JetMoE.

The folders are the stages a recipe flows through, each importing only the ones before it:
  modeling/    the model, its expert dispatch, LM head and router statistics
  data/        the recipe's sources, mixtures, embedded sets and per-format checks
  adapters/    what a run trains: expert LoRA, experts chosen from the data, frozen routers, 4-bit experts
  training/    the trainer layer every loop mixes in, runs (resume, provenance, card), routing health and drift
  evaluation/  eval-cls, eval-gen, generation, rewards, metrics, plots, lm-eval
  export/      verified export to transformers / stock PEFT          planning/  `jetmoe-ft plan`
Beside them: the loops where users call them (`sft`, `dpo`, `kto`, `orpo`, `grpo`, `cls`, `rm`; each imports no
other loop), the command line (`cli`), and the modules every stage shares: the recipe parser (`config`,
`recipe_values`, `errors`), other libraries' private APIs (`compat`), the embedded tokenizer and tiny model
(`assets`), processes (`distributed`) and the recipe's model and tokenizer (`loading`, after `adapters`).
"""

import logging as _logging
import warnings as _warnings

# Lines other libraries print on every run that a user cannot act on (each names its source); real errors and
# other warnings of the same libraries still show.
_NOISE_LOGS = {
    # bitsandbytes' CPU backend, at import: an optional faster kernel from the hub (`kernels`) is not installed
    "bitsandbytes.backends.cpu.ops": "gemm_4bit_forward from kernels-community",
    # DeepSpeed's accelerator detection on a machine without a GPU: CPU is the right answer here
    "DeepSpeed": "Setting accelerator to CPU",
}
_NOISE_WARNINGS = (
    # transformers 5 renamed `gradient_checkpointing`; TRL's configs still set the old name by default
    (FutureWarning, r"`[a-z_]*gradient_checkpointing[a-z_]*` is deprecated"),
    # the Trainer's DataLoader asks for pinned memory; without a GPU there is nothing to pin
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    # PEFT looks for the base model's config.json to compare vocabularies; the embedded tiny model has none
    (UserWarning, r"Could not find a config file in jetmoe-ft/"),
)


def _quiet_known_noise() -> None:
    for name, text in _NOISE_LOGS.items():
        _logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())
    for category, pattern in _NOISE_WARNINGS:
        _warnings.filterwarnings("ignore", message=pattern, category=category)


_quiet_known_noise()

from .modeling import (  # noqa: E402  (after the noise filters: importing it imports the libraries)
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
