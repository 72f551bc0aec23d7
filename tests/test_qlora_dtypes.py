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


@pytest.mark.parametrize("dtype", [[], ["--dtype", "bfloat16"]], ids=["fp32", "bf16"])
def test_the_readmes_qlora_command_trains_its_whole_head_too(tmp_path, capsys, dtype):
    # `sft_lora.yaml --load_in_4bit true`: its lora_targets include lm_head, trained whole in bf16 by TRL
    # while QLoRA's norms stay fp32; the LM head meets the hidden states in the head's dtype
    status = sft_cli(
        ["--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--load_in_4bit", "true"]
        + ["--output_dir", str(tmp_path), *dtype, *SHORT]
    )
    err = capsys.readouterr().err
    assert status == 0, err[-2000:]
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_an_evaluation_pass_keeps_the_gradient_through_4bit_kv_proj():
    """bitsandbytes repacks a CPU 4-bit weight for an inference kernel without backward on its first forward in
    evaluation mode; the evaluation before training must not cut the gradient to the layers below."""
    import torch

    from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
    from jetmoe_ft.adapters.quantization import quantize_model_4bit

    from .conftest import tiny_kwargs

    torch.manual_seed(0)
    model = quantize_model_4bit(JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(hidden_size=64))))
    ids = torch.randint(1, 128, (1, 6))

    def input_gradient():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.float().sum().backward()
        return embeds.grad

    model.train()
    before = input_gradient()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:, :1])  # one token in evaluation mode: where bitsandbytes would repack
    model.train()
    torch.testing.assert_close(input_gradient(), before)
