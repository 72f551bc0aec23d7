import pytest
import torch

from jetmoe_ft.modeling import JetMoeConfig
from jetmoe_ft.modeling.experts import (
    EXPERT_BACKENDS,
    default_row_multiple,
    few_rows,
    grouped_mm_expert_linear,
    loop_expert_linear,
    resolve_backend,
    route_rows,
    rows_expert_linear,
    rows_to_slots,
    sort_by_expert,
    token_rows,
)
from jetmoe_ft.modeling.modeling_jetmoe import JetMoeMoE

from .conftest import tiny_kwargs


def _random_choice(num_tokens, num_experts, top_k, seed=0, skip_expert=None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e9  # an expert nobody picks: an empty group
    return logits.topk(top_k, dim=-1).indices


@pytest.mark.parametrize("row_multiple", [1, 4, 64])
def test_sort_by_expert_layout(row_multiple):
    num_experts, top_k = 6, 2
    index = _random_choice(37, num_experts, top_k, skip_expert=3)
    routing = sort_by_expert(index, num_experts, row_multiple)
    flat = index.reshape(-1)
    # every (token, slot) pair sits in exactly one row, and that row holds it
    assert torch.equal(routing.row_slot[routing.slot_row], torch.arange(flat.numel()))
    assert torch.equal(routing.expert_counts, torch.bincount(flat, minlength=num_experts))
    ends = routing.group_ends.tolist()
    starts = [0, *ends[:-1]]
    assert ends[-1] == routing.row_slot.numel()
    for expert, (start, end) in enumerate(zip(starts, ends, strict=True)):
        rows = routing.slot_row[flat == expert]
        assert ((rows >= start) & (rows < end)).all()
        if expert < num_experts - 1:
            assert (end - start) % row_multiple == 0
            assert end - start - len(rows) < row_multiple
    assert ends[-1] % row_multiple == 0
    assert torch.equal(routing.row_token, routing.row_slot // top_k)


@pytest.mark.parametrize("backend", sorted(EXPERT_BACKENDS))
@pytest.mark.parametrize("row_multiple", [1, 8])
def test_backends_match_a_plain_per_token_computation(backend, row_multiple):
    """Each backend, forward and backward, against weight[e] @ x for every (token, expert) pair."""
    num_tokens, num_experts, top_k, d_in, d_out = 50, 5, 2, 12, 8
    index = _random_choice(num_tokens, num_experts, top_k, seed=1, skip_expert=2)
    x = torch.randn(num_tokens, d_in, requires_grad=True)
    weight = torch.randn(num_experts, d_out, d_in, requires_grad=True)
    routing = sort_by_expert(index, num_experts, row_multiple)

    out = EXPERT_BACKENDS[backend](x[routing.row_token], weight, routing)[routing.slot_row]
    expected = torch.einsum("nkoi,ni->nko", weight[index], x).reshape(-1, d_out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weight), upstream)
    expected_grads = torch.autograd.grad(expected, (x, weight), upstream)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["grouped_mm", "auto"])
def test_moe_layer_backends_agree_with_the_loop(backend):
    torch.manual_seed(0)
    reference = JetMoeMoE(JetMoeConfig(**tiny_kwargs(moe_backend="loop")))
    fast = JetMoeMoE(JetMoeConfig(**tiny_kwargs(moe_backend=backend)))
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.1)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(3, 11, 64, requires_grad=True)
    out_ref, logits_ref = reference(x)
    out_fast, logits_fast = fast(x)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_fast, logits_ref)
    upstream = torch.randn_like(out_ref)
    (out_ref * upstream).sum().backward()
    (out_fast * upstream).sum().backward()
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fast_path_has_no_host_sync():
    """The grouped_mm layer traces into one graph: no `.tolist()`, no data-dependent shapes."""
    torch._dynamo.reset()
    layer = JetMoeMoE(JetMoeConfig(**tiny_kwargs(moe_backend="grouped_mm")))
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.1)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(compiled(x)[0], layer(x)[0])


def test_loop_is_the_backend_where_grouped_mm_cannot_run():
    weight = torch.empty(4, 16, 32)
    assert resolve_backend("auto", weight, torch.float32) is grouped_mm_expert_linear
    assert resolve_backend("auto", weight, torch.float64) is loop_expert_linear
    assert resolve_backend("auto", torch.empty(4, 7, 32), torch.float32) is loop_expert_linear  # unaligned
    assert resolve_backend("loop", weight, torch.float32) is loop_expert_linear
    assert default_row_multiple(torch.device("cpu"), torch.bfloat16, 4096, 8) == 64
    assert default_row_multiple(torch.device("cpu"), torch.bfloat16, 4, 8) == 1  # decoding: no padding
    assert default_row_multiple(torch.device("cpu"), torch.float32, 4096, 8) == 1


def test_unsorted_rows_match_a_plain_per_token_computation():
    """`route_rows` (few pairs, no sort): the rows backend forward and backward, eager and traced."""
    num_tokens, num_experts, top_k, d_in, d_out = 3, 8, 2, 16, 12
    index = _random_choice(num_tokens, num_experts, top_k, seed=2)
    routing = route_rows(index, num_experts)
    assert (
        not routing.grouped and few_rows(index.numel(), num_experts) and not few_rows(9 * top_k, num_experts)
    )
    assert torch.equal(routing.expert_counts, torch.bincount(index.reshape(-1), minlength=num_experts))
    weight = torch.randn(num_experts, d_out, d_in, requires_grad=True)
    for backend in (
        "loop",
        "grouped_mm",
        "auto",
    ):  # whatever the layer's backend, unsorted rows take this one
        assert resolve_backend(backend, weight, torch.float32, routing) is rows_expert_linear
    x = torch.randn(num_tokens, d_in, requires_grad=True)
    expected = torch.einsum("nkoi,ni->nko", weight[index], x).reshape(-1, d_out)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight), upstream)

    def forward(x, weight):
        return rows_to_slots(rows_expert_linear(token_rows(x, routing), weight, routing), routing)

    traced = torch.compile(forward, backend="aot_eager", fullgraph=True)  # the compiled, fused formulation
    for run in (forward, traced):
        out = run(x, weight)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out, (x, weight), upstream)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
