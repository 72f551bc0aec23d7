"""Every use of another library's private API, in one place.

Each entry names the pinned version it was checked against and why the public API does not do. At import,
`check_private_apis()` verifies that each attribute still exists, so a moved pin fails at once with one line
naming the package and the attribute, instead of deep inside a training run.
"""

from __future__ import annotations

import argparse
import importlib
from contextlib import contextmanager
from typing import Any

import torch

# (module, attribute path, pinned version, why)
PRIVATE_APIS = (
    ("torch", "_grouped_mm", "torch 2.13.0", "one kernel for every expert's matmul (experts.py)"),
    (
        "torch._C",
        "_current_graph_task_id",
        "torch 2.13.0",
        "tells a forward replayed by gradient checkpointing during backward (routing statistics, router loss)",
    ),
    (
        "trl.trainer.dpo_trainer",
        "DPOTrainer._precompute_ref_logps",
        "trl 1.16.0",
        "TRL precomputes reference log-probs inside its __init__: our LM head must be installed first",
    ),
    (
        "trl.trainer.kto_trainer",
        "KTOTrainer._precompute_ref_logps",
        "trl 1.16.0",
        "TRL precomputes KTO's reference log-probs inside its __init__: our LM head must be installed first",
    ),
    (
        "trl.trainer.kto_trainer",
        "KTOTrainer._prepare_dataset",
        "trl 1.16.0",
        "TRL pairs KTO's KL completions within each process's batch; over several processes, ours pairs them "
        "within the global batch (the same estimate as one process on that batch)",
    ),
    (
        "transformers.utils.output_capturing",
        "capture_outputs",
        "transformers 5.24.0",
        "transformers' own output recording (`_can_record_outputs`): hidden states / attentions by layer index",
    ),
    (
        "transformers.utils.output_capturing",
        "OutputRecorder",
        "transformers 5.24.0",
        "names which submodule's output is recorded as which model output",
    ),
    (
        "peft",
        "LoraConfig._register_custom_module",
        "peft 0.21.2",
        "the only way to give PEFT a LoRA layer for a custom module (expert LoRA)",
    ),
    (
        "trl.trainer.grpo_trainer",
        "create_model_from_path",
        "trl 1.16.0",
        "GRPO builds a full-weight reference from the policy's load path inside its __init__ (no `ref_model` "
        "argument); ours is a frozen copy of the in-memory JetMoE, handed over while the trainer is built",
    ),
    (
        "trl.trainer.grpo_trainer",
        "GRPOTrainer._generate_single_turn",
        "trl 1.16.0",
        "the one place GRPO calls `model.generate`: routers' top-k at generation time are recorded around it",
    ),
    (
        "trl.trainer.grpo_trainer",
        "GRPOTrainer._generate_and_score_completions",
        "trl 1.16.0",
        "the generation batch GRPO shuffles and splits into micro-batches: the generation-time routing rides in it",
    ),
)


class PinMovedError(ImportError):
    """A private attribute this project relies on is gone: the named package's pin moved."""


def check_private_apis() -> None:
    """Raise `PinMovedError` naming the first private attribute that no longer exists."""
    for module_name, path, pinned, why in PRIVATE_APIS:
        try:
            target: Any = importlib.import_module(module_name)
            for part in path.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError):
            raise PinMovedError(
                f"{module_name}.{path} is gone (checked on {pinned}; used because: {why}): install the pinned "
                "version (`make install`) or update jetmoe_ft/compat.py."
            ) from None


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm`: `rows[g] @ weight[g]` for the consecutive row groups ending at `offs`."""
    return torch._grouped_mm(rows, weight, offs=offs)


def in_backward() -> bool:
    """Whether autograd is running a backward pass: gradient checkpointing replays forwards there."""
    # A compiled forward (decoding) never runs inside backward, and dynamo cannot trace the query.
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def parser_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of an argparse parser by destination (argparse keeps them in `_actions`, no public list)."""
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def trl_metrics(trainer) -> dict[str, dict[str, list[float]]] | None:
    """TRL's per-mode metric lists (`trainer._metrics["train" | "eval"]`, trl 1.16.0), averaged and cleared by
    its `log`; None for a trainer that is not TRL's. Used to log ours beside TRL's and to file its evaluation
    metrics under the evaluation's prefix (TRL always names them `eval_*`)."""
    return getattr(trainer, "_metrics", None)


def count_trained_tokens(trainer, tokens: int) -> int:
    """Add to TRL SFT's running token count (`trainer._total_train_tokens`, trl 1.16.0), logged as `num_tokens`;
    returns the new total."""
    trainer._total_train_tokens += tokens
    return trainer._total_train_tokens


def precompute_ref_logps(trainer_cls: type, trainer, dataset, name: str, batch_size: int):
    """TRL DPO's reference log-prob precomputation (`DPOTrainer._precompute_ref_logps`, trl 1.16.0)."""
    return super(trainer_cls, trainer)._precompute_ref_logps(dataset, name, batch_size)


def is_accelerate_prepared(model: torch.nn.Module) -> bool:
    """accelerate's mark on a model it prepared (`_is_accelerate_prepared`, accelerate 1.15.0)."""
    return bool(getattr(model, "_is_accelerate_prepared", False))


def unmark_accelerate_prepared(model: torch.nn.Module) -> None:
    """Let `accelerator.prepare` wrap `model` again (see `distributed.let_training_wrap_the_model`)."""
    model._is_accelerate_prepared = False


def register_custom_lora_module(config, mapping: dict[type, type]) -> None:
    """PEFT's experimental custom-module LoRA (`LoraConfig._register_custom_module`, peft 0.21.2); PEFT does not
    store it in the adapter config, so every loader registers it again."""
    config._register_custom_module(mapping)


def kto_prepare_dataset(trainer_cls: type, trainer, dataset, processing_class, args, name: str):
    """TRL KTO's unpairing, tokenisation, long-prompt filter and KL completions (`KTOTrainer._prepare_dataset`,
    trl 1.16.0)."""
    return super(trainer_cls, trainer)._prepare_dataset(dataset, processing_class, args, name)


def trl_stored_metrics(trainer) -> dict[str, dict[str, list[float]]] | None:
    """The per-mode metric lists of TRL's experimental ORPO and CPO trainers (`trainer._stored_metrics`, trl
    1.16.0), averaged into the logs and deleted by their `log`; evaluation keys start with `eval_` whatever the
    evaluation's prefix. None for another trainer."""
    return getattr(trainer, "_stored_metrics", None)


@contextmanager
def grpo_reference(reference: torch.nn.Module | None):
    """While a `GRPOTrainer` is built, hand it `reference` as the full-weight reference model it would otherwise
    load from the policy's path (`trl.trainer.grpo_trainer.create_model_from_path`, trl 1.16.0); None changes
    nothing. Only the reference is served: the policy is passed to the trainer as a model, never as a path."""
    if reference is None:
        yield
        return
    from trl.trainer import grpo_trainer

    original = grpo_trainer.create_model_from_path
    grpo_trainer.create_model_from_path = lambda *args, **kwargs: reference
    try:
        yield
    finally:
        grpo_trainer.create_model_from_path = original


def grpo_generate_single_turn(trainer_cls: type, trainer, *args, **kwargs):
    """TRL GRPO's generation of one turn (`GRPOTrainer._generate_single_turn`, trl 1.16.0)."""
    return super(trainer_cls, trainer)._generate_single_turn(*args, **kwargs)


def grpo_generate_and_score(trainer_cls: type, trainer, inputs):
    """TRL GRPO's generation batch: completions, rewards, advantages (`_generate_and_score_completions`, trl
    1.16.0)."""
    return super(trainer_cls, trainer)._generate_and_score_completions(inputs)


check_private_apis()
