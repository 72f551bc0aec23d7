"""The export's model card (`README.md`), true outside this repo: `library_name: transformers`, a real `base_model`
(a hub id, or none), library versions, the run's held-out results, every check with its figure, and the usage
snippets — the same text the fresh-process check executed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..training.model_card import _results
from .probes import GREEDY_TOKENS
from .sources import Source

KIND_NAMES = {
    "full": "a full model",
    "adapter": "an expert-LoRA adapter",
    "stacked_adapter": "an adapter trained on another adapter",
    "qlora": "a QLoRA adapter",
}


def snippets(
    source: Source, probe: dict, model_id: str, adapter: str | None, base: str | None
) -> dict[str, str]:
    """The usage snippets of an export at `model_id`: `model`, and with a stock adapter `adapter` (the source text of
    `PeftModel.from_pretrained`'s arguments after the model) on the base `base`. The card shows them with the final
    names; the fresh-process check runs them on the staged files."""
    found = {"model": usage_snippet(model_id, source.task, probe)}
    if adapter is not None:
        found["adapter"] = adapter_snippet(base, adapter, source.task, probe, source.head_kwargs())
    return found


def expected_output(source: Source, tokenizer, reference: dict) -> str | float:
    """What the snippets print when the export is right: the run's own greedy answer, score or label (probe 0)."""
    if source.task == "causal_lm":
        return tokenizer.decode(reference["greedy"][0], skip_special_tokens=True).strip()
    logits = reference["logits"][0].reshape(-1)
    if source.head == "reward":
        return float(logits[0])
    return source.config.id2label[int(logits.argmax())]


def usage_snippet(model_id: str, task: str, probe: dict) -> str:
    """Python that loads the export with transformers alone and prints what the model answers (or scores)."""
    if task == "sequence_classification":
        if "messages" in probe:
            encode = (
                f"messages = {probe['messages']!r}\n"
                'inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)\n'
            )
        else:
            encode = f'inputs = tokenizer({probe["text"]!r}, return_tensors="pt")\n'
        return (
            "import torch\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"model_id = {model_id!r}\n"
            "tokenizer = AutoTokenizer.from_pretrained(model_id)\n"
            'model = AutoModelForSequenceClassification.from_pretrained(model_id, dtype="auto")\n'
            + encode
            + "with torch.no_grad():\n"
            "    logits = model(**inputs).logits[0]\n"
            'print(f"{logits.item():.4f}" if model.config.num_labels == 1 else '
            "model.config.id2label[int(logits.argmax())])\n"
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model_id = {model_id!r}\n"
        "tokenizer = AutoTokenizer.from_pretrained(model_id)\n"
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")\n'
        f"messages = {probe['messages']!r}\n"
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)\n"
        f"outputs = model.generate(**inputs, max_new_tokens={GREEDY_TOKENS}, do_sample=False)\n"
        'print(tokenizer.decode(outputs[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )


def adapter_snippet(base: str, adapter: str, task: str, probe: dict, base_kwargs: dict) -> str:
    """Python that puts the stock-PEFT adapter on transformers' base model and prints the same answer."""
    cls = (
        "AutoModelForSequenceClassification" if task == "sequence_classification" else "AutoModelForCausalLM"
    )
    load = f'model = {cls}.from_pretrained(model_id, dtype="auto")\n'
    kwargs = "".join(f", {key}={value!r}" for key, value in base_kwargs.items())
    return "from peft import PeftModel\n" + usage_snippet(base, task, probe).replace(
        load,
        f'model = {cls}.from_pretrained(model_id, dtype="auto"{kwargs})\n'
        f"model = PeftModel.from_pretrained(model, {adapter})\n",
    )


def write_card(
    folder: Path,
    name: str,
    info: dict[str, Any],
    shown: dict[str, str],
    model_id: str,
    metrics: dict[str, Any],
) -> None:
    """`folder/README.md` of the export `name`, from export.json's `info` and the snippets `shown`."""
    source, base_model = info["source"], info.get("base_model")
    front = {
        "library_name": "transformers",
        **({"base_model": base_model} if base_model else {}),
        "pipeline_tag": "text-classification"
        if info["task"] == "sequence_classification"
        else "text-generation",
        "tags": ["jetmoe", "jetmoe-ft", "moe", info["loop"], f"export-{info['dtype']}"],
        **({"datasets": info["datasets"]} if info.get("datasets") else {}),
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A JetMoE {_what(info)} fine-tuned with `jetmoe-ft {info['loop']}` from "
        f"{f'`{base_model}`' if base_model else 'a base with no hub id'} "
        f"(run `{source['path']}`: {KIND_NAMES[source['kind']]}), exported with `jetmoe-ft export` in "
        f"{info['dtype']} as a plain transformers checkpoint: transformers' own `JetMoeConfig` and "
        f"`{info['model_class']}` load it; jetmoe-ft is not needed to use it.",
        "",
        "## Use",
        "",
        "```python",
        shown["model"].rstrip(),
        "```",
    ]
    if info["head"] == "lm":
        lines += [
            "",
            'Served by transformers\' OpenAI-compatible server (`pip install "transformers[serving]"`):',
            "",
            "```bash",
            f"transformers serve {model_id} --port 8000",
            "```",
        ]
    if "adapter" in shown:
        lines += [
            "",
            "The adapter alone, in stock PEFT's format (`adapter/`), on transformers' base model:",
            "",
            "```python",
            shown["adapter"].rstrip(),
            "```",
        ]
    lines += ["", "## Held-out results of the run", "", *_results(metrics)]
    if info.get("qlora"):
        q = info["qlora"]
        lines += [
            "",
            "## QLoRA",
            "",
            f"The adapter was trained on {q['quant_type']} 4-bit experts; it is merged here into the dequantized "
            f"weights. Distance of this export from the 4-bit model the adapter was trained with, on the probe "
            f"prompts: max |logit difference| {q['max_abs_logit_difference']:.4g}, mean KL {q['mean_kl']:.3g}, "
            f"greedy tokens {'identical' if q['greedy_identical'] else 'different'}.",
        ]
    lines += ["", "## Checks passed before publishing", "", "| check | figures |", "| --- | --- |"]
    for check in info["checks"]:
        lines.append(f"| {check['check']} | {_figures(check)} |")
    lines += [
        "",
        "The probe inputs, the reference logits and greedy tokens are in `probe.safetensors`; every figure is in "
        "`export.json`.",
        "",
        "## Versions",
        "",
        "| library | version |",
        "| --- | --- |",
        *[f"| {name} | {version} |" for name, version in info["versions"].items()],
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


def _what(info: dict) -> str:
    return {"lm": "language model", "classifier": "classifier", "reward": "reward model"}[info["head"]]


def _figures(check: dict) -> str:
    shown = []
    for key, value in check.items():
        if key in ("check", "passed") or isinstance(value, dict | list) or value is None:
            continue
        shown.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(shown)


def read_metrics(path: Path) -> dict[str, Any]:
    """The run's `metrics.json` (beside the adapter, or one folder up), or nothing."""
    for folder in (path, path.parent):
        try:
            return json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
    return {}
