"""What JetMoE needs from a multi-process launch: ZeRO-3 leaf modules, a whole final export, honest CPU runs.

The launch itself is accelerate's (`configs/*.yaml`); these functions are called by the loader and the
training loops so that every loop behaves the same under DDP, FSDP2 and DeepSpeed.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from .compat import is_accelerate_prepared, unmark_accelerate_prepared
from .config import RecipeError
from .modeling.modeling_jetmoe import JetMoeAttention, JetMoeMoE

# ZeRO-3 gathers a leaf module's parameters, its children's included, when the leaf is *called*; so the
# leaves must be modules that run through `__call__`. `JetMoeMoA` is not: the attention calls its
# `map` and `reduce` methods, so as a leaf its hooks never fire and its gradients are never reduced
# (on 2 ranks: "RuntimeError: unknown parameter type" in ZeRO-3's `zero_grad` after the first step).
# `JetMoeAttention`, which owns the MoA experts and calls them, takes its place.
ZERO3_LEAF_CLASSES: tuple[type[nn.Module], ...] = (JetMoeAttention, JetMoeMoE)

GPU_ONLY_LAUNCHES = {
    "ACCELERATE_USE_FSDP": "FSDP (configs/fsdp2.yaml)",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed (configs/zero2.yaml, configs/zero3.yaml)",
}


def declare_zero3_leaf_modules(model: nn.Module) -> list[str]:
    """Under DeepSpeed ZeRO-3, make every MoA attention and MoE block a ZeRO-3 leaf; returns their names.

    A leaf's parameters are gathered in one piece when it is entered, whichever experts the rank's tokens
    pick, and ZeRO-3 no longer traces the order of the expert calls inside it: the cure for the MoE
    hangs of DeepSpeed #4808 / TRL #1268. Outside ZeRO-3 this does nothing.
    """
    if not is_deepspeed_zero3_enabled():
        return []
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, list(ZERO3_LEAF_CLASSES))
    return [name for name, module in model.named_modules() if getattr(module, "_z3_leaf", False)]


def check_launch(cuda_available: bool | None = None) -> None:
    """Refuse an FSDP or DeepSpeed launch on a machine without a GPU, before anything loads.

    accelerate 1.15 turns FSDP and DeepSpeed on for GPU process groups only: on CPU ranks it drops the
    plugin and each run would silently be plain DDP (or one process training alone).
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available:
        return
    for variable, what in GPU_ONLY_LAUNCHES.items():
        if os.environ.get(variable, "false").lower() == "true":
            raise RecipeError(
                f"{what} needs GPUs: accelerate runs it on GPU ranks only. On CPU launch with "
                "`--config_file configs/cpu_ddp.yaml` (DDP)."
            )


def let_training_wrap_the_model(trainer) -> bool:
    """After `trainer.evaluate()` and before `trainer.train()`: let training wrap the model in DDP again.

    An evaluation before training prepares the bare model for evaluation only, and accelerate marks it as
    prepared; `train()` then skips the DDP wrapper and every rank trains on its own gradients (measured on
    2 CPU ranks: the ranks' gradients differed and rank 0 saved a model trained on its half of the data).
    FSDP and DeepSpeed prepare the model fully for evaluation and are left alone. Returns whether it acted.
    """
    model = trainer.model
    distributed = trainer.accelerator.num_processes > 1
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if not distributed or sharded or trainer.model_wrapped is not model:
        return False
    if not is_accelerate_prepared(model):
        return False
    unmark_accelerate_prepared(model)
    return True


def prepare_final_save(trainer) -> bool:
    """Make `trainer.save_model()` write a whole model or adapter under FSDP with sharded checkpoints.

    transformers saves nothing in `save_model` while FSDP's state-dict type is `SHARDED_STATE_DICT`
    (the one `configs/fsdp2.yaml` uses for fast, resumable checkpoints), so the final export switches
    to a full state dict, gathered on rank 0. Returns whether it switched.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    if "FULL_STATE_DICT" in str(plugin.state_dict_type):
        return False
    plugin.set_state_dict_type("FULL_STATE_DICT")
    return True


def is_main_process() -> bool:
    """Whether this is the process that writes shared files and prints summaries (global rank 0).

    Read from the launcher's `RANK`, so it holds before any process group or trainer exists."""
    return int(os.environ.get("RANK", "0")) == 0
