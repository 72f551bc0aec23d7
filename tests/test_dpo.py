import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict
from peft import LoraConfig, get_peft_model
from trl import DPOConfig

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.config import RecipeError
from jetmoe_ft.data import check_preferences
from jetmoe_ft.dpo import JetMoeDPOTrainer
from jetmoe_ft.dpo import main as dpo_main
from jetmoe_ft.training.reference import record_stacked_base
from jetmoe_ft.training.runs import last_complete_checkpoint

from .conftest import learnable_pairs, tiny_kwargs

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny" / "dpo.yaml")
QUICK = [
    *("--model_name_or_path", "jetmoe-ft/tiny", "--max_length", "48"),
    *("--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8"),
    *("--max_train_samples", "64", "--max_eval_samples", "8", "--logging_steps", "1"),
]


def _run(output_dir, *extra):
    return dpo_main(["--config", RECIPE, "--output_dir", str(output_dir), *QUICK, *extra])


def _train_logs(output_dir: Path, checkpoint: str) -> list[dict]:
    state = json.loads((output_dir / checkpoint / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("dpo")
    metrics = _run(output_dir, "--max_steps", "4", "--save_steps", "2")
    return output_dir, metrics


def test_outputs_of_a_full_weight_run(trained):
    output_dir, metrics = trained
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "recipe.yaml",
        "metrics.json",
        "routing.json",
    ):
        assert (output_dir / name).is_file(), name
    for when in ("before", "after"):
        for key in ("loss", "rewards/accuracies", "rewards/margins"):
            assert f"eval_{when}_{key}" in metrics, f"eval_{when}_{key}"
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved["eval_after_rewards/margins"] == metrics["eval_after_rewards/margins"]
    # the policy starts as the reference: every reward is exactly 0 before training
    assert metrics["eval_before_rewards/margins"] == 0.0 and metrics["eval_after_rewards/margins"] != 0.0
    assert saved["reference"] == "frozen copy"
    assert last_complete_checkpoint(output_dir).name == "checkpoint-4"


def test_preference_metrics_router_loss_and_routing_health_are_logged(trained):
    output_dir, _ = trained
    logs = _train_logs(output_dir, "checkpoint-4")
    assert len(logs) == 4
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "routing/layer3.moe.entropy",
    ):
        assert all(key in entry for entry in logs), key
    assert all(entry["aux_loss"] > 0 for entry in logs)
    # the first step: policy = reference, so the loss is log 2 plus the weighted router loss
    assert logs[0]["loss"] == pytest.approx(0.6931 + 0.01 * logs[0]["aux_loss"], abs=2e-3)
    routing = json.loads((output_dir / "routing.json").read_text())
    assert routing["history"] and len(routing["total"]["layers"]) == 4


def test_resume_continues_where_the_kill_left_off(trained, tmp_path):
    output_dir, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(output_dir / "checkpoint-2", resumed / "checkpoint-2")
    _run(resumed, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "true")
    straight = JetMoeForCausalLM.from_pretrained(output_dir / "checkpoint-4").state_dict()
    continued = JetMoeForCausalLM.from_pretrained(resumed).state_dict()
    for name, tensor in straight.items():
        torch.testing.assert_close(continued[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_lora_from_a_trained_directory_keeps_no_reference_copy(trained, tmp_path):
    start, full = trained
    metrics = _run(
        tmp_path,
        *("--model_name_or_path", str(start), "--lora_targets", "kv_proj", "moe_experts"),
        *("--max_steps", "2", "--save_steps", "2", "--learning_rate", "1e-3"),
    )
    assert metrics["reference"] == "adapter disabled"
    # one copy of the base weights (plus the adapter) instead of two
    assert metrics["memory/weights_mb"] < 0.6 * full["memory/weights_mb"]
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "ref").exists()
    assert metrics["eval_after_rewards/margins"] != 0.0  # the adapter moved away from the reference
    # routing statistics count the policy's tokens only, not the reference passes (adapter disabled)
    routing = json.loads((tmp_path / "routing.json").read_text())
    num_tokens = _train_logs(tmp_path, "checkpoint-2")[-1]["num_tokens"]
    assert routing["total"]["layers"][0]["moe"]["tokens"] == num_tokens


def test_reward_accuracy_rises_on_a_learnable_preference(tmp_path):
    DatasetDict(
        train=Dataset.from_list(learnable_pairs(24)), test=Dataset.from_list(learnable_pairs(8, 1000))
    ).save_to_disk(tmp_path / "data")
    metrics = _run(
        tmp_path / "out",
        *("--dataset_name", str(tmp_path / "data"), "--precompute_ref_log_probs", "true"),
        *("--max_steps", "6", "--learning_rate", "1e-3", "--save_strategy", "no", "--warmup_steps", "0"),
    )
    assert metrics["reference"] == "precomputed"
    # reference log-probs precomputed with the same LM head as the policy's: exactly equal before training
    assert metrics["eval_before_rewards/margins"] == 0.0
    assert metrics["eval_after_rewards/accuracies"] >= 0.9
    assert metrics["eval_after_rewards/margins"] > 0.1
    assert metrics["eval_after_loss"] < metrics["eval_before_loss"] - 0.05


# ---------------------------------------------------------------------------------------------
# The trainer on a small model


def _small_trainer(tmp_path, data: Dataset) -> JetMoeDPOTrainer:
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(vocab_size=32000)))
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        max_length=64,
        per_device_train_batch_size=4,
        gradient_checkpointing=False,
    )
    return JetMoeDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=args,
        train_dataset=data,
        processing_class=load_tokenizer(),
    )


def _with_system_prompt(pairs: list[dict]) -> Dataset:
    system = {"role": "system", "content": "You are terse."}
    return Dataset.from_list([{**pair, "prompt": [system, *pair["prompt"]]} for pair in pairs])


def test_chat_template_is_applied_once(tmp_path):
    trainer = _small_trainer(tmp_path, _with_system_prompt(learnable_pairs(2)))
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    text = tokenizer.decode(row["prompt_ids"] + row["chosen_ids"])
    assert text.count("<|system|>") == 1 and text.count("You are terse.") == 1
    assert (row["prompt_ids"] + row["chosen_ids"]).count(tokenizer.bos_token_id) == 1
    assert text.endswith("Yes, gladly.</s>\n")


# ---------------------------------------------------------------------------------------------
# Bad input


def _args(max_length: int | None = 64) -> DPOConfig:
    return DPOConfig(output_dir="unused", report_to="none", use_cpu=True, max_length=max_length)


def _check(rows: list[dict], max_length: int | None = 64) -> Dataset:
    return check_preferences(DatasetDict(train=Dataset.from_list(rows)), load_tokenizer(), _args(max_length))[
        "train"
    ]


def test_unlearnable_pairs_are_counted_and_dropped():
    good = {"prompt": "Q: why?\nA:", "chosen": " Because.", "rejected": " Who knows."}
    rows = [
        good,
        {**good, "chosen": "  "},
        {**good, "rejected": good["chosen"]},
        {**good, "prompt": "word " * 80},
    ]
    with pytest.warns(
        UserWarning, match=r"Dropped 3 of 4 train pairs: .*1 with an empty chosen or rejected answer"
    ):
        kept = _check(rows)
    assert kept.to_list() == [good]
    with pytest.raises(RecipeError, match=r"chosen/rejected: every train pair has 2 with chosen == rejected"):
        _check([{**good, "rejected": good["chosen"]}] * 2)
    with pytest.raises(
        RecipeError, match=r"^max_length: every train pair has 1 with a prompt of 64\+ tokens; raise"
    ):
        _check([{**good, "prompt": "word " * 80}])


def test_implicit_prompts_are_extracted_and_formats_checked():
    user = {"role": "user", "content": "Hi?"}
    chosen, rejected = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "Bye."}
    kept = _check([{"chosen": [user, chosen], "rejected": [user, rejected]}])
    assert kept[0] == {"prompt": [user], "chosen": [chosen], "rejected": [rejected]}
    with pytest.raises(
        RecipeError,
        match=r"^prompt: text, but chosen, rejected are conversations .*columns: \[chosen, rejected\]",
    ):
        _check([{"prompt": "Hi?", "chosen": [user, chosen], "rejected": [user, rejected]}])


def test_missing_columns_fail_in_one_line_before_the_model_loads(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "Q", "chosen": "A"}) for _ in range(4)))
    result = subprocess.run(
        [sys.executable, "-m", "jetmoe_ft.cli", "dpo", "--config", RECIPE, "--dataset_name", str(data)]
        + ["--model_name_or_path", "jetmoe-ft/tiny"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: dataset_name")
    assert "dpo needs `chosen` + `rejected`" in errors[0] and "the data has chosen, prompt" in errors[0]


def test_an_adapter_stacked_on_a_merged_adapter_names_it_as_base(tmp_path):
    start = get_peft_model(
        JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs())), LoraConfig(target_modules=["kv_proj"])
    )
    start.save_pretrained(tmp_path / "sft-adapter")
    stacked = get_peft_model(
        JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs())), LoraConfig(target_modules=["kv_proj"])
    )
    for path, expected in (
        (tmp_path / "full", None),
        (tmp_path / "sft-adapter", str(tmp_path / "sft-adapter")),
    ):
        before = stacked.peft_config["default"].base_model_name_or_path
        record_stacked_base(stacked, SimpleNamespace(model=SimpleNamespace(model_name_or_path=str(path))))
        assert stacked.peft_config["default"].base_model_name_or_path == (expected or before)
