"""The experiment trackers users already run: `report_to: wandb` and `report_to: mlflow`, through transformers'
own `WandbCallback` and `MLflowCallback`.

The callbacks send every logged value (losses, `aux_loss`, the routing-health and drift keys, the evaluations
before and after); this module adds what they leave out, from the main process only:

- **one tracker run per training run**, named after the recipe and its fingerprint (`tiny-sft@3f2a9c1b`)
  unless the recipe sets `run_name`. The run is opened here, before the callbacks, and closed after the last
  output is written: `MLflowCallback` alone ends its run when training ends, and the evaluation after training
  then opens a second, unnamed run. A resumed run (a requeued job) continues the same tracker run: its id is
  kept in `output_dir/trackers.json`.
- **the run's outputs as artifacts**: the model card, `metrics.json`, the routing report, the recipe and the
  plots (wandb: one artifact of type `run-outputs`, and each plot as an image; MLflow: under `outputs/`).

Both work offline: `WANDB_MODE=offline` writes `wandb/offline-run-*/run-*.wandb` (read it with
`wandb leet inspect --json`, sync it later with `wandb sync`); `MLFLOW_TRACKING_URI=sqlite:///mlflow.db`
(a local store; read it with `mlflow.MlflowClient` or `mlflow ui`). Install them with the `trackers` extra.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..distributed import is_main_process

TRACKERS = ("wandb", "mlflow")
STATE_FILE = "trackers.json"
OUTPUTS = ("README.md", "metrics.json", "routing.json", "recipe.yaml", "run.json")
"""Files of `output_dir` logged as artifacts (with every `*.png` plot), when present."""
EXIT_STATUS = {0: "FINISHED", 75: "KILLED", 130: "KILLED"}


def run_name(recipe, fingerprint: dict[str, Any]) -> str:
    """`<recipe>@<fingerprint>`: the recipe file's path under `recipes/` (or its name) and 8 hex digits."""
    path = Path(recipe.path) if recipe.path else None
    if path is None:
        label = "recipe"
    else:
        parts = path.with_suffix("").parts
        label = "-".join(parts[parts.index("recipes") + 1 :] if "recipes" in parts else parts[-1:])
    return f"{label}@{fingerprint['sha'][:8]}"


def name_the_run(args, recipe, fingerprint: dict[str, Any]) -> None:
    """Give the trackers' run the recipe's name and fingerprint, unless the recipe names it (`run_name`)."""
    if args.run_name in (None, "", args.output_dir):
        args.run_name = run_name(recipe, fingerprint)


def reported(args) -> list[str]:
    """The trackers of `TRACKERS` that `report_to` asks for."""
    report_to = args.report_to or []
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in TRACKERS if name in report_to or "all" in report_to]


class TrackerRuns:
    """The tracker runs of this process's training run (main process only; elsewhere it does nothing)."""

    def __init__(self):
        self.wandb = None
        self.mlflow = None
        self.output_dir: Path | None = None
        self._set_env: list[str] = []  # variables set for the callbacks while the runs are open

    def open(self, args, fingerprint: dict[str, Any], resumed: bool) -> None:
        """Before the trainer's callbacks set themselves up: open (or, resuming, reopen) each tracker's run."""
        self.close()
        names = reported(args)
        if not names or not is_main_process():
            return
        self.output_dir = Path(args.output_dir)
        earlier = _read_state(self.output_dir) if resumed else {}
        summary = {
            "fingerprint": fingerprint["sha"],
            "recipe": fingerprint["recipe"],
            "data": fingerprint["data"],
        }
        if "wandb" in names:
            import wandb

            run_id = earlier.get("wandb")
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "jetmoe-ft"),
                name=args.run_name,
                id=run_id,
                resume="allow" if run_id else None,
                config={"jetmoe_ft": summary},
            )
        if "mlflow" in names:
            import mlflow

            run_id = earlier.get("mlflow")
            self.mlflow = mlflow.start_run(run_id=run_id, run_name=None if run_id else args.run_name)
            if run_id and "MLFLOW_MAX_LOG_PARAMS" not in os.environ:
                # the run's parameters are logged already; MLflow refuses changed values (max_steps, resume_...)
                os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
                self._set_env.append("MLFLOW_MAX_LOG_PARAMS")
            mlflow.set_tags(
                {"jetmoe_ft.fingerprint": fingerprint["sha"], "jetmoe_ft.run_name": args.run_name}
            )
        _write_state(
            self.output_dir,
            {
                "wandb": self.wandb.id if self.wandb else None,
                "mlflow": self.mlflow.info.run_id if self.mlflow else None,
            },
        )

    def log_outputs(self, output_dir: str | os.PathLike) -> list[str]:
        """The run's card, reports, recipe and plots as artifacts of each open tracker run; their names."""
        output_dir = Path(output_dir)
        files = [output_dir / name for name in OUTPUTS if (output_dir / name).is_file()]
        files += sorted(output_dir.glob("*.png"))
        if not files or not (self.wandb or self.mlflow):
            return []
        if self.wandb is not None:
            import wandb

            artifact = wandb.Artifact(
                _artifact_name(self.wandb.name or "run"),
                type="run-outputs",
                metadata={"output_dir": str(output_dir)},
            )
            for path in files:
                artifact.add_file(str(path), name=path.name)
            self.wandb.log_artifact(artifact)
            images = {f"plots/{path.stem}": wandb.Image(str(path)) for path in files if path.suffix == ".png"}
            if images:
                self.wandb.log(images)
        if self.mlflow is not None:
            import mlflow

            for path in files:
                mlflow.log_artifact(str(path), artifact_path="outputs")
        return [path.name for path in files]

    def close(self, exit_status: int = 0) -> None:
        """End the open tracker runs: finished, killed (preempted, interrupted) or failed."""
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_status)
            self.wandb = None
        if self.mlflow is not None:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run(status=EXIT_STATUS.get(exit_status, "FAILED"))
            self.mlflow = None
        while self._set_env:
            os.environ.pop(self._set_env.pop(), None)


TRACKER_RUNS = TrackerRuns()


def _artifact_name(name: str) -> str:
    """wandb artifact names take letters, digits, `-`, `_` and `.`."""
    return re.sub(r"[^0-9A-Za-z._-]", "-", name) + "-outputs"


def _read_state(output_dir: Path) -> dict[str, str | None]:
    try:
        value = json.loads((output_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_state(output_dir: Path, state: dict[str, str | None]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / f".{STATE_FILE}.tmp"
    partial.write_text(json.dumps(state) + "\n")
    os.replace(partial, output_dir / STATE_FILE)
