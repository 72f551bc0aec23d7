"""The console: one short line per logging step that names the loss, while every routing key still reaches the
logs (`log_history`, and from there metrics, TensorBoard and the trackers)."""

import json
from pathlib import Path

from jetmoe_ft.sft import cli as sft_cli
from jetmoe_ft.training.console import ConsoleLine, routing_summary

ROOT = Path(__file__).resolve().parents[1]
LINE_LIMIT = 160


def _routing_logs() -> dict[str, float]:
    """A logging step's routing keys for 2 layers x (moa, moe) x 4 experts, plus kept shares."""
    logs = {}
    for layer in range(2):
        for kind in ("moa", "moe"):
            loads = [0.25, 0.25, 0.25, 0.25]
            if (layer, kind) == (1, "moe"):
                loads = [0.55, 0.3, 0.14, 0.01]
            for expert, load in enumerate(loads):
                logs[f"routing/layer{layer}.{kind}.load.e{expert}"] = load
            logs[f"routing/layer{layer}.{kind}.load_min"] = min(loads)
            logs[f"routing/layer{layer}.{kind}.load_max"] = max(loads)
            logs[f"routing/layer{layer}.{kind}.entropy"] = 0.9
            logs[f"routing/layer{layer}.{kind}.topk_kept"] = 0.7 if (layer, kind) == (0, "moa") else 0.95
            logs[f"routing/layer{layer}.{kind}.kl"] = 0.01
    return logs


def test_the_routing_summary_names_the_least_and_most_loaded_expert_and_the_lowest_kept_share():
    assert routing_summary(_routing_logs()) == ["load 0.010@L1.moe.e3..0.550@L1.moe.e0", "kept 0.700@L0.moa"]
    # without per-expert keys, the per-router extremes
    coarse = {key: value for key, value in _routing_logs().items() if ".load.e" not in key}
    assert routing_summary(coarse)[0] == "load 0.010@L1.moe..0.550@L1.moe"


def test_a_line_has_the_headline_values_in_order():
    logs = {"loss": 2.5, "grad_norm": 1.25, "learning_rate": 2e-3, "aux_loss": 11.6, "epoch": 0.5}
    line = ConsoleLine()({**logs, **_routing_logs()}, step=10, max_steps=120)
    assert line == (
        "step 10/120  loss 2.5000  aux 11.6  lr 2.00e-03  grad 1.25  load 0.010@L1.moe.e3..0.550@L1.moe.e0  "
        "kept 0.700@L0.moa"
    )
    assert ConsoleLine()({"eval_after_loss": 2.25, "eval_after_runtime": 3.0}, 120, 120) == (
        "eval_after at step 120: loss 2.2500  3.0 s"
    )


def test_a_logging_step_prints_one_short_line_and_log_history_keeps_every_routing_key(tmp_path, capsys):
    args = ["--config", str(ROOT / "recipes" / "tiny" / "sft.yaml")]
    args += ["--max_train_samples", "16", "--max_eval_samples", "4", "--per_device_train_batch_size", "2"]
    args += ["--max_length", "48", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2"]
    args += ["--report_to", "none"]
    for disable_tqdm in ("false", "true"):  # transformers' progress bar, then its plain printer
        output_dir = tmp_path / f"tqdm-off-{disable_tqdm}"
        assert sft_cli([*args, "--output_dir", str(output_dir), "--disable_tqdm", disable_tqdm]) == 0
        out = capsys.readouterr().out
        steps = [
            part for part in out.replace("\r", "\n").splitlines() if "step 1/2" in part or "step 2/2" in part
        ]
        lines = [part[part.index("step ") :] for part in steps]
        assert len(lines) == 2, out[-3000:]
        for line in lines:
            assert line.startswith(("step 1/2  loss ", "step 2/2  loss ")), line
            assert len(line) <= LINE_LIMIT and "aux " in line and " load " in line and " kept " in line, line
        assert "routing/layer0" not in out  # no dump of the logged keys
        history = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        for entry in [entry for entry in history if "loss" in entry]:
            routing = [key for key in entry if key.startswith("routing/")]
            # 4 layers x 2 routers x (entropy, load_min, load_max, 8 expert loads, topk_kept, kl)
            assert len(routing) == 4 * 2 * 13, sorted(routing)
            assert "aux_loss" in entry and "grad_norm" in entry
