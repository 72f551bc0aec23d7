"""The one JetMoE trainer layer: what every training loop adds to its library trainer.

`JetMoeTrainerMixin` goes first in the bases of a loop's trainer (`class T(JetMoeTrainerMixin, SFTTrainer)`)
and owns, for every loop:

- **the router loss**: the training loss is the loop's own loss plus `aux_loss_coef` times the JetMoE router
  loss (switch + z-loss over every MoA and MoE router), added here once. It is measured on every forward of the
  policy that trains (training mode, gradients on), whatever the library trainer calls: a reference pass (no
  gradients, or a separate frozen copy) and every evaluation pass add nothing, so evaluation losses are the
  task loss alone. Under gradient accumulation it is a per-micro-batch mean scaled like the task loss; across
  processes each rank adds its own and DDP averages the gradients. The library trainers' own MoE loss (TRL adds
  Mixtral's form through `router_aux_loss_coef`) is switched off.
- **its logging** as `aux_loss` (the mean since the last log, over processes), and the routing health per
  layer and router (`routing/layer{i}.{moa,moe}.entropy`, `.load_max`, ...) with the drift from the start
  model on a fixed probe batch (`.topk_kept`, `.kl`; `jetmoe_ft.training.drift`) through `log`, so the values reach
  `log_history`, the console and every reporter;
- **the LM head** of TRL's loops (`jetmoe_ft.modeling.lm_head`), on the policy and a separate reference;
- **the non-finite guard**: a NaN / Inf loss or gradient stops training before the optimizer step, so the weights
  stay the last finite ones (`NonFiniteTrainingError`, exit status 3, recorded in `metrics.json`); with
  `nonfinite_skip_steps: N` up to N such steps are skipped instead (their gradients dropped);
- **evaluation under a prefix** (`evaluate(metric_key_prefix="eval_before")`): TRL's own metrics are filed
  under that prefix too, and a DDP run is let wrap the model again afterwards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from ..compat import in_backward, trl_metrics
from ..distributed import is_main_process, let_training_wrap_the_model
from ..modeling import JetMoeForCausalLM, JetMoeModel
from ..modeling.lm_head import install_lm_head
from ..modeling.lm_head_loss import DEFAULT_CHUNK_SIZE
from ..modeling.modeling_jetmoe import router_loss_for
from .console import install_console
from .drift import RoutingDriftProbe, probe_token_ids
from .routing_health import RoutingHealthCallback


class RouterLossRecorder:
    """Records the JetMoE router loss of every forward of `model`'s JetMoE backbone that trains.

    A pre-hook asks the backbone for its router logits (without the wrapper adding a loss of its own), a
    post-hook turns them into the router loss with that forward's padding mask. Forwards in evaluation mode,
    without gradients, or replayed by gradient checkpointing are not recorded.
    """

    def __init__(self, model: nn.Module):
        self.losses: list[torch.Tensor] = []
        self._mask: dict[int, torch.Tensor | None] = {}
        self._handles = []
        backbones = [module for module in model.modules() if isinstance(module, JetMoeModel)]
        if not backbones:
            raise TypeError(f"{type(model).__name__} holds no JetMoeModel: use a jetmoe_ft JetMoE model.")
        for backbone in backbones:
            self._handles.append(backbone.register_forward_pre_hook(self._ask_for_logits, with_kwargs=True))
            self._handles.append(backbone.register_forward_hook(self._record))

    @staticmethod
    def _trains(module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and not in_backward()

    def _ask_for_logits(self, module, args, kwargs):
        if not self._trains(module):
            return None
        self._mask[id(module)] = kwargs.get("attention_mask")
        return args, {**kwargs, "output_router_logits": True}

    def _record(self, module, args, output) -> None:
        if not self._trains(module) or id(module) not in self._mask:
            return
        mask = self._mask.pop(id(module))
        self.losses.append(router_loss_for(module.config, output.router_logits, mask))

    def take(self) -> torch.Tensor | None:
        """The mean router loss of the forwards recorded since the last call (None if there were none)."""
        if not self.losses:
            return None
        loss = torch.stack([loss.float() for loss in self.losses]).mean()
        self.losses.clear()
        return loss

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class NonFiniteTrainingError(RuntimeError):
    """Training stopped on a NaN / Inf loss or gradient; the weights are the last finite ones."""


NONFINITE_CAUSES = (
    "usual causes: a learning rate too high for the batch, no warm-up, fp16 overflow (use bf16), or bad data"
)


class NonFiniteGuard(TrainerCallback):
    """Stops (or skips, `skip_steps` times) an optimizer step whose loss or gradients are not finite.

    The check runs before `optimizer.step()`, so a stopped run keeps finite weights. All processes agree on
    the verdict (one all-reduce per optimizer step), so none is left waiting in a collective.
    """

    def __init__(self, skip_steps: int = 0):
        self.skip_steps = skip_steps
        self.skipped = 0
        self.bad_loss: float | None = None

    def record_loss(self, loss: torch.Tensor) -> None:
        """Called with each micro-batch's loss."""
        if self.bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self.bad_loss = float(loss.detach().float().reshape(-1)[0])

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bad_grads = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        verdict = torch.tensor([float(self.bad_loss is not None), float(bad_grads)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = grads[0].device if grads and "gloo" not in dist.get_backend() else torch.device("cpu")
            verdict = verdict.to(device)
            dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        bad_loss, bad_grads = bool(verdict[0]), bool(verdict[1])
        what = "loss" if bad_loss else "gradient"
        value = self.bad_loss if self.bad_loss is not None else float("nan")
        self.bad_loss = None
        if not (bad_loss or bad_grads):
            return
        step = state.global_step + 1
        if self.skipped < self.skip_steps:
            self.skipped += 1
            for parameter in model.parameters():
                parameter.grad = None  # the optimizer skips parameters without a gradient
            print(
                f"Step {step}: non-finite {what} ({value}); step skipped ({self.skipped} of {self.skip_steps})."
            )
            return
        message = (
            f"training stopped at step {step}: non-finite {what} ({value}); the weights are those of step "
            f"{step - 1}, no final model was written; {NONFINITE_CAUSES}."
        )
        record_stop(args.output_dir, message, step, state)
        raise NonFiniteTrainingError(message)


def record_stop(output_dir: str, message: str, step: int, state) -> None:
    """`metrics.json` of a stopped run: why, at which step, and the logged values (non-finite ones as null)."""
    if not is_main_process():
        return
    history = [{key: _finite_or_none(value) for key, value in entry.items()} for entry in state.log_history]
    record = {"stopped": message, "stopped_at_step": step, "log_history": history}
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class JetMoeTrainerMixin:
    """Router loss once, its logging, routing health, prefixed evaluations; see the module docstring."""

    same_gradient_per_token = False
    """Whether the loop's loss gives every scored token the same gradient (a token mean, as SFT's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        config = _jetmoe_config(model)
        self.aux_loss_coef = float(config.aux_loss_coef or 0.0)
        # TRL's trainers add their own (Mixtral-form) aux loss when the config declares router logits.
        self.aux_loss_enabled = False
        config.output_router_logits = False
        self.router_loss = RouterLossRecorder(model)
        self._aux_window: list[torch.Tensor] = []
        self.drift_probe = _drift_probe(model, self.train_dataset, config)
        self.routing_health = RoutingHealthCallback()
        self.routing_health.wraps_trainer_log = True
        self.add_callback(self.routing_health)
        self._metric_key_prefix = "eval"
        options = getattr(self.args, "jetmoe", None)  # set by `parse_recipe`
        self.nonfinite_guard = NonFiniteGuard(getattr(options, "nonfinite_skip_steps", 0))
        self.add_callback(self.nonfinite_guard)
        self.install_lm_heads()
        install_console(self)  # one short line per logging step; every key still reaches the logs

    def install_lm_heads(self) -> None:
        """Our LM head on the policy and the reference, once, after TRL added its fused heads (a TRL loop that
        scores tokens inside its `__init__`, like DPO's precomputed reference, calls this first)."""
        if getattr(self, "_lm_heads_installed", False):
            return
        options = getattr(self.args, "jetmoe", None)  # set by `parse_recipe`
        chunk_size = getattr(options, "lm_head_chunk_size", DEFAULT_CHUNK_SIZE)
        head = dict(
            temperature=getattr(self, "temperature", 1.0),
            chunk_size=chunk_size if getattr(options, "chunked_lm_head", True) else None,
        )
        policy = self.accelerator.unwrap_model(self.model)
        policy = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        if isinstance(policy, JetMoeForCausalLM):
            install_lm_head(policy, same_gradient_per_token=self.same_gradient_per_token, **head)
        reference = getattr(self, "ref_model", None)
        if reference is not None:
            install_lm_head(self.accelerator.unwrap_model(reference), reference=True, **head)
        self._lm_heads_installed = True

    # -- the router loss, once ------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.router_loss.take()  # nothing left over from a forward outside a loss (e.g. generation)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        aux_loss = self.router_loss.take()
        if aux_loss is not None:
            self._aux_window.append(aux_loss.detach())
            if self.aux_loss_coef:
                loss = loss + self.aux_loss_coef * aux_loss.to(loss.device) / self._steps_left_to_trainer(
                    num_items_in_batch
                )
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.record_loss(loss)
        return loss

    def _steps_left_to_trainer(self, num_items_in_batch) -> int:
        """1 when the Trainer divides the loss by the accumulation steps itself, else those steps.

        The Trainer skips the division when the task loss is already normalised by `num_items_in_batch`
        (transformers 5.24 `training_step`); the router loss is a per-micro-batch mean and needs it then.
        """
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        # Outside `train()` (a direct call) there is no accumulation to scale for.
        return getattr(self, "current_gradient_accumulation_steps", 1) if scaled else 1

    # -- logging ---------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            self._add_aux_loss(logs)
            if self.drift_probe is not None:
                logs.update(self.drift_probe.values(self.accelerator.unwrap_model(self.model)))
        self.routing_health.add_to_logs(logs, self.state.global_step)
        self._file_trl_eval_metrics(logs)
        super().log(logs, start_time)

    def _add_aux_loss(self, logs: dict[str, float]) -> None:
        if not self._aux_window:
            return
        local = torch.stack(self._aux_window).mean()
        self._aux_window.clear()
        logs["aux_loss"] = self.accelerator.reduce(local.to(self.accelerator.device), reduction="mean").item()

    def _file_trl_eval_metrics(self, logs: dict[str, float]) -> None:
        """TRL names its evaluation metrics `eval_*` whatever the prefix: give them the evaluation's."""
        metrics = trl_metrics(self)
        prefix = self._metric_key_prefix
        if metrics is None or self.model.training or prefix == "eval" or not metrics["eval"]:
            return
        logs.update({f"{prefix}_{key}": sum(values) / len(values) for key, values in metrics["eval"].items()})
        metrics["eval"].clear()

    # -- evaluation --------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._metric_key_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._metric_key_prefix = "eval"
            let_training_wrap_the_model(self)


def _drift_probe(model: nn.Module, dataset, config) -> RoutingDriftProbe | None:
    """Drift against the start model (the model as the trainer gets it) on the first tokenized training rows;
    None when the training data holds no token ids yet (e.g. GRPO's prompts)."""
    columns = set(getattr(dataset, "column_names", None) or ())
    if not ("input_ids" in columns or {"prompt_input_ids", "chosen_input_ids"} <= columns):
        return None
    return RoutingDriftProbe(model, probe_token_ids(dataset), pad_id=config.pad_token_id or 0)


def _jetmoe_config(model: nn.Module):
    """The config of the JetMoE model inside `model` (PEFT-wrapped or not)."""
    for module in model.modules():
        if isinstance(module, JetMoeModel):
            return module.config
    raise TypeError(f"{type(model).__name__} holds no JetMoeModel: use a jetmoe_ft JetMoE model.")
