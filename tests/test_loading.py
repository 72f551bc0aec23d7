import pytest
import torch
from trl import SFTConfig

from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.config import RecipeError, parse_recipe
from jetmoe_ft.loading import load_recipe_model, load_recipe_tokenizer
from jetmoe_ft.modeling import JetMoeForSequenceClassification


def _recipe(tmp_path, *overrides):
    path = tmp_path / "recipe.yaml"
    path.write_text("model_name_or_path: jetmoe-ft/tiny\ndataset_name: chatterbot\nbf16: false\n")
    return parse_recipe(SFTConfig, ["--config", str(path), "--output_dir", str(tmp_path), *overrides])


def test_jetmoe_fields_reach_the_model(tmp_path):
    recipe = _recipe(
        tmp_path,
        *("--moe_backend", "loop", "--aux_loss_coef", "0.02", "--router_z_loss_coef", "0.3"),
        *("--router_loss_ignore_padding", "true", "--attn_implementation", "eager", "--dtype", "bfloat16"),
    )
    model = load_recipe_model(recipe)
    config = model.config
    assert (config.moe_backend, config.aux_loss_coef, config.router_z_loss_coef) == ("loop", 0.02, 0.3)
    assert config.router_loss_ignore_padding is True
    assert config._attn_implementation == "eager"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.input_linear.backend == "loop"


def test_tiny_model_is_the_seeded_one_and_takes_a_head(tmp_path):
    first = load_recipe_model(_recipe(tmp_path, "--model_seed", "3"))
    again = load_recipe_model(_recipe(tmp_path, "--model_seed", "3"))
    other = load_recipe_model(_recipe(tmp_path, "--model_seed", "4"))
    torch.testing.assert_close(first.lm_head.weight, again.lm_head.weight)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)
    classifier = load_recipe_model(_recipe(tmp_path), JetMoeForSequenceClassification, num_labels=3)
    assert classifier.score.out_features == 3


def test_saved_model_directory_loads_with_overrides(tmp_path):
    load_recipe_model(_recipe(tmp_path)).save_pretrained(tmp_path / "saved")
    load_tokenizer().save_pretrained(tmp_path / "saved")
    recipe = _recipe(tmp_path, "--model_name_or_path", str(tmp_path / "saved"), "--moe_backend", "loop")
    assert load_recipe_model(recipe).config.moe_backend == "loop"
    assert load_recipe_tokenizer(recipe).chat_template


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("--model_name_or_path", "./no/such/dir"), "no such directory"),
        (("--load_in_4bit", "true"), "4-bit weights are frozen; train LoRA on them"),
        (("--tokenizer_name_or_path", "./missing-tokenizer"), "cannot load a tokenizer"),
    ],
)
def test_model_and_tokenizer_mistakes(tmp_path, overrides, message):
    recipe = _recipe(tmp_path, *overrides)
    with pytest.raises(RecipeError, match=message):
        if "tokenizer" in overrides[0]:
            load_recipe_tokenizer(recipe)
        else:
            load_recipe_model(recipe)
