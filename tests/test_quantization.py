"""QLoRA: 4-bit experts and dense projections (bitsandbytes, CPU backend here), expert LoRA on top."""

import pytest
import torch
from trl import SFTConfig

pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import dequantize_4bit  # noqa: E402

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM  # noqa: E402
from jetmoe_ft.adapters.adapt import adapt_model  # noqa: E402
from jetmoe_ft.adapters.lora import expert_lora_layers  # noqa: E402
from jetmoe_ft.adapters.quantization import JetMoeParallelExperts4bit, quantize_model_4bit  # noqa: E402
from jetmoe_ft.config import RecipeError, parse_recipe  # noqa: E402
from jetmoe_ft.loading import load_recipe_model, load_trained_model  # noqa: E402

from .conftest import randomize_biases, tiny_kwargs  # noqa: E402

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _pair(backend: str):
    """A 4-bit model and a bf16 twin holding exactly its dequantized weights."""
    torch.manual_seed(0)
    model = JetMoeForCausalLM(
        JetMoeConfig(**tiny_kwargs(moe_backend=backend, hidden_size=128, kv_channels=32))
    ).eval()
    randomize_biases(model)
    quantized = quantize_model_4bit(_copy(model), compute_dtype=torch.bfloat16)
    twin = _copy(model).to(torch.bfloat16)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            twin_module = twin.get_submodule(name)
            if isinstance(module, JetMoeParallelExperts4bit):
                twin_module.weight.copy_(module.dequantize())
            elif name.endswith("kv_proj"):
                twin_module.weight.copy_(dequantize_4bit(module.weight.data, module.weight.quant_state))
    return quantized, twin


def _copy(model):
    clone = JetMoeForCausalLM(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_4bit_model_computes_with_its_dequantized_weights(backend):
    quantized, twin = _pair(backend)
    experts = quantized.model.layers[0].mlp.input_linear
    assert isinstance(experts, JetMoeParallelExperts4bit) and experts.weight_4bit.dtype == torch.uint8
    assert experts.weight_4bit.numel() == experts.num_experts * experts.output_size * experts.input_size // 2
    kv_proj = quantized.model.layers[0].self_attention.kv_proj
    assert type(kv_proj).__name__ == "Linear4bit" and kv_proj.weight.bnb_quantized
    assert not any(p.requires_grad for p in quantized.parameters())
    with torch.no_grad():
        expected = twin(IDS).logits.float()
        actual = quantized.to(torch.bfloat16)(IDS).logits.float()
    torch.testing.assert_close(actual, expected, atol=0.05, rtol=0.05)


def _recipe(tmp_path, text: str = ""):
    path = tmp_path / "recipe.yaml"
    path.write_text("dataset_name: chatterbot\nmodel_name_or_path: jetmoe-ft/tiny\nbf16: false\n" + text)
    return parse_recipe(SFTConfig, ["--config", str(path), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_expert_lora_gradients_through_4bit_experts(tmp_path, backend):
    recipe = _recipe(tmp_path, "lora_targets: [moa_experts, moe_experts, kv_proj]\nlora_r: 4\n")
    quantized, twin = _pair(backend)
    results = []
    for model in (quantized, twin):
        torch.manual_seed(1)
        adapted = adapt_model(recipe, model)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = adapted(IDS, labels=IDS).loss
        loss.backward()
        results.append({n: p.grad.float() for n, p in adapted.named_parameters() if p.requires_grad})
    grads_4bit, grads_twin = results
    assert grads_4bit.keys() == grads_twin.keys() and any("mlp.input_linear.lora_A" in n for n in grads_4bit)
    for name in grads_4bit:
        cosine = torch.nn.functional.cosine_similarity(
            grads_4bit[name].flatten(), grads_twin[name].flatten(), dim=0
        )
        assert cosine > 0.98, name


def test_backward_keeps_no_16bit_expert_weights():
    quantized, _ = _pair("grouped_mm")
    experts = quantized.model.layers[0].mlp.input_linear
    saved_shapes = []
    rows = torch.randn(32, experts.input_size, requires_grad=True)
    routing = quantized.model.layers[0].mlp.router(rows).routing
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t
    ):
        out = experts(rows, routing)
    out.float().square().sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    full = (experts.num_experts, experts.output_size, experts.input_size)
    assert full not in saved_shapes and (experts.output_size, experts.input_size) not in saved_shapes


def test_qlora_recipe_trains_and_saves_an_adapter(tmp_path):
    from jetmoe_ft.sft import main as sft_main

    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(
        "model_name_or_path: jetmoe-ft/tiny\ndataset_name: chatterbot\nload_in_4bit: true\nuse_bnb_nested_quant: true\n"
        "dtype: bfloat16\nlora_targets: [moa_experts, moe_experts, kv_proj]\nlora_r: 8\nlearning_rate: 3.0e-3\n"
        "max_length: 64\nper_device_train_batch_size: 4\nmax_steps: 3\nmax_eval_samples: 8\nbf16: false\n"
        "gradient_checkpointing: true\nreport_to: none\nsave_strategy: 'no'\nlogging_steps: 1\n"
    )
    output_dir = tmp_path / "run"
    metrics = sft_main(["--config", str(recipe), "--output_dir", str(output_dir)])
    assert metrics["eval_after_loss"] < metrics["eval_before_loss"]
    assert (output_dir / "adapter_config.json").is_file()
    loaded = load_trained_model(output_dir)
    assert len(expert_lora_layers(loaded)) == 16


@pytest.mark.parametrize(
    "text, message",
    [
        ("load_in_4bit: true\n", "4-bit weights are frozen"),
        ("load_in_8bit: true\nlora_targets: [moe_experts]\n", "4 bits only"),
        (
            "load_in_4bit: true\nlora_targets: [moe_experts]\nbnb_4bit_quant_type: int4\n",
            "'int4' is not one of fp4, nf4",
        ),
    ],
)
def test_bad_quantization_choices(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):  # at parsing or before the model loads
        load_recipe_model(_recipe(tmp_path, text))
