"""ORPO and SimPO: one reference-free loop, the method from the recipe; the held-out pairwise accuracy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from trl.experimental.orpo import ORPOConfig

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.config import RecipeError
from jetmoe_ft.orpo import JetMoeORPOTrainer, parse_method_recipe, recipe_method
from jetmoe_ft.orpo import main as orpo_main

from .conftest import learnable_pairs, tiny_kwargs

ROOT = Path(__file__).resolve().parents[1]
ORPO = str(ROOT / "recipes" / "tiny" / "orpo.yaml")
SIMPO = str(ROOT / "recipes" / "tiny" / "simpo.yaml")
QUICK = [
    *("--model_name_or_path", "jetmoe-ft/tiny", "--max_length", "48"),
    *("--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8"),
    *("--max_train_samples", "16", "--max_eval_samples", "4", "--logging_steps", "1"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("orpo")
    argv = [
        "--config",
        ORPO,
        "--output_dir",
        str(output_dir),
        *QUICK,
        "--max_steps",
        "2",
        "--save_steps",
        "2",
    ]
    return output_dir, orpo_main(argv)


def test_orpo_run_is_reference_free_and_reports_the_pairwise_accuracy(trained, capsys):
    output_dir, metrics = trained
    for name in ("model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json", "routing.json"):
        assert (output_dir / name).is_file(), name
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved["reference"] == "none" and saved["method"] == "orpo"
    for when in ("before", "after"):
        assert saved[f"eval_{when}_pairs/count"] == 4
        for key in (
            "loss",
            "pairs/accuracy",
            "pairs/accuracy_se",
            "pairs/margin",
            "rewards/accuracies",
            "nll_loss",
        ):
            assert f"eval_{when}_{key}" in saved, f"eval_{when}_{key}"
    # TRL's stored evaluation metrics are filed under the evaluation's prefix, not left as `eval_*`
    assert not [key for key in saved if key.startswith("eval_rewards")]
    assert saved["eval_before_pairs/margin"] != saved["eval_after_pairs/margin"]
    # one copy of the weights: about half of DPO's frozen-copy run on the same model
    assert saved["memory/weights_mb"] < 100
    assert yaml.safe_load((output_dir / "recipe.yaml").read_text())["method"] == "orpo"


def test_orpo_logs_its_terms_the_router_loss_and_routing(trained):
    output_dir, _ = trained
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logs) == 2
    for key in ("nll_loss", "log_odds_ratio", "rewards/accuracies", "aux_loss", "routing/layer3.moe.entropy"):
        assert all(key in entry for entry in logs), key
    assert all(entry["aux_loss"] > 0 for entry in logs)
    # ORPO's loss: the chosen answer's NLL minus beta x mean log-sigmoid(log-odds ratio), plus the router loss once
    first, recipe = logs[0], yaml.safe_load((output_dir / "recipe.yaml").read_text())
    beta, coef = recipe["beta"], recipe["aux_loss_coef"]
    expected = first["nll_loss"] - beta * first["log_odds_ratio"] + coef * first["aux_loss"]
    assert first["loss"] == pytest.approx(expected, abs=1e-3)


def test_simpo_learns_a_learnable_preference(tmp_path):
    DatasetDict(
        train=Dataset.from_list(learnable_pairs(16)), test=Dataset.from_list(learnable_pairs(8, 1000))
    ).save_to_disk(tmp_path / "data")
    argv = ["--config", SIMPO, "--output_dir", str(tmp_path / "out"), *QUICK, "--max_eval_samples", "8"]
    argv += ["--dataset_name", str(tmp_path / "data"), "--max_steps", "4", "--learning_rate", "1e-3"]
    metrics = orpo_main([*argv, "--save_strategy", "no", "--warmup_steps", "0"], default_method="simpo")
    assert metrics["method"] == "simpo" and metrics["eval_after_pairs/count"] == 8
    assert metrics["eval_after_pairs/accuracy"] == 1.0
    assert metrics["eval_after_pairs/margin"] > metrics["eval_before_pairs/margin"] + 0.5
    assert metrics["eval_after_loss"] < metrics["eval_before_loss"]


def test_held_out_margin_is_beta_times_the_average_log_probability_margin(tmp_path):
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(vocab_size=32000)))
    args = ORPOConfig(
        str(tmp_path),
        report_to="none",
        use_cpu=True,
        max_length=48,
        beta=0.25,
        per_device_eval_batch_size=3,
        bf16=False,
        gradient_checkpointing=False,
    )
    data = Dataset.from_list(
        learnable_pairs(2)
        + [{**learnable_pairs(1, 7)[0], "rejected": [{"role": "assistant", "content": "Hm."}]}]
    )
    trainer = JetMoeORPOTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=load_tokenizer()
    )
    expected = []
    with torch.no_grad():
        for row in trainer.eval_dataset:
            average = {}
            for side in ("chosen", "rejected"):
                ids = torch.tensor([row[f"{side}_input_ids"]])
                labels = torch.tensor(row[f"{side}_labels"][1:])
                scores = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                mask = labels != -100
                average[side] = scores[mask].gather(-1, labels[mask].unsqueeze(-1)).mean()
            expected.append(0.25 * (average["chosen"] - average["rejected"]))
    torch.testing.assert_close(trainer.held_out_margins(), torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_the_recipe_names_the_method(tmp_path):
    assert recipe_method(["--config", ORPO]) == "orpo"
    assert recipe_method(["--config", SIMPO]) == "simpo"
    assert recipe_method(["--config", ORPO, "--method", "simpo"]) == "simpo"
    assert recipe_method([], default="simpo") == "simpo"
    with pytest.raises(RecipeError, match=r"^method: 'dpo' is not one of orpo, simpo\.$"):
        recipe_method(["--config", ORPO, "--method=dpo"])
    recipe = parse_method_recipe(["--config", SIMPO], default="orpo")
    assert recipe.training.loss_type == "simpo" and recipe.training.cpo_alpha == 0.0
    with pytest.raises(RecipeError, match=r"^loss_type: 'sigmoid' with method simpo"):
        parse_method_recipe(["--config", SIMPO, "--loss_type", "sigmoid"], default="simpo")
    with pytest.raises(RecipeError, match="simpo_gamma"):  # an ORPO run has no SimPO keys
        parse_method_recipe(["--config", SIMPO, "--method", "orpo"], default="orpo")


def test_missing_columns_fail_in_one_line_after_saying_there_is_no_reference(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "Q", "completion": "A"}) for _ in range(4)))
    result = subprocess.run(
        [sys.executable, "-m", "jetmoe_ft.orpo", "--config", ORPO, "--dataset_name", str(data), *QUICK[:2]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[0].startswith("ORPO: no reference model")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "orpo needs `chosen` + `rejected`" in errors[0]
    assert "the data has completion, prompt" in errors[0]
