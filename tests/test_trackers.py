"""`report_to: [wandb, mlflow]`: wandb offline and a real local MLflow store (sqlite) receive the losses, `aux_loss`,
the routing-health and drift keys, the evaluations, and the run's card, reports and plots as artifacts, in one
tracker run named after the recipe and its fingerprint; a resumed run continues that tracker run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jetmoe_ft.sft import cli as sft_cli
from jetmoe_ft.training.trackers import STATE_FILE

pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ["README.md", "metrics.json", "recipe.yaml", "routing.json", "routing_load.png", "run.json"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A tiny SFT run reported to both trackers, then resumed for one more step; their files and store."""
    root = tmp_path_factory.mktemp("trackers")
    recipe = root / "sft-tracked.yaml"
    recipe.write_text((ROOT / "recipes" / "tiny" / "sft.yaml").read_text() + "\nreport_to: [wandb, mlflow]\n")
    store = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "WANDB_MODE": "offline",
            "WANDB_DIR": root,
            "WANDB_DATA_DIR": root / "wandb-data",
            "WANDB_CACHE_DIR": root / "wandb-cache",
            "WANDB_CONFIG_DIR": root / "wandb-config",
            "WANDB_SILENT": "true",
            "MLFLOW_TRACKING_URI": store,
            "MLFLOW_EXPERIMENT_NAME": "jetmoe-ft-tests",
        }.items():
            env.setenv(name, str(value))
        # artifacts beside the store, not in the working directory
        mlflow.MlflowClient(store).create_experiment(
            "jetmoe-ft-tests", artifact_location=str(root / "artifacts")
        )
        args = ["--config", str(recipe), "--output_dir", str(root / "run"), "--max_train_samples", "16"]
        args += ["--max_eval_samples", "4", "--per_device_train_batch_size", "2", "--max_length", "48"]
        args += ["--logging_steps", "1", "--save_steps", "2", "--max_steps", "2"]
        assert sft_cli(args) == 0
        first = json.loads((root / "run" / STATE_FILE).read_text())
        assert sft_cli([*args[:-2], "--max_steps", "3", "--resume_from_checkpoint", "true"]) == 0
    mlflow.set_tracking_uri(None)
    return root, first


def _wandb_records(run_dir: Path) -> list[dict]:
    """wandb's own reader of an offline run's transaction log (`wandb leet inspect --json`)."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def _run_name(root: Path) -> str:
    sha = json.loads((root / "run" / "run.json").read_text())["sha"]
    return f"sft-tracked@{sha[:8]}"


def test_wandb_offline_run_holds_the_losses_routing_keys_and_outputs(tracked):
    root, first = tracked
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(
        run.name.endswith(first["wandb"]) for run in runs
    )  # resumed: the same run id
    records = _wandb_records(runs[0])
    assert [r["run"]["display_name"] for r in records if r["type"] == "run"] == [_run_name(root)]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    train = [item for item in history if "train/loss" in item]
    assert [item["train/global_step"] for item in train] == [1, 2]
    for item in train:
        assert item["train/aux_loss"] > 0
        routing = {key for key in item if key.startswith("train/routing/")}
        assert {"train/routing/layer0.moe.load.e0", "train/routing/layer3.moa.entropy"} <= routing
        assert {"train/routing/layer1.moe.topk_kept", "train/routing/layer1.moe.kl"} <= routing  # drift
    assert any("eval/before_loss" in item for item in history)
    assert any("eval/after_loss" in item for item in history)
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifact["type"] == "run-outputs"
    assert sorted(entry["path"] for entry in artifact["manifest"]["contents"]) == OUTPUTS
    assert any("plots/routing_load.path" in item for item in history)  # the plot as an image too


def test_the_local_mlflow_store_holds_one_run_with_the_losses_routing_keys_and_outputs(tracked):
    root, first = tracked
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jetmoe-ft-tests")
    # one run: transformers' MLflowCallback alone would end it with training, and the evaluation after training
    # would open a second, unnamed one
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == first["mlflow"] and run.info.run_name == _run_name(root)
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["jetmoe_ft.fingerprint"] == json.loads((root / "run" / "run.json").read_text())["sha"]
    )
    aux = client.get_metric_history(run.info.run_id, "aux_loss")
    assert sorted(metric.step for metric in aux) == [1, 2, 3] and all(metric.value > 0 for metric in aux)
    for key in ("routing/layer0.moe.load.e0", "routing/layer2.moa.load_max", "routing/layer1.moe.topk_kept"):
        assert key in run.data.metrics, key
    assert {"loss", "grad_norm", "eval_before_loss", "eval_after_loss"} <= run.data.metrics.keys()
    # both runs' outputs (the resumed run logs them again, the same names)
    logged = sorted(
        Path(artifact.path).name for artifact in client.list_artifacts(run.info.run_id, "outputs")
    )
    assert logged == OUTPUTS
