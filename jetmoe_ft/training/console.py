"""A console a person reads: one short line per logging step instead of transformers' dump of every logged key.

A JetMoE run logs ~170 values per step (every expert's load in every router, kept shares, KLs); transformers'
`ProgressCallback` / `PrinterCallback` print them all on one line. `install_console` swaps their printing for
one line with the loss, `aux_loss`, the loop's own headline values (reward accuracy, margin, KL, ...), learning
rate, gradient norm, tokens per second and a routing summary: the least and the most loaded expert and the
lowest kept share (drift from the start model). Only the printing changes: every key still reaches
`log_history`, `metrics.json`, TensorBoard and the trackers.
"""

from __future__ import annotations

import re
import time

from transformers import PrinterCallback, ProgressCallback

from ..modeling.routing import LOG_PREFIX

HEADLINE = (
    ("loss", "loss", "{:.4f}"),
    ("aux_loss", "aux", "{:.4g}"),
    ("rewards/accuracies", "acc", "{:.3f}"),
    ("rewards/margins", "margin", "{:.3f}"),
    ("reward", "reward", "{:.3f}"),
    ("kl", "kl", "{:.4g}"),
    ("accuracy", "acc", "{:.3f}"),
    ("learning_rate", "lr", "{:.2e}"),
    ("grad_norm", "grad", "{:.3g}"),
)
"""(logged key, short name, format), in the order printed."""

_EXPERT_LOAD = re.compile(rf"^{re.escape(LOG_PREFIX)}layer(\d+)\.(\w+)\.load\.e(\d+)$")
_ROUTER_VALUE = re.compile(rf"^{re.escape(LOG_PREFIX)}layer(\d+)\.(\w+)\.(load_min|load_max|topk_kept)$")
TOKEN_COUNTS = ("num_tokens", "num_input_tokens_seen")


class ConsoleLine:
    """Formats a log entry as one line; remembers the token count between logging steps for tokens/s."""

    def __init__(self):
        self._last_tokens: tuple[float, float] | None = None  # (tokens seen, when)

    def restart(self) -> None:
        """A new `train()` (or a resumed one): tokens/s starts over."""
        self._last_tokens = None

    def __call__(self, logs: dict, step: int, max_steps: int) -> str:
        if any(key.startswith("eval_") for key in logs):
            return self._evaluation(logs, step)
        if "train_runtime" in logs:
            return self._summary(logs, step)
        parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
        parts += [
            f"{short} {fmt.format(logs[key])}" for key, short, fmt in HEADLINE if _is_number(logs.get(key))
        ]
        if (speed := self._tokens_per_second(logs)) is not None:
            parts.append(f"{speed:,.0f} tok/s")
        parts += routing_summary(logs)
        return "  ".join(parts)

    def _tokens_per_second(self, logs: dict) -> float | None:
        tokens = next((float(logs[key]) for key in TOKEN_COUNTS if _is_number(logs.get(key))), None)
        if tokens is None:
            return None
        now, last = time.monotonic(), self._last_tokens
        self._last_tokens = (tokens, now)
        if last is None or now <= last[1] or tokens < last[0]:
            return None
        return (tokens - last[0]) / (now - last[1])

    @staticmethod
    def _evaluation(logs: dict, step: int) -> str:
        prefix = next((key[: -len("_runtime")] for key in logs if key.endswith("_runtime")), "eval")
        values = [
            f"{name} {logs[f'{prefix}_{name}']:.4f}"
            for name in ("loss", "rewards/accuracies", "accuracy")
            if _is_number(logs.get(f"{prefix}_{name}"))
        ]
        if _is_number(runtime := logs.get(f"{prefix}_runtime")):
            values.append(f"{runtime:.1f} s")
        return f"{prefix} at step {step}: " + "  ".join(values)

    @staticmethod
    def _summary(logs: dict, step: int) -> str:
        loss = logs.get("train_loss")
        mean = f", mean loss {loss:.4f}" if _is_number(loss) else ""
        return f"trained {step} steps in {logs['train_runtime']:.1f} s{mean}"


def routing_summary(logs: dict) -> list[str]:
    """`load 0.012@L2.moe.e5..0.310@L0.moa.e1` (least and most loaded expert) and `kept 0.81@L3.moe` (lowest
    kept top-k share), from whichever routing keys the entry holds."""
    loads, extremes, kept = {}, {"load_min": {}, "load_max": {}}, {}
    for key, value in logs.items():
        if not _is_number(value):
            continue
        if match := _EXPERT_LOAD.match(key):
            layer, kind, expert = match.groups()
            loads[f"L{layer}.{kind}.e{expert}"] = value
        elif match := _ROUTER_VALUE.match(key):
            layer, kind, what = match.groups()
            (kept if what == "topk_kept" else extremes[what])[f"L{layer}.{kind}"] = value
    parts = []
    low = min(loads.items(), key=lambda item: item[1]) if loads else _pick(extremes["load_min"], min)
    high = max(loads.items(), key=lambda item: item[1]) if loads else _pick(extremes["load_max"], max)
    if low and high:
        parts.append(f"load {low[1]:.3f}@{low[0]}..{high[1]:.3f}@{high[0]}")
    if kept:
        where, value = min(kept.items(), key=lambda item: item[1])
        parts.append(f"kept {value:.3f}@{where}")
    return parts


def _pick(values: dict, choose):
    return choose(values.items(), key=lambda item: item[1]) if values else None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class ConsoleProgressCallback(ProgressCallback):
    """transformers' progress bar, with one short line per logging step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.console = ConsoleLine()

    def on_train_begin(self, args, state, control, **kwargs):
        self.console.restart()
        return super().on_train_begin(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(self.console(logs, state.global_step, state.max_steps))


class ConsolePrinterCallback(PrinterCallback):
    """transformers' printer (`disable_tqdm: true`), with one short line per logging step."""

    def __init__(self):
        self.console = ConsoleLine()

    def on_train_begin(self, args, state, control, **kwargs):
        self.console.restart()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(self.console(logs, state.global_step, state.max_steps), flush=True)


def install_console(trainer) -> None:
    """Swap the trainer's log printer (progress bar or plain printer) for the one-line console; a notebook's
    progress display and custom printers are left alone."""
    for library, ours in (
        (ProgressCallback, ConsoleProgressCallback),
        (PrinterCallback, ConsolePrinterCallback),
    ):
        current = [callback for callback in trainer.callback_handler.callbacks if type(callback) is library]
        for callback in current:
            trainer.remove_callback(callback)
            trainer.add_callback(ours())
