"""A run's output says what it is (model card), and a run's stderr holds no library noise a user cannot act on."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOISE = (
    "gemm_4bit_forward",
    "Setting accelerator to CPU",
    "is deprecated and will be removed in v6",
    "pin_memory",
    "Could not find a config file",
    "fine-tuned version of [None]",
)


def test_a_lora_run_writes_a_true_card_and_no_noise(tmp_path):
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "jetmoe_ft.sft", "--config", str(ROOT / "recipes/tiny/sft_lora.yaml")]
    command += ["--output_dir", str(output_dir), "--max_train_samples", "16", "--max_eval_samples", "4"]
    command += ["--max_steps", "2", "--max_length", "48", "--save_strategy", "no", "--report_to", "none"]
    command += ["--gradient_checkpointing", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for text in NOISE:
        assert text not in result.stderr + result.stdout, text
    card = (output_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "jetmoe-ft/tiny" and front["datasets"] == ["chatterbot"]
    assert front["library_name"] == "peft" and "sft" in front["tags"]
    assert (
        "recipes/tiny/sft_lora.yaml" in card and "| loss |" in card and "![routing](routing_load.png)" in card
    )
    assert "[None]" not in card and "More Information Needed" not in card
