"""Strict loading: missing, unexpected or misshapen tensors, corrupt files and missing configs are one line each;
configs written by the official JetMoE code mean the same here."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification
from jetmoe_ft.assets import tiny_config
from jetmoe_ft.config import RecipeError
from jetmoe_ft.evaluation.eval_cls import cli as eval_cls_cli
from jetmoe_ft.loading import load_trained_model, strict_from_pretrained
from jetmoe_ft.sft import cli as sft_cli

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max_train_samples", "8", "--max_eval_samples", "4", "--per_device_train_batch_size", "2"]
SHORT += ["--max_length", "48", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none"]
# the embedded tokenizer's vocabulary, a small body: quick to save and to train a step
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8, intermediate_size=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A complete small JetMoE directory (the embedded tokenizer's vocabulary)."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    torch.manual_seed(0)
    JetMoeForCausalLM(tiny_config(**SMALL)).save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path, edit=None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    if edit is not None:
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _sft(capsys, model: Path, output_dir: Path, *extra) -> tuple[int, str, str]:
    status = sft_cli(
        ["--config", str(ROOT / "recipes/tiny/sft.yaml"), "--model_name_or_path", str(model)]
        + ["--tokenizer_name_or_path", "jetmoe-ft/embedded", "--output_dir", str(output_dir), *SHORT, *extra]
    )
    out = capsys.readouterr()
    return status, out.out, out.err


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _drop_expert(tensors: dict) -> None:
    del tensors["model.layers.0.mlp.input_linear.weight"]


def test_a_missing_tensor_is_refused_before_training(saved, tmp_path, capsys):
    model = _copy(saved, tmp_path, _drop_expert)
    status, _, err = _sft(capsys, model, tmp_path / "out")
    line = _one_line_error(err)
    assert status == 2
    assert "1 missing tensors" in line and "model.layers.0.mlp.input_linear.weight" in line
    assert "allow_partial_load" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_unexpected_tensor_is_refused(saved, tmp_path, capsys):
    model = _copy(saved, tmp_path, lambda tensors: tensors.update({"model.extra.weight": torch.zeros(2)}))
    status, _, err = _sft(capsys, model, tmp_path / "out")
    line = _one_line_error(err)
    assert status == 2 and "1 unexpected tensors (model.extra.weight)" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_allow_partial_load_accepts_a_partial_checkpoint_knowingly(saved, tmp_path, capsys):
    model = _copy(saved, tmp_path, _drop_expert)
    status, out, err = _sft(capsys, model, tmp_path / "out", "--allow_partial_load", "true")
    assert status == 0, err
    assert "allow_partial_load: loading" in out and "1 missing tensors" in out
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_tensor_of_another_shape_is_one_line(saved, tmp_path, capsys):
    model = _copy(saved, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 16}))
    status, _, err = _sft(capsys, model, tmp_path / "out")
    line = _one_line_error(err)
    assert status == 2 and "another shape" in line and "mlp.input_linear.weight" in line


def test_corrupt_weights_are_one_line(saved, tmp_path, capsys):
    model = _copy(saved, tmp_path)
    (model / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    status, _, err = _sft(capsys, model, tmp_path / "out")
    line = _one_line_error(err)
    assert status == 2 and "cannot read the weights" in line and "damaged" in line


def test_a_directory_without_config_json_is_one_line_before_building(saved, tmp_path, capsys):
    model = _copy(saved, tmp_path)
    (model / "config.json").unlink()
    status, _, err = _sft(capsys, model, tmp_path / "out")
    line = _one_line_error(err)
    assert status == 2 and "has no config.json" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_missing_model_directory_says_so(tmp_path, capsys):
    status, _, err = _sft(capsys, tmp_path / "outputs" / "nothing-here", tmp_path / "out")
    line = _one_line_error(err)
    assert status == 2 and "no such directory" in line and "Repo id" not in line


def test_official_config_names_load_the_same_model(tmp_path):
    torch.manual_seed(0)
    ours = JetMoeForCausalLM(JetMoeConfig(**SMALL, vocab_size=64, num_local_experts=4, num_experts_per_tok=1))
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    renamed = {"intermediate_size": "ffn_hidden_size", "num_local_experts": "moe_num_experts"}
    renamed["num_experts_per_tok"] = "moe_top_k"
    official = {renamed.get(key, key): value for key, value in config.items()}
    official.update(glu=True, bias=True, num_attention_heads=2)  # 2 kv heads x top-1
    (tmp_path / "config.json").write_text(json.dumps(official))
    loaded = load_trained_model(tmp_path).eval()
    assert loaded.config.num_experts_per_tok == 1 and loaded.config.intermediate_size == 32
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours.eval()(ids).logits)
    loaded.save_pretrained(tmp_path / "again")
    saved_config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "moe_top_k" not in saved_config and saved_config["num_experts_per_tok"] == 1


@pytest.mark.parametrize(
    "values, words",
    [
        ({"glu": False}, "glu=false"),
        ({"bias": False}, "bias=false"),
        ({"moe_top_k": 1, "num_experts_per_tok": 3}, "disagrees"),
        ({"num_attention_heads": 32}, "num_attention_heads=32"),
    ],
)
def test_official_config_values_that_cannot_mean_the_same_are_refused(saved, tmp_path, capsys, values, words):
    model = _copy(saved, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **values}))
    status, _, err = _sft(capsys, model, tmp_path / "out")
    line = _one_line_error(err)
    assert status == 2 and words in line and "config.json" in line


def test_eval_cls_refuses_a_language_model(saved, tmp_path, capsys):
    status = eval_cls_cli(["--model", str(saved), "--dataset_name", "rotten_tomatoes", "--max_samples", "4"])
    line = _one_line_error(capsys.readouterr().err)
    assert status == 2 and "no classification head" in line
    assert not (saved / "eval").exists()


def test_a_new_classification_head_is_allowed_when_training_starts(saved):
    model = strict_from_pretrained(JetMoeForSequenceClassification, saved, new_head=True, num_labels=3)
    assert model.score.weight.shape[0] == 3
    with pytest.raises(RecipeError, match="1 missing tensors"):
        strict_from_pretrained(JetMoeForSequenceClassification, saved, num_labels=3)
