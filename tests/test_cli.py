"""The command line explains itself: `jetmoe-ft COMMAND --help` lists recipe keys, `jetmoe-ft recipes` lists recipes."""

from pathlib import Path

import pytest

from jetmoe_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("command", "own_key"), [("sft", "packing"), ("dpo", "beta"), ("cls", "label_column")]
)
def test_help_lists_the_recipe_keys_by_group_with_defaults(capsys, command, own_key):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for group in ("JetMoE:", "adapters:", "data:", "training:"):
        assert group in out, group
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["aux_loss_coef"].split()[1] == "null"
    assert lines["lora_targets"].split()[1] == "null" and "moa_experts" in lines["lora_targets"]
    assert lines["learning_rate"].split()[1] in ("2e-05", "1e-06", "5e-05", "0.0001", "1e-05")
    assert own_key in lines


def test_recipes_lists_every_recipe_with_its_first_comment(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    shipped = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert len(out) == len(shipped)
    assert any(line.startswith("recipes/tiny/sft.yaml") and "Supervised fine-tuning" in line for line in out)


def test_unknown_command_is_one_line_and_the_list(capsys):
    assert main(["fly"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'fly'") and "recipes" in err
