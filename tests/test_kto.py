"""KTO: the loop end to end, unpaired data and its checks, the LoRA reference, the held-out pairwise accuracy."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict
from peft import LoraConfig, get_peft_model
from trl import KTOConfig

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.config import RecipeError
from jetmoe_ft.data.unpaired import check_unpaired, held_out_pairs, unpair
from jetmoe_ft.kto import JetMoeKTOTrainer
from jetmoe_ft.kto import cli as kto_cli
from jetmoe_ft.kto import main as kto_main
from jetmoe_ft.training.reference import reference_kind

from .conftest import learnable_pairs, tiny_kwargs

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny" / "kto.yaml")
QUICK = [
    *("--model_name_or_path", "jetmoe-ft/tiny", "--max_length", "48"),
    *("--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8"),
    *("--max_train_samples", "16", "--max_eval_samples", "4", "--logging_steps", "1"),
]


def _run(output_dir, *extra):
    return kto_main(["--config", RECIPE, "--output_dir", str(output_dir), *QUICK, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("kto")
    metrics = _run(output_dir, "--max_steps", "2", "--save_steps", "2")
    return output_dir, metrics


def test_a_run_from_pairs_writes_its_outputs_and_the_pairwise_accuracy(trained):
    output_dir, metrics = trained
    for name in ("model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json", "routing.json"):
        assert (output_dir / name).is_file(), name
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved["reference"] == "frozen copy"
    # 4 held-out pairs, unpaired into 8 rows, compared pair by pair
    for when in ("before", "after"):
        assert saved[f"eval_{when}_pairs/count"] == 4
        for key in ("loss", "pairs/accuracy", "pairs/accuracy_se", "pairs/margin", "kl"):
            assert f"eval_{when}_{key}" in saved, f"eval_{when}_{key}"
    # before training the policy is the reference: every implicit reward is exactly 0 (a tie, counted wrong)
    assert saved["eval_before_pairs/margin"] == 0.0 and saved["eval_before_pairs/accuracy"] == 0.0
    assert saved["eval_after_pairs/margin"] != 0.0


def test_first_step_is_kto_at_the_reference_plus_the_router_loss_once(trained):
    output_dir, _ = trained
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logs) == 2
    for key in ("kl", "entropy", "aux_loss", "routing/layer3.moe.entropy"):
        assert all(key in entry for entry in logs), key
    # policy = reference and KL = 0: each row's loss is 1 - sigmoid(0) = 0.5; the router loss is added once
    assert logs[0]["kl"] == 0.0
    assert logs[0]["loss"] == pytest.approx(0.5 + 0.01 * logs[0]["aux_loss"], abs=1e-4)


def test_pairwise_accuracy_rises_on_unpaired_data_with_a_precomputed_reference(tmp_path):
    """Natively unpaired rows (thumbs up / down on single answers): pairs for the accuracy are formed by prompt."""
    rows = [dict(row) for row in unpair(Dataset.from_list(learnable_pairs(16))).remove_columns("pair")]
    held_out = [
        dict(row) for row in unpair(Dataset.from_list(learnable_pairs(6, 1000))).remove_columns("pair")
    ]
    DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(held_out)).save_to_disk(
        tmp_path / "data"
    )
    metrics = _run(
        tmp_path / "out",
        *("--dataset_name", str(tmp_path / "data"), "--precompute_ref_log_probs", "true"),
        *("--max_steps", "6", "--learning_rate", "1e-3", "--save_strategy", "no", "--warmup_steps", "0"),
        *("--max_eval_samples", "12"),
    )
    assert metrics["reference"] == "precomputed"
    assert metrics["eval_before_pairs/margin"] == 0.0  # same LM head for the reference and the policy
    assert metrics["eval_after_pairs/count"] == 6
    assert metrics["eval_after_pairs/accuracy"] == 1.0 and metrics["eval_after_pairs/margin"] > 0.1


# ---------------------------------------------------------------------------------------------
# The reference of a LoRA run is the base model with the adapter disabled


def _args(tmp_path, **overrides) -> KTOConfig:
    values = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        max_length=48,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_checkpointing=False,
        bf16=False,
        beta=0.1,
    )
    return KTOConfig(**{**values, **overrides})


def _sequence_logps(model, batch) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens from plain logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    scores = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (scores * batch["completion_mask"][:, 1:]).sum(-1)


def test_lora_reference_is_the_adapter_disabled_model(tmp_path):
    torch.manual_seed(0)
    base = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(vocab_size=32000)))
    model = get_peft_model(base, LoraConfig(target_modules=["kv_proj"], r=4))
    data = unpair(Dataset.from_list(learnable_pairs(4)))
    trainer = JetMoeKTOTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        processing_class=load_tokenizer(),
    )
    assert reference_kind(trainer) == "adapter disabled" and "ref" not in trainer.model.peft_config
    with torch.no_grad():  # a trained adapter: the policy differs from the base
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    batch = next(iter(trainer.get_eval_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        reference = trainer.compute_ref_log_probs(trainer.model, batch)[0]
        with trainer.model.disable_adapter():
            disabled = _sequence_logps(trainer.model, batch)
        enabled = _sequence_logps(trainer.model, batch)
    torch.testing.assert_close(reference, disabled, rtol=1e-5, atol=1e-4)
    assert (enabled - disabled).abs().max() > 1e-2
    # the held-out implicit reward: beta x (policy - adapter-disabled reference), row by row
    rewards = trainer.held_out_rewards()
    torch.testing.assert_close(rewards[: len(enabled)], 0.1 * (enabled - disabled), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Unpaired data


def test_pairs_are_unpaired_next_to_each_other_with_their_index():
    rows = unpair(Dataset.from_list(learnable_pairs(2)))
    assert rows["label"] == [True, False, True, False] and rows["pair"] == [0, 0, 1, 1]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "No. Go away."}]
    assert held_out_pairs(rows) == [(0, 1), (2, 3)]
    # without a pair index, rows are paired by prompt: every desirable x undesirable answer of one prompt
    same_prompt = Dataset.from_list(
        [
            {"prompt": "Q?", "completion": answer, "label": label}
            for answer, label in (("a", True), ("b", False), ("c", False))
        ]
        + [{"prompt": "Other?", "completion": "d", "label": True}]
    )
    assert held_out_pairs(same_prompt) == [(0, 1), (0, 2)]


def test_training_rows_are_shuffled_and_unlearnable_pairs_dropped():
    pairs = learnable_pairs(20) + [
        {**learnable_pairs(1, 99)[0], "rejected": [{"role": "assistant", "content": " "}]}
    ]
    args = SimpleNamespace(max_length=64, dataset_num_proc=None)
    with pytest.warns(UserWarning, match="Dropped 1 of 21 train pairs"):
        checked = check_unpaired(DatasetDict(train=Dataset.from_list(pairs)), load_tokenizer(), args, seed=3)
    train = checked["train"]
    assert len(train) == 40 and sum(train["label"]) == 20
    assert train["pair"] != sorted(train["pair"])  # KTO samples in order: the order is shuffled once


BAD_DATA = {
    "missing label": (
        [{"prompt": "Q?", "completion": "A."}] * 4,
        r"^error: dataset_name .*data\.jsonl \(train\): kto needs `prompt` \+ `completion` \+ `label` .*; the data has completion, prompt\.",
    ),
    "labels not booleans": (
        [{"prompt": "Q?", "completion": "A.", "label": i % 2} for i in range(4)],
        r"^error: label: expected true or false .*got 0 \(int\) in row 0 of the train split",
    ),
    "only desirable": (
        [{"prompt": "Q?", "completion": "A.", "label": True}] * 4,
        r"^error: label: every train example is desirable \(true\); KTO needs undesirable \(false\) examples",
    ),
    "empty completion": (
        [{"prompt": "Q?", "completion": "A." if i else "  ", "label": bool(i % 2)} for i in range(4)],
        r"^error: completion: 1 of 4 train examples have an empty completion \(first: row 0\)",
    ),
    "mixed formats": (
        [
            {"prompt": "Q?", "completion": [{"role": "assistant", "content": "A."}], "label": bool(i % 2)}
            for i in range(4)
        ],
        r"^error: prompt: text, but completion is a conversation in the train split",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_and_exit_status_2_before_the_model_loads(tmp_path, capsys, case):
    rows, expected = BAD_DATA[case]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    output_dir = tmp_path / "out"
    argv = ["--config", RECIPE, "--dataset_name", str(data), "--output_dir", str(output_dir)]
    code = kto_cli([*argv, "--model_name_or_path", "jetmoe-ft/tiny"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    assert pytest.importorskip("re").match(expected, errors[0]), errors[0]
    assert not output_dir.exists()  # stopped before the run claimed its output directory


def test_bad_data_from_the_command_line_is_one_line_without_a_traceback(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": "Q?", "completion": "A.", "label": True}) for _ in range(4))
    )
    result = subprocess.run(
        [sys.executable, "-m", "jetmoe_ft.kto", "--config", RECIPE, "--dataset_name", str(data), *QUICK[:2]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "every train example is desirable" in errors[0]


def test_recipe_errors_name_the_field():
    with pytest.raises(RecipeError, match="^label: expected true or false"):
        check_unpaired(
            DatasetDict(train=Dataset.from_list([{"prompt": "Q", "completion": "A", "label": "yes"}] * 2)),
            load_tokenizer(),
            SimpleNamespace(max_length=64, dataset_num_proc=None),
        )
