import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM

from .conftest import randomize_biases, tiny_kwargs


def _model(**overrides):
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(**overrides)))
    randomize_biases(model)
    return model.train()


def _grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    model = _model()
    ids = torch.randint(1, 128, (2, 12))
    loss, grads = _grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = _grads(model, ids)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    assert any("router" in name for name in grads)  # the router loss reaches the routers through the replay
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_weights_run_and_stay_close_to_fp32():
    model = _model().eval()
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits
        bf16 = model.to(torch.bfloat16)(input_ids=ids).logits
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_bf16_autocast_training_step():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 128, (4, 16))
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.model.layers[0].mlp.input_linear.weight.grad.dtype == torch.float32
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_torch_compile_training_step_without_breaks_inside_a_decoder_layer():
    ids = torch.randint(1, 128, (2, 16))
    expected_loss, expected_grads = _grads(_model(moe_backend="grouped_mm"), ids)

    torch._dynamo.reset()
    model = _model(moe_backend="grouped_mm")
    layer_counter = CompileCounterWithBackend("aot_eager")
    for layer in model.model.layers:
        layer.compile(backend=layer_counter, fullgraph=True)  # fullgraph: any break inside a layer fails
    loss, grads = _grads(model, ids)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert layer_counter.frame_count == len(
        model.model.layers
    )  # one graph per layer (layer_idx is a constant)

    torch._dynamo.reset()
    model_counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_model(moe_backend="grouped_mm"), backend=model_counter)
    loss, grads = _grads(compiled, ids)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads["_orig_mod." + name], grad, atol=1e-4, rtol=1e-4, msg=name)
    print(f"graphs for a whole training step: {model_counter.frame_count}")
    assert model_counter.frame_count == 1
