import math

import torch
import torch.nn.functional as F

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.modeling import jetmoe_router_loss

from .conftest import randomize_biases, tiny_kwargs


def original_router_loss(logits: torch.Tensor, top_k: int, z_coef: float = 0.1) -> torch.Tensor:
    """One router's loss written as in myshell-ai/JetMoE `utils/gate.py` `compute_aux_loss`."""
    num_experts = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    top_k_logits, top_k_indices = logits.topk(top_k, dim=1)
    top_k_gates = torch.softmax(top_k_logits, dim=1)
    gates = torch.zeros_like(probs).scatter(1, top_k_indices, top_k_gates)
    count = logits.size(0)
    probs = probs.sum(0)
    freq = (gates > 0).float().sum(0)
    lsesq = (torch.log(torch.exp(logits).sum(dim=-1)) ** 2).sum()
    switchloss = num_experts * (F.normalize(probs, p=1, dim=0) * F.normalize(freq, p=1, dim=0)).sum()
    zloss = lsesq / count
    return switchloss + z_coef * zloss


def _model(**overrides):
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(**overrides)))
    randomize_biases(model)
    return model


def test_outputs_carry_every_router_and_the_original_loss():
    model = _model(num_experts_per_tok=2)
    ids = torch.randint(1, 128, (2, 10))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 * model.config.num_hidden_layers  # MoA and MoE per layer
    assert all(logits.shape == (20, 4) and logits.dtype == torch.float32 for logits in out.router_logits)
    expected = sum(original_router_loss(logits, 2) for logits in out.router_logits)
    torch.testing.assert_close(out.aux_loss, expected)
    lm_only = model(input_ids=ids, labels=ids)
    assert lm_only.aux_loss is None and lm_only.router_logits is None
    torch.testing.assert_close(out.loss, lm_only.loss + 0.01 * expected)


def test_z_loss_weight_and_aux_coefficient_come_from_the_config():
    model = _model(router_z_loss_coef=0.5, aux_loss_coef=0.2, num_experts_per_tok=1)
    ids = torch.randint(1, 128, (2, 6))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    expected = sum(original_router_loss(logits, 1, z_coef=0.5) for logits in out.router_logits)
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss + 0.2 * expected)


def test_padding_can_be_left_out_of_the_statistics():
    ids = torch.randint(1, 128, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    counted = _model()(input_ids=ids, attention_mask=mask, output_router_logits=True)
    ignored = _model(router_loss_ignore_padding=True)(
        input_ids=ids, attention_mask=mask, output_router_logits=True
    )
    real = mask.reshape(-1).bool()
    expected = sum(original_router_loss(logits[real], 2) for logits in ignored.router_logits)
    torch.testing.assert_close(ignored.aux_loss, expected)
    assert not torch.allclose(counted.aux_loss, ignored.aux_loss)


def test_router_loss_trains_the_routers():
    model = _model()
    ids = torch.randint(1, 128, (2, 8))
    model(input_ids=ids, output_router_logits=True).aux_loss.backward()
    router = model.model.layers[0].mlp.router.layer.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_balanced_uniform_router_scores_one_per_router():
    """Equal logits: switch = E * sum(1/E * 1/E) = 1, z = log(E)^2."""
    logits = torch.zeros(16, 4)
    loss = jetmoe_router_loss((logits, logits), top_k=2, z_loss_coef=0.1)
    torch.testing.assert_close(loss, torch.tensor(2 * (1 + 0.1 * math.log(4.0) ** 2)))
