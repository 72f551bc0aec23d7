import dataclasses
import json

import pytest
import transformers

from jetmoe_ft import JetMoeConfig

from .conftest import tiny_kwargs

OURS_ONLY = {"moe_backend", "expert_row_multiple", "router_z_loss_coef", "router_loss_ignore_padding"}


def _defaults(cls) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {
        name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for name, f in fields.items()
    }


def test_every_transformers_field_with_the_same_default():
    reference, ours = _defaults(transformers.JetMoeConfig), _defaults(JetMoeConfig)
    assert set(reference) <= set(ours)
    assert set(ours) - set(reference) == OURS_ONLY
    for name, default in reference.items():
        assert ours[name] == default, name
    assert JetMoeConfig().to_diff_dict().keys() >= {"model_type"}
    assert JetMoeConfig().model_type == transformers.JetMoeConfig().model_type == "jetmoe"


def test_attention_heads_and_aliases():
    config = JetMoeConfig(num_key_value_heads=4, num_experts_per_tok=3, num_local_experts=6)
    assert config.num_attention_heads == 12
    assert config.num_experts == 6
    assert config.head_dim == config.kv_channels
    assert config.router_aux_loss_coef == config.aux_loss_coef == 0.01
    config.router_aux_loss_coef = 0.02  # TRL writes it back
    assert config.aux_loss_coef == 0.02
    assert "num_experts" not in config.to_dict() and "router_aux_loss_coef" not in config.to_dict()


def test_config_json_both_ways(tmp_path):
    transformers.JetMoeConfig(**tiny_kwargs(), rms_norm_eps=1e-5).save_pretrained(tmp_path / "theirs")
    ours = JetMoeConfig.from_pretrained(tmp_path / "theirs")
    assert ours.rms_norm_eps == 1e-5 and ours.num_local_experts == 4 and ours.moe_backend == "auto"

    JetMoeConfig(**tiny_kwargs(), moe_backend="loop", router_z_loss_coef=0.2).save_pretrained(
        tmp_path / "ours"
    )
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "jetmoe" and saved["moe_backend"] == "loop"
    theirs = transformers.JetMoeConfig.from_pretrained(tmp_path / "ours")
    assert theirs.hidden_size == 64 and theirs.num_attention_heads == 4
    assert JetMoeConfig.from_pretrained(tmp_path / "ours").router_z_loss_coef == 0.2


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(moe_backend="fast"), "moe_backend"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(expert_row_multiple=0), "expert_row_multiple"),
    ],
)
def test_bad_values_are_named(bad, message):
    with pytest.raises(Exception, match=message):
        JetMoeConfig(**bad)
