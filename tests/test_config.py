from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments
from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, SFTConfig
from trl.experimental.cpo import CPOConfig
from trl.experimental.orpo import ORPOConfig

from jetmoe_ft.cls import ClsArguments
from jetmoe_ft.config import RecipeError, parse_recipe, recipe_keys
from jetmoe_ft.grpo import GrpoArguments
from jetmoe_ft.orpo import MethodArguments
from jetmoe_ft.rm import RewardArguments

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml"))
LOOPS = {
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "cls": (TrainingArguments, ClsArguments),
    "rm": (RewardConfig, RewardArguments),
    "kto": KTOConfig,
    "orpo": (ORPOConfig, MethodArguments),
    "simpo": (CPOConfig, MethodArguments),
    "grpo": (GRPOConfig, GrpoArguments),
}
"""Recipe kind (file or folder name) -> training arguments class, or (training class, task fields class)."""


def _loop(path: Path) -> tuple[type, type | None]:
    kind = next(part for part in (path.stem, path.parent.name) if part.split("_")[0] in LOOPS).split("_")[0]
    loop = LOOPS[kind]
    return loop if isinstance(loop, tuple) else (loop, None)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_recipe_parses_and_says_how_to_run_it(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#")
    assert "jetmoe-ft" in path.read_text().split("\n\n")[0] or "accelerate launch" in path.read_text()
    # GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only machine unless told
    training_cls, task_cls = _loop(path)
    recipe = parse_recipe(training_cls, ["--config", str(path), "--use_cpu", "true"], task_cls=task_cls)
    assert recipe.model.model_name_or_path
    assert recipe.data.dataset_name or recipe.data.datasets


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("dataset_name: chatterbot\nbf16: false\n" + text)
    return path


def test_yaml_values_then_command_line_overrides(tmp_path):
    path = _write(
        tmp_path, "learning_rate: 2e-3\nmax_length: 64\nmoe_backend: loop\nlr_scheduler_type: cosine\n"
    )
    recipe = parse_recipe(
        SFTConfig, ["--config", str(path), "--max_length", "32", "--output_dir", str(tmp_path)]
    )
    assert recipe.training.learning_rate == 2e-3  # YAML reads `2e-3` as a string; it is converted
    assert recipe.training.max_length == 32
    assert recipe.jetmoe.moe_backend == "loop"
    assert recipe.values["max_length"] == 32 and recipe.values["lr_scheduler_type"] == "cosine"
    saved = yaml.safe_load(recipe.save(tmp_path).read_text())
    assert saved["max_length"] == 32 and saved["learning_rate"] == 2e-3


@pytest.mark.parametrize(
    "text, message",
    [
        ("learnin_rate: 1e-4\n", "unknown key `learnin_rate` (did you mean `learning_rate`?)"),
        ("learning_rate: fast\n", "learning_rate: expected a number, got 'fast'"),
        ("max_length: [1, 2]\n", "max_length: expected an integer, got a list"),
        ("lr_scheduler_type: cosin\n", "lr_scheduler_type: 'cosin' is not one of linear, cosine"),
        ("packing: maybe\n", "packing: expected true or false"),
        ("moe_backend: fast\n", "moe_backend: 'fast' is not one of auto, loop, grouped_mm"),
        ("datasets: [{path: chatterbot, wieght: 2}]\n", "Set either `dataset_name:` or `datasets:`"),
        ("test_split_size: 2\n", "test_split_size: expected a number between 0 and 1"),
        ("config: x.yaml\n", "`config` is not a recipe key"),
        ("learning_rate: [\n", "is not valid YAML"),
    ],
)
def test_user_mistakes_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe(SFTConfig, ["--config", str(_write(tmp_path, text))])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_mixture_entries_are_checked(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("bf16: false\ndatasets:\n  - path: chatterbot\n    wieght: 2\n")
    with pytest.raises(RecipeError, match=r"datasets\[0\]: unknown key `wieght` \(did you mean `weight`\?\)"):
        parse_recipe(SFTConfig, ["--config", str(path)])
    path.write_text("bf16: false\ndatasets:\n  - name: x\n")
    with pytest.raises(RecipeError, match=r"datasets\[0\]: `path:` is missing"):
        parse_recipe(SFTConfig, ["--config", str(path)])


def test_missing_file_unknown_override_and_no_data(tmp_path):
    with pytest.raises(RecipeError, match="no recipe file"):
        parse_recipe(SFTConfig, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(
        RecipeError, match=r"--learnin_rate: unknown option \(did you mean `learning_rate`\?\)"
    ):
        parse_recipe(SFTConfig, ["--config", str(_write(tmp_path, "")), "--learnin_rate", "1"])
    empty = tmp_path / "empty.yaml"
    empty.write_text("bf16: false\n")
    with pytest.raises(RecipeError, match="No data"):
        parse_recipe(SFTConfig, ["--config", str(empty)])


def test_recipe_keys_cover_every_group():
    keys = recipe_keys(SFTConfig)
    for key in ("learning_rate", "model_name_or_path", "dataset_name", "moe_backend", "router_z_loss_coef"):
        assert key in keys


def test_router_loss_weight_is_set_once(tmp_path):
    path = _write(tmp_path, "aux_loss_coef: 0.01\nrouter_aux_loss_coef: 0.02\n")
    with pytest.raises(RecipeError, match="Set the router loss weight once"):
        parse_recipe(SFTConfig, ["--config", str(path), "--output_dir", str(tmp_path)])
