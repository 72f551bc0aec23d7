"""Classification and reward-model training from recipes: learning, router loss, LoRA head, mistakes."""

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from safetensors import safe_open
from transformers import DataCollatorWithPadding, TrainingArguments
from trl import RewardConfig

from jetmoe_ft import JetMoeConfig, JetMoeForSequenceClassification
from jetmoe_ft.assets import build_tiny_model, load_tokenizer
from jetmoe_ft.cli import main as jetmoe_ft_cli
from jetmoe_ft.cls import JetMoeClassificationTrainer, cli
from jetmoe_ft.cls import main as cls_main
from jetmoe_ft.evaluation.eval_cls import main as eval_main
from jetmoe_ft.rm import JetMoeRewardTrainer
from jetmoe_ft.rm import main as rm_main

from .conftest import tiny_kwargs

ROOT = Path(__file__).resolve().parents[1]
CLS_RECIPE = str(ROOT / "recipes" / "tiny" / "cls.yaml")
RM_RECIPE = str(ROOT / "recipes" / "tiny" / "rm.yaml")
QUICK = [
    "--save_strategy",
    "no",
    "--logging_steps",
    "1",
    "--max_length",
    "32",
    "--per_device_train_batch_size",
    "8",
]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def _easy_reviews(path: Path, count: int = 240, seed: int = 0) -> str:
    """Filler words with one telling word somewhere in the middle: `pos` or `neg`."""
    rng = random.Random(seed)
    filler = "the a film plot actors story scene it was and with some very this that".split()
    words = {
        "pos": ["great", "lovely", "superb", "wonderful"],
        "neg": ["awful", "dull", "boring", "terrible"],
    }
    rows = []
    for i in range(count):
        label = ("pos", "neg")[i % 2]
        text = [rng.choice(filler) for _ in range(8)]
        text.insert(rng.randrange(2, 6), rng.choice(words[label]))
        rows.append({"text": " ".join(text), "label": label})
    return _jsonl(path, rows)


def test_classifier_learns_an_easy_task_and_saves_its_labels(tmp_path):
    data = _easy_reviews(tmp_path / "reviews.jsonl")
    torch.manual_seed(0)
    base = JetMoeForSequenceClassification(JetMoeConfig(**tiny_kwargs(vocab_size=32000, hidden_size=128)))
    base.save_pretrained(tmp_path / "base")  # a local base model with no head config of its own
    out = tmp_path / "out"
    metrics = cls_main(
        [
            "--config",
            CLS_RECIPE,
            "--dataset_name",
            data,
            "--test_split_size",
            "0.25",
            "--output_dir",
            str(out),
        ]
        + ["--model_name_or_path", str(tmp_path / "base"), "--tokenizer_name_or_path", "embedded"]
        + ["--max_steps", "30", "--learning_rate", "3e-3", "--warmup_steps", "0", *QUICK]
        + ["--per_device_train_batch_size", "16"]
    )
    assert metrics["eval_before_accuracy"] < 0.7
    assert metrics["eval_after_accuracy"] >= 0.9, metrics
    assert metrics["eval_after_loss"] < metrics["eval_before_loss"]
    config = JetMoeConfig.from_pretrained(out)
    assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}
    assert config.pad_token_id == load_tokenizer().pad_token_id
    assert (out / "routing.json").is_file() and (out / "recipe.yaml").is_file()

    # the saved head scores a padded batch (input ids alone: the config's pad id) as each row alone
    model = JetMoeForSequenceClassification.from_pretrained(out).eval()
    tokenizer = load_tokenizer()
    texts = ["the plot was superb", "it was awful and very dull with some actors"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        alone = torch.cat(
            [model(input_ids=tokenizer(t, return_tensors="pt")["input_ids"]).logits for t in texts]
        )
        torch.testing.assert_close(model(input_ids=batch).logits, alone, atol=1e-5, rtol=1e-4)


def _tiny_head(num_labels: int, coef: float = 0.5):
    config = JetMoeConfig(
        **tiny_kwargs(vocab_size=32000), num_labels=num_labels, pad_token_id=0, aux_loss_coef=coef
    )
    return JetMoeForSequenceClassification(config)


def test_router_loss_counts_once_while_training(tmp_path):
    tokenizer = load_tokenizer()
    rows = [{"input_ids": [1, 50, 60, 70], "label": 0}, {"input_ids": [1, 80], "label": 1}]
    model = _tiny_head(2)
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    trainer = JetMoeClassificationTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    batch = DataCollatorWithPadding(tokenizer)(rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.train()
    outputs = model(**inputs, output_router_logits=True)
    cross_entropy = F.cross_entropy(outputs.logits, batch["labels"])
    assert outputs.aux_loss > 0
    torch.testing.assert_close(trainer.compute_loss(model, batch), cross_entropy + 0.5 * outputs.aux_loss)
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, batch), cross_entropy)  # evaluation: plain CE
    assert trainer.model_accepts_loss_kwargs is False  # per-batch means: the Trainer scales for accumulation


def test_reward_trainer_adds_the_router_loss(tmp_path):
    tokenizer = load_tokenizer()
    model = _tiny_head(1, coef=0.25)
    pairs = Dataset.from_list([{"chosen": "Paris is in France.", "rejected": "Bananas."}] * 2)
    args = RewardConfig(
        str(tmp_path), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False
    )
    trainer = JetMoeRewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    model.train()
    outputs = model(**batch, output_router_logits=True)
    chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
    expected = -F.logsigmoid(chosen - rejected).mean() + 0.25 * outputs.aux_loss
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), expected)
    log = {"loss": 1.0}
    trainer._add_aux_loss(log)
    assert log["aux_loss"] == pytest.approx(outputs.aux_loss.item())


def test_lora_run_saves_and_evaluates_a_trained_head(tmp_path):
    out = tmp_path / "lora"
    cls_main(
        ["--config", CLS_RECIPE, "--output_dir", str(out), "--max_steps", "3", "--max_train_samples", "48"]
        + ["--max_eval_samples", "16", "--lora_targets", "moe_experts", "--lora_r", "4", *QUICK]
        + ["--gradient_checkpointing", "true"]
    )
    assert (out / "adapter_config.json").is_file()
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        heads = [key for key in handle.keys() if ".score." in f".{key}"]
        assert heads, list(handle.keys())[:5]
        trained = handle.get_tensor(heads[0])
        # B starts at zero: a non-zero B means gradients reached the adapters through the checkpointed layers
        assert any(handle.get_tensor(key).abs().sum() > 0 for key in handle.keys() if "lora_B" in key)
    initial = build_tiny_model(0, JetMoeForSequenceClassification, num_labels=2).score.weight
    assert trained.shape == initial.shape and not torch.allclose(trained, initial)
    assert JetMoeConfig.from_pretrained(out).id2label == {0: "rotten", 1: "fresh"}

    report = eval_main(
        ["--model", str(out), "--max_samples", "24", "--bootstrap", "20", "--max_length", "32"]
    )
    assert report["num_examples"] == 24 and report["labels"] == ["rotten", "fresh"]
    assert (out / "eval" / "reliability.png").is_file()


def test_reward_model_trains_and_evaluates(tmp_path):
    out = tmp_path / "rm"
    metrics = rm_main(
        ["--config", RM_RECIPE, "--output_dir", str(out), "--max_steps", "2", "--max_train_samples", "16"]
        + ["--model_name_or_path", "jetmoe-ft/tiny"]
        + ["--max_eval_samples", "12", "--max_length", "64", "--per_device_train_batch_size", "4"]
        + ["--save_strategy", "no", "--logging_steps", "1"]
    )
    assert {"eval_before_accuracy", "eval_after_accuracy", "eval_after_margin"} <= set(metrics)
    assert JetMoeConfig.from_pretrained(out).num_labels == 1
    report = eval_main(["--model", str(out), "--max_samples", "12", "--bootstrap", "20"])
    assert report["task"] == "reward" and {"accuracy", "mean_margin", "ece"} <= set(report["metrics"])
    rows = (out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == report["num_examples"] == 12 - report["excluded_longer_than_max_length"]
    assert (out / "eval" / "reliability.png").is_file()


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        (
            [{"text": "x", "label": 0}, {"text": "y", "label": 5}],
            ["--num_labels", "2"],
            "labels must be in 0..1",
        ),
        ([{"text": "x", "label": -1}, {"text": "y", "label": 1}], [], "found -1. Remove unlabelled rows"),
        ([{"sentence": "x", "label": 0}], [], "cls needs `text` + `label`; the data has label, sentence"),
        (
            [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}],
            ["--num_labels", "3"],
            "num_labels: 3, but",
        ),
        ([{"text": "x", "label": "a"}] * 2, [], "a single class (a)"),
        ([{"text": "x", "label": 0.5}] * 2, [], "regression heads are not supported"),
        ([{"text": "x", "label": 0}], ["--num_labels", "1"], "rm needs `chosen` + `rejected`"),
    ],
)
def test_data_mistakes_are_one_line_before_any_model(tmp_path, capsys, rows, extra, message):
    """Through `jetmoe-ft cls`, which reads `num_labels: 1` as a reward model (the `rm` loop)."""
    data = _jsonl(tmp_path / "data.jsonl", rows)
    argv = ["--config", CLS_RECIPE, "--dataset_name", data, "--output_dir", str(tmp_path), *extra]
    assert jetmoe_ft_cli(["cls", *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_each_head_loop_refuses_the_other_heads_num_labels(tmp_path, capsys):
    assert cli(["--config", CLS_RECIPE, "--num_labels", "1", "--output_dir", str(tmp_path)]) == 2
    assert "num_labels: 1 trains a reward model; run `jetmoe-ft rm`" in capsys.readouterr().err
    from jetmoe_ft.rm import cli as rm_cli

    assert rm_cli(["--config", RM_RECIPE, "--num_labels", "2", "--output_dir", str(tmp_path)]) == 2
    assert "num_labels: 2 trains a classifier; run `jetmoe-ft cls`" in capsys.readouterr().err


def test_unseen_test_label_is_named(tmp_path, capsys):
    splits = {
        "train": Dataset.from_list([{"text": "x", "label": "a"}, {"text": "y", "label": "b"}]),
        "test": Dataset.from_list([{"text": "z", "label": "c"}]),
    }
    DatasetDict(splits).save_to_disk(tmp_path / "data")
    assert cli(["--config", CLS_RECIPE, "--dataset_name", str(tmp_path / "data")]) == 2
    assert "error: test split: label 'c' is not one of the model's classes (a, b)." in capsys.readouterr().err
