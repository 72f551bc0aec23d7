"""Decoding: the per-call dispatch of the `auto` backend, static cache, torch.compile, batched generation,
compiled decoding (`CompiledDecoding`) and its fallback."""

from contextlib import nullcontext

import pytest
import torch
import transformers

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.modeling.modeling_jetmoe import JetMoeTopKGating

from .conftest import randomize_biases, reference_and_ours, tiny_kwargs

GREEDY = dict(do_sample=False, pad_token_id=0)


def _model(**overrides) -> JetMoeForCausalLM:
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(pad_token_id=0, **overrides)))
    randomize_biases(model)
    return model.eval()


def _left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(1, 128, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def _routings(model: torch.nn.Module) -> list[bool]:
    """Records, for every router call, whether its rows were grouped by expert (sorted)."""
    grouped = []
    for module in model.modules():
        if isinstance(module, JetMoeTopKGating):
            module.register_forward_hook(lambda m, args, out: grouped.append(out.routing.grouped))
    return grouped


def test_auto_decodes_unsorted_and_prefills_sorted_and_equals_the_loop():
    auto, loop = _model(), _model(moe_backend="loop")
    grouped = _routings(auto)
    ids, mask = _left_padded([9, 6])
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, **GREEDY)
    expected = loop.generate(
        input_ids=ids, attention_mask=mask, **kwargs, output_logits=True, return_dict_in_generate=True
    )
    got = auto.generate(
        input_ids=ids, attention_mask=mask, **kwargs, output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(got.sequences, expected.sequences)
    for mine, theirs in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    routers = 2 * auto.config.num_hidden_layers
    # prefill: 18 (token, slot) pairs > 4 experts, sorted; each decode step: 2 tokens x 2 slots <= 4, unsorted
    assert grouped[:routers] == [True] * routers
    assert grouped[routers:] == [False] * (len(grouped) - routers) and len(grouped) == 6 * routers


def test_few_rows_forward_and_backward_equal_transformers():
    """One and two tokens (decode-sized calls, unsorted rows) through the whole model, gradients included."""
    reference, ours = reference_and_ours(transformers.JetMoeForCausalLM, JetMoeForCausalLM)
    for length in (1, 2):
        ids = torch.randint(1, 128, (1, length))
        for model in (reference, ours):
            model.zero_grad()
            model(input_ids=ids, labels=torch.randint(1, 128, (1, length))).logits.sum().backward()
        theirs = dict(reference.named_parameters())
        for name, param in ours.named_parameters():
            if theirs[name].grad is None:
                assert param.grad is None or not param.grad.any(), name
            else:
                torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("left_padding", [False, True], ids=["unpadded", "left-padded"])
def test_static_cache_equals_the_dynamic_cache(left_padding):
    model = _model()
    ids, mask = _left_padded([8, 5] if left_padding else [8, 8], seed=3)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, **GREEDY)
    dynamic = model.generate(**kwargs)
    static = model.generate(**kwargs, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_compiled_forward_with_static_cache_equals_eager():
    """`torch.compile(fullgraph=True)` traces the whole forward (no graph break, no host sync) for prefill and
    decode, and generates the eager tokens with and without left padding. Dynamo's `eager` backend keeps
    the test fast; `make bench` runs inductor."""
    torch._dynamo.reset()
    model = _model()
    cases = [_left_padded([8, 8], seed=4), _left_padded([8, 5], seed=5)]
    expected = [
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **GREEDY)
        for ids, mask in cases
    ]
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager", dynamic=False)
    for (ids, mask), want in zip(cases, expected, strict=True):
        got = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=8,
            min_new_tokens=8,
            cache_implementation="static",
            **GREEDY,
        )
        assert torch.equal(got, want)


def test_batched_left_padded_generation_equals_one_by_one():
    model = _model()
    lengths = [3, 11, 7, 1, 9, 5, 12, 2, 8, 6, 10, 4, 12, 3, 7, 9]
    ids, mask = _left_padded(lengths, seed=6)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, **GREEDY)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    width = ids.shape[1]
    for row, length in enumerate(lengths):
        alone = model.generate(input_ids=ids[row : row + 1, width - length :], **kwargs)
        assert torch.equal(batched[row, width - length :], alone[0]), f"row {row}"


def _adapted(backend: str):
    from peft import LoraConfig, get_peft_model

    from jetmoe_ft.adapters.lora import register_expert_lora

    model = _model(moe_backend=backend, hidden_size=128, kv_channels=32, intermediate_size=128)
    targets = ["experts.input_linear", "experts.output_linear", "mlp.input_linear", "mlp.output_linear"]
    model = get_peft_model(model, register_expert_lora(LoraConfig(r=4, target_modules=targets)))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def test_expert_lora_goes_through_the_unsorted_rows():
    auto, loop = _adapted("auto"), _adapted("loop")
    ids = torch.randint(1, 128, (1, 2))
    outputs = [model(input_ids=ids).logits for model in (auto, loop)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for out in outputs:
        out.square().sum().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (auto, loop)]
    assert grads[0].keys() == grads[1].keys() and any(g is not None and g.any() for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_4bit_experts_go_through_the_unsorted_rows():
    pytest.importorskip("bitsandbytes")
    from jetmoe_ft.adapters.quantization import quantize_model_4bit

    auto, loop = (
        quantize_model_4bit(
            _model(moe_backend=backend, hidden_size=128, kv_channels=32), compute_dtype=torch.bfloat16
        )
        for backend in ("auto", "loop")
    )
    grouped = _routings(auto)
    ids = torch.randint(1, 128, (1, 1))
    with torch.no_grad():
        got, expected = (
            auto.to(torch.bfloat16)(input_ids=ids).logits,
            loop.to(torch.bfloat16)(input_ids=ids).logits,
        )
    assert grouped and not any(grouped)
    torch.testing.assert_close(got, expected)


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length,), generator=generator).tolist() for length in lengths]


def test_compiled_decoding_generates_the_eager_tokens_and_compiles_once():
    """`CompiledDecoding` (static cache, fullgraph-compiled decode steps, eager prefill) gives the eager greedy
    tokens in fp32, with left padding, in training mode as GRPO generates; prompts of other widths (one cache
    length) reuse the one graph. Dynamo's `eager` backend keeps the test fast; `make bench-grpo` runs inductor."""
    from torch._dynamo.utils import counters

    from jetmoe_ft.assets import load_tokenizer
    from jetmoe_ft.evaluation.generation import CompiledDecoding, generate_answers

    torch._dynamo.reset()
    counters.clear()
    model, tokenizer = _model(vocab_size=32000).train(), load_tokenizer()
    decoding = CompiledDecoding(model, backend="eager")
    for seed, lengths in enumerate(([5, 9, 7], [12, 3, 8])):
        prompts = _prompts(lengths, seed)
        eager = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
        compiled = generate_answers(
            model, tokenizer, prompts, max_new_tokens=8, batch_size=3, decoding=decoding
        )
        assert [a[0].token_ids for a in compiled] == [a[0].token_ids for a in eager]
    assert decoding.failed is None and counters["stats"]["unique_graphs"] == 1
    assert model.training and model.forward == model.__class__.forward.__get__(model)  # restored


def test_compiled_decoding_falls_back_to_eager_with_one_line(capsys):
    from jetmoe_ft.evaluation.generation import CompiledDecoding

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    model = _model()
    ids, mask = _left_padded([6, 4], seed=7)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, **GREEDY)
    want = model.generate(**kwargs)
    decoding = CompiledDecoding(model, backend=failing_backend)
    for _ in range(2):
        with decoding.active():
            got = model.generate(**kwargs, **decoding.generate_kwargs(ids.shape[1], 5))
        assert torch.equal(got, want)
    lines = [line for line in capsys.readouterr().out.splitlines() if "Compiled decoding" in line]
    assert len(lines) == 1 and "no compiler here" in lines[0] and lines[0].endswith("decoding eagerly.")
    assert decoding.generate_kwargs(6, 5) == {"cache_implementation": None}


def test_rollout_routing_records_compiled_decoding_as_eager():
    """The rollout record (experts of every router, sampled tokens' log-probs) is read from the causal LM's
    outputs by hooks around the compiled forward: the same under compiled decoding as eager."""
    from jetmoe_ft.evaluation.generation import CompiledDecoding
    from jetmoe_ft.training.rollout_routing import RolloutRouting

    torch._dynamo.reset()
    model = _model().train()
    routing, decoding = RolloutRouting(model), CompiledDecoding(model, backend="eager")
    ids, mask = _left_padded([7, 4, 6], seed=8)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, **GREEDY)
    records = []
    for fast in (False, True):
        with torch.no_grad(), routing.generation(), decoding.active() if fast else nullcontext():
            extra = decoding.generate_kwargs(ids.shape[1], 6) if fast else {}
            out = model.generate(**kwargs, **extra)
        records.append(routing.take_generation(out[:, ids.shape[1] :].tolist(), pad_id=0))
    assert decoding.failed is None
    assert torch.equal(records[0]["rollout_experts"], records[1]["rollout_experts"])
    torch.testing.assert_close(records[0]["rollout_log_probs"], records[1]["rollout_log_probs"])


def test_chat_and_eval_gen_compile_flags_answer_as_eager(tmp_path, monkeypatch, capsys):
    """`--compile` in `jetmoe-ft chat` and `eval-gen` decodes through `CompiledDecoding` (here with dynamo's
    `eager` backend, for speed) and gives the eager greedy answers."""
    import json

    from jetmoe_ft.assets import load_tokenizer
    from jetmoe_ft.evaluation import chat, eval_gen
    from jetmoe_ft.evaluation.generation import CompiledDecoding

    torch._dynamo.reset()
    used = []

    def recorded(model, **kwargs):
        used.append(CompiledDecoding(model, backend="eager"))
        return used[-1]

    for module in (chat, eval_gen):
        monkeypatch.setattr(module, "CompiledDecoding", recorded)
    model_dir = tmp_path / "model"
    _model(vocab_size=32000, bos_token_id=1, eos_token_id=2).save_pretrained(model_dir)
    load_tokenizer().save_pretrained(model_dir)
    answers = {}
    for flag in ([], ["--compile"]):
        capsys.readouterr()
        argv = ["--model", str(model_dir), "--prompt", "Hello there", "--max_new_tokens", "6"]
        assert chat.main(argv + flag) == 0
        out = tmp_path / f"eval{len(flag)}"
        eval_gen.main(
            ["--model", str(model_dir), "--baseline", str(model_dir), "--dataset_name", "chatterbot"]
            + ["--max_samples", "3", "--max_new_tokens", "5", "--bootstrap", "10", "--no_instructions"]
            + ["--output_dir", str(out), *flag]
        )
        rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
        answers[bool(flag)] = (capsys.readouterr().out.splitlines()[0], [row["answer"] for row in rows])
    assert answers[True] == answers[False]
    assert len(used) == 3 and all(decoding.failed is None for decoding in used)  # chat, eval-gen's two sides
