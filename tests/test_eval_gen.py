"""eval-gen: paired bootstrap, batched generation, end to end against a baseline, and the mistakes it explains."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.evaluation.eval_gen import cli, main
from jetmoe_ft.evaluation.generation import (
    Answer,
    distinct_n,
    generate_answers,
    prompt_token_ids,
    repeated_ngrams,
)
from jetmoe_ft.evaluation.metrics import paired_bootstrap

from .conftest import randomize_biases, tiny_kwargs

SPECIALS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
QUICK = ["--max_samples", "5", "--max_new_tokens", "4", "--bootstrap", "30", "--batch_size", "16"]


def test_paired_bootstrap_matches_a_hand_computation():
    first, second = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 5.0, 4.0])
    result = paired_bootstrap(first, second, resamples=7, seed=5)
    rng = np.random.default_rng(5)
    draws = []
    for _ in range(7):
        index = rng.integers(0, 4, 4)
        draws.append(second[index].mean() - first[index].mean())
    assert result["difference"] == pytest.approx(0.75)
    assert result["first"] == 2.5 and result["second"] == 3.25
    assert result["ci95"] == pytest.approx([np.percentile(draws, 2.5), np.percentile(draws, 97.5)])
    # a constant shift has a zero-width interval: the pairing cancels what the examples share
    shifted = paired_bootstrap(first, first + 1, resamples=50)
    assert shifted["ci95"] == pytest.approx([1.0, 1.0])
    # any statistic over any per-example objects
    lists = paired_bootstrap([[1], [2]], [[1, 1], [2]], lambda rows: sum(map(len, rows)), resamples=5)
    assert lists["difference"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_answer_statistics():
    answers = [[Answer("a b a b a b", [5] * 6, True)], [Answer("c d", [5, 2], True)]]
    assert distinct_n(answers, 1) == pytest.approx(4 / 8)
    assert distinct_n(answers, 2) == pytest.approx(3 / 6)
    assert repeated_ngrams(answers[0][0], 3) == pytest.approx(2 / 4)
    assert repeated_ngrams(answers[1][0], 3) == 0.0
    assert np.isnan(distinct_n([[Answer("", [2], True)]], 1))


def _causal_lm(seed: int) -> JetMoeForCausalLM:
    torch.manual_seed(seed)
    model = JetMoeForCausalLM(
        JetMoeConfig(**tiny_kwargs(vocab_size=32000), **SPECIALS, initializer_range=0.2)
    )
    randomize_biases(model, seed)
    return model


def test_batched_generation_equals_one_by_one():
    tokenizer = load_tokenizer()
    model = _causal_lm(0)
    prompts = [
        [{"role": "user", "content": text}]
        for text in ("Hi", "What is the weather like on the moon today?", "Tell me a joke", "Why?")
    ]
    ids = [prompt_token_ids(tokenizer, prompt) for prompt in prompts]
    batched = generate_answers(model, tokenizer, ids, max_new_tokens=6, batch_size=4)
    alone = [generate_answers(model, tokenizer, [row], max_new_tokens=6, batch_size=1)[0] for row in ids]
    assert [group[0].token_ids for group in batched] == [group[0].token_ids for group in alone]
    assert len({tuple(group[0].token_ids) for group in batched}) > 1  # the prompts matter
    sampled = generate_answers(
        model, tokenizer, ids[:2], max_new_tokens=4, do_sample=True, num_samples=3, seed=1
    )
    assert [len(group) for group in sampled] == [3, 3]
    again = generate_answers(
        model, tokenizer, ids[:2], max_new_tokens=4, do_sample=True, num_samples=3, seed=1
    )
    assert [[a.token_ids for a in g] for g in sampled] == [[a.token_ids for a in g] for g in again]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base model, a 'fine-tuned' one whose recipe names the base as its start, an adapter on the base, a
    reward head and a two-class head, saved as the training loops save them."""
    root = tmp_path_factory.mktemp("eval-gen")
    tokenizer = load_tokenizer()
    base = _causal_lm(0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tuned = _causal_lm(0)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    tuned.save_pretrained(root / "tuned")
    tokenizer.save_pretrained(root / "tuned")
    recipe = {"model_name_or_path": str(root / "base"), "dataset_name": "chatterbot", "seed": 42}
    (root / "tuned" / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    adapter = get_peft_model(
        _causal_lm(0), LoraConfig(target_modules=["kv_proj", "layer"], r=4, init_lora_weights=False)
    )
    adapter.peft_config["default"].base_model_name_or_path = str(root / "base")
    adapter.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    (root / "adapter" / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    for name, labels in (("rm", 1), ("classifier", 2)):
        torch.manual_seed(3)
        head = JetMoeForSequenceClassification(
            JetMoeConfig(**tiny_kwargs(vocab_size=32000), **SPECIALS, num_labels=labels)
        )
        head.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_eval_gen_against_the_start_model_with_a_reward_model(runs, capsys):
    out = runs / "out"
    report = main(
        ["--model", str(runs / "tuned"), "--reward_model", str(runs / "rm"), "--output_dir", str(out), *QUICK]
    )
    assert report["baseline"] == str(runs / "base") and report["num_prompts"] == 5
    metrics = report["metrics"]
    for key in (
        "reference_nll",
        "reward_mean",
        "instructions_prompt_strict",
        "distinct_2",
        "hit_max_new_tokens",
    ):
        entry = metrics[key]
        assert entry["difference"] == pytest.approx(entry["fine_tuned"] - entry["baseline"]), key
        assert entry["ci95"][0] <= entry["difference"] <= entry["ci95"][1], key

    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    held = [row for row in rows if row["source"] == "held-out"]
    assert len(held) == 5 and len(rows) == 5 + 30
    assert held[0]["prompt"][-1]["role"] == "user" and held[0]["reference"]
    wins = [
        1.0 if r["reward"] > r["baseline_reward"] else 0.5 if r["reward"] == r["baseline_reward"] else 0.0
        for r in held
    ]
    assert metrics["win_rate"]["value"] == pytest.approx(np.mean(wins))
    assert metrics["reward_mean"]["fine_tuned"] == pytest.approx(np.mean([r["reward"] for r in held]))
    instructed = rows[5]
    assert set(instructed["checks"]) == {"strict", "loose"} and "baseline_answer" in instructed

    drift = report["routing_drift"]
    assert drift["summary"]["moe_kl"] > 0 and drift["tokens"] > 0
    markdown = (out / "report.md").read_text()
    assert "| reference answer loss (nats/token) |" in markdown and "samples side by side" in markdown
    for name in ("routing_drift.png", "rewards.png"):
        assert (out / name).stat().st_size > 5000, name
    assert json.loads((out / "metrics.json").read_text())["metrics"]["reward_mean"] == metrics["reward_mean"]
    assert "difference [95% CI]" in capsys.readouterr().out


def test_a_model_against_itself_changes_nothing(runs):
    report = main(
        ["--model", str(runs / "tuned"), "--baseline", str(runs / "tuned"), "--no_instructions"]
        + ["--output_dir", str(runs / "self"), *QUICK]
    )
    assert all(entry["difference"] == 0.0 for key, entry in report["metrics"].items()), report["metrics"]
    assert all(
        layer[kind]["topk_kept"] == 1.0 and layer[kind]["kl"] == 0.0
        for layer in report["routing_drift"]["layers"]
        for kind in ("moa", "moe")
    )


def test_an_adapter_is_compared_with_its_base_disabled(runs):
    report = main(
        ["--model", str(runs / "adapter"), "--no_instructions", "--output_dir", str(runs / "lora"), *QUICK]
    )
    assert report["baseline"] == "the same adapter, disabled"
    assert report["routing_drift"]["summary"]["moe_kl"] > 0
    # the disabled adapter is the base: same reference loss as the base model scored on its own
    base_report = main(
        [
            "--model",
            str(runs / "base"),
            "--dataset_name",
            "chatterbot",
            "--baseline",
            str(runs / "base"),
            "--no_instructions",
        ]
        + ["--output_dir", str(runs / "base-self"), *QUICK, "--max_new_tokens", "1"]
    )
    assert report["metrics"]["reference_nll"]["baseline"] == pytest.approx(
        base_report["metrics"]["reference_nll"]["baseline"], rel=1e-5
    )


def test_mistakes_are_one_line(runs, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(runs / "base", bare)
    cases = [
        (["--model", str(bare)], "has no recipe.yaml; pass --config"),
        (["--model", str(runs / "classifier"), "--dataset_name", "chatterbot"], "is a classification head"),
        (["--model", str(runs / "tuned"), "--reward_model", str(runs / "classifier")], "not a reward head"),
        (
            ["--model", str(runs / "tuned"), "--reward_model", str(runs / "base")],
            "is a language model, not a reward head",
        ),
        (["--model", str(runs / "tuned"), "--max_new_tokens", "250"], "do not fit the context (256 tokens)"),
        (["--model", str(bare), "--dataset_name", "chatterbot"], "has no recipe.yaml naming its start model"),
    ]
    for argv, message in cases:
        assert cli([*argv, "--max_samples", "4"]) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (argv, errors)
