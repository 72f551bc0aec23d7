"""Every recipe x load_in_4bit combination a user can write runs, or refuses in one line (fp32, bf16, fp16
activations; MoA and MoE experts; kv_proj quantized)."""

from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

from jetmoe_ft.cls import cli as cls_cli  # noqa: E402
from jetmoe_ft.sft import cli as sft_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max_train_samples", "8", "--max_eval_samples", "4", "--max_steps", "1", "--max_length", "32"]
SHORT += ["--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none"]


@pytest.mark.parametrize(
    "dtype, targets",
    [
        (
            [],
            ["moa_experts", "moe_experts", "kv_proj"],
        ),  # fp32 recipe: 4-bit compute in bf16, fp32 activations
        (["--dtype", "bfloat16"], ["moa_experts", "moe_experts", "kv_proj"]),
        (["--dtype", "float16"], ["moa_experts", "moe_experts", "kv_proj"]),
        ([], ["moe_experts"]),  # MoA experts and kv_proj quantized, frozen, no adapter
    ],
)
def test_qlora_sft_runs_in_each_dtype(tmp_path, capsys, dtype, targets):
    status = sft_cli(
        [
            "--config",
            str(ROOT / "recipes/tiny/sft_lora.yaml"),
            "--load_in_4bit",
            "true",
            "--lora_targets",
            *targets,
        ]
        + ["--output_dir", str(tmp_path), *dtype, *SHORT]
    )
    err = capsys.readouterr().err
    assert status == 0, err[-2000:]
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_qlora_classifier_runs_in_fp32(tmp_path, capsys):
    status = cls_cli(
        ["--config", str(ROOT / "recipes/tiny/cls.yaml"), "--load_in_4bit", "true", "--model_name_or_path"]
        + ["jetmoe-ft/tiny", "--lora_targets", "moa_experts", "moe_experts", "kv_proj"]
        + ["--output_dir", str(tmp_path), *SHORT]
    )
    err = capsys.readouterr().err
    assert status == 0, err[-2000:]
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_qlora_with_whole_trained_head_refuses_in_one_line(tmp_path, capsys):
    # the README's `sft_lora.yaml --load_in_4bit true`: its lora_targets include lm_head
    status = sft_cli(
        ["--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--load_in_4bit", "true"]
        + ["--output_dir", str(tmp_path), *SHORT]
    )
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "load_in_4bit: lm_head in lora_targets" in lines[0] and "drop them" in lines[0]
    assert not (tmp_path / "adapter_model.safetensors").exists()
