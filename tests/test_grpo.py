"""GRPO: router loss once, rewards reaching the trainer, generation-time routing against training, one-line
mistakes, the loop end to end on one and two CPU processes."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import GRPOConfig

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.config import RecipeError
from jetmoe_ft.data.prompts import to_prompts
from jetmoe_ft.evaluation.reward_funcs import build_reward_funcs, parse_reward_funcs
from jetmoe_ft.grpo import JetMoeGRPOTrainer, cli
from jetmoe_ft.grpo import main as grpo_main
from jetmoe_ft.training.rollout_routing import UNSET, RolloutRouting

from .conftest import tiny_kwargs

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny" / "grpo.yaml")
QUICK = [
    *(
        "--model_name_or_path",
        "jetmoe-ft/tiny",
        "--reward_funcs",
        "[no_repeated_ngrams, 'tests.test_grpo:short']",
    ),
    *("--reward_weights", "1.0", "0.5", "--max_train_samples", "16", "--max_eval_samples", "4"),
    *("--num_generations", "2", "--max_completion_length", "6", "--per_device_train_batch_size", "4"),
    *("--per_device_eval_batch_size", "4", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2"),
    # the random model rarely ends within 6 tokens; masked (truncated) completions leave no token to compare
    *("--mask_truncated_completions", "false"),
]
PROMPTS = [[{"role": "user", "content": f"Tell me about task number {i}."}] for i in range(4)]


def short(completions, **kwargs):
    """A user reward by dotted name: fewer characters score higher."""
    return [-len(c[-1]["content"] if isinstance(c, list) else c) / 10 for c in completions]


def _trainer(tmp_path, coef, beta=0.1, lora=False, **trainer_kwargs):
    torch.manual_seed(0)
    model = JetMoeForCausalLM(
        JetMoeConfig(**tiny_kwargs(vocab_size=32000), aux_loss_coef=coef, pad_token_id=0)
    )
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["kv_proj"]))
    args = GRPOConfig(
        str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=5,
        num_iterations=2,  # TRL then also computes the old policy's log-probs (a no-grad pass)
        beta=beta,
        gradient_checkpointing=False,
        seed=0,
    )
    rewards = build_reward_funcs(parse_reward_funcs(["no_repeated_ngrams", "tests.test_grpo:short"]), [2])
    return JetMoeGRPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval().requires_grad_(False) if beta and not lora else None,
        reward_funcs=rewards,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=load_tokenizer(),
        **trainer_kwargs,
    )


def test_router_loss_is_added_once_and_only_by_the_training_forward(tmp_path):
    weighted, plain = _trainer(tmp_path / "a", 0.5), _trainer(tmp_path / "b", 0.0)
    weighted.current_gradient_accumulation_steps = plain.current_gradient_accumulation_steps = (
        1  # set by train()
    )
    assert weighted.aux_loss_enabled is False and weighted.ref_model is not None
    weighted.model.train()
    # generation, the old policy's and the reference's log-probs: forwards without gradients record nothing
    inputs = weighted._prepare_inputs(next(iter(weighted.get_train_dataloader())))
    assert inputs["old_per_token_logps"] is not None and inputs["ref_per_token_logps"] is not None
    assert weighted.router_loss.losses == [] and weighted._aux_window == []
    plain.model.train()
    losses = {
        name: t.compute_loss(t.model, dict(inputs)) for name, t in (("weighted", weighted), ("plain", plain))
    }
    assert len(weighted._aux_window) == 1  # one training forward, one router loss
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    expected = weighted.model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss.detach()
    torch.testing.assert_close(weighted._aux_window[-1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["weighted"] - losses["plain"], 0.5 * expected, rtol=1e-4, atol=1e-6)
    assert "aux_loss" not in weighted._metrics["train"]  # TRL's own (Mixtral-form) aux loss stayed off


def test_with_lora_the_reference_is_the_adapter_disabled(tmp_path):
    trainer = _trainer(tmp_path, 0.01, beta=0.1, lora=True)
    model = trainer.model
    assert trainer.ref_model is None and list(model.peft_config) == [
        "default"
    ]  # TRL's copy of the fresh adapter dropped
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():  # a trained adapter: the policy now differs from its base
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad(), model.disable_adapter():
        base, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, width)
    keep = inputs["completion_mask"].bool()
    torch.testing.assert_close(inputs["ref_per_token_logps"][keep], base[keep], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(inputs["old_per_token_logps"][keep], base[keep], atol=1e-3)


def test_rollout_routing_matches_with_the_same_weights_and_sees_a_change():
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(), pad_token_id=0)).eval()
    routing = RolloutRouting(model)
    prompt = torch.randint(3, 128, (3, 5))
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :2] = 0  # left padding, as GRPO generates
    with routing.generation(), torch.no_grad():
        generated = model.generate(
            input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
    completion = generated[:, 5:]
    record = routing.take_generation(completion.tolist(), pad_id=0)
    assert record["rollout_experts"].shape == (3, 4, 11, 2)
    assert (record["rollout_experts"][:, :, -1] == UNSET).all()  # the last token is never read
    inputs = {
        "prompt_ids": prompt,
        "completion_ids": completion,
        "completion_mask": torch.ones_like(completion),
        **record,
    }

    def training_forward():
        model.train()
        with routing.training_forward():
            model(input_ids=generated, attention_mask=torch.cat([prompt_mask, inputs["completion_mask"]], 1))
        routing.compare(inputs)
        return {k: v for k, v in routing.take_log_values().items() if k.startswith("routing/")}

    same = training_forward()
    assert same == {
        "routing/rollout_match": 1.0,
        "routing/rollout_match.moa": 1.0,
        "routing/rollout_match.moe": 1.0,
    }
    with torch.no_grad():
        model.model.layers[1].mlp.router.layer.weight.add_(torch.randn(4, 64))
    moved = training_forward()
    assert moved["routing/rollout_match.moe"] < 1.0 and moved["routing/rollout_match.moa"] == 1.0


def _logs(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_two_steps_log_rewards_router_loss_and_rollout_match(tmp_path):
    metrics = grpo_main(["--config", RECIPE, "--output_dir", str(tmp_path), *QUICK])
    logs = _logs(tmp_path)
    assert len(logs) == 2
    for entry in logs:
        # a built-in and a dotted-name reward reached the trainer; fp32, same weights: the routing agrees
        assert "rewards/no_repeated_ngrams/mean" in entry and "rewards/short/mean" in entry
        assert entry["routing/rollout_match"] == 1.0 and entry["routing/rollout_match.moe"] == 1.0
        assert entry["aux_loss"] > 0 and "routing/layer0.moe.entropy" in entry
        # the sampled tokens' log-probs recorded while generating are the training forward's
        assert entry["rollout/logprob_gap"] < 1e-4 and entry["rollout/generation_seconds"] > 0
        assert "routing/rollout_free_match" not in entry  # no replay: nothing else changes
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for when in ("before", "after"):
        low, high = saved[f"eval_{when}_reward/ci95"]
        assert low <= saved[f"eval_{when}_reward/mean"] <= high
        assert f"eval_{when}_rewards/short/mean" in saved
    assert saved["eval_reward/change"] == pytest.approx(
        saved["eval_after_reward/mean"] - saved["eval_before_reward/mean"]
    )
    assert (
        saved["eval_reward/prompts"] == 4
        and metrics["eval_reward/change_ci95"] == saved["eval_reward/change_ci95"]
    )


def _one_line_exit(capsys, argv) -> str:
    capsys.readouterr()
    assert cli(["--config", RECIPE, "--model_name_or_path", "jetmoe-ft/tiny", *argv]) == 2
    stderr = capsys.readouterr().err  # data loading may draw progress bars there first
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and stderr.count("error") == 1 and "Traceback" not in stderr
    return error


def test_user_mistakes_are_one_line_and_exit_status_2(tmp_path, capsys):
    assert "`max_wrds` is not a built-in reward" in _one_line_exit(capsys, ["--reward_funcs", "[max_wrds]"])
    torch.manual_seed(0)
    JetMoeForSequenceClassification(JetMoeConfig(**tiny_kwargs(), num_labels=3)).save_pretrained(
        tmp_path / "cls"
    )
    error = _one_line_exit(capsys, ["--reward_funcs", f"[{tmp_path / 'cls'}]"])
    assert "classifier with 3 labels, not a reward head" in error
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "A fine film.", "label": 1}\n{"text": "Dull.", "label": 0}\n')
    error = _one_line_exit(capsys, ["--dataset_name", str(texts), "--reward_funcs", "[no_commas]"])
    assert "grpo needs `prompt`" in error and "the data has label, text" in error


def test_conversations_become_prompts_and_none_is_a_mistake():
    chats = Dataset.from_list(
        [
            {
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                "n": 1,
            },
            {"messages": [{"role": "assistant", "content": "Alone"}], "n": 2},
        ]
    )
    (row,) = to_prompts({"train": chats})["train"]
    assert row == {"prompt": [{"role": "user", "content": "Hi"}], "n": 1}
    with pytest.raises(RecipeError, match="the train split has no prompt"):
        to_prompts({"train": chats.select([1])})


def test_a_subprocess_exits_with_status_2_on_a_wrong_reward():
    result = subprocess.run(
        [sys.executable, "-m", "jetmoe_ft.grpo", "--config", RECIPE, "--reward_funcs", "[nope]"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: reward_funcs[0]: `nope` is not a built-in")
    )


def test_two_cpu_ranks_run_two_grpo_steps_with_routing_replay(tmp_path):
    """Each rank replays its own rollouts: one generation serves both steps, so the second trains on weights
    that moved; the experts used stay the rollout's, and the old policy's log-probs (the rollout's weights, with
    the rollout's experts) equal the rollout's, on both ranks."""
    command = [str(Path(sys.executable).parent / "accelerate"), "launch"]
    command += ["--config_file", str(ROOT / "configs" / "cpu_ddp.yaml"), "-m", "jetmoe_ft.grpo"]
    command += ["--config", RECIPE, "--output_dir", str(tmp_path), *QUICK]
    command += ["--routing_replay", "rollout", "--steps_per_generation", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained 2 steps" in result.stdout and "on 2 processes (cpu)" in result.stdout
    assert "Routing replay: every scoring forward" in result.stdout
    logs = _logs(tmp_path)
    assert len(logs) == 2 and all(entry["routing/rollout_match"] == 1.0 for entry in logs)
    assert all(entry["rollout/logprob_gap.old"] < 1e-4 for entry in logs)
    assert logs[0]["routing/rollout_free_match"] == 1.0  # the rollout's weights
    assert logs[1]["rollout/logprob_gap"] > logs[1]["rollout/logprob_gap.old"]  # one update later
    assert json.loads((tmp_path / "metrics.json").read_text())["eval_reward/prompts"] == 4


@pytest.mark.parametrize("path", ["recipes/tiny/grpo.yaml", "recipes/jetmoe-8b/grpo/lora.yaml"])
def test_shipped_grpo_recipes_parse_with_their_rewards(path):
    from jetmoe_ft.config import parse_recipe
    from jetmoe_ft.grpo import GrpoArguments

    recipe = parse_recipe(
        GRPOConfig, ["--config", str(ROOT / path), "--use_cpu", "true"], task_cls=GrpoArguments
    )
    assert recipe.training.num_generations > 1 and recipe.training.max_completion_length > 0
    entries = recipe.task.reward_funcs
    assert len(entries) == len(recipe.training.reward_weights) and isinstance(entries[0], str)
    # reward-model directories aside (trained by other recipes), every entry resolves
    assert parse_reward_funcs(entries[1:])
