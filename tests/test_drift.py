"""Routing drift: hand cases, zero against itself, non-zero after training, the training-time probe."""

import copy
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.training.drift import (
    RoutingDriftProbe,
    collect_router_logits,
    pad_token_ids,
    plot_drift,
    probe_token_ids,
    routing_drift,
)

from .conftest import tiny_kwargs

TOKENS = [[5, 9, 17, 3, 44, 2, 8], [7, 7, 1, 90], [11, 12, 13, 14, 15, 16, 17, 18]]


def _model(seed: int = 0) -> JetMoeForCausalLM:
    torch.manual_seed(seed)
    return JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs()))


def _train(model, steps: int = 5, lr: float = 0.05) -> None:
    batch = pad_token_ids(TOKENS)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_drift_on_hand_made_logits():
    # 4 tokens, 3 experts, top-1: tokens 0 and 1 keep their expert, 2 and 3 move from expert 0 to 2
    start = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    tuned = start.clone()
    tuned[2] = torch.tensor([0.0, 0.0, 1.0])
    tuned[3] = torch.tensor([0.0, 1.0, 2.0])
    drift = routing_drift({(0, "moa"): start, (0, "moe"): start}, {(0, "moa"): start, (0, "moe"): tuned}, 1)
    assert drift.topk_kept.tolist() == [[1.0, 0.5]]
    p, q = torch.softmax(start.double(), -1), torch.softmax(tuned.double(), -1)
    expected_kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert drift.kl[0, 0] == 0.0 and drift.kl[0, 1] == pytest.approx(expected_kl)
    assert drift.load_start[0, 1].tolist() == [0.75, 0.25, 0.0]
    assert drift.load_change[0, 1].tolist() == pytest.approx([-0.5, 0.0, 0.5])
    # a top-2 set in another order is the same set
    swapped = torch.tensor([[1.0, 2.0, 0.0]])
    assert (
        routing_drift({(0, "moe"): torch.tensor([[2.0, 1.0, 0.0]])}, {(0, "moe"): swapped}, 2).topk_kept[0, 1]
        == 1.0
    )


def test_a_model_against_itself_has_exactly_zero_drift():
    model = _model()
    batch = pad_token_ids(TOKENS)
    logits = collect_router_logits(model, [batch])
    assert len(logits) == 2 * model.config.num_hidden_layers
    assert all(v.shape == (sum(map(len, TOKENS)), 4) for v in logits.values())  # padding left out
    drift = routing_drift(logits, collect_router_logits(model, [batch]), model.config.num_experts_per_tok)
    assert (drift.topk_kept == 1.0).all() and (drift.kl == 0.0).all()
    assert (drift.load_change == 0.0).all()
    assert np.allclose(drift.load_start.sum(-1), 1.0)


def test_drift_after_training_is_non_zero_and_plotted(tmp_path):
    model = _model()
    start = copy.deepcopy(model)
    _train(model)
    batch = pad_token_ids(TOKENS)
    drift = routing_drift(
        collect_router_logits(start, [batch]),
        collect_router_logits(model, [batch]),
        model.config.num_experts_per_tok,
    )
    assert (drift.kl > 0).all() and drift.topk_kept.min() < 1.0
    assert np.abs(drift.load_change).max() > 0
    assert model.training  # the caller's mode is restored
    summary = drift.to_dict()["summary"]
    assert 0 <= summary["moe_topk_kept"] < 1 and summary["moe_kl"] > 0
    assert plot_drift(drift, tmp_path / "drift.png").stat().st_size > 5000


def test_probe_with_full_weights_starts_at_zero_and_logs_drift():
    model = _model()
    probe = RoutingDriftProbe(model, TOKENS)
    values = probe.values(model)
    assert set(values) == {
        f"routing/layer{i}.{kind}.{name}"
        for i in range(2)
        for kind in ("moa", "moe")
        for name in ("topk_kept", "kl")
    }
    assert all(values[key] == (1.0 if key.endswith("kept") else 0.0) for key in values)
    _train(model)
    after = probe.values(model)
    assert any(after[key] > 0 for key in after if key.endswith(".kl"))
    assert all(math.isfinite(v) for v in after.values())


def test_probe_with_lora_compares_against_the_adapter_disabled_pass():
    model = get_peft_model(_model(), LoraConfig(target_modules=["kv_proj", "layer"], r=4, lora_dropout=0.0))
    probe = RoutingDriftProbe(model, TOKENS)
    assert all(v == 0.0 for k, v in probe.values(model).items() if k.endswith(".kl"))  # B = 0 at the start
    _train(model, lr=0.5)
    assert any(v > 0 for k, v in probe.values(model).items() if k.endswith(".kl"))
    with model.disable_adapter():  # the frozen base still routes like the start
        assert all(v == 0.0 for k, v in probe.values(model).items() if k.endswith(".kl"))


def test_probe_token_ids_from_training_rows():
    from datasets import Dataset

    sft = Dataset.from_list([{"input_ids": list(range(1, 200))}, {"input_ids": [4, 5]}])
    assert [len(ids) for ids in probe_token_ids(sft, count=8, max_length=64)] == [64, 2]
    dpo = Dataset.from_list(
        [{"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4]}]
    )
    assert probe_token_ids(dpo) == [[1, 2, 3]]
    with pytest.raises(ValueError, match="No token ids"):
        probe_token_ids(Dataset.from_list([{"prompt": "hi"}]))
