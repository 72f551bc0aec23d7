"""Evaluation of classification and reward heads: metrics against scikit-learn, calibration, intervals,
outputs, label mapping and the mistakes `eval-cls` explains."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score
from trl import RewardConfig, RewardTrainer

from jetmoe_ft import JetMoeConfig, JetMoeForSequenceClassification
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.data.embedded import load_chatterbot_pairs, load_rotten_tomatoes
from jetmoe_ft.evaluation.eval_cls import cli, main, pair_token_ids
from jetmoe_ft.evaluation.metrics import (
    bootstrap_intervals,
    classification_scores,
    expected_calibration_error,
    majority_scores,
    reward_scores,
)

from .conftest import tiny_kwargs


def test_classification_scores_match_sklearn():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 1, 0, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.2, 0.5, 0.3],
            [0.1, 0.8, 0.1],
            [0.3, 0.3, 0.4],
            [0.1, 0.1, 0.8],
            [0.2, 0.2, 0.6],
            [0.5, 0.4, 0.1],
            [0.1, 0.6, 0.3],
            [0.6, 0.3, 0.1],
            [0.1, 0.3, 0.6],
        ]
    )
    names = ["a", "b", "c"]
    predicted = probs.argmax(-1)
    scores = classification_scores(labels, probs, names)
    assert scores["accuracy"] == pytest.approx(accuracy_score(labels, predicted)) == pytest.approx(0.7)
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert scores["weighted_f1"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted)
    for i, name in enumerate(names):
        assert scores[f"precision/{name}"] == pytest.approx(precision[i])
        assert scores[f"recall/{name}"] == pytest.approx(recall[i])
        assert scores[f"f1/{name}"] == pytest.approx(f1[i])
    assert "roc_auc" not in scores  # binary tasks only

    binary = classification_scores(
        labels[:6] % 2, probs[:6, :2] / probs[:6, :2].sum(-1, keepdims=True), ["x", "y"]
    )
    expected_auc = roc_auc_score(labels[:6] % 2, probs[:6, 1] / probs[:6, :2].sum(-1))
    assert binary["roc_auc"] == pytest.approx(expected_auc)


def test_expected_calibration_error_on_known_cases():
    # every prediction 90% sure, half right: |0.5 - 0.9| = 0.4
    assert expected_calibration_error(np.full(10, 0.9), np.arange(10) % 2 == 0) == pytest.approx(0.4)
    # two bins: (0.95: 1 of 2 right) and (0.55: 2 of 2 right), each half the data
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    # bins are (lo, hi]: 1/15 shares the first bin with 0.05 (one bin, 1 of 2 right)
    together = abs(0.5 - (1 / 15 + 0.05) / 2)
    assert expected_calibration_error(np.array([1 / 15, 0.05]), np.array([True, False])) == pytest.approx(
        together
    )
    # perfectly calibrated: zero
    assert expected_calibration_error(np.ones(4), np.ones(4, dtype=bool)) == 0.0


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    probs = np.clip(0.5 + 0.3 * (2 * labels - 1) + rng.normal(0, 0.3, 400), 0.01, 0.99)
    probs = np.stack([1 - probs, probs], -1)

    def statistic(idx):
        return classification_scores(labels[idx], probs[idx], ["n", "p"])

    point = statistic(np.arange(400))
    intervals = bootstrap_intervals(statistic, 400, resamples=200, seed=3)
    for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece", "f1/p"):
        low, high = intervals[key]
        assert low <= point[key] <= high, key
        assert high - low < 0.2, key
    assert intervals == bootstrap_intervals(statistic, 400, resamples=200, seed=3)
    # a statistic that never varies has a zero-width interval
    assert bootstrap_intervals(lambda idx: {"one": 1.0}, 10, resamples=20)["one"] == [1.0, 1.0]


def test_majority_baseline_and_reward_scores():
    labels = np.array([1, 1, 1, 0])
    assert majority_scores(labels, 2)["accuracy"] == 0.75
    assert majority_scores(labels, 2)["macro_f1"] == pytest.approx(
        f1_score(labels, np.ones(4), average="macro")
    )
    scores = reward_scores(np.array([2.0, 1.0, -1.0, 0.0]))
    assert scores["accuracy"] == 0.5 and scores["mean_margin"] == 0.5  # a tie is not a win


# ---------------------------------------------------------------------------------------------
# eval-cls end to end on small saved heads

NAMES = ["fresh", "rotten"]  # the reverse of the data's ClassLabel order: labels must map by name


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A small random classifier saved as `jetmoe-ft cls` saves one (model, tokenizer)."""
    path = tmp_path_factory.mktemp("head")
    torch.manual_seed(0)
    config = JetMoeConfig(
        **tiny_kwargs(vocab_size=32000),
        num_labels=2,
        id2label=dict(enumerate(NAMES)),
        label2id={name: i for i, name in enumerate(NAMES)},
        pad_token_id=0,
    )
    JetMoeForSequenceClassification(config).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def test_eval_cls_writes_metrics_predictions_and_plots(classifier_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    report = main(
        ["--model", str(classifier_dir), "--dataset_name", "rotten_tomatoes", "--split", "test"]
        + ["--max_samples", "48", "--bootstrap", "50", "--max_length", "32", "--output_dir", str(out)]
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["num_examples"] == 48
    assert set(rows[0]) >= {"id", "label", "prediction", "probabilities"}
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0)

    truth = load_rotten_tomatoes(seed=42)["test"].select(range(48))
    assert [row["label"] for row in rows] == [truth.features["label"].int2str(v) for v in truth["label"]]
    labels = [row["label"] for row in rows]
    predicted = [row["prediction"] for row in rows]
    saved = json.loads((out / "metrics.json").read_text())
    accuracy = saved["metrics"]["accuracy"]
    assert accuracy["value"] == pytest.approx(accuracy_score(labels, predicted))
    assert accuracy["ci95"][0] <= accuracy["value"] <= accuracy["ci95"][1]
    assert saved["metrics"]["macro_f1"]["value"] == pytest.approx(
        f1_score(labels, predicted, average="macro")
    )
    assert saved["baseline"]["accuracy"]["value"] == max(labels.count(n) for n in NAMES) / 48
    assert {"roc_auc", "ece", "weighted_f1"} <= set(saved["metrics"])
    assert sum(map(sum, saved["confusion_matrix"])) == 48
    assert saved["per_class"]["rotten"]["support"] == labels.count("rotten")
    for name in ("confusion_matrix.png", "reliability.png"):
        assert (out / name).stat().st_size > 5000, name
    table = capsys.readouterr().out
    assert "accuracy" in table and "majority class" in table and "confusion matrix" in table


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"text": "fine", "label": "fresh"}, {"text": "meh", "label": "meh"}],
            "label 'meh' is not one of the model's classes (fresh, rotten)",
        ),
        (
            [{"text": "fine", "label": 0}, {"text": "bad", "label": 3}],
            "labels must be in 0..1 (num_labels 2); found 3",
        ),
        ([{"sentence": "fine", "label": 0}], "cls needs `text` + `label`; the data has label, sentence"),
    ],
)
def test_bad_evaluation_data_is_one_clear_line(classifier_dir, tmp_path, capsys, rows, message):
    data = _jsonl(tmp_path / "data.jsonl", rows)
    assert cli(["--model", str(classifier_dir), "--dataset_name", data, "--split", "train"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_headless_adapter_and_missing_data_are_explained(classifier_dir, tmp_path, capsys):
    model = JetMoeForSequenceClassification.from_pretrained(classifier_dir)
    headless = get_peft_model(model, LoraConfig(target_modules=["kv_proj"], r=2))
    headless.save_pretrained(tmp_path / "adapter")
    assert cli(["--model", str(tmp_path / "adapter"), "--dataset_name", "rotten_tomatoes"]) == 2
    assert "has no classification head (`score`)" in capsys.readouterr().err
    assert cli(["--model", str(classifier_dir)]) == 2
    assert "No data to evaluate on" in capsys.readouterr().err


def test_pairs_are_tokenized_as_the_reward_trainer_does(tmp_path):
    tokenizer = load_tokenizer()
    pairs = load_chatterbot_pairs()["test"].select(range(4))
    text_pairs = pairs.map(
        lambda row: {
            "prompt": row["prompt"][-1]["content"],
            "chosen": row["chosen"][0]["content"],
            "rejected": row["rejected"][0]["content"],
        }
    )
    args = RewardConfig(output_dir=str(tmp_path), max_length=None, use_cpu=True, bf16=False, report_to="none")
    for dataset in (pairs, text_pairs):
        theirs = RewardTrainer._prepare_dataset(None, dataset, tokenizer, args, "test")
        for example, prepared in zip(dataset, theirs, strict=True):
            assert pair_token_ids(example, tokenizer) == (prepared["chosen_ids"], prepared["rejected_ids"])
