"""Expert-aware LoRA, experts picked from data, router and expert freezing."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification
from jetmoe_ft.adapters.adapt import adapt_model, parameter_group, trainable_parameter_table
from jetmoe_ft.adapters.lora import ExpertLoraLayer, expert_lora_layers
from jetmoe_ft.adapters.selection import keep_top_p, select_experts
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.config import RecipeError, parse_recipe
from jetmoe_ft.loading import load_trained_model

from .conftest import randomize_biases, tiny_kwargs


def _recipe(tmp_path, text: str = "", *argv: str):
    path = tmp_path / "recipe.yaml"
    path.write_text("dataset_name: chatterbot\nmodel_name_or_path: jetmoe-ft/tiny\nbf16: false\n" + text)
    return parse_recipe(SFTConfig, ["--config", str(path), "--output_dir", str(tmp_path / "out"), *argv])


def _model(seed: int = 0, cls=JetMoeForCausalLM, **overrides):
    torch.manual_seed(seed)
    model = cls(JetMoeConfig(**tiny_kwargs(**overrides))).eval()
    randomize_biases(model)
    return model


def _randomize_adapters(model, std: float = 0.1, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


IDS = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_expert_lora_equals_merged_weights_and_loads_in_transformers(tmp_path, backend):
    recipe = _recipe(
        tmp_path, "lora_targets: [moa_experts, moe_experts, kv_proj]\nlora_r: 4\nlora_alpha: 8\n"
    )
    model = adapt_model(recipe, _model(moe_backend=backend))
    layers = expert_lora_layers(model)
    assert len(layers) == 2 * 2 * 2  # 2 layers x (MoA, MoE) x (input, output projections)
    _randomize_adapters(model)
    model.eval()
    adapted = model(IDS).logits

    merged = model.merge_and_unload()
    assert type(merged) is JetMoeForCausalLM
    torch.testing.assert_close(merged(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    theirs = transformers.JetMoeForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(theirs(IDS).logits, adapted, atol=1e-4, rtol=1e-4)


def test_backends_agree_forward_and_backward(tmp_path):
    results = []
    for backend in ("loop", "grouped_mm"):
        recipe = _recipe(tmp_path, "lora_targets: [moa_experts, moe_experts]\nlora_r: 4\n")
        model = adapt_model(recipe, _model(moe_backend=backend))
        _randomize_adapters(model)
        model(IDS).logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((model(IDS).logits.detach(), grads))
    (logits_loop, grads_loop), (logits_mm, grads_mm) = results
    torch.testing.assert_close(logits_mm, logits_loop, atol=1e-5, rtol=1e-5)
    assert grads_loop.keys() == grads_mm.keys() and len(grads_loop) == 16
    for name in grads_loop:
        torch.testing.assert_close(grads_mm[name], grads_loop[name], atol=1e-5, rtol=1e-4)


def test_adapter_on_one_expert_changes_only_tokens_routed_to_it(tmp_path):
    recipe = _recipe(tmp_path, "lora_targets: [moe_experts]\nlora_experts: {0: [2]}\nlora_r: 4\n")
    base = _model()
    captured = {}
    handle = base.model.layers[0].mlp.register_forward_hook(
        lambda m, a, out: captured.__setitem__("base", out)
    )
    base(IDS)
    handle.remove()
    model = adapt_model(recipe, base)
    assert sorted(expert_lora_layers(model)) == [
        "base_model.model.model.layers.0.mlp.input_linear",
        "base_model.model.model.layers.0.mlp.output_linear",
    ]
    _randomize_adapters(model)
    model.base_model.model.model.layers[0].mlp.register_forward_hook(
        lambda m, a, out: captured.__setitem__("adapted", out)
    )
    model(IDS)
    (base_out, logits), (adapted_out, _) = captured["base"], captured["adapted"]
    routed_to_2 = (logits.topk(2, dim=-1).indices == 2).any(-1).view(base_out.shape[:2])
    changed = (adapted_out - base_out).abs().amax(-1) > 1e-6
    assert routed_to_2.any() and (~routed_to_2).any()
    assert torch.equal(changed, routed_to_2)


def test_subset_adapter_trains_only_its_experts(tmp_path):
    recipe = _recipe(tmp_path, "lora_targets: [moe_experts]\nlora_experts: [1, 3]\nlora_r: 4\n")
    model = adapt_model(recipe, _model())
    _randomize_adapters(model)
    model(IDS).logits.sum().backward()
    for layer in expert_lora_layers(model).values():
        assert layer.trained_experts() == [1, 3]
        for factor in (layer.lora_A["default"], layer.lora_B["default"]):
            per_expert = factor.weight.grad.flatten(1).abs().sum(1)
            assert (per_expert[[0, 2]] == 0).all() and (per_expert[[1, 3]] > 0).all()
        delta = layer.get_delta_weight("default")
        assert (delta[[0, 2]] == 0).all() and (delta[[1, 3]] != 0).any()


def test_dropout_acts_in_training_only(tmp_path):
    recipe = _recipe(tmp_path, "lora_targets: [moe_experts]\nlora_dropout: 0.5\nlora_r: 4\n")
    model = adapt_model(recipe, _model())
    _randomize_adapters(model)
    model.train()
    assert not torch.allclose(model(IDS).logits, model(IDS).logits)
    model.eval()
    torch.testing.assert_close(model(IDS).logits, model(IDS).logits)


def test_adapter_directory_round_trip_needs_no_user_code(tmp_path):
    recipe = _recipe(tmp_path, "lora_targets: [moa_experts, moe_experts, kv_proj, lm_head]\nlora_r: 4\n")
    base = _model()
    base.save_pretrained(tmp_path / "base")
    model = adapt_model(recipe, JetMoeForCausalLM.from_pretrained(tmp_path / "base"))
    _randomize_adapters(model)
    model.eval()
    expected = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }

    loaded = load_trained_model(tmp_path / "adapter")
    assert isinstance(loaded, PeftModel) and len(expert_lora_layers(loaded)) == 8
    torch.testing.assert_close(loaded.eval()(IDS).logits, expected)
    merged = load_trained_model(tmp_path / "adapter", merge=True)
    assert type(merged) is JetMoeForCausalLM
    torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_classification_adapter_keeps_its_head(tmp_path):
    recipe = _recipe(tmp_path, "lora_targets: [moe_experts]\nlora_r: 4\n")
    base = _model(cls=JetMoeForSequenceClassification, num_labels=3, pad_token_id=0)
    base.save_pretrained(tmp_path / "base")
    model = adapt_model(
        recipe, JetMoeForSequenceClassification.from_pretrained(tmp_path / "base"), task_type="SEQ_CLS"
    )
    assert any("score.modules_to_save" in name and p.requires_grad for name, p in model.named_parameters())
    model.save_pretrained(tmp_path / "adapter")
    assert isinstance(load_trained_model(tmp_path / "adapter", JetMoeForSequenceClassification), PeftModel)

    headless = _recipe(tmp_path, "lora_targets: [moe_experts]\nlora_r: 4\n")
    model = adapt_model(headless, JetMoeForCausalLM.from_pretrained(tmp_path / "base"))
    model.save_pretrained(tmp_path / "causal")
    with pytest.raises(RecipeError, match="no classification head"):
        load_trained_model(tmp_path / "causal", JetMoeForSequenceClassification)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora_targets: [moe_expert]\n", "unknown target `moe_expert` (did you mean `moe_experts`?)"),
        ("lora_targets: [moe_experts]\nlora_experts: some\n", "lora_experts: expected all, auto"),
        ("lora_experts: [1]\n", "set `lora_targets:`"),
        ("lora_targets: [router]\nfreeze_router: all\n", "contradicts `freeze_router: all`"),
        ("use_peft: true\nlora_target_modules: [q_proj]\n", "no module named `q_proj`"),
        ("use_peft: true\nlora_target_modules: all-linear\n", "reaches only kv_proj and the routers"),
        ("lora_targets: [moe_experts]\nlora_experts: {7: [0]}\n", "layer 7 does not exist"),
        ("lora_targets: [moe_experts]\nlora_experts: [9]\n", "expert 9 does not exist"),
        ("finetune_experts: [0]\nweight_decay: 0.1\n", "set `weight_decay: 0`"),
    ],
)
def test_bad_adapter_choices_are_explained(tmp_path, text, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        adapt_model(_recipe(tmp_path, text), _model())


def test_parameter_table_groups():
    assert parameter_group("model.layers.0.self_attention.experts.input_linear.weight") == "MoA experts"
    assert parameter_group("model.layers.0.self_attention.experts.router.layer.weight") == "routers"
    assert (
        parameter_group("base_model.model.model.layers.1.mlp.output_linear.lora_B.default.weight")
        == "MoE experts"
    )
    assert parameter_group("model.layers.0.self_attention.kv_proj.lora_A.default.weight") == "kv_proj"
    assert parameter_group("score.weight") == "heads" and parameter_group("model.norm.weight") == "other"
    table = trainable_parameter_table(_model())
    assert "MoA experts" in table and "100.00%" in table.splitlines()[-1]


def _train_steps(model, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.0):
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    for _ in range(steps):
        outputs = model(IDS, labels=IDS, output_router_logits=True)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_frozen_routers_stay_bit_identical_in_full_fine_tuning(tmp_path, capsys):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapt_model(_recipe(tmp_path, "freeze_router: moa\n"), model)
    assert "router loss no longer trains them" in capsys.readouterr().out
    _train_steps(model)
    for name, param in model.named_parameters():
        if "self_attention.experts.router" in name:
            assert torch.equal(param, before[name]), name
        elif name.endswith("router.layer.weight") or "input_linear" in name:
            assert not torch.equal(param, before[name]), name


def test_lora_routers_frozen_by_default_trained_whole_when_asked(tmp_path):
    model = adapt_model(_recipe(tmp_path, "lora_targets: [moe_experts]\nlora_r: 4\n"), _model())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".router." in n)
    assert not any(".router." in name for name in expert_lora_layers(model))
    model = adapt_model(
        _recipe(tmp_path, "lora_targets: [moe_experts]\nlora_r: 4\nfreeze_router: moa\n"), _model()
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".router." in n}
    assert trained and all(".mlp.router." in n for n in trained)
    model = adapt_model(_recipe(tmp_path, "lora_targets: [router]\nlora_r: 4\n"), _model())
    assert any(".router.layer.lora_A" in n for n, _ in model.named_parameters())


def test_finetune_chosen_experts_leaves_others_bit_identical(tmp_path):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapt_model(_recipe(tmp_path, "finetune_experts: {0: [1], 1: [0, 3]}\nweight_decay: 0.0\n"), model)
    _train_steps(model)
    for name, param in model.named_parameters():
        if name.endswith(("input_linear.weight", "output_linear.weight")):
            chosen = [1] if ".layers.0." in name else [0, 3]
            others = [e for e in range(4) if e not in chosen]
            assert torch.equal(param[others], before[name][others]), name
            assert not torch.equal(param[chosen], before[name][chosen]), name


def test_keep_top_p():
    shares = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    assert keep_top_p(shares, 0.4) == [1]
    assert keep_top_p(shares, 0.5) == [1, 3]
    assert keep_top_p(shares, 0.7) == [1, 3]
    assert keep_top_p(shares, 0.71) == [1, 3, 4]
    assert keep_top_p(shares, 1.0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("score", ["gate", "token"])
def test_selection_follows_the_routers(score):
    model = _model(vocab_size=32000)
    router = model.model.layers[1].mlp.router
    favoured = torch.nn.Linear(64, 4, bias=True)  # a router that always picks expert 3 first
    with torch.no_grad():
        favoured.weight.copy_(router.layer.weight)
        favoured.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    router.layer = favoured
    texts = ["Hello there, how are you?", "What is a computer?", "Tell me a joke about robots."]
    selection = select_experts(model, texts, load_tokenizer(), score=score, top_p=0.6)
    assert selection.shares.shape == (2, 2, 4) and selection.tokens > 0
    torch.testing.assert_close(selection.shares.sum(-1), torch.ones(2, 2))
    assert 3 in selection.experts[(1, "moe")] and len(selection.experts[(1, "moe")]) <= 2
    expected_share = 1.0 if score == "gate" else 0.5  # all gate mass, or one of the two picks of every token
    assert selection.shares[1, 1, 3].item() == pytest.approx(expected_share, abs=1e-3)
    for (layer, kind), experts in selection.experts.items():
        assert experts == keep_top_p(selection.shares[layer, ("moa", "moe").index(kind)], 0.6)


def test_auto_selection_writes_report_and_drives_lora(tmp_path):
    data = Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]
                for i in range(12)
            ]
        }
    )
    recipe = _recipe(
        tmp_path,
        "lora_targets: [moe_experts, moa_experts]\nlora_experts: auto\nexpert_top_p: 0.3\nlora_r: 4\n",
    )
    model = adapt_model(recipe, _model(vocab_size=32000), train_dataset=data, tokenizer=load_tokenizer())
    report = json.loads((tmp_path / "out" / "expert_selection.json").read_text())
    assert (tmp_path / "out" / "expert_selection.png").stat().st_size > 1000
    assert report["score"] == "gate" and len(report["layers"]) == 2
    for name, layer in expert_lora_layers(model).items():
        kind = "moa" if "self_attention" in name else "moe"
        index = int(name.split("layers.")[1].split(".")[0])
        assert layer.trained_experts() == report["layers"][index][kind]["experts"]
        assert 1 <= len(layer.trained_experts()) < 4
    assert isinstance(next(iter(expert_lora_layers(model).values())), ExpertLoraLayer)


def test_tiny_lora_recipe_learns_and_saves_an_adapter(tmp_path):
    from jetmoe_ft.sft import main as sft_main

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "sft_lora.yaml")
    output_dir = tmp_path / "run"
    metrics = sft_main(
        [
            "--config",
            recipe,
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "8",
            "--max_length",
            "64",
            "--per_device_train_batch_size",
            "8",
            "--max_eval_samples",
            "32",
            "--save_steps",
            "6",
        ]
    )
    assert metrics["eval_after_loss"] < metrics["eval_before_loss"] - 0.5
    assert (output_dir / "adapter_config.json").is_file() and not (output_dir / "model.safetensors").exists()
    config = json.loads((output_dir / "adapter_config.json").read_text())
    # the tiny model ties its head to the input embeddings: PEFT trains the one shared matrix
    assert config["modules_to_save"] in (["lm_head"], ["model.embed_tokens"]) and config["r"] == 16
    loaded = load_trained_model(output_dir)
    assert len(expert_lora_layers(loaded)) == 4 * 2 * 2
    assert not any(".router." in name for name, _ in loaded.named_parameters() if "lora_" in name)


def test_an_adapter_trained_on_a_merged_adapter_loads_with_both(tmp_path):
    from jetmoe_ft.assets import build_tiny_model
    from jetmoe_ft.loading import load_recipe_model

    first = adapt_model(_recipe(tmp_path, "lora_targets: [moe_experts]\nlora_r: 4\n"), build_tiny_model(0))
    _randomize_adapters(first, seed=1)
    first.save_pretrained(tmp_path / "first")
    recipe = _recipe(
        tmp_path, "lora_targets: [moa_experts]\nlora_r: 4\n", "--model_name_or_path", str(tmp_path / "first")
    )
    second = adapt_model(recipe, load_recipe_model(recipe))
    _randomize_adapters(second, seed=2)
    second.eval()
    ids = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = second(ids).logits
    second.save_pretrained(tmp_path / "second")
    loaded = load_trained_model(tmp_path / "second", merge=True)
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
