"""Recipe values that cannot run, or would silently do nothing, are one line at parse time or against the model's
config.json, before any data or weights load."""

from pathlib import Path

import pytest
import yaml

import jetmoe_ft.sft
from jetmoe_ft.evaluation.chat import main as chat_main
from jetmoe_ft.sft import cli as sft_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the loop gets as far as loading data or weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded data or weights before the check")

    monkeypatch.setattr(jetmoe_ft.sft, "load_recipe_datasets", refuse)
    monkeypatch.setattr(jetmoe_ft.sft, "load_recipe_model", refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.mark.parametrize(
    "recipe, args, words",
    [
        ("sft.yaml", ["--learning_rate", "-0.001"], ["learning_rate: -0.001 is out of range", "above 0"]),
        ("sft.yaml", ["--learning_rate", "0"], ["learning_rate: 0.0", "trains nothing"]),
        (
            "sft.yaml",
            ["--per_device_train_batch_size", "0"],
            ["per_device_train_batch_size: 0", "at least 1"],
        ),
        ("sft.yaml", ["--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps: 0"]),
        ("sft.yaml", ["--max_length", "0"], ["max_length: 0"]),
        ("sft_lora.yaml", ["--lora_r", "0"], ["lora_r: 0", "LoRA rank"]),
        ("sft_lora.yaml", ["--lora_dropout", "1.0"], ["lora_dropout: 1.0", "below 1"]),
        ("sft_lora.yaml", ["--lora_experts", "[99]"], ["lora_experts: expert 99 does not exist", "0..7"]),
        ("sft_lora.yaml", ["--lora_experts", "{9: [0]}"], ["lora_experts: layer 9 does not exist"]),
        (
            "sft_lora.yaml",
            ["--finetune_experts", "[0]"],
            ["finetune_experts", "cannot be combined with LoRA"],
        ),
        ("sft.yaml", ["--max_length", "4096"], ["max_length: 4096", "max_position_embeddings (1024"]),
        ("sft.yaml", ["--bf16", "true"], ["bf16:", "`bf16: false`"]),
    ],
)
def test_values_are_checked_before_anything_loads(tmp_path, capsys, nothing_loads, recipe, args, words):
    status = sft_cli(["--config", str(TINY / recipe), "--output_dir", str(tmp_path / "out"), *args])
    line = _error_line(capsys)
    assert status == 2
    for word in words:
        assert word in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_same_mixture_source_twice_is_refused(tmp_path, capsys, nothing_loads):
    recipe = yaml.safe_load((TINY / "sft.yaml").read_text())
    recipe.pop("dataset_name")
    recipe["datasets"] = [{"path": "chatterbot"}, {"path": "chatterbot", "weight": 0.5}]
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(recipe))
    status = sft_cli(["--config", str(path), "--output_dir", str(tmp_path / "out")])
    line = _error_line(capsys)
    assert status == 2 and "datasets[1]: the same source as datasets[0]" in line and "weight" in line


def test_a_missing_config_flag_says_so(capsys):
    status = sft_cli(["--learning_rate", "1e-4"])
    line = _error_line(capsys)
    assert status == 2 and "--config: missing" in line and "No data" not in line


def test_chat_refuses_a_classifier_directory(tmp_path, capsys):
    from jetmoe_ft import JetMoeForSequenceClassification
    from jetmoe_ft.assets import load_tokenizer, tiny_config

    small = dict(
        hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8, intermediate_size=32
    )
    JetMoeForSequenceClassification(tiny_config(**small, num_labels=2)).save_pretrained(tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    capsys.readouterr()
    status = chat_main(["--model", str(tmp_path), "--prompt", "Hello"])
    line = _error_line(capsys)
    assert status == 2 and "is a classifier" in line and "eval-cls" in line
