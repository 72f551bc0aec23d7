import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset

from jetmoe_ft import JetMoeForCausalLM
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.config import RecipeError
from jetmoe_ft.evaluation.chat import main as chat_main
from jetmoe_ft.loading import check_tokenizer
from jetmoe_ft.sft import main as sft_main
from jetmoe_ft.training.runs import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny" / "sft.yaml")
QUICK = [
    "--max_length",
    "64",
    "--per_device_train_batch_size",
    "4",
    "--max_eval_samples",
    "16",
    "--logging_steps",
    "1",
]


def _run(output_dir, *extra):
    return sft_main(["--config", RECIPE, "--output_dir", str(output_dir), *QUICK, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sft")
    metrics = _run(output_dir, "--max_steps", "4", "--save_steps", "2")
    return output_dir, metrics


def test_outputs_of_a_run(trained):
    output_dir, metrics = trained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "metrics.json"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "routing.json").is_file() and (output_dir / "routing_load.png").stat().st_size > 1000
    assert {"eval_before_loss", "eval_after_loss", "train_runtime"} <= set(metrics)
    assert (
        json.loads((output_dir / "metrics.json").read_text())["eval_after_loss"] == metrics["eval_after_loss"]
    )
    assert "max_steps: 4" in (output_dir / "recipe.yaml").read_text()
    assert last_complete_checkpoint(output_dir).name == "checkpoint-4"

    tokenizer = transformers.AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.chat_template == load_tokenizer().chat_template
    ours = JetMoeForCausalLM.from_pretrained(output_dir)
    theirs = transformers.JetMoeForCausalLM.from_pretrained(output_dir)
    ids = torch.tensor([[1, 10, 20, 30]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_router_loss_and_routing_health_are_logged(trained):
    output_dir, _ = trained
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(train_logs) == 4
    assert all(entry["aux_loss"] > 0 for entry in train_logs)
    assert all("routing/layer3.moe.entropy" in entry for entry in train_logs)
    routing = json.loads((output_dir / "routing.json").read_text())
    assert routing["history"] and len(routing["total"]["layers"]) == 4


def test_resume_continues_where_the_kill_left_off(trained, tmp_path):
    output_dir, _ = trained
    resumed = tmp_path / "resumed"
    # the first run's checkpoint-2, and a half-written newer one, as a kill while saving leaves it
    shutil.copytree(output_dir / "checkpoint-2", resumed / "checkpoint-2")
    broken = resumed / "checkpoint-3"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    assert last_complete_checkpoint(resumed).name == "checkpoint-2"

    _run(resumed, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "true")
    straight = JetMoeForCausalLM.from_pretrained(output_dir / "checkpoint-4").state_dict()
    continued = JetMoeForCausalLM.from_pretrained(resumed).state_dict()
    for name, tensor in straight.items():
        torch.testing.assert_close(continued[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_chat_with_the_trained_model(trained, capsys):
    output_dir, _ = trained
    assert chat_main(["--model", str(output_dir), "--prompt", "Hello", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert chat_main(["--model", str(output_dir / "missing")]) == 2


def test_padding_free_batches_with_gradient_checkpointing(tmp_path):
    metrics = _run(
        tmp_path,
        *("--max_steps", "2", "--packing", "false", "--padding_free", "true", "--max_length", "None"),
        *("--gradient_checkpointing", "true", "--save_strategy", "no"),
    )
    assert metrics["train_loss"] > 0


def test_held_out_loss_falls(tmp_path):
    metrics = sft_main(
        ["--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "30", "--save_strategy", "no"]
        + ["--logging_steps", "10", "--learning_rate", "3e-3"]
    )
    assert metrics["eval_after_loss"] < metrics["eval_before_loss"] - 2.0


def test_user_mistakes_exit_with_one_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: jetmoe-ft/tiny\ndataset_name: chatterbot\nlearnin_rate: 1e-3\n")
    result = subprocess.run(
        [sys.executable, "-m", "jetmoe_ft.cli", "sft", "--config", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: unknown key `learnin_rate` (did you mean `learning_rate`?)" in result.stderr


def test_tokenizer_checks():
    tokenizer = load_tokenizer()
    chats = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    )
    check_tokenizer(tokenizer, chats, max_length=64)
    with pytest.raises(RecipeError, match="max_length: 3 is shorter than every example"):
        check_tokenizer(tokenizer, chats, max_length=3)
    no_template = load_tokenizer()
    no_template.chat_template = None
    with pytest.raises(RecipeError, match="no chat template"):
        check_tokenizer(no_template, chats, max_length=64)
    no_pad = load_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(RecipeError, match="set `pad_token:`"):
        check_tokenizer(no_pad, chats, max_length=64)
    check_tokenizer(no_pad, chats, max_length=64, pad_token="<unk>")


def test_plain_text_data(tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"A short review number {i}, rather good."}) for i in range(40))
    )
    metrics = sft_main(
        ["--config", RECIPE, "--output_dir", str(tmp_path / "out"), "--dataset_name", str(data)]
        + [
            "--assistant_only_loss",
            "false",
            "--test_split_size",
            "0.2",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
        ]
        + QUICK
    )
    assert metrics["eval_after_loss"] < metrics["eval_before_loss"]
