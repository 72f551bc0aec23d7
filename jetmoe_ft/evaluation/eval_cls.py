"""How good is a trained head: evaluation of classification and reward models on held-out data.
(Just over 400 lines because the reward-head checks that eval-gen and GRPO share live beside `head_config`.)

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
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from sklearn.metrics import (
    confusion_matrix,
)
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from trl.data_utils import is_conversational

from ..config import RecipeError
from ..data.held_out import eval_source, load_eval_split
from ..data.labels import encode_labels
from ..loading import (
    adapter_has_head,
    is_adapter_dir,
    load_tokenizer_named,
    load_trained_model,
    resolve_pad_token,
)
from ..modeling import JetMoeConfig, JetMoeForSequenceClassification
from ..training.runs import run_command
from .metrics import (
    CONFIDENCE,
    N_BINS,
    bootstrap_intervals,
    classification_scores,
    majority_scores,
    reward_scores,
    with_intervals,
)
from .plots import plot_confusion_matrix, plot_reliability

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


def reward_head_config(path: str | Path, field: str) -> JetMoeConfig:
    """The config of a reward head (`jetmoe-ft cls` with `num_labels: 1`); a language model or a classifier of
    several labels is one line naming `field`."""
    try:
        config = head_config(path)
    except RecipeError as error:
        raise RecipeError(f"{field}: {str(error).removeprefix('--model: ')}") from None
    if any(name.endswith("CausalLM") for name in config.architectures or []):
        raise RecipeError(
            f"{field}: {path} is a language model, not a reward head (`jetmoe-ft cls`, num_labels: 1)."
        )
    if config.num_labels != 1:
        raise RecipeError(
            f"{field}: {path} is a classifier with {config.num_labels} labels, not a reward head; train one with "
            "`jetmoe-ft cls` and `num_labels: 1`."
        )
    return config


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
    tokenizer = load_tokenizer_named(tokenizer_name or str(path), field="--tokenizer")
    resolve_pad_token(tokenizer)
    return model.eval(), tokenizer


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
