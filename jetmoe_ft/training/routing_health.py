"""Routing health during training: router entropy and expert load every logging step, `routing.json` and the
heat-map `routing_load.png` at the end.

The trainer layer (`jetmoe_ft.training.trainers`) adds the values to `logs` in its `log`, before `Trainer.log` copies
them into `log_history` and hands them to the reporting callbacks (TensorBoard, W&B, ...). A callback added
only through `callbacks=[...]` falls back to `on_log`: it adds the values to `logs` and to the `log_history`
entry just appended for those logs, but the reporters have already run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.utils import logging

from ..distributed import is_main_process
from ..modeling.routing import RoutingHooks, RoutingStats, attach_routing_hooks, plot_expert_load

logger = logging.get_logger(__name__)


class RoutingHealthCallback(TrainerCallback):
    """Logs router entropy and expert load every logging step; writes `routing.json` and
    `routing_load.png` into `output_dir` at the end. The trainer layer installs it so the values
    reach `log_history` *and* the reporting integrations (see the module docstring).
    """

    def __init__(self, per_expert: bool = True):
        self.per_expert = per_expert
        self.window: RoutingStats | None = None
        self.total: RoutingStats | None = None
        self.history: list[dict[str, Any]] = []
        self.hooks: RoutingHooks | None = None
        self.wraps_trainer_log = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._detach()
        self.window = RoutingStats.for_model(model)
        self.total = RoutingStats.for_model(model)
        self.history = []
        self.hooks = attach_routing_hooks(model, self.window, training_only=True)
        if args.report_to and not self.wraps_trainer_log:
            logger.warning(
                "Routing values reach log_history but not report_to; mix jetmoe_ft.training.trainers.JetMoeTrainerMixin in."
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.wraps_trainer_log or logs is None:
            return
        entry = state.log_history[-1] if state.log_history else None
        # Trainer.log appended {**logs, "step"} just before calling on_log: complete that entry too.
        same_entry = (
            entry is not None
            and entry.get("step") == state.global_step
            and entry.keys() - {"step"} == logs.keys()
        )
        values = self.add_to_logs(logs, state.global_step)
        if same_entry:
            entry.update(values)

    def on_train_end(self, args, state, control, **kwargs):
        if self.window is None:
            return
        self._take_window(state.global_step, record=False)
        if is_main_process():
            self.write_report(args.output_dir, state.global_step)
        self._detach()

    def add_to_logs(self, logs: dict[str, float], step: int) -> dict[str, float]:
        """Add the current window's values to `logs` and start a new window; returns what was added.

        A collective under multi-process training (every rank logs the same steps). Evaluation logs
        and empty windows get nothing.
        """
        if self.window is None or any(key.startswith("eval_") for key in logs):
            return {}
        window = self._take_window(step, record=True)
        values = window.log_values(self.per_expert) if window is not None else {}
        logs.update(values)
        return values

    def write_report(self, output_dir: str | Path, step: int) -> None:
        """`routing.json` (history and run totals) and the heat-map `routing_load.png`."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        report = {"global_step": step, "total": self.total.to_dict(), "history": self.history}
        (output_dir / "routing.json").write_text(json.dumps(report, indent=1))
        tokens = int(self.total.tokens.max())
        plot_expert_load(
            self.total.expert_load(), output_dir / "routing_load.png", f"Expert load, {tokens:,} tokens"
        )

    def _take_window(self, step: int, record: bool) -> RoutingStats | None:
        """Reduce the window over processes, add it to the totals and reset it; None when it was empty."""
        window = self.window.all_reduce_()
        if not bool(window.tokens.sum() > 0):
            return None
        snapshot = RoutingStats(window.num_layers, window.num_experts).add_(window)
        self.total.add_(window)
        if record:
            self.history.append({"step": step, **snapshot.to_dict()})
        window.reset()
        return snapshot

    def _detach(self) -> None:
        # Without a window, later logs (e.g. a manual trainer.log on one rank) start no collective.
        self.window = None
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
