"""Routing replay: imposed experts are used (MoA and MoE), routers keep their gradient, the generation record lines
up with the training input, gradient checkpointing recomputes the same experts, expert LoRA and GRPO's three
scoring forwards (policy, old policy, reference) are replayed."""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.adapters.lora import register_expert_lora
from jetmoe_ft.compat import in_backward
from jetmoe_ft.training.rollout_routing import UNSET, RolloutRouting, routers_in_output_order
from jetmoe_ft.training.routing_replay import RoutingReplay

from .conftest import randomize_biases, tiny_kwargs


def _model(**overrides) -> JetMoeForCausalLM:
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(pad_token_id=0, **overrides)))
    randomize_biases(model)
    return model


def _used_experts(model) -> list[list[tuple[bool, torch.Tensor, torch.Tensor | None]]]:
    """Per router (output order), every call: (in backward, experts used, experts imposed)."""
    calls = []
    for _, _, router in routers_in_output_order(model):
        seen = []
        calls.append(seen)
        router.register_forward_hook(
            lambda m, a, d, seen=seen: seen.append((in_backward(), d.experts.clone(), m.imposed_experts))
        )
    return calls


def _random_experts(batch: int, length: int, routers: int, seed: int = 1) -> torch.Tensor:
    """[B, routers, T, 2] distinct random experts of 4, some positions `UNSET`."""
    generator = torch.Generator().manual_seed(seed)
    experts = torch.stack(
        [torch.randperm(4, generator=generator)[:2] for _ in range(batch * routers * length)]
    ).view(batch, routers, length, 2)
    experts[:, :, -1] = UNSET
    return experts.to(torch.int16)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_imposing_the_routers_own_choice_changes_nothing():
    model, ids = _model(), torch.randint(1, 128, (2, 7))
    model(input_ids=ids).logits.square().sum().backward()
    free, free_grads = model(input_ids=ids).logits.detach(), _grads(model)
    model.zero_grad()
    own = [[] for _ in range(4)]
    handles = [
        router.register_forward_hook(lambda m, a, d, own=own[i]: own.append(d.experts))
        for i, (_, _, router) in enumerate(routers_in_output_order(model))
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    experts = torch.stack([calls[0].view(2, 7, 2) for calls in own], dim=1)
    replay = RoutingReplay()
    with replay.imposing(model, experts):
        logits = model(input_ids=ids).logits
        logits.square().sum().backward()
    assert torch.equal(logits.detach(), free)
    replayed_grads = _grads(model)
    assert replayed_grads.keys() == free_grads.keys()
    for name, grad in replayed_grads.items():
        torch.testing.assert_close(grad, free_grads[name], rtol=0, atol=1e-7, msg=name)


def test_imposed_experts_are_used_and_the_routers_keep_their_gradient():
    model, ids = _model(), torch.randint(1, 128, (2, 7))
    calls = _used_experts(model)
    experts = _random_experts(2, 7, 4)
    replay = RoutingReplay()
    with replay.imposing(model, experts):
        model(input_ids=ids).logits.square().sum().backward()
    for index, ((_, used, imposed),) in enumerate(calls):
        want = experts[:, index].reshape(14, 2).long()
        recorded = want[:, 0] != UNSET
        assert torch.equal(used[recorded], want[recorded]), index
        assert torch.equal(imposed, want)  # UNSET rows keep the router's own top-k
    for _, _, router in routers_in_output_order(model):
        assert router.imposed_experts is None  # released
        assert router.layer.weight.grad is not None and router.layer.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not this forward's"), replay.imposing(model, experts):
        model(input_ids=ids[:, :5])


def test_the_generation_record_lines_up_with_the_training_input():
    """Left-padded prompts: the experts of every read position and the sampled tokens' log-probs recorded while
    generating equal those of the training forward over prompt + completion (fp32, same weights)."""
    model = _model().eval()
    routing = RolloutRouting(model, temperature=0.7)
    prompt = torch.randint(3, 128, (3, 6))
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :2] = 0
    prompt[0, :2] = 0
    with routing.generation(), torch.no_grad():
        generated = model.generate(
            input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=5, min_new_tokens=5, do_sample=True,
            temperature=0.7, pad_token_id=0,
        )  # fmt: skip
    completion = generated[:, 6:]
    record = routing.take_generation(completion.tolist(), pad_id=0)
    experts, log_probs = record["rollout_experts"], record["rollout_log_probs"]
    assert (
        record["rollout_prompt_width"] == 6 and experts.shape == (3, 4, 11, 2) and log_probs.shape == (3, 5)
    )
    assert (experts[:, :, -1] == UNSET).all() and (experts[:, :, :-1] != UNSET).all()
    mask = torch.cat([prompt_mask, torch.ones_like(completion)], 1)
    calls = _used_experts(model)
    with torch.no_grad():
        logits = model(input_ids=generated, attention_mask=mask).logits
    training = torch.stack([router[0][1].view(3, 11, 2) for router in calls], dim=1)
    real = mask.bool()[:, None, :-1].expand(-1, 4, -1)
    assert torch.equal(
        training[:, :, :-1].sort(-1).values[real], experts[:, :, :-1].long().sort(-1).values[real]
    )
    scores = torch.log_softmax(logits[:, 5:-1] / 0.7, -1).gather(-1, completion[..., None])[..., 0]
    torch.testing.assert_close(scores, log_probs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_the_imposed_experts(reentrant):
    ids = torch.randint(1, 128, (2, 7))
    experts = _random_experts(2, 7, 4, seed=2)
    grads = {}
    for checkpointing in (False, True):
        model = _model().train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        calls = _used_experts(model)
        replay = RoutingReplay()
        replay.impose(model, experts)  # held through backward, as GRPO's training step holds it
        model(input_ids=ids).logits.square().sum().backward()
        replay.release()
        grads[checkpointing] = _grads(model)
        recomputed = [call for router in calls for call in router if call[0]]
        assert len(recomputed) == (4 if checkpointing else 0)
        for _, used, imposed in recomputed:
            recorded = imposed[:, 0] != UNSET
            assert torch.equal(used[recorded], imposed[recorded])
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-5, atol=1e-6, msg=name)


def test_expert_lora_and_frozen_routers_are_replayed():
    model = _model()
    model.requires_grad_(False)
    targets = ["experts.input_linear", "experts.output_linear", "mlp.input_linear", "mlp.output_linear"]
    model = get_peft_model(model, register_expert_lora(LoraConfig(r=2, target_modules=targets)))
    calls = _used_experts(model)
    experts = _random_experts(2, 7, 4, seed=3)
    replay = RoutingReplay()
    with replay.imposing(model, experts):
        model(input_ids=torch.randint(1, 128, (2, 7))).logits.square().sum().backward()
    for index, ((_, used, _),) in enumerate(calls):
        want = experts[:, index].reshape(14, 2).long()
        assert torch.equal(used[want[:, 0] != UNSET], want[want[:, 0] != UNSET])
    trained = [p for n, p in model.named_parameters() if "lora_" in n]
    assert trained and all(p.grad is not None for p in trained)
    assert all(r.layer.weight.grad is None for _, _, r in routers_in_output_order(model))  # frozen stay so


def test_grpo_replays_the_rollout_in_the_policy_old_policy_and_reference_forwards(tmp_path):
    from .test_grpo import _trainer

    trainer = _trainer(tmp_path, 0.01, beta=0.1, routing_replay="rollout")
    policy, reference = trainer.model, trainer.ref_model
    generate = trainer._generate_single_turn

    def generate_then_move_the_routers(*args, **kwargs):
        out = generate(*args, **kwargs)
        with torch.no_grad():  # the weights move between sampling and scoring: the own choice differs now
            for model in (policy, reference):
                for _, _, router in routers_in_output_order(model):
                    router.layer.weight.add_(torch.randn_like(router.layer.weight))
        return out

    trainer._generate_single_turn = generate_then_move_the_routers
    calls = {"policy": _used_experts(policy), "reference": _used_experts(reference)}
    trainer.current_gradient_accumulation_steps = 1
    policy.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(policy, inputs)
    loss.backward()
    trainer.routing_replay.release()
    logs = trainer.rollout_routing.take_log_values(replayed=True)
    assert logs["routing/rollout_match"] == 1.0 and logs["routing/rollout_free_match"] < 1.0
    assert logs["routing/rollout_free_match.moa"] < 1.0 and logs["routing/rollout_free_match.moe"] < 1.0
    # the policy: generation (its own choice), the old policy's pass (no grad) and the training forward; the
    # reference: its one pass
    for name, forwards in (("policy", 2), ("reference", 1)):
        for router in calls[name]:
            scored, generation = router[-forwards:], router[:-forwards]
            assert all(imposed is None for _, _, imposed in generation) and len(generation) == (
                5 if name == "policy" else 0
            )
            for _, used, imposed in scored:
                recorded = imposed[:, 0] != UNSET
                assert recorded.float().mean() > 0.9 and torch.equal(used[recorded], imposed[recorded])
    assert all(p.grad is not None for p in (r.layer.weight for _, _, r in routers_in_output_order(policy)))
    assert all(r.imposed_experts is None for _, _, r in routers_in_output_order(policy))
    assert logs["rollout/logprob_gap.old"] > 0  # moved routers: the old log-probs are not the rollout's


def test_a_generator_that_records_no_routing_cannot_replay(tmp_path, capsys):
    from jetmoe_ft.config import RecipeError
    from jetmoe_ft.grpo import cli

    from .test_grpo import RECIPE, _trainer

    argv = ["--config", RECIPE, "--model_name_or_path", "jetmoe-ft/tiny", "--routing_replay", "rollout"]
    assert cli([*argv, "--use_vllm", "true"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: routing_replay: rollout needs completions from our model's `generate`")
    recipe = tmp_path / "beams.yaml"
    recipe.write_text(Path(RECIPE).read_text() + "generation_kwargs: {num_beams: 2}\n")
    assert cli(["--config", str(recipe), *argv[2:]]) == 2
    assert "num_beams > 1" in capsys.readouterr().err.strip().splitlines()[-1]
    assert cli([*argv[:-1], "always"]) == 2
    assert "routing_replay" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="rollout_func"):
        _trainer(tmp_path, 0.01, beta=0.0, routing_replay="rollout", rollout_func=lambda prompts, trainer: {})
