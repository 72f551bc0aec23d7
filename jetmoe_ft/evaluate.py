"""How good is a trained head: evaluation of classification and reward models on held-out data.

jetmoe-ft eval-cls --model DIR [--config R.yaml | --dataset_name NAME --split SPLIT] [--output_dir D]

`DIR` is what `jetmoe-ft cls` wrote: a full model or a LoRA adapter (with its `score` head). Without
`--config` or `--dataset_name`, the data is the held-out split of the run's own `DIR/recipe.yaml`.

Classification heads get accuracy, macro and weighted F1, per-class precision / recall / F1, the
confusion matrix, expected calibration error (15 equal-width confidence bins) and, for two classes,
ROC-AUC; each with a bootstrap 95% interval (percentiles of the statistic over resampled examples),
beside the majority-class baseline (always predicting the split's most frequent label). Reward heads
(`num_labels: 1`) get pairwise accuracy (chosen scored above rejected), mean margin and the calibration
of the Bradley-Terry probability sigmoid(margin). Metrics come from scikit-learn, plots from matplotlib.

Writes `metrics.json`, `predictions.jsonl` (one row per example), `confusion_matrix.png` (classifiers)
and `reliability.png` into `--output_dir` (default `DIR/eval`), and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase
from trl.data_utils import is_conversational

from .assets import load_tokenizer
from .cls import encode_labels, resolve_pad_token
from .config import DataArguments, RecipeError, read_recipe_file
from .loading import (
    EMBEDDED_TOKENIZER_NAMES,
    TINY_NAMES,
    adapter_has_head,
    is_adapter_dir,
    load_trained_model,
)
from .modeling import JetMoeConfig, JetMoeForSequenceClassification
from .recipe_data import load_recipe_datasets
from .runs import run_command

N_BINS = 15
CONFIDENCE = 0.95
DEFAULT_SEED = 42  # TrainingArguments' default: the data seed of a recipe that sets none


# ---------------------------------------------------------------------------------------------
# metrics


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Sum over equal-width confidence bins of (share of examples) x |accuracy - mean confidence|.

    Bins are (lo, hi] as in Guo et al. 2017, with a confidence of exactly 0 in the first bin.
    """
    bins = [(acc, conf, count) for acc, conf, count in reliability_bins(confidence, correct, n_bins) if count]
    total = sum(count for _, _, count in bins)
    return float(sum(count * abs(acc - conf) for acc, conf, count in bins) / total) if total else float("nan")


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS
) -> list[tuple[float, float, int]]:
    """(accuracy, mean confidence, count) of each of `n_bins` equal-width bins; empty bins are (nan, nan, 0)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        chosen = index == b
        count = int(chosen.sum())
        bins.append(
            (float(correct[chosen].mean()), float(confidence[chosen].mean()), count)
            if count
            else (float("nan"), float("nan"), 0)
        )
    return bins


def classification_scores(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, float]:
    """Flat scalar metrics of one set of predictions: `accuracy`, `macro_f1`, `weighted_f1`, `ece`,
    `roc_auc` (two classes), and `precision/<class>`, `recall/<class>`, `f1/<class>`."""
    classes = list(range(len(names)))
    predicted = probs.argmax(-1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, average=None, zero_division=0
    )
    # sklearn's macro / weighted F1 are these means of the per-class F1; one call instead of three keeps
    # the bootstrap fast
    scores = {
        "accuracy": accuracy_score(labels, predicted),
        "macro_f1": f1.mean(),
        "weighted_f1": np.average(f1, weights=support) if support.sum() else 0.0,
        "ece": expected_calibration_error(probs.max(-1), predicted == labels),
    }
    if len(names) == 2:
        scores["roc_auc"] = _binary_auc(labels, probs[:, 1])
    for i, name in enumerate(names):
        scores[f"precision/{name}"] = precision[i]
        scores[f"recall/{name}"] = recall[i]
        scores[f"f1/{name}"] = f1[i]
    return {key: float(value) for key, value in scores.items()}


def _binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC, or nan when only one class is present (a bootstrap resample can draw one class only)."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def majority_scores(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and F1 of always predicting the most frequent label of `labels` (ties: the lowest id)."""
    majority = int(np.bincount(labels, minlength=num_classes).argmax())
    predicted = np.full_like(labels, majority)
    classes = list(range(num_classes))
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(
            f1_score(labels, predicted, labels=classes, average="weighted", zero_division=0)
        ),
    }


def reward_scores(margins: np.ndarray) -> dict[str, float]:
    """Pairwise accuracy (chosen strictly above rejected), mean margin, and the calibration error of the
    Bradley-Terry probability that the pair is ordered as the model says."""
    correct = margins > 0
    confidence = 1.0 / (1.0 + np.exp(-np.abs(margins)))
    return {
        "accuracy": float(correct.mean()),
        "mean_margin": float(margins.mean()),
        "ece": expected_calibration_error(confidence, correct),
    }


def bootstrap_intervals(
    statistic: Callable[[np.ndarray], dict[str, float]],
    size: int,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, list[float]]:
    """Percentile bootstrap: `statistic(indices)` on `resamples` draws of `size` indices with replacement;
    returns [low, high] per key. Draws where a statistic is undefined (nan) are left out of its interval."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for key, value in statistic(rng.integers(0, size, size)).items():
            draws.setdefault(key, []).append(value)
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for key, values in draws.items():
        values = np.asarray(values, dtype=float)
        values = values[~np.isnan(values)]
        intervals[key] = (
            [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
            if len(values)
            else [float("nan")] * 2
        )
    return intervals


def with_intervals(point: dict[str, float], intervals: dict[str, list[float]]) -> dict[str, dict]:
    """`{name: {"value": v, "ci95": [low, high]}}`."""
    return {key: {"value": value, "ci95": intervals.get(key)} for key, value in point.items()}


# ---------------------------------------------------------------------------------------------
# model, data and predictions


def head_config(path: str | Path) -> JetMoeConfig:
    """The head's config (num_labels, id2label) of a trained directory, read before any weights load.

    For an adapter it is the `config.json` that `jetmoe-ft cls` writes beside it.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise RecipeError(f"--model: no such directory {path}.")
    if (path / "config.json").is_file():
        return JetMoeConfig.from_pretrained(path)
    if is_adapter_dir(path):
        if not adapter_has_head(path):
            load_trained_model(
                path, JetMoeForSequenceClassification
            )  # raises its "no classification head" error
        raise RecipeError(
            f"--model: the adapter in {path} has no config.json giving its classes (num_labels, id2label); "
            "copy its base model's config.json there with the head's num_labels / id2label."
        )
    raise RecipeError(
        f"--model: {path} holds neither a model (config.json) nor an adapter (adapter_config.json)."
    )


def load_head(path: str | Path, config: JetMoeConfig, tokenizer_name: str | None = None):
    """A trained `JetMoeForSequenceClassification` (full directory or LoRA adapter) and its tokenizer."""
    kwargs = {}
    if is_adapter_dir(path):  # the base gets the head's shape and names
        kwargs = {
            "num_labels": config.num_labels,
            "id2label": config.id2label,
            "label2id": config.label2id,
            "pad_token_id": config.pad_token_id,
        }
    model = load_trained_model(path, JetMoeForSequenceClassification, **kwargs)
    tokenizer = _load_tokenizer(tokenizer_name or str(path))
    resolve_pad_token(tokenizer)
    return model.eval(), tokenizer


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name in EMBEDDED_TOKENIZER_NAMES or name in TINY_NAMES:
        return load_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"tokenizer: none in {name} ({str(error).splitlines()[0][:200]}); pass --tokenizer."
        ) from None


@dataclasses.dataclass
class EvalSource:
    """Which data to evaluate on, and how it was described to the user."""

    data: DataArguments
    split: str
    seed: int
    values: dict[str, Any]
    description: str


def eval_source(args: argparse.Namespace) -> EvalSource:
    """The data to evaluate: `--dataset_name/--split`, else `--config`, else the run's own recipe."""
    recipe_path = Path(args.config) if args.config else Path(args.model) / "recipe.yaml"
    values = read_recipe_file(recipe_path) if (args.config or recipe_path.is_file()) else {}
    seed = int(values.get("seed", DEFAULT_SEED))
    if args.dataset_name:
        split = args.split or "test"
        data = DataArguments(
            dataset_name=args.dataset_name,
            dataset_config=args.dataset_config,
            dataset_train_split=split,
            dataset_test_split=split,
        )
        return EvalSource(data, "train", seed, values, f"{args.dataset_name} ({split} split)")
    if not values:
        raise RecipeError(
            f"No data to evaluate on: {args.model} has no recipe.yaml; pass --config R.yaml or "
            "--dataset_name NAME --split SPLIT."
        )
    fields = {f.name for f in dataclasses.fields(DataArguments)} - {"max_train_samples", "max_eval_samples"}
    data = DataArguments(**{key: value for key, value in values.items() if key in fields})
    if args.split:
        data.dataset_test_split = args.split
    if data.dataset_test_split == data.dataset_train_split:
        return EvalSource(data, "train", seed, values, f"{_name(data)} ({data.dataset_train_split} split)")
    return EvalSource(data, "test", seed, values, f"{_name(data)} ({data.dataset_test_split} split)")


def _name(data: DataArguments) -> str:
    return data.dataset_name or " + ".join(str(entry["path"]) for entry in data.datasets)


def load_eval_split(source: EvalSource, task: str, max_samples: int | None) -> Dataset:
    """The evaluation rows, checked for the columns `task` needs."""
    text_column = source.values.get("text_column", "text")
    label_column = source.values.get("label_column", "label")
    source.data.max_eval_samples = max_samples
    if source.split == "train":
        source.data.max_train_samples = max_samples
    splits = load_recipe_datasets(
        source.data, task, seed=source.seed, text_field=text_column, label_field=label_column
    )
    if source.split not in splits:
        raise RecipeError(
            f"{source.description}: the recipe has no held-out split; set `dataset_test_split` or "
            "`test_split_size` in it, or pass --dataset_name NAME --split SPLIT."
        )
    dataset = splits[source.split]
    if task == "cls":
        dataset = dataset.rename_columns(
            {old: new for old, new in ((text_column, "text"), (label_column, "label")) if old != new}
        )
    return dataset


@torch.no_grad()
def score_batches(
    model, tokenizer, encoded: list[list[int]], batch_size: int, device: torch.device, desc: str
) -> np.ndarray:
    """Head outputs [N, num_labels] (float64) for token id lists, in batches of similar lengths."""
    collator = DataCollatorWithPadding(tokenizer)
    order = np.argsort([len(ids) for ids in encoded], kind="stable")[::-1]
    outputs = np.zeros((len(encoded), model.config.num_labels))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        rows = order[start : start + batch_size]
        batch = collator([{"input_ids": encoded[i]} for i in rows]).to(device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        outputs[rows] = logits.float().cpu().numpy()
    return outputs


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def pair_token_ids(
    example: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Token ids of (prompt +) chosen and (prompt +) rejected, exactly as TRL's `RewardTrainer` makes them:
    the chat template for conversations, else the text plus the eos token."""
    chosen, rejected = example["chosen"], example["rejected"]
    if "prompt" in example and example["prompt"] is not None:
        chosen, rejected = example["prompt"] + chosen, example["prompt"] + rejected
    if is_conversational(example):
        return tuple(
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            for messages in (chosen, rejected)
        )
    eos = tokenizer.eos_token
    return tuple(
        tokenizer(text if text.endswith(eos) else text + eos)["input_ids"] for text in (chosen, rejected)
    )


# ---------------------------------------------------------------------------------------------
# the two evaluations


def class_names(config: JetMoeConfig) -> list[str]:
    return [config.id2label[i] for i in range(config.num_labels)]


def evaluate_classifier(
    model, tokenizer, dataset: Dataset, labels: np.ndarray, args, device
) -> tuple[dict, list[dict]]:
    """Metrics and prediction rows of a classification head on `text` rows with class ids `labels`."""
    names = class_names(model.config)
    texts = [str(text) if text is not None else "" for text in dataset["text"]]
    encoded = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    probs = softmax(score_batches(model, tokenizer, encoded, args.batch_size, device, "Classifying"))

    point = classification_scores(labels, probs, names)
    intervals = bootstrap_intervals(
        lambda idx: classification_scores(labels[idx], probs[idx], names),
        len(labels),
        args.bootstrap,
        args.seed,
    )
    baseline = majority_scores(labels, len(names))
    baseline_intervals = bootstrap_intervals(
        lambda idx: majority_scores(labels[idx], len(names)), len(labels), args.bootstrap, args.seed
    )
    majority = int(np.bincount(labels, minlength=len(names)).argmax())
    support = np.bincount(labels, minlength=len(names))
    metrics = {
        "task": "classification",
        "num_examples": len(labels),
        "labels": names,
        "metrics": with_intervals({k: v for k, v in point.items() if "/" not in k}, intervals),
        "per_class": {
            name: {
                **{
                    kind: {"value": point[f"{kind}/{name}"], "ci95": intervals[f"{kind}/{name}"]}
                    for kind in ("precision", "recall", "f1")
                },
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(
            labels, probs.argmax(-1), labels=list(range(len(names)))
        ).tolist(),
        "baseline": {
            "name": f"majority class ({names[majority]})",
            "majority_class": names[majority],
            **with_intervals(baseline, baseline_intervals),
            **({"roc_auc": {"value": 0.5, "ci95": [0.5, 0.5]}} if len(names) == 2 else {}),
        },
    }
    rows = [
        {
            "id": _row_id(dataset, i),
            "label": names[labels[i]],
            "prediction": names[int(probs[i].argmax())],
            "probabilities": {name: float(probs[i, j]) for j, name in enumerate(names)},
            "text": texts[i],
        }
        for i in range(len(labels))
    ]
    return metrics, rows


def evaluate_reward_model(model, tokenizer, dataset: Dataset, args, device) -> tuple[dict, list[dict]]:
    """Metrics and prediction rows of a reward head on `chosen` / `rejected` pairs."""
    pairs = [pair_token_ids(example, tokenizer) for example in dataset]
    kept = [
        i
        for i, (c, r) in enumerate(pairs)
        if args.max_length is None or max(len(c), len(r)) <= args.max_length
    ]
    encoded = [pairs[i][0] for i in kept] + [pairs[i][1] for i in kept]
    rewards = score_batches(model, tokenizer, encoded, args.batch_size, device, "Scoring pairs")[:, 0]
    chosen, rejected = rewards[: len(kept)], rewards[len(kept) :]
    margins = chosen - rejected

    point = reward_scores(margins)
    intervals = bootstrap_intervals(
        lambda idx: reward_scores(margins[idx]), len(margins), args.bootstrap, args.seed
    )
    metrics = {
        "task": "reward",
        "num_examples": len(kept),
        "excluded_longer_than_max_length": len(pairs) - len(kept),
        "metrics": with_intervals(point, intervals),
        "baseline": {"name": "chance", "accuracy": {"value": 0.5, "ci95": [0.5, 0.5]}},
    }
    rows = [
        {
            "id": _row_id(dataset, i),
            "reward_chosen": float(chosen[k]),
            "reward_rejected": float(rejected[k]),
            "margin": float(margins[k]),
            "correct": bool(margins[k] > 0),
        }
        for k, i in enumerate(kept)
    ]
    return metrics, rows


def _row_id(dataset: Dataset, index: int):
    return dataset[index]["id"] if "id" in dataset.column_names else index


# ---------------------------------------------------------------------------------------------
# plots and the table


def plot_confusion_matrix(matrix: list[list[int]], names: list[str], path: Path) -> Path:
    """Counts per (true, predicted) class pair, as a heat map."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no global backend
    from sklearn.metrics import ConfusionMatrixDisplay

    size = min(3.0 + 0.6 * len(names), 20.0)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=names).plot(
        ax=ax,
        cmap="Blues",
        values_format="d",
        colorbar=True,
        xticks_rotation=45 if len(names) > 4 else "horizontal",
    )
    ax.set_title("Confusion matrix (rows: true class)")
    fig.savefig(path, dpi=100)
    return path


def plot_reliability(confidence: np.ndarray, correct: np.ndarray, path: Path, ece: float, what: str) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and how many fall in each bin."""
    from matplotlib.figure import Figure

    bins = reliability_bins(confidence, correct)
    centers = (np.arange(N_BINS) + 0.5) / N_BINS
    accuracy = np.array([acc for acc, _, _ in bins])
    counts = np.array([count for _, _, count in bins])
    fig = Figure(figsize=(5.5, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers, np.nan_to_num(accuracy), width=1 / N_BINS, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability ({what}); ECE {ece:.3f}, {N_BINS} bins")
    top.legend(loc="upper left")
    bottom.bar(centers, counts, width=1 / N_BINS, edgecolor="black", color="grey")
    bottom.set_xlabel(f"confidence ({what})")
    bottom.set_ylabel("examples")
    bottom.set_xlim(0, 1)
    fig.savefig(path, dpi=100)
    return path


def _cell(entry: dict | None, digits: int = 3) -> str:
    if entry is None:
        return ""
    interval = entry.get("ci95")
    text = f"{entry['value']:.{digits}f}"
    if interval and interval != [entry["value"]] * 2:
        text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return text


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned plain-text tables."""
    metrics, baseline = report["metrics"], report["baseline"]
    titles = {
        "accuracy": "accuracy",
        "macro_f1": "macro F1",
        "weighted_f1": "weighted F1",
        "roc_auc": "ROC-AUC",
        "ece": f"ECE ({N_BINS} bins)",
        "mean_margin": "mean margin",
    }
    lines = [
        f"{report['model']} on {report['data']}: {report['num_examples']} examples",
        f"{'metric':<16}{'value [95% interval]':<28}{baseline['name']}",
    ]
    for key, title in titles.items():
        if key in metrics:
            lines.append(f"{title:<16}{_cell(metrics[key]):<28}{_cell(baseline.get(key))}")
    if report["task"] == "classification":
        width = max(8, *(len(name) for name in report["labels"])) + 2
        lines += ["", f"{'class':<{width}}{'precision':<26}{'recall':<26}{'f1':<26}support"]
        for name, entry in report["per_class"].items():
            cells = "".join(f"{_cell(entry[kind]):<26}" for kind in ("precision", "recall", "f1"))
            lines.append(f"{name:<{width}}{cells}{entry['support']}")
        lines += ["", "confusion matrix (rows: true, columns: predicted)"]
        lines.append(" " * width + "".join(f"{name:>{width}}" for name in report["labels"]))
        for name, row in zip(report["labels"], report["confusion_matrix"], strict=True):
            lines.append(f"{name:<{width}}" + "".join(f"{count:>{width}}" for count in row))
    elif report.get("excluded_longer_than_max_length"):
        lines.append(
            f"({report['excluded_longer_than_max_length']} pairs longer than max_length left out, as in training)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jetmoe-ft eval-cls", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="A directory written by `jetmoe-ft cls` (model or adapter)."
    )
    parser.add_argument(
        "--config", help="A recipe whose held-out data to use (default: the run's recipe.yaml)."
    )
    parser.add_argument(
        "--dataset_name", help="Data to evaluate on instead: embedded name, local file or hub id."
    )
    parser.add_argument("--dataset_config", help="Configuration name of --dataset_name.")
    parser.add_argument("--split", help="Split to evaluate (default: the recipe's test split, or `test`).")
    parser.add_argument("--output_dir", help="Where to write the results (default: MODEL/eval).")
    parser.add_argument("--tokenizer", help="Tokenizer, when MODEL has none.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--max_length", type=int, help="Token limit (default: the recipe's, else 512 / 1024)."
    )
    parser.add_argument("--max_samples", type=int, help="Evaluate at most this many examples.")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the intervals.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resampling.")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available).")
    args = parser.parse_args(argv)
    if args.config and args.dataset_name:
        parser.error("give --config or --dataset_name, not both")
    if args.bootstrap < 1:
        parser.error("--bootstrap: at least 1 resample")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate one trained head; returns the report written to `metrics.json`."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    source = eval_source(args)
    config = head_config(args.model)
    reward = config.num_labels == 1
    dataset = load_eval_split(source, "rm" if reward else "cls", args.max_samples)
    if not reward:  # label mistakes surface before the weights load
        label2id = {name: i for i, name in enumerate(class_names(config))}
        labels = np.asarray(encode_labels(dataset, "label", label2id, "evaluation data"))
    if args.max_length is None:
        args.max_length = int(source.values.get("max_length") or (1024 if reward else 512))
    model, tokenizer = load_head(args.model, config, args.tokenizer)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)

    if reward:
        metrics, rows = evaluate_reward_model(model, tokenizer, dataset, args, device)
    else:
        metrics, rows = evaluate_classifier(model, tokenizer, dataset, labels, args, device)
    report = {
        "model": str(args.model),
        "data": source.description,
        **metrics,
        "bootstrap": {"resamples": args.bootstrap, "confidence": CONFIDENCE, "seed": args.seed},
        "ece_bins": N_BINS,
        "max_length": args.max_length,
    }
    output_dir = Path(args.output_dir or Path(args.model) / "eval")
    write_outputs(report, rows, output_dir)
    print("\n" + format_table(report))
    print(f"\nWrote metrics.json, predictions.jsonl and plots to {output_dir}")
    return report


def write_outputs(report: dict[str, Any], rows: list[dict], output_dir: Path) -> None:
    """`metrics.json`, `predictions.jsonl`, and the plots."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    with (output_dir / "predictions.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    ece = report["metrics"]["ece"]["value"]
    if report["task"] == "classification":
        plot_confusion_matrix(
            report["confusion_matrix"], report["labels"], output_dir / "confusion_matrix.png"
        )
        confidence = np.array([max(row["probabilities"].values()) for row in rows])
        correct = np.array([row["label"] == row["prediction"] for row in rows])
        plot_reliability(confidence, correct, output_dir / "reliability.png", ece, "top-class probability")
    else:
        margins = np.array([row["margin"] for row in rows])
        confidence = 1.0 / (1.0 + np.exp(-np.abs(margins)))
        plot_reliability(confidence, margins > 0, output_dir / "reliability.png", ece, "sigmoid(|margin|)")


def cli(argv: list[str] | None = None) -> int:
    """`jetmoe-ft eval-cls`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
