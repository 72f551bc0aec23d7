import gc

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.modeling.lm_head_loss import IGNORE_INDEX, LMHeadLoss, causal_lm_loss, score_tokens
from tests.conftest import tiny_kwargs

B, T, H, V = 2, 24, 16, 50
EXACT = dict(rtol=1e-5, atol=1e-6)


def make_inputs(dtype=torch.float32, bias=False):
    """Hidden states, a head and labels with ignored runs: a prompt, and all of row 1's second half."""
    hidden = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype).requires_grad_()
    head_bias = torch.randn(V, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = IGNORE_INDEX
    labels[1, T // 2 :] = IGNORE_INDEX
    return hidden, weight, head_bias, labels


def per_token_logps(hidden, weight, targets, chunk_size, bias=None):
    """log p(target) per token, with gradient: what DPO, KTO and ORPO sum per sequence."""
    return score_tokens(hidden, weight, targets, chunk_size, bias, statistics=False).log_probs


def grads_of(loss, *tensors):
    """The gradients of `loss` with respect to `tensors` (None for those that are None)."""
    present = [t for t in tensors if t is not None]
    found = iter(torch.autograd.grad(loss, present))
    return [None if t is None else next(found) for t in tensors]


def reference_loss(hidden, weight, labels, bias=None, **kwargs):
    """The model's unchunked path: `lm_head(hidden)` then transformers' `ForCausalLMLoss`."""
    return ForCausalLMLoss(F.linear(hidden, weight, bias), labels, vocab_size=weight.shape[0], **kwargs)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 12, 1000])  # 7 does not divide 35 rows; 1000 > all rows
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_gradients_equal_the_unchunked_loss(chunk_size, bias):
    hidden, weight, head_bias, labels = make_inputs(bias=bias)
    expected = reference_loss(hidden, weight, labels, head_bias)
    got = causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size, bias=head_bias)
    assert isinstance(got, LMHeadLoss) and got.correct is None and got.entropy_sum is None
    torch.testing.assert_close(got.loss, expected, rtol=0, atol=1e-5)
    for g, e in zip(
        grads_of(got.loss, hidden, weight, head_bias),
        grads_of(expected, hidden, weight, head_bias),
        strict=True,
    ):
        if e is not None:
            torch.testing.assert_close(g, e, **EXACT)
    assert got.num_tokens.item() == (labels[:, 1:] != IGNORE_INDEX).sum().item()


@pytest.mark.parametrize("num_items", [7, torch.tensor(40)])
def test_num_items_in_batch_divides_the_summed_loss(num_items):
    hidden, weight, _, labels = make_inputs()
    expected = reference_loss(hidden, weight, labels, num_items_in_batch=num_items)
    got = causal_lm_loss(hidden, weight, labels, num_items_in_batch=num_items, chunk_size=4).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for g, e in zip(grads_of(got, hidden, weight), grads_of(expected, hidden, weight), strict=True):
        torch.testing.assert_close(g, e, **EXACT)


def test_shift_labels_are_used_as_given():
    hidden, weight, _, labels = make_inputs()
    shift_labels = torch.randint(0, V, (B, T))
    shift_labels[0, ::3] = IGNORE_INDEX
    expected = reference_loss(hidden, weight, labels, shift_labels=shift_labels)
    got = causal_lm_loss(hidden, weight, labels, shift_labels=shift_labels, chunk_size=8).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_no_scored_token_gives_transformers_nan_or_zero_with_num_items():
    hidden, weight, _, labels = make_inputs()
    labels = torch.full_like(labels, IGNORE_INDEX)
    assert (
        reference_loss(hidden, weight, labels).isnan() and causal_lm_loss(hidden, weight, labels).loss.isnan()
    )
    got = causal_lm_loss(hidden, weight, labels, num_items_in_batch=3, metrics=True)
    assert got.loss.item() == 0 and got.num_tokens.item() == 0 and got.correct.item() == 0
    grad_hidden, grad_weight = grads_of(got.loss, hidden, weight)
    assert not grad_hidden.any() and not grad_weight.any()


def test_metrics_equal_direct_computation():
    hidden, weight, _, labels = make_inputs()
    hidden = hidden.detach()
    labels[:, 1::2] = (hidden[:, :-1] @ weight.detach().T).argmax(-1)[:, 0::2]  # every other one correct
    got = causal_lm_loss(hidden, weight, labels, chunk_size=6, metrics=True)
    logits, targets = (hidden @ weight.detach().T)[:, :-1], labels[:, 1:]
    valid = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & valid
    entropy = torch.distributions.Categorical(logits=logits).entropy()[valid].sum()
    assert got.correct.item() == correct.sum().item() > 0
    torch.testing.assert_close(got.entropy_sum, entropy, rtol=1e-5, atol=1e-4)
    assert not got.entropy_sum.requires_grad and got.loss.requires_grad


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_per_token_logps_equal_log_softmax_gather(chunk_size):
    hidden, weight, head_bias, labels = make_inputs(bias=True)
    targets = labels[:, 1:]
    logits = F.linear(hidden[:, :-1], weight, head_bias).log_softmax(-1)
    expected = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != IGNORE_INDEX)
    got = per_token_logps(hidden[:, :-1], weight, targets, chunk_size=chunk_size, bias=head_bias)
    assert got.shape == targets.shape and got.dtype == torch.float32
    assert (got[targets == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(got, expected, **EXACT)
    # DPO weighs each sequence's summed log-prob differently: a per-token upstream gradient.
    upstream = torch.randn(B, 1)
    got_grads = grads_of((got.sum(-1, keepdim=True) * upstream).sum(), hidden, weight, head_bias)
    expected_grads = grads_of((expected.sum(-1, keepdim=True) * upstream).sum(), hidden, weight, head_bias)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, **EXACT)


def test_bf16_inputs_are_close_to_fp32_and_keep_their_dtype():
    hidden, weight, _, labels = make_inputs()
    expected = reference_loss(hidden, weight, labels)
    expected_grads = grads_of(expected, hidden, weight)
    hidden16, weight16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    got = causal_lm_loss(hidden16, weight16, labels, chunk_size=5).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=0)
    for g, e, t in zip(grads_of(got, hidden16, weight16), expected_grads, (hidden16, weight16), strict=True):
        assert g.dtype == t.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e, rtol=0.05, atol=0.05 * e.abs().max().item())


@pytest.mark.parametrize("loss_kind", ["loss", "logps"])
def test_autocast_matches_the_autocast_model_path_and_gradients_reach_fp32_params(loss_kind):
    hidden, weight, _, labels = make_inputs()

    def loss_of(logps):
        return -(logps.sum(-1) * torch.tensor([1.0, -0.5])).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        if loss_kind == "loss":
            expected = reference_loss(hidden, weight, labels)
            got = causal_lm_loss(hidden, weight, labels, chunk_size=7).loss
        else:
            logits = F.linear(hidden[:, :-1], weight).float().log_softmax(-1)
            targets = labels[:, 1:]
            logps = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != IGNORE_INDEX)
            expected = loss_of(logps)
            got = loss_of(per_token_logps(hidden[:, :-1], weight, targets, chunk_size=7))
    # The same bf16 matmul, then fp32: equal up to the order of the fp32 reductions.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads_of(got, hidden, weight), grads_of(expected, hidden, weight), strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.02, atol=0.02 * e.abs().max().item())


def test_weight_tied_to_the_embeddings_gets_both_gradients():
    embedding = torch.nn.Embedding(V, H)
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX

    def grad_of_tied(loss_fn):
        embedding.weight.grad = None
        hidden = torch.tanh(embedding(ids))
        loss_fn(hidden, embedding.weight, labels).backward()
        return embedding.weight.grad.clone()

    expected = grad_of_tied(reference_loss)
    got = grad_of_tied(lambda h, w, y: causal_lm_loss(h, w, y, chunk_size=9).loss)
    torch.testing.assert_close(got, expected, **EXACT)
    assert embedding.weight.grad[ids[0, 0]].abs().sum() > 0


def test_jetmoe_model_loss_and_every_parameter_gradient_match():
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(output_router_logits=False))).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as JetMoE-8B
    ids = torch.randint(3, model.config.vocab_size, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :6] = IGNORE_INDEX  # a prompt
    params = [p for p in model.parameters() if p.requires_grad]

    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = causal_lm_loss(hidden, model.lm_head.weight, labels, chunk_size=8).loss
    got_grads = torch.autograd.grad(got, params, allow_unused=True)

    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, g, e in zip(names, got_grads, expected_grads, strict=True):
        assert (g is None) == (e is None), name
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def live_tensor_ids() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}


def largest_tensors(loss_fn):
    """(largest saved-for-backward tensor, largest new tensor Python holds) while `loss_fn`'s graph is alive."""
    saved, before = [], live_tensor_ids()

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    gc.collect()
    held = [o.numel() for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before]
    loss.backward()
    return max(saved, default=0), max(held)


@pytest.mark.parametrize("kind", ["loss", "logps"])
def test_no_tokens_by_vocab_tensor_is_kept_for_the_backward(kind):
    rows, vocab, width = 2 * 128, 1024, 8  # rows x vocab is far above vocab x width and rows x width
    hidden = torch.randn(2, 128, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 128))

    if kind == "loss":
        saved, held = largest_tensors(lambda: causal_lm_loss(hidden, weight, labels, chunk_size=32).loss)
    else:
        saved, held = largest_tensors(lambda: per_token_logps(hidden, weight, labels, chunk_size=32).sum())
    assert max(saved, held) <= vocab * width
    # The check sees the unchunked path's [rows, vocab] logits, so it can fail.
    unchunked_saved, _ = largest_tensors(lambda: reference_loss(hidden, weight, labels))
    assert unchunked_saved >= rows * vocab // 2


def test_second_backward_and_bad_chunk_size_fail_clearly():
    hidden, weight, _, labels = make_inputs()
    loss = causal_lm_loss(hidden, weight, labels).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_loss(hidden, weight, labels, chunk_size=0)


def test_no_grad_gives_the_same_loss():
    hidden, weight, _, labels = make_inputs()
    with torch.no_grad():
        got = causal_lm_loss(hidden, weight, labels, chunk_size=4, metrics=True)
        expected = reference_loss(hidden, weight, labels)
    assert not got.loss.requires_grad
    torch.testing.assert_close(got.loss, expected, rtol=0, atol=1e-5)
