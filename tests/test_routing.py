import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.modeling.routing import (
    KINDS,
    RoutingStats,
    attach_routing_hooks,
    find_routers,
    plot_expert_load,
)
from jetmoe_ft.training.routing_health import RoutingHealthCallback
from jetmoe_ft.training.trainers import JetMoeTrainerMixin

from .conftest import randomize_biases, tiny_kwargs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _model(**overrides):
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(**overrides)))
    randomize_biases(model)
    return model


def _direct_stats(router_logits, top_k, num_experts, token_mask=None):
    """Selections, probability sums, entropy sums and tokens per router, computed from the model's outputs."""
    selections, prob_sums, entropy_sums, tokens = [], [], [], []
    for logits in router_logits:
        keep = (
            torch.ones(logits.shape[0], dtype=torch.bool)
            if token_mask is None
            else token_mask.reshape(-1).bool()
        )
        logits = logits.detach()[keep].double()
        probs = logits.softmax(-1)
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        selections.append(torch.bincount(chosen, minlength=num_experts).double())
        prob_sums.append(probs.sum(0))
        entropy_sums.append(-(probs * probs.log()).sum())
        tokens.append(float(keep.sum()))
    shape = (-1, len(KINDS))
    return (
        torch.stack(selections).view(*shape, num_experts),
        torch.stack(prob_sums).view(*shape, num_experts),
        torch.stack(entropy_sums).view(shape),
        torch.tensor(tokens, dtype=torch.float64).view(shape),
    )


def _assert_stats_equal(stats, expected):
    selections, prob_sum, entropy_sum, tokens = expected
    torch.testing.assert_close(stats.selections, selections, rtol=0, atol=0)
    torch.testing.assert_close(stats.prob_sum, prob_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.entropy_sum, entropy_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.tokens, tokens, rtol=0, atol=0)


def test_stats_match_the_router_logits_the_model_returns():
    model = _model().eval()
    ids = torch.randint(1, 128, (3, 10))
    stats = RoutingStats.for_model(model)
    assert (stats.num_layers, stats.num_experts) == (2, 4)
    counts = {}
    routers = find_routers(model)
    for layer, kind, router in routers:
        router.register_forward_hook(
            lambda m, a, out, key=(layer, kind): counts.__setitem__(key, out.routing.expert_counts)
        )
    with attach_routing_hooks(model, stats), torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    _assert_stats_equal(stats, _direct_stats(out.router_logits, 2, 4))
    for (layer, kind), expert_counts in counts.items():  # the experts the model actually dispatched to
        assert stats.selections[layer, KINDS.index(kind)].tolist() == expert_counts.double().tolist()
    load = stats.expert_load()
    assert load.shape == (2, 2, 4)
    torch.testing.assert_close(load.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(stats.mean_gate().sum(-1), torch.ones(2, 2))
    entropy = stats.entropy()
    assert entropy.shape == (2, 2) and ((entropy > 0) & (entropy <= 1)).all()
    torch.testing.assert_close(stats.entropy(normalized=False), entropy * math.log(4))


def test_entropy_is_normalised_by_log_num_experts():
    stats = RoutingStats(num_layers=1, num_experts=4)
    stats.update(0, "moe", torch.zeros(5, 4), top_k=2)
    torch.testing.assert_close(stats.entropy()[0, 1], torch.tensor(1.0))
    torch.testing.assert_close(stats.mean_gate()[0, 1], torch.full((4,), 0.25))
    assert stats.tokens[0, 0] == 0 and stats.entropy()[0, 0] == 0  # the MoA router saw nothing
    peaked = RoutingStats(num_layers=1, num_experts=4)
    peaked.update(0, "moa", torch.tensor([[30.0, 0.0, 0.0, -float("inf")]]), top_k=1)
    assert peaked.entropy()[0, 0] < 1e-9
    assert peaked.expert_load()[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_padding_is_left_out_and_unmasked_batches_count_every_token():
    model = _model().eval()
    ids = torch.randint(1, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 2:] = 0
    stats = RoutingStats.for_model(model)
    with attach_routing_hooks(model, stats), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        assert stats.tokens.unique().tolist() == [7.0]
        _assert_stats_equal(stats, _direct_stats(out.router_logits, 2, 4, token_mask=mask))
        stats.reset()
        model(input_ids=ids)  # padding-free / packed: no mask, every token counts
    assert stats.tokens.unique().tolist() == [16.0]


def test_removed_hooks_stop_counting():
    model = _model().eval()
    stats = RoutingStats.for_model(model)
    hooks = attach_routing_hooks(model, stats)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 128, (1, 6)))
        hooks.remove()
        model(input_ids=torch.randint(1, 128, (1, 6)))
    assert stats.tokens.unique().tolist() == [6.0]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_replay_is_not_counted_twice(use_reentrant):
    model = _model().train()
    ids = torch.randint(1, 128, (2, 8))
    calls = []
    for _, _, router in find_routers(model):
        router.register_forward_hook(lambda *args: calls.append(1))

    def run():
        stats = RoutingStats.for_model(model)
        calls.clear()
        with attach_routing_hooks(model, stats):
            model(input_ids=ids, labels=ids).loss.backward()
        return stats, len(calls)

    plain, plain_calls = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed, checkpointed_calls = run()
    assert checkpointed_calls == 2 * plain_calls  # the backward really replayed every router
    for mine, reference in zip(checkpointed._tensors(), plain._tensors(), strict=True):
        torch.testing.assert_close(mine, reference)


def test_routers_are_found_through_peft_wrappers():
    from peft import LoraConfig, get_peft_model

    model = _model().eval()
    ids = torch.randint(1, 128, (2, 6))
    plain = RoutingStats.for_model(model)
    with attach_routing_hooks(model, plain), torch.no_grad():
        model(input_ids=ids)
    # LoRA starts as the identity, and a trainable router copy routes exactly like the original.
    peft_model = get_peft_model(model, LoraConfig(target_modules=["kv_proj"], modules_to_save=["router"]))
    routers = find_routers(peft_model)
    assert {(layer, kind) for layer, kind, _ in routers} == {(0, "moa"), (0, "moe"), (1, "moa"), (1, "moe")}
    wrapped = RoutingStats.for_model(peft_model)
    with attach_routing_hooks(peft_model, wrapped), torch.no_grad():
        peft_model(input_ids=ids)
    torch.testing.assert_close(wrapped.selections, plain.selections)
    torch.testing.assert_close(wrapped.prob_sum, plain.prob_sum)


def test_to_dict_is_json_and_plot_writes_a_png(tmp_path):
    stats = RoutingStats(num_layers=2, num_experts=3)
    stats.update(1, "moa", torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), top_k=1)
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["layers"][1]["moa"]["load"] == [0.5, 0.0, 0.5]
    assert data["layers"][1]["moa"]["selections"] == [1, 0, 1]
    assert data["layers"][0]["moe"]["tokens"] == 0
    path = plot_expert_load(stats.expert_load().numpy(), tmp_path / "plots" / "load.png", "test")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def _all_reduce_worker(rank, world_size, init_file):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    stats = RoutingStats(num_layers=1, num_experts=2)
    stats.update(0, "moe", torch.tensor([[1.0, 0.0]] * (rank + 1)), top_k=1)
    stats.all_reduce_()
    assert stats.selections[0, 1].tolist() == [3.0, 0.0]
    assert stats.tokens[0, 1].item() == 3.0
    torch.distributed.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init")), nprocs=2)


class _Recorder(TrainerCallback):
    """Stands where transformers puts the reporting integrations (TensorBoard, W&B, ...)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(tmp_path, install: bool):
    model = _model(num_hidden_layers=2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (6, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    if install:  # the trainer layer every loop uses
        trainer = type("Trainer", (JetMoeTrainerMixin, Trainer), {})(
            model=model, args=args, train_dataset=data
        )
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RoutingHealthCallback()])
    recorder = _Recorder()
    trainer.callback_handler.callbacks.insert(1, recorder)
    trainer.train()
    return trainer, recorder, int(mask.sum())


@pytest.mark.parametrize("install", [True, False], ids=["trainer_layer", "callbacks_arg"])
def test_trainer_logs_routing_and_writes_the_report(tmp_path, install):
    trainer, recorder, real_tokens = _train(tmp_path, install)
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_logs) == 3
    for entry in step_logs:
        for layer in range(2):
            for kind in KINDS:
                name = f"routing/layer{layer}.{kind}"
                shares = [entry[f"{name}.load.e{e}"] for e in range(4)]
                assert sum(shares) == pytest.approx(1.0)
                assert entry[f"{name}.load_max"] == max(shares) and entry[f"{name}.load_min"] == min(shares)
                assert 0 < entry[f"{name}.entropy"] <= 1
    reached_reporters = any("routing/layer0.moe.entropy" in logs for logs in recorder.logs)
    assert reached_reporters == install

    report = json.loads((tmp_path / "routing.json").read_text())
    assert [entry["step"] for entry in report["history"]] == [1, 2, 3]
    total = report["total"]["layers"]
    assert total[1]["moe"]["tokens"] == real_tokens  # every real token once, padding left out
    assert sum(entry["layers"][0]["moa"]["tokens"] for entry in report["history"]) == real_tokens
    assert sum(total[0]["moa"]["load"]) == pytest.approx(1.0)
    png = (tmp_path / "routing_load.png").read_bytes()
    assert len(png) > 1000 and png.startswith(PNG_SIGNATURE)


def test_training_only_counts_training_forwards_with_gradients_even_inside_reentrant_checkpointing():
    model = _model(num_hidden_layers=2)
    ids = torch.randint(1, 128, (2, 6))
    stats = RoutingStats.for_model(model)
    model.train()
    with attach_routing_hooks(model, stats, training_only=True):
        with torch.no_grad():  # a generation or reference pass in training mode: not counted
            model(input_ids=ids)
        assert stats.tokens.sum() == 0
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model(input_ids=ids, labels=ids).loss.backward()  # checkpointed layers run without gradients inside
    assert torch.all(stats.tokens == ids.numel())  # every router, every token once
